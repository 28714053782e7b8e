"""moepatch: a config-driven patching layer over HuggingFace transformers MoE models.

Public API::

    handle = moepatch.apply(model)          # reads model.config.moepatch
    with moepatch.RoutingRecorder(model) as recorder: ...
    handle.remove()                          # the model is exactly as before
"""

import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys
from collections.abc import Sequence as _Sequence
from importlib.machinery import ModuleSpec as _ModuleSpec
from types import ModuleType as _ModuleType

from moepatch.compat import check_versions as _check_versions

_check_versions()

MOVED_MODULES = {
    "moepatch.tiny": "moepatch.testing.tiny",
    "moepatch.synthetic": "moepatch.data.synthetic",
    "moepatch.testing.synthetic": "moepatch.data.synthetic",
    "moepatch.sampling": "moepatch.mixing.update_rule",
    "moepatch.mixture": "moepatch.mixing.sampler",
    "moepatch.mixing.instruction_data": "moepatch.data.instruction",
    "moepatch.dynamic_sampling": "moepatch.mixing.callback",
    "moepatch.finetune": "moepatch.training.runner",
    "moepatch.mixing.finetune": "moepatch.training.runner",
    "moepatch.recorder": "moepatch.routing.recorder",
    "moepatch.freeze": "moepatch.routing.freeze",
    "moepatch.profiling": "moepatch.tools.c2r.profiling",
    "moepatch.placement": "moepatch.tools.c2r.placement",
    "moepatch.plots": "moepatch.tools.report",
    "moepatch.report": "moepatch.tools.report",
    "moepatch.testing.demo": "moepatch.demo.run",
    "moepatch.testing.demo_task_experts": "moepatch.demo.task_experts",
    **{f"moepatch.c2r.{name}": f"moepatch.tools.c2r.{name}"
       for name in ("profiling", "matrices", "placement", "traffic", "permutation", "pipeline")},
    **{f"moepatch.lora_experts.{name}": f"moepatch.tools.lora_experts.{name}"
       for name in ("allocate", "guilomo", "importers", "export", "merge")},
}
"""Import paths of earlier releases → where the module lives now.  ``import moepatch.sampling`` (and attribute
access ``moepatch.sampling``) gives the very module object at its new path, imported on first use."""


class _MovedModuleFinder(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """Resolves an earlier import path of :data:`MOVED_MODULES` to the module object at its new path."""

    def find_spec(self, fullname: str, path: _Sequence[str] | None = None, target: _ModuleType | None = None
                  ) -> _ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return _importlib_util.spec_from_loader(fullname, self)

    def create_module(self, spec: _ModuleSpec) -> _ModuleType:
        module = _importlib.import_module(MOVED_MODULES[spec.name])
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module: _ModuleType) -> None:
        # the import system stamped the alias's spec on the real module; give it back its own
        module.__spec__ = self._own_spec


if not any(isinstance(finder, _MovedModuleFinder) for finder in _sys.meta_path):
    _sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str) -> _ModuleType:
    """``moepatch.sampling`` and the other :data:`MOVED_MODULES` as attributes, imported on first use."""
    if f"moepatch.{name}" in MOVED_MODULES:
        return _importlib.import_module(f"moepatch.{name}")
    raise AttributeError(f"module 'moepatch' has no attribute {name!r}")

from model_patches.structure import MoELayer  # noqa: E402
from model_patches.structure import MoEModel  # noqa: E402
from model_patches.structure import describe  # noqa: E402
from moepatch._version import __version__  # noqa: E402
from moepatch.c2r.feature import C2R  # noqa: E402
from moepatch.config import MoePatchConfig  # noqa: E402
from moepatch.config import config_schema  # noqa: E402
from moepatch.config import write_config  # noqa: E402
from moepatch.errors import MoePatchWarning  # noqa: E402
from moepatch.errors import UnsupportedModelError  # noqa: E402
from moepatch.expert_parallel import register as _register_expert_parallel  # noqa: E402
from moepatch.feature import register_features  # noqa: E402
from moepatch.loading.install import install  # noqa: E402
from moepatch.loading.install import uninstall  # noqa: E402
from moepatch.loading.pretrained import from_pretrained  # noqa: E402
from moepatch.loading.pretrained import load_config  # noqa: E402
from moepatch.lora_experts.feature import LORA_EXPERTS  # noqa: E402
from moepatch.models.llama_moe import register_llama_moe as _register_llama_moe  # noqa: E402
from moepatch.models.moduleformer import register_moduleformer as _register_moduleformer  # noqa: E402
from moepatch.patch import PatchHandle  # noqa: E402
from moepatch.patch import apply  # noqa: E402
from moepatch.patch import get_handle  # noqa: E402
from moepatch.patch import patched  # noqa: E402
from moepatch.routing.bias_update import BIAS_UPDATE  # noqa: E402
from moepatch.routing.freeze import FREEZE_GATE  # noqa: E402
from moepatch.routing.recorder import RoutingRecorder  # noqa: E402
from moepatch.routing.statistics import ROUTING_STATS  # noqa: E402
from moepatch.routing.statistics import RoutingStatsConfig  # noqa: E402

# The features: planned and installed in this order, undone in reverse; a new feature is one more entry here
register_features(FREEZE_GATE, ROUTING_STATS, C2R, LORA_EXPERTS, BIAS_UPDATE)

# AutoConfig / AutoModelForCausalLM know model_types "llama_moe" and "moduleformer" once moepatch is imported
_register_llama_moe()
_register_moduleformer()

# DistributedConfig(ep_implementation="moepatch_dedup") selects moepatch's deduplicating expert-parallel dispatch
_register_expert_parallel()

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
    "config_schema",
    "describe",
    "from_pretrained",
    "get_handle",
    "install",
    "load_config",
    "patched",
    "uninstall",
    "write_config",
]
