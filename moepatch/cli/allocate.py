"""``moepatch allocate CHECKPOINT``: GuiLoMo stage 1, per-module expert counts and per-expert ranks written as
``expert.json`` / ``rank.json`` (:mod:`moepatch.tools.lora_experts.allocate` does the work).  The LoRA experts block is
planned on the checkpoint's weightless skeleton first, so a wrong target or rank fails before anything is loaded."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from typing import NoReturn

from moepatch.cli.arguments import DistinctValues
from moepatch.cli.arguments import checkpoint_folder
from moepatch.cli.arguments import existing_file
from moepatch.cli.arguments import fraction
from moepatch.cli.arguments import non_empty_text
from moepatch.cli.arguments import non_negative_float
from moepatch.cli.arguments import non_negative_int
from moepatch.cli.arguments import output_folder
from moepatch.cli.arguments import positive_float
from moepatch.cli.arguments import positive_int
from moepatch.cli.arguments import seed
from moepatch.cli.common import check_block_on_skeleton
from moepatch.cli.common import load_tokenizer
from moepatch.errors import CommandError
from moepatch.errors import FieldProblems
from moepatch.errors import UsageError

if TYPE_CHECKING:
    from moepatch.tools.lora_experts.guilomo import SearchRecipe


DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""``--target-modules`` when not given: attention and dense / shared-expert MLP projections (LLaMA names)."""


