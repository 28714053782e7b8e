"""``moepatch demo``: every feature on a tiny checkpoint (:func:`moepatch.demo.run.run_demo` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moepatch.cli.common import check_ep_size
from moepatch.errors import UsageError
from moepatch.staged_output import check_writable_target


def check_demo_arguments(args: argparse.Namespace) -> None:
    """The demo's tiny models have 8 experts, top-2: ``--top-t`` and ``--ep-size`` must fit them, and ``--output``
    must be writable, outside any checkpoint, and not hold a ``finetune`` folder the demo did not write (the demo
    replaces its own)."""
    from moepatch.demo.run import FINETUNE_FOLDER
    from moepatch.demo.run import is_demo_finetune
    from moepatch.demo.task_experts import TASK_EXPERTS_FOLDER
    from moepatch.testing import tiny

    num_experts, top_k = tiny.TINY_NUM_EXPERTS, tiny.TINY_TOP_K
    if not max(top_k - 1, 1) <= args.top_t <= num_experts - 1:
        raise UsageError("--top-t", f"expected {max(top_k - 1, 1)} .. {num_experts - 1} for the demo's {num_experts} "
                                    f"experts (top-{top_k}), got {args.top_t}")
    check_ep_size(num_experts, args.ep_size)
    if args.output:
        check_writable_target(args.output, "--output")  # the staged copy is written beside it: before any step
        target = Path(args.output).expanduser().absolute()
        for folder in (target, *target.parents):
            if (folder / "config.json").is_file() and not is_demo_finetune(folder):
                raise UsageError("--output", f"{args.output} {'is' if folder == target else 'lies inside'} the "
                                             f"checkpoint folder {folder} (config.json): the demo would write its "
                                             "models and files into it; choose a folder of its own")
    previous = Path(args.output) / FINETUNE_FOLDER if args.output else None
    if previous is not None and previous.exists() and args.finetune_steps > 0 and not is_demo_finetune(previous):
        raise UsageError("--output", f"{previous} exists and is not a fine-tune of an earlier demo; the demo writes "
                                     "its fine-tune there: choose another --output")
    experts = Path(args.output) / TASK_EXPERTS_FOLDER if args.output else None
    if experts is not None and experts.exists() and args.expert_steps > 0 and not is_demo_finetune(experts):
        raise UsageError("--output", f"{experts} exists and is not the task experts of an earlier demo; the demo "
                                     "writes them there: choose another --output")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; it narrates each step on stdout as it goes."""
    from moepatch.demo.run import run_demo

    run_demo(args.output, args.family, seed=args.seed, top_t=args.top_t, ep_size=args.ep_size,
             finetune_steps=args.finetune_steps, expert_steps=args.expert_steps)
    return 0
