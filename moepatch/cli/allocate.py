"""``moepatch allocate CHECKPOINT``: GuiLoMo stage 1, per-module expert counts and per-expert ranks written as
``expert.json`` / ``rank.json`` (:mod:`moepatch.lora_experts.allocate` does the work).  The LoRA experts block is
planned on the checkpoint's weightless skeleton first, so a wrong target or rank fails before anything is loaded."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from moepatch.cli.common import check_block_on_skeleton
from moepatch.cli.common import load_tokenizer
from moepatch.errors import CommandError
from moepatch.errors import UsageError


def cmd_allocate(args: argparse.Namespace) -> int:
    """GuiLoMo stage 1 on a checkpoint: learn expert counts and ranks, write expert.json / rank.json."""
    from moepatch.lora_experts.allocate import DEFAULT_EMBEDDED_EXAMPLES
    from moepatch.lora_experts.allocate import conversations_of
    from moepatch.lora_experts.allocate import embedded_records
    from moepatch.lora_experts.allocate import encode_examples
    from moepatch.lora_experts.allocate import file_records
    from moepatch.lora_experts.allocate import search_checkpoint
    from moepatch.lora_experts.allocate import with_answers
    from moepatch.lora_experts.guilomo import search_config
    from moepatch.lora_experts.guilomo import write_allocation
    from moepatch.validation import check_output_folder

    checkpoint = Path(args.model_path)
    if args.top_k > args.max_experts:
        raise UsageError("--top-k", f"{args.top_k} is more than --max-experts {args.max_experts}")
    if args.data and args.examples is not None:
        raise UsageError("--examples", "only applies to the embedded data; with --data every record is used")
    block = search_config(args.target_modules, args.max_experts, args.max_rank, args.top_k)
    narrowest = check_block_on_skeleton(checkpoint, {"lora_experts": block}, "--target-modules")
    if args.max_rank > narrowest:
        raise UsageError("--max-rank", f"{args.max_rank} exceeds the narrowest adapted projection ({narrowest} "
                                       "features): a LoRA rank cannot usefully exceed min(in, out)")
    output = Path(args.output) if args.output else checkpoint / "guilomo"
    check_output_folder(output, "--output")
    if args.data:
        records = file_records(args.data)
    else:
        records = embedded_records(DEFAULT_EMBEDDED_EXAMPLES if args.examples is None else args.examples, args.seed)
    conversations = conversations_of(records)  # malformed records fail here
    if len(conversations) < 2 * args.batch_size:
        where = "--data" if args.data else "--examples"
        raise UsageError(where, f"{len(conversations)} examples make fewer than 2 batches of --batch-size "
                                f"{args.batch_size}; the search needs train/valid batch pairs")
    tokenizer = load_tokenizer(checkpoint)
    encoded = encode_examples(tokenizer, conversations, max_length=args.max_length, seed=args.seed)
    examples = with_answers(encoded)
    if len(examples) < 2 * args.batch_size:
        raise UsageError("--max-length", f"{args.max_length} tokens cut every answer token of "
                                         f"{len(encoded) - len(examples)} of {len(encoded)} examples, leaving fewer "
                                         f"than 2 batches of --batch-size {args.batch_size} to learn from; raise it")
    if len(examples) < len(encoded):
        print(f"dropped {len(encoded) - len(examples)} of {len(encoded)} examples whose answer --max-length "
              f"{args.max_length} cuts off entirely")
    result = search_checkpoint(checkpoint, tokenizer, examples, block, batch_size=args.batch_size, epochs=args.epochs,
                               lr=args.lr, arch_lr=args.arch_lr, seed=args.seed, log=print)
    if not all(math.isfinite(value) for value in result["loss_trace"]):
        raise CommandError(f"the search diverged (loss {result['loss_trace'][-1]}); lower --lr / --arch-lr; "
                           "nothing was written")
    expert_file, rank_file = write_allocation(result, output)
    counts = list(result["expert"].values())
    ranks = list(result["rank"].values())
    trace = result["loss_trace"]
    print(f"loss {trace[0]:.3f} -> {trace[-1]:.3f}; experts per module: min {min(counts)}, mean "
          f"{sum(counts) / len(counts):.2f}, max {max(counts)}; ranks: mean {sum(ranks) / len(ranks):.2f}")
    print(f"wrote {expert_file} and {rank_file}; use them with "
          '{"lora_experts": {"method": "mola", "num_experts": "expert.json", "r": "rank.json", ...}}')
    return 0
