"""``moepatch place SOURCE --ep-size D``: C2R expert placement for expert parallelism (copies per token, and the
bytes per token the per-pair and the dedup dispatch would send, :mod:`moepatch.tools.c2r.traffic`), from a checkpoint
folder (profiled, copies counted exactly) or a saved matrix file.  The work is :mod:`moepatch.tools.c2r.pipeline`'s;
this module checks the arguments against the source and prints the report."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from moepatch.cli.common import check_ep_size
from moepatch.cli.common import checked_block
from moepatch.cli.common import load_tokenizer
from moepatch.cli.common import read_corpus_files
from moepatch.errors import CommandError
from moepatch.errors import UsageError

PLACE_PROFILING_DEFAULTS: dict[str, Any] = {"data": None, "text_field": "text", "max_tokens": None, "batch_size": 4,
                                            "max_length": 512}
"""Options of ``place`` that only apply to a checkpoint SOURCE (it is profiled), with their defaults."""
DEFAULT_ROW_DTYPE = "bfloat16"
"""``--dtype``'s default: the dtype large MoE models are usually trained and served in, so the hidden states an
expert-parallel dispatch sends are in it too (``float32`` rows weigh twice as much; an FP8 dispatch half)."""


def row_dtype(text: str) -> torch.dtype:
    """``--dtype``: a torch floating dtype by its canonical name (``bfloat16``, ``float32``, ``float8_e4m3fn``, ...),
    the element type of the hidden states a dispatch sends; integer dtypes and aliases (``half``) are refused, and so
    are packed dtypes (``float4_e2m1fn_x2``: two values in each one-byte element), whose row of H values is not
    ``H × element_size()`` bytes."""
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or str(dtype) != f"torch.{text}":
        raise argparse.ArgumentTypeError(f"expected a torch floating dtype name such as {DEFAULT_ROW_DTYPE}, float32, "
                                         f"float16 or float8_e4m3fn, got {text!r}")
    packed = re.search(r"_?x(\d+)$", text)
    if packed or torch.finfo(dtype).bits != 8 * dtype.itemsize:
        values = f"{packed.group(1)} values" if packed else "a fraction of a byte per value"
        raise argparse.ArgumentTypeError(
            f"{text} packs {values} into each {dtype.itemsize}-byte element, so a row of --hidden-size values is not "
            f"--hidden-size x {dtype.itemsize} bytes; expected a dtype with one value per whole-byte element, such "
            f"as {DEFAULT_ROW_DTYPE}, float32, float16 or float8_e4m3fn")
    return dtype


def given_row(args: argparse.Namespace) -> dict[str, Any] | None:
    """The row size ``--hidden-size`` / ``--dtype`` give for a matrix file (``None`` without ``--hidden-size``);
    ``--dtype`` alone is refused, since it says nothing without a hidden size."""
    from moepatch.tools.c2r.traffic import row_size

    if args.hidden_size is None:
        if args.dtype is not None:
            raise UsageError("--dtype", "sets the element size of a row of --hidden-size elements; give "
                                        "--hidden-size H too")
        return None
    dtype = args.dtype if args.dtype is not None else getattr(torch, DEFAULT_ROW_DTYPE)
    given = f"given: --hidden-size {args.hidden_size} --dtype {str(dtype).removeprefix('torch.')}"
    return row_size(args.hidden_size, dtype, given if args.dtype is not None else f"{given} (the default)")


def check_permuted_target(source: Path, target: Path, data: list[Path] | None = None) -> None:
    """``--write-permuted DIR`` must be a new or empty folder, not the source nor the ``--data`` files."""
    from moepatch.staged_output import refuse_output_in_inputs

    # the source, inside it, or around it; the same for the profiling data
    refuse_output_in_inputs(target, "--write-permuted", {"SOURCE": source, "--data": data})
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError("--write-permuted", f"{target} already exists and is not an empty folder; give a new folder")


def check_renumbered_for(source: Path, ep_size: int, moe: Any) -> None:
    """A SOURCE renumbered by ``--write-permuted`` for another EP size is refused (its contiguous shards are planned
    groups for that size only; see :mod:`moepatch.expert_parallel.placement`), and so is a record that does not fit
    the checkpoint's structure ``moe`` (its expert count, its MoE layers) or is malformed (exit status 1)."""
    from moepatch.expert_parallel.placement import placement_mismatch

    try:
        problem = placement_mismatch(source, ep_size, num_experts=moe.num_experts, layers=moe.moe_layer_indices)
    except ValueError as error:  # a malformed record, or another checkpoint's: named by file and field
        raise CommandError(str(error)) from None
    if problem is not None:
        raise UsageError("--ep-size", problem)


