"""All family knowledge of moepatch: where each MoE family keeps its routers and experts, and how it routes.

One short declarative file per family (:class:`~model_patches.spec.FamilySpec`), the registry they register into,
the structure resolver (:func:`~model_patches.structure.describe`, the only code that walks a model's module tree)
and the executed routing rule with its probe (:mod:`model_patches.routing_rule`).  Features in ``moepatch`` import
this package; it never imports them.  To add a family, add a file that calls ``register(FamilySpec(...))`` and
import it below.
"""

from model_patches import dbrx  # noqa: E402,F401  (family files register at import)
from model_patches import deepseek_v2  # noqa: E402,F401
from model_patches import deepseek_v3  # noqa: E402,F401
from model_patches import deepseek_v4  # noqa: E402,F401
from model_patches import doge  # noqa: E402,F401
from model_patches import ergo  # noqa: E402,F401
from model_patches import ernie4_5_moe  # noqa: E402,F401
from model_patches import gemma4_text  # noqa: E402,F401
from model_patches import generic_topk  # noqa: E402,F401  (fallback for model types no family claims)
from model_patches import gpt_oss  # noqa: E402,F401
from model_patches import granitemoe  # noqa: E402,F401
from model_patches import hunyuan_v1_moe  # noqa: E402,F401
from model_patches import inkling  # noqa: E402,F401
from model_patches import jamba  # noqa: E402,F401
from model_patches import jetmoe  # noqa: E402,F401
from model_patches import kolibri1  # noqa: E402,F401
from model_patches import llama4  # noqa: E402,F401
from model_patches import llama_moe  # noqa: E402,F401
from model_patches import minimax  # noqa: E402,F401
from model_patches import minimax_m2  # noqa: E402,F401
from model_patches import mixtral  # noqa: E402,F401
from model_patches import moduleformer  # noqa: E402,F401
from model_patches import phimoe  # noqa: E402,F401
from model_patches import qwen2_moe  # noqa: E402,F401
from model_patches import qwen3_5_moe  # noqa: E402,F401
from model_patches import zaya  # noqa: E402,F401
from model_patches.errors import UnsupportedModelError
from model_patches.registry import fallback_families
from model_patches.registry import families
from model_patches.registry import family_for_model_type
from model_patches.registry import get_family
from model_patches.registry import register
from model_patches.registry import supported_summary
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule
from model_patches.structure import MoELayer  # noqa: E402
from model_patches.structure import MoEModel  # noqa: E402
from model_patches.structure import describe  # noqa: E402

__all__ = ["FamilySpec", "MoELayer", "MoEModel", "RouterOutput", "RoutingRule", "UnsupportedModelError", "describe",
           "families", "fallback_families", "family_for_model_type", "get_family", "register", "supported_summary"]
