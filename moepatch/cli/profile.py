"""``moepatch profile CHECKPOINT``: C2R co-activation matrices and the official ``top_t`` / ``collaborative_list``
fields (:mod:`moepatch.tools.c2r.pipeline` does the work).  Every argument is checked against the checkpoint's
weightless skeleton first, so a wrong one fails before the model is loaded or anything is written."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moepatch.cli.common import checked_block
from moepatch.cli.common import load_tokenizer
from moepatch.cli.common import read_corpus_files
from moepatch.errors import CommandError
from moepatch.errors import UsageError


def cmd_profile(args: argparse.Namespace) -> int:
    """Check the arguments, profile the checkpoint, write matrices, heatmap and (unless ``--no-write-config``) the
    C2R fields into its config.json."""
    from moepatch.data.corpus import embedded_corpus
    from moepatch.loading.install import BACKUP_NAME
    from moepatch.staged_output import refuse_output_in_inputs
    from moepatch.tools.c2r.pipeline import default_min_tokens
    from moepatch.tools.c2r.pipeline import profile_checkpoint
    from moepatch.tools.c2r.pipeline import save_profile_results
    from moepatch.tools.c2r.profiling import default_top_t
    from moepatch.validation import check_output_folder

    checkpoint = Path(args.model_path)
    if not args.write_config:
        for flag, value in (("--top-t", args.top_t), ("--min-tokens", args.min_tokens)):
            if value is not None:
                raise UsageError(flag, "only applies to the fields written into config.json; drop it or drop "
                                       "--no-write-config")
    if args.text_field is not None and not any(Path(path).suffix in (".jsonl", ".json") for path in args.data or ()):
        raise UsageError("--text-field", "only applies to .jsonl / .json --data (a .txt file's lines are the "
                                         "documents; without --data the embedded corpus is used)")
    config, moe = checked_block(checkpoint, args.trust_remote_code)  # every check before anything is loaded
    if args.ep_size is not None:
        from moepatch.cli.common import check_ep_size
        from moepatch.cli.place import check_renumbered_for

        check_ep_size(moe.num_experts, args.ep_size)
        check_renumbered_for(checkpoint, args.ep_size, moe)
    if args.as_configured:
        from moepatch.tools.c2r.pipeline import has_c2r_fields

        if not has_c2r_fields(config):
            raise UsageError("--as-configured", f"{checkpoint / 'config.json'} routes without C2R (no top_t / "
                                                "collaborative_list, no moepatch c2r block): profiling as configured "
                                                "is profiling vanilla routing; drop --as-configured")
    num_experts, top_k, moe_layers = moe.num_experts, moe.top_k, moe.moe_layer_indices
    if top_k < 2:
        raise CommandError(f"{checkpoint}: the model routes each token to {top_k} expert; co-activation (and C2R) "
                           "needs at least 2 experts per token")
    if args.top_t is not None and not top_k - 1 <= args.top_t <= num_experts - 1:
        raise UsageError("--top-t", f"expected {max(top_k - 1, 1)} .. {num_experts - 1} for this model "
                                    f"({num_experts} experts, top-{top_k}), got {args.top_t}")
    bad_plot = [i for i in args.plot_layers if not -len(moe_layers) <= i < len(moe_layers)]
    if bad_plot:
        raise UsageError("--plot-layers", f"positions among the {len(moe_layers)} MoE layers {moe_layers} run from "
                                          f"{-len(moe_layers)} to {len(moe_layers) - 1}, got {bad_plot}")
    min_tokens = args.min_tokens if args.min_tokens is not None else default_min_tokens(num_experts, top_k)
    if args.max_tokens is not None and args.write_config and args.max_tokens < min_tokens:
        raise UsageError("--max-tokens", f"{args.max_tokens} is below the {min_tokens} tokens needed to write C2R "
                                         "fields (--min-tokens); raise it, lower --min-tokens, or --no-write-config")
    if args.write_config and (checkpoint / BACKUP_NAME).exists():
        raise CommandError(f"{checkpoint}: moepatch's loader is installed there, and `moepatch uninstall` would undo "
                           "the written fields; run `moepatch uninstall` first (or pass --no-write-config)")
    if args.write_config:  # config.json is replaced by a copy written beside it: the folder must take new files
        from moepatch.staged_output import check_writable_target

        try:
            if not os.access(checkpoint / "config.json", os.W_OK):
                raise UsageError("model_path", "config.json is not writable")
            check_writable_target(checkpoint / "config.json", "model_path", folder=False)
        except UsageError as error:
            raise CommandError(f"{checkpoint / 'config.json'} cannot be written ({error.message}); "
                               "the C2R fields go there (or pass --no-write-config)") from None
    output = Path(args.output) if args.output else checkpoint / "c2r_profile"
    # the checkpoint (whose config.json receives the fields) and the data are neither the output nor inside it: a
    # staged output folder holding the checkpoint would swap its old copy back over the written fields
    refuse_output_in_inputs(output, "--output", {"model_path": checkpoint, "--data": args.data},
                            output_may_lie_inside={"model_path"})
    check_output_folder(output, "--output")
    documents = read_corpus_files(args.data, args.text_field or "text") if args.data else embedded_corpus()
    tokenizer = load_tokenizer(checkpoint, args.trust_remote_code)

    run = profile_checkpoint(checkpoint, tokenizer, documents, as_configured=args.as_configured,
                             batch_size=args.batch_size, max_length=args.max_length, max_tokens=args.max_tokens,
                             seed=args.seed, keep_choices=args.ep_size is not None)
    profile = run.profile
    routing = "C2R (as configured)" if run.routed_under_c2r else "vanilla"
    note = (" (the checkpoint's C2R was switched off for profiling; --as-configured profiles it as it routes)"
            if run.c2r_switched_off else "")
    print(f"profiled {profile.tokens} non-padding tokens with {routing} routing{note}, MoE layers {profile.layers}, "
          f"top-{profile.top_k} of {profile.num_experts} experts")
    if args.write_config and profile.tokens < min_tokens:
        raise CommandError(f"only {profile.tokens} non-padding tokens profiled, fewer than the {min_tokens} needed "
                           f"to write C2R fields (--min-tokens; default 64 per expert: 64·E/k); give more --data, or "
                           f"--no-write-config to keep only the matrices; nothing was written")
    top_t = args.top_t if args.top_t is not None else default_top_t(num_experts, top_k)
    placement = None
    if args.ep_size is not None:  # the placement for the EP size that will be used, from this same run
        from moepatch.tools.c2r.permutation import routing_groups
        from moepatch.tools.c2r.pipeline import place_profiles
        from moepatch.tools.c2r.placement import format_report
        from moepatch.tools.c2r.traffic import format_dispatch

        groups = {index: limit.groups for index, limit in routing_groups(run.moe).items()}
        placement = place_profiles({"profiled": profile}, args.ep_size, seed=args.seed, routing_groups=groups,
                                   row=run.row)["profiled"]
        print(f"\n== expert placement over {args.ep_size} devices ({routing} routing, this run) ==")
        print(format_report(placement))
        print("\n" + format_dispatch(placement) + "\n")
    written = save_profile_results(run, output, top_t=top_t, plot_positions=args.plot_layers,
                                   config_checkpoint=checkpoint if args.write_config else None, placement=placement)
    print(f"matrices: {written.matrices}")
    print(f"heatmap:  {written.heatmap if written.heatmap is not None else 'skipped (pip install matplotlib)'}")
    if placement is not None:
        print(f"placement: {output / 'placement.json'} (`moepatch place {checkpoint} --ep-size {args.ep_size} "
              "--write-permuted DIR` writes the renumbered copy)")
    if written.config is not None:
        print(f"config:   wrote top_t={top_t} and collaborative_list [{profile.num_layers}][{profile.num_experts}]"
              f"[{profile.num_experts}] into {written.config}")
    return 0
