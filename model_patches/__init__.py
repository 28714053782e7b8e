"""Per-family descriptions of transformers MoE models, one short declarative file each.

Importing this package registers every family with :mod:`moepatch.registry`.  To add a family, add a file that
calls ``register(FamilySpec(...))`` and import it here; the features in ``moepatch/`` need no change.
"""

from model_patches import generic_topk  # noqa: F401  (fallback for model types no family claims)
from model_patches import llama_moe  # noqa: F401
from model_patches import mixtral  # noqa: F401
from model_patches import moduleformer  # noqa: F401
from model_patches import qwen2_moe  # noqa: F401
