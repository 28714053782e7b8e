"""moepatch: a config-driven patching layer over HuggingFace transformers MoE models.

Public API::

    handle = moepatch.apply(model)          # reads model.config.moepatch
    with moepatch.RoutingRecorder(model) as recorder: ...
    handle.remove()                          # the model is exactly as before
"""

from moepatch.compat import check_versions as _check_versions

_check_versions()

from model_patches.structure import MoELayer  # noqa: E402
from model_patches.structure import MoEModel  # noqa: E402
from model_patches.structure import describe  # noqa: E402
from moepatch._version import __version__  # noqa: E402
from moepatch.config import MoePatchConfig  # noqa: E402
from moepatch.config import RoutingStatsConfig  # noqa: E402
from moepatch.config import write_config  # noqa: E402
from moepatch.errors import MoePatchWarning  # noqa: E402
from moepatch.errors import UnsupportedModelError  # noqa: E402
from moepatch.install import install  # noqa: E402
from moepatch.install import uninstall  # noqa: E402
from moepatch.loading import from_pretrained  # noqa: E402
from moepatch.loading import load_config  # noqa: E402
from moepatch.models.llama_moe import register_llama_moe as _register_llama_moe  # noqa: E402
from moepatch.models.moduleformer import register_moduleformer as _register_moduleformer  # noqa: E402
from moepatch.patch import PatchHandle  # noqa: E402
from moepatch.patch import apply  # noqa: E402
from moepatch.patch import get_handle  # noqa: E402
from moepatch.patch import patched  # noqa: E402
from moepatch.recorder import RoutingRecorder  # noqa: E402

# AutoConfig / AutoModelForCausalLM know model_types "llama_moe" and "moduleformer" once moepatch is imported
_register_llama_moe()
_register_moduleformer()

__all__ = [
    "MoELayer",
    "MoEModel",
    "MoePatchConfig",
    "MoePatchWarning",
    "PatchHandle",
    "RoutingRecorder",
    "RoutingStatsConfig",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "describe",
    "from_pretrained",
    "get_handle",
    "install",
    "load_config",
    "patched",
    "uninstall",
    "write_config",
]
