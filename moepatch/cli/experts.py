"""``moepatch experts``: task experts (MELD, Yan et al., KDD 2024) after ``scripts/finetune.py --task_experts true``.

* ``fit-router OUT [--data DATA]``: fit the request router on each task's dev examples, print held-out accuracy;
* ``route OUT --input requests.jsonl --top-k 2``: the chosen tasks and weights of every request (jsonl);
* ``merge OUT --tasks a b --weights 0.5 0.5 --method cat|svd`` (or ``--from-routes routes.jsonl``): peft
  ``add_weighted_adapter`` merges (fused routed experts merged by moepatch in peft's layout), checked against the
  experts' own deltas;
* ``serve-check OUT --input requests.jsonl``: mixed-adapter batches equal one request at a time, and their
  throughput vs one adapter at a time;
* ``export-vllm OUT --max-lora-rank 64``: the adapters plus the vLLM ``EngineArgs`` / ``LoRARequest`` entries.

Every argument is checked before a model is loaded or a file written.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from moepatch.cli.arguments import DistinctValues
from moepatch.cli.arguments import existing_file
from moepatch.cli.arguments import fraction
from moepatch.cli.arguments import non_empty_text
from moepatch.cli.arguments import positive_float
from moepatch.cli.arguments import positive_int
from moepatch.cli.arguments import seed
from moepatch.errors import CommandError
from moepatch.errors import FieldError
from moepatch.errors import UsageError
from moepatch.task_experts.manifest import ROUTER_FOLDER

FIT_DEFAULTS: dict[str, object] = {"positives": "scored", "positive_margin": 0.05, "encoder_epochs": 10.0,
                                   "encoder_lr": 1e-5, "encoder_temperature": 0.02, "encoder_batch_size": 16}
"""fit-router's options of the encoder fine-tune and the scored positives (MELD's values): one given with another
value where it does not apply is refused, not ignored."""

FIT_ROUTER_FLAGS = {"data": "--data", "groups": "--group", "head": "--head", "encoder": "--encoder",
                    "pooling": "--encoder-pooling", "descriptions": "--descriptions",
                    "finetune_encoder": "--finetune-encoder", "positives": "--positives", "holdout": "--holdout"}
"""fit-router's flag for each field :func:`~moepatch.task_experts.fitting.fit_router` names in its errors."""
MERGE_FLAGS = {"tasks": "--tasks", "weights": "--weights", "method": "--method", "rank": "--rank", "name": "--name",
               "max_lora_rank": "--max-lora-rank"}
"""merge's flag for each field of a :class:`~moepatch.task_experts.merging.MergeRequest` (and the rank limit)."""
EXPORT_VLLM_FLAGS = {"max_lora_rank": "--max-lora-rank", "max_loras": "--max-loras", "routes": "--routes",
                     "include_experts": "--no-experts"}
"""export-vllm's flag for each argument of :func:`~moepatch.task_experts.vllm_export.export_vllm` (``output``, the
run, is the positional argument's own name)."""


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _group(text: str) -> tuple[str, list[str]]:
    name, _, tasks = text.partition("=")
    members = [task for task in tasks.split(",") if task]
    if not name or not members:
        raise argparse.ArgumentTypeError(f"expected GROUP=task,task,..., got {text!r}")
    return name, members