def check_group_c2r(moe: Any, args: argparse.Namespace) -> None:
    """``--c2r-within-groups`` writes C2R lists into the ``--write-permuted`` copy: it needs that copy, groups that
    hold a token's k experts, and a routing rule that takes the lists (checked on the skeleton, before profiling)."""
    from moepatch.tools.c2r.permutation import group_c2r_config

    if not args.write_permuted:
        raise UsageError("--c2r-within-groups", "sets the C2R lists of the renumbered copy: give --write-permuted DIR")
    try:
        group_c2r_config(moe, args.ep_size, [layer.index for layer in moe.layers])
    except ValueError as error:
        raise UsageError("--c2r-within-groups", str(error)) from None


def matrix_file_top_k(source: Path, matrices: dict[str, torch.Tensor], given: int | None) -> int:
    """The matrices' experts per token: recorded in the file, implied by its diagonal, or ``--top-k``; never guessed."""
    from moepatch.tools.c2r.matrices import inferred_top_k
    from moepatch.tools.c2r.matrices import recorded_top_k

    known: dict[str, int] = {}
    recorded = recorded_top_k(source)
    if recorded is not None:
        known["recorded in the file"] = recorded
    for name, stack in matrices.items():
        implied = inferred_top_k(stack)
        if implied is not None:
            known[f"implied by the diagonal of {name!r}"] = implied
    if len(set(known.values())) > 1:
        raise CommandError(f"{source}: the file contradicts itself about top_k: {known}")
    num_experts = min(int(stack.shape[-1]) for stack in matrices.values())
    if known:
        where, top_k = next(iter(known.items()))
        if given is not None and given != top_k:
            raise UsageError("--top-k", f"{given} contradicts top_k={top_k} {where} ({source}); drop --top-k")
        if not 2 <= top_k <= num_experts:
            raise CommandError(f"{source}: top_k={top_k} {where}, but pair counts need 2 .. {num_experts} experts "
                               "per token")
        return top_k
    if given is None:
        raise UsageError("--top-k", f"{source} does not record how many experts each token chose; pass --top-k K "
                                    "(the profiled model's experts per token, e.g. 4 for Qwen1.5-MoE, 2 for Mixtral)")
    if not 2 <= given <= num_experts:
        raise UsageError("--top-k", f"expected 2 .. {num_experts} (pair counts come from tokens with at least two "
                                    f"experts, and the matrices have {num_experts}), got {given}")
    return given