def add_allocate_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments; the optimisation defaults are GuiLoMo's official stage 1 (see
    :class:`moepatch.tools.lora_experts.guilomo.SearchRecipe`), each overridable."""
    parser.add_argument("model_path", type=checkpoint_folder, help="checkpoint folder")
    parser.add_argument("--data", nargs="+", type=existing_file, action=DistinctValues,
                        help="jsonl instruction files (default: the embedded four tasks)")
    parser.add_argument("--max-experts", type=positive_int, default=8)
    parser.add_argument("--max-rank", type=positive_int, default=8)
    parser.add_argument("--top-k", type=positive_int, default=2)
    parser.add_argument("--target-modules", nargs="+", type=non_empty_text, action=DistinctValues,
                        help=f"projection names to adapt (default: {' '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--routed-experts", action="store_true",
                        help="let the target names reach the routed experts too (one allocation per routed expert); "
                             "by default they adapt attention, dense and shared projections only")
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--examples", type=positive_int,
                        help="embedded examples when --data is not given (default 64, split over the four tasks)")
    parser.add_argument("--max-length", type=positive_int, default=256)
    parser.add_argument("--lr", type=positive_float, default=3e-4, help="LoRA-expert weights' AdamW learning rate")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                        help="weights' AdamW weight decay (default 0, the HF Trainer's)")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=100,
                        help="learning-rate warm-up, in train/valid pairs (default 100, the official script's)")
    parser.add_argument("--lr-schedule", choices=("linear", "constant"), default="linear",
                        help="after warm-up: linear decay to 0 (the HF Trainer's default) or constant")
    parser.add_argument("--max-grad-norm", type=non_negative_float, default=1.0,
                        help="clip the weights' gradient norm (default 1.0, the HF Trainer's; 0 disables)")
    parser.add_argument("--lora-dropout", type=fraction, default=0.05)
    parser.add_argument("--arch-lr", type=positive_float, default=3e-3, help="GSVs' AdamW learning rate")
    parser.add_argument("--arch-betas", nargs=2, type=fraction, default=[0.5, 0.999], metavar=("BETA1", "BETA2"))
    parser.add_argument("--arch-weight-decay", type=non_negative_float, default=0.0,
                        help="GSVs' AdamW weight decay (default 0: the official trainer never reads its 1e-3)")
    parser.add_argument("--bilevel", choices=("official", "darts"), default="official",
                        help="GSV gradient: the official trainer's (default) or the textbook second-order DARTS step")
    parser.add_argument("--stage-one-balance", choices=("mola_training", "mola3_training"), default="mola_training",
                        help="balance loss of ArMoLA/mola_training.py (LLaMA-2, no factor N; default, the script the "
                             "official README runs) or of mola3_training.py (LLaMA-3, times N)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--output", type=output_folder,
                        help="folder for expert.json / rank.json (default: <model>/guilomo)")


def search_recipe(args: argparse.Namespace) -> SearchRecipe:
    """The optimisation recipe the arguments ask for."""
    from moepatch.tools.lora_experts.guilomo import SearchRecipe

    return SearchRecipe(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                        schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm, arch_lr=args.arch_lr,
                        arch_betas=tuple(args.arch_betas), arch_weight_decay=args.arch_weight_decay,
                        bilevel=args.bilevel)


def _refuse_default_targets(error: UsageError, planned: Callable[[list[str]], object]) -> NoReturn:
    """The default ``--target-modules`` do not fit this model (a name reaching only its routed experts, or naming
    nothing): say so — the user did not pass the flag — and which of the defaults would do."""
    fitting = []
    for name in DEFAULT_TARGETS:
        try:
            planned([name])
            fitting.append(name)
        except UsageError:
            pass
    unfit = " ".join(name for name in DEFAULT_TARGETS if name not in fitting)
    problems = error.__cause__.problems if isinstance(error.__cause__, FieldProblems) else []
    reason = next((message for field, message in problems if field == "moepatch.lora_experts.target_modules"),
                  error.message)
    advice = (f"pass --target-modules {' '.join(fitting)}" if fitting else
              "pass --target-modules with this model's projection names")
    raise UsageError("--target-modules", f"not given, and its defaults ({' '.join(DEFAULT_TARGETS)}) include "
                                         f"{unfit or 'names'} that do not fit this model ({reason}): {advice}, or "
                                         "add --routed-experts to adapt the routed experts too") from None


def cmd_allocate(args: argparse.Namespace) -> int:
    """GuiLoMo stage 1 on a checkpoint: learn expert counts and ranks, write expert.json / rank.json."""
    from moepatch.staged_output import refuse_output_in_inputs
    from moepatch.tools.lora_experts.allocate import DEFAULT_EMBEDDED_EXAMPLES
    from moepatch.tools.lora_experts.allocate import conversations_of
    from moepatch.tools.lora_experts.allocate import embedded_records
    from moepatch.tools.lora_experts.allocate import encode_examples
    from moepatch.tools.lora_experts.allocate import file_records
    from moepatch.tools.lora_experts.allocate import search_checkpoint
    from moepatch.tools.lora_experts.allocate import with_answers
    from moepatch.tools.lora_experts.guilomo import search_config
    from moepatch.tools.lora_experts.guilomo import write_allocation
    from moepatch.validation import check_output_folder

    checkpoint = Path(args.model_path)
    if args.top_k > args.max_experts:
        raise UsageError("--top-k", f"{args.top_k} is more than --max-experts {args.max_experts}")
    if args.data and args.examples is not None:
        raise UsageError("--examples", "only applies to the embedded data; with --data every record is used")

    def planned(targets: list[str]) -> tuple[dict, int]:
        block = search_config(targets, args.max_experts, args.max_rank, args.top_k, args.lora_dropout,
                              args.routed_experts, args.stage_one_balance)
        return block, check_block_on_skeleton(checkpoint, {"lora_experts": block}, "--target-modules")

    try:
        block, narrowest = planned(list(args.target_modules or DEFAULT_TARGETS))
    except UsageError as error:
        if args.target_modules is not None:
            raise
        _refuse_default_targets(error, planned)
    if args.max_rank > narrowest:
        raise UsageError("--max-rank", f"{args.max_rank} exceeds the narrowest adapted projection ({narrowest} "
                                       "features): a LoRA rank cannot usefully exceed min(in, out)")
    output = Path(args.output) if args.output else checkpoint / "guilomo"
    refuse_output_in_inputs(output, "--output", {"model_path": checkpoint, "--data": args.data},
                            output_may_lie_inside={"model_path"})  # CHECKPOINT/guilomo by default
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
                               recipe=search_recipe(args), seed=args.seed, log=print)
    if not all(math.isfinite(value) for value in result["loss_trace"]):
        raise CommandError(f"the search diverged (loss {result['loss_trace'][-1]}); lower --lr / --arch-lr; "
                           "nothing was written")
    expert_file, rank_file = write_allocation(result, output)
    counts = list(result["expert"].values())
    ranks = list(result["rank"].values())
    trace = result["loss_trace"]
    print(f"loss {trace[0]:.3f} -> {trace[-1]:.3f}; experts per module: min {min(counts)}, mean "
          f"{sum(counts) / len(counts):.2f}, max {max(counts)}; ranks: mean {sum(ranks) / len(ranks):.2f}")
    from moepatch.validation import is_inside

    def as_config_names_it(file: Path) -> str:  # config.json's fields look relative names up beside it
        return str(file.resolve().relative_to(checkpoint.resolve()) if is_inside(file, checkpoint)
                   else file.resolve())

    print(f"wrote {expert_file} and {rank_file}; GuiLoMo's stage 2 uses them from {checkpoint / 'config.json'} with "
          f'{{"lora_experts": {{"method": "mola", "num_experts": "{as_config_names_it(Path(expert_file))}", '
          f'"r": "{as_config_names_it(Path(rank_file))}", "top_k": 2, "scaling": "last_expert_rank", '
          '"balance_loss": {"coef": 0.001, "reduction": "sum"}, ...}} '
          "(moepatch.tools.lora_experts.guilomo.stage_two_config)")
    return 0