def add_experts_arguments(parser: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser]) -> None:
    sub = parser.add_subparsers(dest="experts_command", required=True, parser_class=parser_class)
    fit = sub.add_parser("fit-router", help="fit the request router on each task's dev examples")
    fit.add_argument("output", help="the finetune --task_experts output folder (or its experts/ folder)")
    fit.add_argument("--data", help="multi-source data folder (default: OUT/data, written by --synthetic_data)")
    fit.add_argument("--head", choices=("centroid", "linear", "contrastive", "retrieval"), default="centroid",
                     help="contrastive: MELD's scheme, every expert answers every fitting request and the (near-)best "
                          "are its positives; retrieval: MELD's router, cosine of the request and each expert's "
                          "description by --encoder (with --finetune-encoder, fine-tuned on those positives)")
    fit.add_argument("--descriptions", type=existing_file,
                     help="retrieval: JSON object task -> description text (default: the task's name)")
    fit.add_argument("--finetune-encoder", action="store_true",
                     help="retrieval: MELD's contrastive fine-tune of the encoder (InfoNCE, one hard negative per "
                          "positive, in-batch negatives); saved in the router folder")
    fit.add_argument("--positives", choices=("scored", "own"), default=FIT_DEFAULTS["positives"],
                     help="the fine-tune's positives: scored = experts that answer the request well (MELD, runs "
                          "every expert on every fitting request), own = the request's own task")
    fit.add_argument("--encoder-epochs", type=positive_float, default=FIT_DEFAULTS["encoder_epochs"],
                     help="fine-tune epochs (MELD: 10)")
    fit.add_argument("--encoder-lr", type=positive_float, default=FIT_DEFAULTS["encoder_lr"],
                     help="fine-tune learning rate (MELD: 1e-5)")
    fit.add_argument("--encoder-temperature", type=positive_float, default=FIT_DEFAULTS["encoder_temperature"],
                     help="InfoNCE temperature of the fine-tune (MELD: 0.02)")
    fit.add_argument("--encoder-batch-size", type=positive_int, default=FIT_DEFAULTS["encoder_batch_size"],
                     help="fine-tune batch (MELD: 16)")
    fit.add_argument("--positive-margin", type=fraction, default=FIT_DEFAULTS["positive_margin"],
                     help="contrastive: experts within this relative answer loss of the best one are positives")
    fit.add_argument("--features", nargs="+", choices=("hidden", "load"), action=DistinctValues,
                     help="base-model signature: mean-pooled final hidden state and/or per-layer expert loads "
                          "(default both; not with --encoder, which embeds the requests itself)")
    fit.add_argument("--encoder", help="a local embedding model instead of the base model: a sentence-transformers "
                                       "folder, or a transformers encoder folder (bge / bge-m3) embedded as "
                                       "FlagEmbedding does")
    fit.add_argument("--encoder-pooling", choices=("cls", "mean"),
                     help="a transformers encoder folder: [CLS] pooling (FlagEmbedding's, bge; the default) or mean "
                          "pooling (a sentence-transformers folder keeps its own)")
    fit.add_argument("--holdout", type=fraction, default=0.25, help="share of each task's examples held out")
    fit.add_argument("--max-examples", type=positive_int, default=64, help="examples per task at most")
    fit.add_argument("--max-length", type=positive_int, default=256)
    fit.add_argument("--batch-size", type=positive_int, default=8)
    fit.add_argument("--group", type=_group, action="append", default=[], metavar="GROUP=task,task",
                     help="task groups for the cross-task evaluation (a task alone is its own group)")
    fit.add_argument("--seed", type=seed, default=0)
    route = sub.add_parser("route", help="choose the top-k task experts of each request")
    route.add_argument("output", help="the task-experts output folder (with a fitted router)")
    route.add_argument("--input", required=True, type=existing_file,
                       help="jsonl: 'text' / 'prompt' or conversation records; 'task' optional (then accuracy)")
    route.add_argument("--top-k", type=positive_int, default=2)
    route.add_argument("--exclude", choices=("none", "cross-dataset", "cross-task"), default="none",
                       help="MELD's evaluation variants: leave the request's own task (or task group) out")
    route.add_argument("--routes", help="where to write the routes (default: OUT/experts/routes.jsonl)")
    merge = sub.add_parser("merge", help="merge task experts with peft add_weighted_adapter (cat or svd)")
    merge.add_argument("output", help="the task-experts output folder")
    merge.add_argument("--tasks", nargs="+", type=non_empty_text)
    merge.add_argument("--weights", nargs="+", type=_finite, help="one per task (default: 1/k each)")
    merge.add_argument("--method", choices=("cat", "svd"), default="cat")
    merge.add_argument("--rank", type=positive_int, help="svd only: the merged rank (default: the largest)")
    merge.add_argument("--from-routes", type=existing_file,
                       help="merge every task combination of a `route` output (MELD merged every pair it saw)")
    merge.add_argument("--max-lora-rank", type=positive_int,
                       help="refuse merges of a larger rank (vLLM's max_lora_rank)")
    merge.add_argument("--name", type=non_empty_text, help="the merged adapter's name (default: tasks joined by +)")
    merge.add_argument("--replace", action="store_true",
                       help="with --name: replace a merged adapter of that name (refused otherwise)")
    serve = sub.add_parser("serve-check", help="mixed-adapter batches: equal to one request at a time, and their "
                                               "throughput vs one adapter at a time")
    serve.add_argument("output", help="the task-experts output folder (with a fitted router)")
    serve.add_argument("--input", required=True, type=existing_file, help="jsonl requests (as for route)")
    serve.add_argument("--top-k", type=positive_int, default=2)
    serve.add_argument("--batch-size", type=positive_int, default=8)
    serve.add_argument("--max-new-tokens", type=positive_int, default=16)
    serve.add_argument("--compare", type=positive_int, default=8,
                       help="requests compared one by one against the mixed batch (greedy tokens, logits)")
    export = sub.add_parser("export-vllm", help="write the adapters and EngineArgs / LoRARequest entries for vLLM")
    export.add_argument("output", help="the task-experts output folder")
    export.add_argument("--max-lora-rank", type=positive_int, required=True,
                        help="vLLM's max_lora_rank (1, 8, 16, 32, 64, 128, 256, 320 or 512)")
    export.add_argument("--max-loras", type=positive_int, help="adapters per batch (default: all of them)")
    export.add_argument("--no-experts", dest="include_experts", action="store_false",
                        help="serve only the merges, not the single experts")
    export.add_argument("--routes", type=existing_file, help="a `route` output: also write each request's adapter")
    parser.set_defaults(func=cmd_experts, check=check_experts_arguments)


