"""Version gates, in one place.

moepatch targets the transformers 5 MoE layout (router modules returning ``(logits, weights, indices)``, fused
3-D expert tensors).  transformers 4 stored routing inside the sparse block and is not supported; importing
moepatch with it fails here, at import, with a message that says what to install.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from packaging.version import Version

MIN_TRANSFORMERS = Version("5.0.0")
MAX_TRANSFORMERS_EXCLUSIVE = Version("6.0.0")
MIN_TORCH = Version("2.6.0")

TRANSFORMERS_VERSION = Version(transformers.__version__)
TORCH_VERSION = Version(torch.__version__.split("+")[0])


def check_versions() -> None:
    """Raise ``ImportError`` when the installed transformers or torch is outside the supported range."""
    if not (MIN_TRANSFORMERS <= TRANSFORMERS_VERSION < MAX_TRANSFORMERS_EXCLUSIVE):
        raise ImportError(
            f"moepatch supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE} (the v5 MoE layout); "
            f"found transformers {transformers.__version__}. Install a supported version: "
            f"pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}'"
        )
    if TORCH_VERSION < MIN_TORCH:
        raise ImportError(
            f"moepatch needs torch >={MIN_TORCH}; found torch {torch.__version__}. "
            "Install torch first (on a CPU machine: pip install torch==2.13.0)."
        )


def current_backward_task_id() -> int:
    """Id of the autograd graph task running on this thread, or -1 outside backward.

    Used to tell a real forward from the re-run of a forward that activation checkpointing performs inside
    backward, so that routing statistics are not counted twice.
    """
    getter = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if getter is None else int(getter())


def distributed_ready() -> bool:
    """True when a ``torch.distributed`` process group is up (the one check every collective moepatch runs makes)."""

    return dist.is_available() and dist.is_initialized()
