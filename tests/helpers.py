"""Helpers shared by the test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import copy
import socket
import sys

import torch

from moepatch.testing import tiny

FAMILIES = tiny.TINY_FAMILIES
"""The families every family-parametrized test runs on."""
ROUTED_NEW_FAMILIES = tiny.NEW_FAMILIES
"""The newer families (``tiny.NEW_FAMILIES``): the feature pipelines (profiling, permutation, freezing, dynamic
mixing, training switches) run on them too."""


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch``, without gradients."""
    with torch.no_grad():
        return model(**batch).logits


def model_state(model: torch.nn.Module) -> dict:
    """Everything apply may touch: instance attributes of every module, requires_grad flags, hooks, config block."""
    return {
        "dicts": {name: set(m.__dict__) for name, m in model.named_modules()},
        "forwards": {name: m.__dict__.get("forward") for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": {
            name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()
        },
        "config": copy.deepcopy(getattr(model.config, "moepatch", None)),
    }


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: str, *args: str, processes: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` on ``processes`` local ranks, on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", script, *args]