def check_experts_arguments(args: argparse.Namespace) -> None:
    if args.experts_command == "fit-router":
        _check_groups(args.group)
    if args.experts_command != "merge":
        return
    if args.replace and args.name is None:
        raise UsageError("--replace", "only with --name (a merge without one is named by its tasks, weights and "
                                      "method: merging it again writes the same adapter)")
    if args.from_routes is not None:
        for flag, value in (("--tasks", args.tasks), ("--name", args.name), ("--rank", args.rank)):
            if value is not None:
                raise UsageError(flag, "not with --from-routes (every combination in the routes is merged)")
        if args.weights is not None:
            raise UsageError("--weights", "not with --from-routes: a route line carries its own weights (per request), "
                                          "and --from-routes merges each task combination with equal weights, as "
                                          "MELD merged its pairs; merge one combination with --tasks ... --weights "
                                          "...")
        if args.method != "cat":
            raise UsageError("--method", "--from-routes merges with cat (exact); merge one combination with svd")
    elif not args.tasks:
        raise UsageError("--tasks", "required (two tasks or more), or --from-routes")


def _check_groups(groups: list[tuple[str, list[str]]]) -> None:
    """``--group``: one flag per group, each task in one group once (a later group would silently take it)."""
    group_of: dict[str, str] = {}
    names: set[str] = set()
    for name, members in groups:
        if name in names:
            raise UsageError("--group", f"group {name!r} given twice; list all its tasks in one --group "
                                        f"{name}=task,task,...")
        names.add(name)
        for task in members:
            if task in group_of:
                where = "twice in group" if group_of[task] == name else f"in groups {group_of[task]!r} and"
                raise UsageError("--group", f"task {task!r} is {where} {name!r}; a task belongs to one group, once")
            group_of[task] = name


def _manifest(output: str, *, router: bool = True) -> Any:
    """The run's manifest after the whole run folder is checked (:func:`moepatch.task_experts.run_folder.read_run`):
    a missing folder is a bad argument (exit 2), a broken file inside the run a failed check naming it (exit 1)."""
    from moepatch.task_experts.manifest import manifest_folder
    from moepatch.task_experts.run_folder import read_run

    try:
        manifest_folder(output)
    except ValueError as error:
        raise UsageError("output", str(error)) from None
    try:
        return read_run(output, router=router)
    except ValueError as error:
        raise CommandError(str(error)) from None