def _place_checkpoint_source(source: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Check the options against the checkpoint's skeleton, then profile it and report (vanilla, and C2R when the
    checkpoint has C2R fields)."""
    from moepatch.data.corpus import embedded_corpus
    from moepatch.tools.c2r.permutation import check_permutable
    from moepatch.tools.c2r.pipeline import place_checkpoint
    from moepatch.validation import check_checkpoint_folder

    for flag in ("hidden_size", "dtype"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')}", "only applies when SOURCE is a matrix file; a "
                                                            "checkpoint's hidden size and dtype are read from it")
    check_checkpoint_folder(source, "source")
    _, moe = checked_block(source, args.trust_remote_code)  # checks before anything is loaded or profiled
    check_ep_size(moe.num_experts, args.ep_size)
    check_renumbered_for(source, args.ep_size, moe)
    if args.top_k is not None and args.top_k != moe.top_k:
        raise UsageError("--top-k", f"{args.top_k} contradicts the checkpoint's top-{moe.top_k} routing; drop "
                                    "--top-k (a checkpoint's routed tokens are counted exactly)")
    if args.write_permuted:
        check_permuted_target(source, Path(args.write_permuted), args.data)
        try:  # what the skeleton shows; the loaded model's rule is checked again before profiling
            check_permutable(moe, structure_only=True)
        except ValueError as error:
            raise CommandError(f"--write-permuted: {error}") from None
    if args.c2r_within_groups:
        check_group_c2r(moe, args)
    if args.text_field is not None and not any(Path(path).suffix in (".jsonl", ".json") for path in args.data or ()):
        raise UsageError("--text-field", "only applies to .jsonl / .json --data (a .txt file's lines are the "
                                         "documents; without --data the embedded corpus is used)")
    options = {name: default if getattr(args, name) is None else getattr(args, name)
               for name, default in PLACE_PROFILING_DEFAULTS.items()}
    documents = (read_corpus_files(options["data"], options["text_field"]) if options["data"]
                 else embedded_corpus())
    tokenizer = load_tokenizer(source, args.trust_remote_code)
    return place_checkpoint(source, tokenizer, documents, args.ep_size, batch_size=options["batch_size"],
                            max_length=options["max_length"], max_tokens=options["max_tokens"], seed=args.seed,
                            progress=not args.json,
                            permuted_for="--write-permuted" if args.write_permuted else None)


def _place_matrix_file(source: Path, args: argparse.Namespace, notes: list[str]) -> dict[str, dict[str, Any]]:
    """Refuse the options that only apply to a checkpoint, then report from the file's matrices (``notes``
    receives what cannot be computed exactly); bytes with ``--hidden-size`` (and ``--dtype``), rows only without."""
    from moepatch.tools.c2r.matrices import load_matrices
    from moepatch.tools.c2r.pipeline import place_matrices

    for flag in ("write_permuted", "c2r_within_groups"):
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')}", "needs a checkpoint folder as SOURCE, not a matrix file")
    for name in PLACE_PROFILING_DEFAULTS:
        if getattr(args, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')}", "only applies when SOURCE is a checkpoint folder "
                                                            "(it is profiled); a matrix file is used as it is")
    if args.trust_remote_code:
        raise UsageError("--trust-remote-code", "only applies when SOURCE is a checkpoint folder")
    row = given_row(args)
    loaded = load_matrices(source)
    top_k = matrix_file_top_k(source, loaded, args.top_k)
    for stack in loaded.values():
        check_ep_size(int(stack.shape[-1]), args.ep_size)
    if top_k > 2:
        notes.append(
            f"copies per token: not computed. The matrices come from a top-{top_k} model, and pairwise counts do "
            f"not determine how many distinct devices a token with {top_k} experts reaches. Run `moepatch place "
            f"CHECKPOINT --ep-size {args.ep_size}` on the checkpoint instead: it routes tokens and counts the "
            "devices of each token exactly. The intra-group fractions below are exact."
        )
    return place_matrices(source, loaded, args.ep_size, top_k=top_k, seed=args.seed, row=row)


def cmd_place(args: argparse.Namespace) -> int:
    """Report the placement (text, or ``--json`` on stdout alone) and optionally write the permuted checkpoint."""
    from moepatch.tools.c2r.pipeline import group_c2r_dispatch
    from moepatch.tools.c2r.pipeline import write_planned_checkpoint
    from moepatch.tools.c2r.placement import format_report
    from moepatch.tools.c2r.traffic import format_dispatch

    source = Path(args.source)
    notes: list[str] = []
    if source.is_dir():
        reports = _place_checkpoint_source(source, args)
    else:
        reports = _place_matrix_file(source, args, notes)
    result: dict[str, Any] = {"source": str(source), "ep_size": args.ep_size, "reports": reports}
    if notes:
        result["notes"] = notes
    if args.c2r_within_groups:
        first = next(iter(reports.values()))
        result["c2r_within_groups"] = group_c2r_dispatch(first["num_experts"], first["top_k"], args.ep_size)
    if args.write_permuted:
        result["permuted_checkpoint"] = str(write_planned_checkpoint(
            source, reports, args.write_permuted, c2r_within_groups=args.c2r_within_groups))
    if args.json:
        print(json.dumps(result, indent=1), file=getattr(args, "json_stream", sys.stdout))
        return 0
    for note in notes:
        print(note + "\n")
    for name, report in reports.items():
        print(f"== {name}: expert placement over {args.ep_size} devices ==")
        print(format_report(report))
        before, after = report["mean_contiguous_copies_per_token"], report["mean_planned_copies_per_token"]
        if before is not None and after is not None:
            print(f"copies per token: contiguous {before:.4f} -> planned {after:.4f} "
                  f"({(before - after) / before * 100:.1f}% less all-to-all volume)")
        dispatch = format_dispatch(report)
        if dispatch:
            print("\n" + dispatch)
        print()
    if "c2r_within_groups" in result:
        group = result["c2r_within_groups"]
        dedup, pair = group["dedup_rows_remote_per_token"], group["pair_rows_remote_per_token"]
        print(f"C2R within the planned groups (written to the copy: top_t = {group['top_t']}, each expert's list its "
              f"device-mates first): 1 copy per token, remote rows per token and layer {dedup:.4f} (dedup) vs "
              f"{pair:.4f} (per pair, any routing) = {group['dedup_vs_pair']:.3f}x, exact with a uniform source rank")
    if "permuted_checkpoint" in result:
        print(f"permuted checkpoint (contiguous sharding = planned groups): {result['permuted_checkpoint']}")
    return 0
