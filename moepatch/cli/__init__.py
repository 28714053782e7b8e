"""The ``moepatch`` command: inspect, demo, profile, place, allocate, experts, eval, install, uninstall, env.

Every argument is checked when parsed (types below) or, where the check needs the checkpoint's structure, against a
weightless meta-device skeleton — before any model is loaded or any file is written.  Every failure goes through
:func:`moepatch.errors.run_guarded`: status 2 for a bad argument, 1 for a failed check, one or two lines naming the
argument or file, no traceback unless ``--debug`` (or ``MOEPATCH_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from moepatch.cli.allocate import add_allocate_arguments
from moepatch.cli.allocate import cmd_allocate
from moepatch.cli.arguments import CommandParser
from moepatch.cli.arguments import DistinctValues
from moepatch.cli.arguments import check_repeated_options
from moepatch.cli.arguments import checkpoint_config
from moepatch.cli.arguments import checkpoint_folder
from moepatch.cli.arguments import existing_file
from moepatch.cli.arguments import non_empty_text
from moepatch.cli.arguments import non_negative_int
from moepatch.cli.arguments import output_folder
from moepatch.cli.arguments import place_source
from moepatch.cli.arguments import positive_int
from moepatch.cli.arguments import seed
from moepatch.cli.demo import check_demo_arguments
from moepatch.cli.demo import cmd_demo
from moepatch.cli.env import cmd_env
from moepatch.cli.experts import add_experts_arguments
from moepatch.cli.inspect import add_inspect_arguments
from moepatch.cli.install import cmd_install
from moepatch.cli.install import cmd_uninstall
from moepatch.cli.place import DEFAULT_ROW_DTYPE
from moepatch.cli.place import cmd_place
from moepatch.cli.place import row_dtype
from moepatch.cli.profile import cmd_profile
from moepatch.errors import CommandError
from moepatch.errors import debug_requested
from moepatch.errors import run_guarded

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = ("inspect", "demo", "profile", "place", "allocate", "experts", "eval", "install", "uninstall", "env")


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per :data:`COMMANDS` entry; each argument's type checks it while parsing, and each subcommand
    names its ``func`` (and, for the demo, a ``check`` of arguments that depend on each other)."""
    from moepatch.testing.tiny import DEMO_FAMILIES

    parser = CommandParser(prog="moepatch", description=__doc__.splitlines()[0],
                           epilog="Every command accepts --debug (or MOEPATCH_DEBUG=1) to show a traceback on failure.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    add_inspect_arguments(sub.add_parser("inspect", help="describe a checkpoint's MoE structure and check its moepatch "
                                                         "config (--help-config: every field of the block)"))
    demo = sub.add_parser("demo", help="build a tiny model, apply a config, run a batch, print routing statistics")
    demo.add_argument("--family", default="qwen2_moe", choices=DEMO_FAMILIES, help="tiny model family")
    demo.add_argument("--output", type=output_folder,
                      help="folder for the checkpoint, statistics and plot (default: a temp folder)")
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--top-t", type=positive_int, default=2, help="C2R top_t written after profiling (1 .. 7)")
    demo.add_argument("--ep-size", type=positive_int, default=2, help="devices for the placement report (1, 2, 4, 8)")
    demo.add_argument("--finetune-steps", type=non_negative_int, default=40,
                      help="steps of the final fine-tune with dynamic mixing (0: skip it)")
    demo.add_argument("--expert-steps", type=non_negative_int, default=30,
                      help="steps of each task expert in the task-experts step (0: skip it)")
    demo.set_defaults(func=cmd_demo, check=check_demo_arguments)
    profile = sub.add_parser("profile", help="C2R profiling: co-activation matrices and the official config fields")
    profile.add_argument("model_path", type=checkpoint_folder,
                         help="checkpoint folder (its config.json receives top_t and collaborative_list)")
    profile.add_argument("--data", nargs="+", type=existing_file, action=DistinctValues,
                         help="plain-text (one document per line) or .jsonl files; default: the embedded demo corpus")
    profile.add_argument("--text-field", type=non_empty_text,
                         help="jsonl / json field holding the text (default 'text'; not for .txt data)")
    profile.add_argument("--max-tokens", type=positive_int, help="stop after this many non-padding tokens")
    profile.add_argument("--min-tokens", type=non_negative_int,
                         help="refuse to write C2R fields profiled from fewer non-padding tokens (default 64·E/k: "
                              "64 choices per expert on average)")
    profile.add_argument("--seed", type=seed, default=0, help="seed of the document order")
    profile.add_argument("--top-t", type=positive_int, help="T written to config.json (default E/2)")
    profile.add_argument("--batch-size", type=positive_int, default=4)
    profile.add_argument("--max-length", type=positive_int, default=512, help="tokens per document (truncation)")
    profile.add_argument("--output", type=output_folder,
                         help="folder for matrices and plots (default MODEL_PATH/c2r_profile)")
    profile.add_argument("--plot-layers", type=int, nargs="+", default=[0, -1], action=DistinctValues,
                         help="positions among the MoE layers to draw (default first and last)")
    profile.add_argument("--no-write-config", dest="write_config", action="store_false",
                         help="do not write top_t / collaborative_list into config.json")
    profile.add_argument("--as-configured", action="store_true",
                         help="profile the routing the checkpoint is configured with (C2R included); by default C2R "
                              "is switched off for the pass, as C2R's method profiles the unmodified model")
    profile.add_argument("--ep-size", type=positive_int,
                         help="also report the expert placement over this many expert-parallel ranks from the same "
                              "run (copies per token, predicted dispatch bytes; placement.json in --output)")
    profile.add_argument("--trust-remote-code", action="store_true")
    profile.set_defaults(func=cmd_profile)
    allocate = sub.add_parser("allocate", help="GuiLoMo search: per-module expert counts and per-expert ranks")
    add_allocate_arguments(allocate)
    allocate.set_defaults(func=cmd_allocate)
    experts = sub.add_parser("experts", help="task experts (MELD): fit-router, route, merge, serve-check, export-vllm")
    add_experts_arguments(experts, CommandParser)

    place = sub.add_parser("place", help="C2R expert placement for expert parallelism: copies per token and "
                                         "predicted dispatch bytes")
    place.add_argument("source", type=place_source,
                       help="a matrix file (JSON / safetensors / official .pkl) or a checkpoint folder")
    place.add_argument("--ep-size", type=positive_int, required=True,
                       help="expert-parallel degree D (devices per layer)")
    place.add_argument("--json", action="store_true", help="print the report as JSON")
    place.add_argument("--seed", type=seed, default=0)
    place.add_argument("--top-k", type=positive_int,
                       help="experts per token of a matrix file's model, when the file does not record it")
    place.add_argument("--hidden-size", type=positive_int,
                       help="a matrix file's model hidden size: the dispatch figures then include bytes per token "
                            "(a matrix file records no hidden size; a checkpoint's is read from it)")
    place.add_argument("--dtype", type=row_dtype,
                       help=f"with --hidden-size: the torch dtype the hidden states are dispatched in (default "
                            f"{DEFAULT_ROW_DTYPE}, what MoE models are trained and served in; e.g. float32, float16, "
                            "float8_e4m3fn for an FP8 dispatch)")
    place.add_argument("--write-permuted", metavar="DIR", type=output_folder,
                       help="write a checkpoint whose experts are renumbered so contiguous sharding = planned groups "
                            "(for --ep-size ranks only: recorded in expert_placement.json)")
    place.add_argument("--c2r-within-groups", action="store_true",
                       help="with --write-permuted: route the copy with C2R within the planned groups (top_t = "
                            "E/ep_size - 1, each expert's device-mates first), so every token's experts sit on one "
                            "device; moepatch's switch, not the paper's profiled list")
    place.add_argument("--data", nargs="+", type=existing_file, action=DistinctValues,
                       help="corpus for profiling a checkpoint (default: embedded)")
    place.add_argument("--text-field", type=non_empty_text, help="jsonl field holding the text (default 'text')")
    place.add_argument("--max-tokens", type=positive_int)
    place.add_argument("--batch-size", type=positive_int, help="default 4")
    place.add_argument("--max-length", type=positive_int, help="default 512")
    place.add_argument("--trust-remote-code", action="store_true")
    place.set_defaults(func=cmd_place)
    install = sub.add_parser("install", help="make a checkpoint load already patched via trust_remote_code")
    install.add_argument("path", type=checkpoint_folder, help="checkpoint folder")
    install.add_argument("--replace-auto-map", action="store_true",
                         help="replace config.json's auto_map entries of the folder's own code (refused otherwise; "
                              "uninstall puts them back)")
    install.set_defaults(func=cmd_install)
    uninstall = sub.add_parser("uninstall", help="undo `moepatch install` (restores config.json byte for byte)")
    uninstall.add_argument("path", type=checkpoint_config, help="checkpoint folder")
    uninstall.add_argument("--force", action="store_true",
                           help="restore config.json even though it was edited since install (the edits are lost)")
    uninstall.set_defaults(func=cmd_uninstall)
    sub.add_parser("eval", help="lm-eval's command line with the 'moepatch' model registered (arguments: lm-eval's)",
                   add_help=False)
    env = sub.add_parser("env", help="versions of moepatch and its ecosystem, for bug reports")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run; every failure becomes an exit status and a short message (see :mod:`moepatch.errors`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    prog = f"moepatch {command}" if command in COMMANDS else "moepatch"

    if command == "eval":  # everything after it is lm-eval's own command line
        rest = argv[argv.index("eval") + 1:]

        def run_eval() -> int:
            try:
                from moepatch.cli.evaluate import run_lm_eval
            except ImportError as error:
                raise CommandError(f"lm-eval is not installed ({error}); pip install 'moepatch[eval]'") from None
            return run_lm_eval(rest)

        return run_guarded(prog, run_eval, debug=debug)

    def body() -> int:
        check_repeated_options(argv)
        args = build_parser().parse_args(argv)
        if getattr(args, "check", None) is not None:
            args.check(args)
        if getattr(args, "json", False):
            # stdout carries only the JSON: progress and third-party chatter (DeepSpeed's accelerator notice on
            # import) go to stderr
            args.json_stream = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                return args.func(args)
        return args.func(args)

    return run_guarded(prog, body, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