def _run_inputs(manifest: Any) -> dict[str, Path]:
    """The files of a task-experts run a command reads and must never write over: its manifest, each expert's
    folder, the fitted router and the merged adapters."""
    from moepatch.task_experts.manifest import MANIFEST_NAME

    inputs = {"output (manifest)": manifest.folder / MANIFEST_NAME, "output (router)": manifest.folder / ROUTER_FOLDER,
              "output (merged adapters)": manifest.folder / "merged"}
    inputs.update({f"output (expert {task!r})": manifest.expert_path(task) for task in manifest.tasks})
    return inputs


def _is_routes_file(path: Path) -> bool:
    """Whether ``path`` is an earlier ``experts route`` output (every line a JSON object with a 'tasks' list), the
    only existing file ``--routes`` may replace."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return all(isinstance(record := json.loads(line), dict) and isinstance(record.get("tasks"), list)
                   for line in lines)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _print_report(report: dict[str, Any]) -> None:
    from moepatch.tools.report import format_table

    tasks = sorted(report["confusion"])
    if report["exclude"] == "none":
        rows = [[task, str(sum(report["confusion"][task].values())), f"{report['per_task_accuracy'][task]:.3f}"]
                + [str(report["confusion"][task].get(other, 0)) for other in tasks] for task in tasks]
        print("\n".join(format_table(["task", "requests", "accuracy"] + [f"->{t}" for t in tasks], rows,
                                     rule=False)))
        print(f"routing accuracy {report['accuracy']:.3f}, top-{report['top_k']} recall "
              f"{report['top_k_recall']:.3f} on {report['requests']} held-out requests")
    else:
        chosen = sorted({t for row in report["confusion"].values() for t in row})
        rows = [[task] + [str(report["confusion"][task].get(other, 0)) for other in chosen] for task in tasks]
        print("\n".join(format_table(["task"] + [f"->{t}" for t in chosen], rows, rule=False)))
        if "same_group_accuracy" in report:
            print(f"{report['exclude']}: routed to a task of the same group {report['same_group_accuracy']:.3f}")


def cmd_fit_router(args: argparse.Namespace) -> int:
    from moepatch.task_experts.fitting import RouterSettings
    from moepatch.task_experts.fitting import fit_router

    manifest = _manifest(args.output, router=False)
    data = Path(args.data) if args.data else manifest.folder.parent / "data"
    if not data.is_dir():
        raise UsageError("--data", f"{data} is not a data folder" + ("" if args.data else
                                                                     " (OUT/data is written by --synthetic_data)"))
    groups = {}
    for name, members in args.group:
        for task in members:
            if task not in manifest.tasks:
                raise UsageError("--group", f"unknown task {task!r} in group {name!r}; the experts are "
                                            f"{manifest.tasks}")
            groups[task] = name
    if args.encoder is not None:
        from moepatch.task_experts.router import encoder_folder_problem

        problem = encoder_folder_problem(args.encoder)
        if problem is not None:
            raise UsageError("--encoder", problem)
        if args.encoder_pooling is not None and (Path(args.encoder) / "modules.json").is_file():
            raise UsageError("--encoder-pooling", f"{args.encoder} is a sentence-transformers folder: its own pooling "
                                                  "module is used")
    elif args.encoder_pooling is not None:
        raise UsageError("--encoder-pooling", "only with --encoder (a transformers encoder folder)")
    if args.encoder is not None and args.features is not None:
        raise UsageError("--features", "only applies to the base model's signatures; --encoder embeds the requests "
                                       "itself, so it would be ignored: drop --features or --encoder")
    router_folder = manifest.folder / ROUTER_FOLDER  # replaced as a whole: no input may lie inside it
    from moepatch.staged_output import check_writable_target
    from moepatch.staged_output import refuse_output_in_inputs

    refuse_output_in_inputs(router_folder, "output", {"--data": args.data, "--descriptions": args.descriptions,
                                                      "--encoder": args.encoder}, blame_input=True)
    check_writable_target(router_folder, "output")
    scored = args.head == "contrastive" or (args.finetune_encoder and args.positives == "scored")
    applies = {"positives": args.finetune_encoder, "positive_margin": scored}
    for name, default in FIT_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if getattr(args, name) != default and not applies.get(name, args.finetune_encoder):
            raise UsageError(flag, "only applies to " + ("the contrastive head or --finetune-encoder with scored "
                                                         "positives" if name == "positive_margin"
                                                         else "--finetune-encoder") + "; it would be ignored")
    descriptions = {}
    if args.descriptions is not None:
        try:
            descriptions = json.loads(args.descriptions.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CommandError(f"{args.descriptions} (--descriptions): not a JSON file ({error})") from None
        if not isinstance(descriptions, dict):
            raise CommandError(f"{args.descriptions} (--descriptions): expected a JSON object task -> text")
    from moepatch.task_experts.encoder_tuning import EncoderTuning

    tuning = EncoderTuning(args.encoder_epochs, args.encoder_lr, args.encoder_temperature, args.encoder_batch_size,
                           args.seed)
    features = list(args.features or ("hidden", "load"))
    settings = RouterSettings(args.head, features, args.encoder, args.encoder_pooling or "cls", args.holdout,
                              args.max_examples, args.max_length, args.batch_size, groups, args.seed,
                              args.positive_margin, descriptions, args.finetune_encoder, args.positives, tuning)
    try:
        _, report = fit_router(manifest, data, settings)
    except FieldError as error:
        raise error.as_usage_error(FIT_ROUTER_FLAGS) from None
    if report is not None:
        _print_report(report)
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from moepatch.task_experts.requests import read_requests
    from moepatch.task_experts.router import TaskRouter
    from moepatch.task_experts.router import routing_report

    manifest = _manifest(args.output)
    try:
        router = TaskRouter.load(manifest.folder / ROUTER_FOLDER)
    except ValueError as error:
        raise UsageError("output", str(error)) from None
    if args.top_k > len(router.tasks):
        raise UsageError("--top-k", f"{args.top_k} is more than the router's {len(router.tasks)} tasks")
    try:
        requests = read_requests(args.input)
    except ValueError as error:
        raise CommandError(f"{error} (--input)") from None
    known = [request.task for request in requests if request.task is not None]  # the given tasks, in order
    unknown = sorted({task for task in known if task not in router.tasks})
    if unknown:
        raise CommandError(f"{args.input} (--input): task(s) {unknown} are not among the router's {router.tasks}")
    if args.exclude != "none" and len(known) != len(requests):
        raise UsageError("--exclude", "needs every request's own 'task' in --input")
    if args.exclude != "none":  # the fewest tasks the exclusion leaves any request: --top-k must fit in them
        left = {task: len(router.tasks) - len(router.excluded(task, args.exclude)) for task in set(known)}
        task = min(left, key=lambda name: (left[name], name), default=None)
        if task is not None and left[task] == 0:
            raise UsageError("--exclude", f"{args.exclude} leaves no task for requests of {task!r} (its group holds "
                                          "every task of the router)")
        if task is not None and args.top_k > left[task]:
            raise UsageError("--top-k", f"{args.top_k} is more than the {left[task]} task(s) --exclude {args.exclude} "
                                        f"leaves for requests of {task!r} (of the router's {len(router.tasks)}); give "
                                        f"--top-k {left[task]} or less")
    routes_path = Path(args.routes) if args.routes else manifest.folder / "routes.jsonl"
    from moepatch.staged_output import check_writable_target
    from moepatch.staged_output import refuse_output_in_inputs
    from moepatch.staged_output import staged_file

    check_writable_target(routes_path, "--routes", folder=False)  # a folder, under a file, /proc: before routing
    refuse_output_in_inputs(routes_path, "--routes", {"--input": args.input, **_run_inputs(manifest),
                                                      "the experts' base (manifest.json 'base')": manifest.base})
    if routes_path.is_file() and not _is_routes_file(routes_path):
        raise UsageError("--routes", f"{routes_path} exists and is not a routes file written by `experts route` "
                                     "(one JSON object with 'tasks' per line): it would be overwritten; choose "
                                     "another path")
    from moepatch.task_experts.fitting import make_encoder

    encoder = make_encoder(manifest, router.encoder)
    try:
        router.check_encoder(encoder)  # router.safetensors fits the encoder's signatures: before routing them all
    except ValueError as error:
        raise CommandError(str(error)) from None
    signatures = encoder.encode([request.text for request in requests])
    own = [request.task for request in requests]
    choices = router.route(signatures, args.top_k, own_tasks=own, exclude=args.exclude)
    with staged_file(routes_path) as scratch, scratch.open("w") as stream:
        for request, choice in zip(requests, choices, strict=True):
            stream.write(json.dumps({"where": request.where, "text": request.text, "tasks": choice.tasks,
                                     "weights": choice.weights, **({"task": request.task} if request.task else {})})
                         + "\n")
    print(f"routed {len(requests)} requests (top-{args.top_k}, exclude {args.exclude}) -> {routes_path}")
    if known and len(known) == len(requests):  # every request's own task: ``known`` is ``own``
        _print_report(routing_report(router, signatures, known, args.top_k, args.exclude))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from moepatch.task_experts.manifest import MERGED_FOLDER
    from moepatch.task_experts.merging import MergeRequest
    from moepatch.task_experts.merging import check_request
    from moepatch.task_experts.merging import combinations_from_routes
    from moepatch.task_experts.merging import load_experts
    from moepatch.task_experts.merging import merge_loaded
    from moepatch.task_experts.merging import write_merges

    manifest = _manifest(args.output)
    if args.from_routes is not None:
        try:
            requests = combinations_from_routes(args.from_routes, None, manifest.tasks)
        except FieldError as error:
            raise error.as_usage_error(MERGE_FLAGS) from None
        except ValueError as error:  # a malformed routes file, named with its line
            raise CommandError(f"{error} (--from-routes)") from None
    else:
        weights = args.weights if args.weights is not None else [1.0 / len(args.tasks)] * len(args.tasks)
        requests = [MergeRequest(list(args.tasks), list(weights), args.method, args.rank, args.name)]
    for request in requests:  # every merge checked before the base is loaded
        try:
            check_request(manifest, request, args.max_lora_rank)
        except FieldError as error:
            raise error.as_usage_error(MERGE_FLAGS) from None
        except ValueError as error:  # an expert's adapter config that cannot be read: the tasks named it
            raise UsageError("--tasks", str(error)) from None
    if args.name is not None and not args.replace:
        from moepatch.task_experts.merging import read_merges

        existing = manifest.folder / MERGED_FOLDER / args.name
        if existing.exists() or any(entry.get("name") == args.name
                                    for entry in read_merges(manifest.folder / MERGED_FOLDER)):
            raise UsageError("--name", f"a merged adapter {args.name!r} already exists ({existing}); choose another "
                                       "name, or pass --replace to replace it")
    tasks = list(dict.fromkeys(task for request in requests for task in request.tasks))
    output = manifest.folder / MERGED_FOLDER
    from moepatch.staged_output import check_writable_target
    from moepatch.staged_output import refuse_output_in_inputs
    from moepatch.staged_output import staged_folder
    from moepatch.task_experts.manifest import base_model

    refuse_output_in_inputs(output, "output", {"--from-routes": args.from_routes}, blame_input=True)
    check_writable_target(output, "output")  # before the base is loaded
    try:
        model, _ = base_model(manifest)
    except ValueError as error:  # the manifest's base: missing, or not the model the experts were trained on
        raise CommandError(str(error)) from None

    peft_model = load_experts(model, manifest, tasks)
    results = []
    with staged_folder(output, start_from_existing=True) as scratch:  # every merge lands, or none does
        for request in requests:
            result = merge_loaded(peft_model, manifest, request, scratch)
            results.append(result)
            print(f"{result.name}: {result.method} of {result.tasks} weights {result.weights} -> rank {result.rank}, "
                  f"max relative error {result.max_relative_error:.2e} over {len(result.module_errors)} modules")
        write_merges(scratch, results)
    print(f"wrote {len(results)} merged adapter(s) to {output} (merges.json)")
    return 0


def cmd_serve_check(args: argparse.Namespace) -> int:
    import torch

    from moepatch.task_experts.requests import read_requests
    from moepatch.task_experts.serving import TaskExpertModel
    from moepatch.task_experts.serving import throughput
    from moepatch.tools.report import format_table

    manifest = _manifest(args.output)
    if not (manifest.folder / ROUTER_FOLDER / "router.json").is_file():
        raise UsageError("output", f"no fitted router in {manifest.folder / ROUTER_FOLDER}; run "
                                   "`moepatch experts fit-router` first")
    try:
        requests = read_requests(args.input)
    except ValueError as error:
        raise CommandError(f"{error} (--input)") from None
    if args.top_k > len(manifest.tasks):
        raise UsageError("--top-k", f"{args.top_k} is more than the {len(manifest.tasks)} experts")
    unknown = sorted({request.task for request in requests if request.task and request.task not in manifest.tasks})
    if unknown:
        raise CommandError(f"{args.input} (--input): task(s) {unknown} are not among the experts {manifest.tasks}")
    if args.compare > len(requests):
        raise UsageError("--compare", f"{args.compare} is more than the {len(requests)} requests in --input")
    serving = TaskExpertModel.from_experts(args.output)
    texts = [request.text for request in requests]
    adapters = [serving.adapter_for(tasks) for tasks in serving.route(texts, args.top_k)]
    checked = min(args.compare, len(texts))
    mixed = serving.generate_with(texts[:checked], adapters[:checked], args.max_new_tokens)
    alone = [serving.generate_with([text], [adapter], args.max_new_tokens)[0]
             for text, adapter in zip(texts[:checked], adapters[:checked], strict=True)]
    mixed_logits = serving.logits(texts[:checked], adapters[:checked])
    alone_logits = torch.cat([serving.logits([t], [a])
                              for t, a in zip(texts[:checked], adapters[:checked], strict=True)])
    same = sum(a == b for a, b in zip(mixed, alone, strict=True))
    difference = (mixed_logits - alone_logits).abs().max().item()
    print(f"{'mixed batches' if serving.mixed_batches else 'one batch per adapter (target_parameters adapters)'}: "
          f"{same}/{checked} requests generate the same greedy tokens as alone; max next-token logit difference "
          f"{difference:.2e}")
    figures = throughput(serving, texts, adapters, args.batch_size, args.max_new_tokens)
    rows = [["mixed batches (arrival order)", str(figures["batches_mixed"]), f"{figures['mixed_tokens_per_s']:.1f}"],
            ["one adapter at a time", str(figures["batches_one_at_a_time"]),
             f"{figures['one_adapter_at_a_time_tokens_per_s']:.1f}"]]
    print("\n".join(format_table(["serving", "batches", "tokens/s"], rows, rule=False)))
    print(f"throughput ratio mixed / one adapter at a time: {figures['ratio']:.2f} ({len(texts)} requests, "
          f"{len(set(adapters))} adapters, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
          f"{serving.model.device})")
    if same != checked:
        raise CommandError(f"{checked - same} request(s) generate differently in a mixed batch than alone")
    return 0


def cmd_export_vllm(args: argparse.Namespace) -> int:
    from moepatch.task_experts.vllm_export import export_vllm

    manifest = _manifest(args.output)
    from moepatch.staged_output import check_writable_target
    from moepatch.staged_output import refuse_output_in_inputs
    from moepatch.task_experts.vllm_export import VLLM_FOLDER

    refuse_output_in_inputs(manifest.folder / VLLM_FOLDER, "output", {"--routes": args.routes}, blame_input=True)
    check_writable_target(manifest.folder / VLLM_FOLDER, "output")
    try:
        path = export_vllm(manifest, args.max_lora_rank, max_loras=args.max_loras,
                           include_experts=args.include_experts, routes=args.routes)
    except FieldError as error:
        raise error.as_usage_error(EXPORT_VLLM_FLAGS) from None
    except ValueError as error:  # a malformed file, named first in the message
        raise CommandError(str(error)) from None
    data = json.loads(path.read_text())
    print(f"wrote {len(data['lora_requests'])} adapters and {path} for vLLM ({data['architecture']})")
    print("EngineArgs(" + ", ".join(f"{key}={value!r}" for key, value in data["engine_args"].items()) + ")")
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    return {"fit-router": cmd_fit_router, "route": cmd_route, "merge": cmd_merge, "serve-check": cmd_serve_check,
            "export-vllm": cmd_export_vllm}[args.experts_command](args)
