"""``moepatch inspect PATH``: a checkpoint's MoE structure and its moepatch block, checked on a weightless skeleton
(no weight is loaded, so it works on checkpoints of any size); ``moepatch inspect --help-config``: every field the
block accepts, with its type, default and help (read from the declarations the parser checks against)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from moepatch.cli.arguments import checkpoint_config
from moepatch.cli.common import skeleton
from moepatch.errors import UsageError


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """``PATH`` (a checkpoint folder), or ``--help-config`` alone."""
    parser.add_argument("path", nargs="?", type=checkpoint_config, help="a checkpoint folder with config.json")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--help-config", action="store_true",
                        help="print every field of the moepatch block (type, default, help) and exit")
    parser.set_defaults(func=cmd_inspect, check=check_inspect_arguments)


def check_inspect_arguments(args: argparse.Namespace) -> None:
    """A checkpoint to inspect, unless the schema is asked for."""
    if args.path is None and not args.help_config:
        raise UsageError("path", "required: a checkpoint folder with config.json (or --help-config)")


def print_config_schema() -> int:
    """``--help-config``: each block entry, then each of its fields with type, default (per method) and help."""
    from moepatch.config import CONFIG_KEY
    from moepatch.config import config_schema
    from moepatch.schema import format_entries

    print(f'The "{CONFIG_KEY}" block of config.json: each key, the values it takes, and its fields.\n')
    print(format_entries(config_schema()), end="")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the structure moepatch sees and the plan its block makes; status 1 lists the block's problems, 2 a
    model moepatch cannot patch.  ``--help-config`` prints the block's schema instead."""
    if getattr(args, "help_config", False):
        return print_config_schema()
    from model_patches.structure import describe
    from moepatch.config import CONFIG_KEY
    from moepatch.config import MoePatchConfig
    from moepatch.errors import UnsupportedModelError
    from moepatch.patch import plan_each
    from moepatch.patch import problem_lines

    config, model = skeleton(args.path, args.trust_remote_code)
    raw = getattr(config, CONFIG_KEY, None)
    print(f"checkpoint: {args.path}")
    print(f"model:      {type(model).__name__} (model_type={config.model_type!r})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # every parse-time problem, one by one; the features that did parse are still planned below, so a bad
        # layer index is listed beside a bad rate (a user fixes the whole block in one go)
        settings, problems = MoePatchConfig.parse_each(raw)
        try:
            settings.adopt_outside_block(config)
        except ValueError as error:
            problems.extend(problem_lines(error))
    notes = [str(w.message) for w in caught]
    try:
        moe = describe(model, family=settings.family, verify=False)
    except UnsupportedModelError as error:
        print(f"family:     unsupported\n  {error}")
        print(f"moepatch inspect: error: {type(model).__name__} is not a model moepatch can patch (see above)",
              file=sys.stderr)
        return 2
    spec = moe.family
    renorm = "yes" if moe.renormalize else "no"
    print(f"family:     {spec.name}" + (" (structural match; routers are probed when weights are loaded)"
                                         if not spec.model_types else ""))
    print(f"layers:     {moe.num_layers} decoder layers; MoE layers {moe.moe_layer_indices}; "
          f"dense layers {list(moe.dense_layers)}")
    if moe.routing_problem is not None:
        routing = f"not known exactly ({moe.routing_problem})"
    else:
        rule = spec.routing
        weights = {"scores": "the chosen unbiased scores", "softmax_of_chosen": "softmax over the chosen logits",
                   "sigmoid_of_chosen": "sigmoid of the chosen logits",
                   "logsigmoid_softmax_of_chosen": "sigmoid of the chosen logits normalised with the shared experts' "
                                                   "in the log domain"}[rule.weights_from]
        routing = (f"top-k of the {rule.selects_on}; weights: {weights}, renormalised: {renorm}"
                   + (f", × {rule.scaling}" if rule.scaling else "")
                   + (f", × learned {rule.weights_scale}" if rule.weights_scale else "")
                   + (f", × {rule.expert_scale}[chosen expert]" if rule.expert_scale else "")
                   + f"; weights dtype: {rule.weights_dtype}"
                   + ("; router input: " + " × ".join((f"{rule.input_norm}(hidden)" if rule.input_norm else "hidden",
                                                        *rule.input_scales))
                      if rule.input_norm or rule.input_scales else "")
                   + ("; handed to the experts sorted by expert" if rule.expert_sorted else "")
                   + ("; a skip class scored after the experts (chosen: expert 0 with weight 0)" if rule.skip_class
                      else "")
                   + (f"; logits by {rule.logits_function.__module__}.{rule.logits_function.__name__}"
                      if rule.logits_function is not None else ""))
    hashed = f"; hashed layers {list(moe.hashed_layers)}" if moe.hashed_layers else ""
    print(f"experts:    {moe.num_experts} routed, top-{moe.top_k}; routing: {routing}{hashed}")
    print(f"shared:     {', '.join(spec.shared_expert_attrs) or 'none'}")
    print(f"router:     {moe.layers[0].name}.{spec.router_attr} ({type(moe.layers[0].router).__name__}); "
          f"experts: {moe.layers[0].name}.{spec.experts_attr} ({type(moe.layers[0].experts).__name__})")
    print(f"gate_substring freezes: {spec.gate_substring_note}")
    shown = raw
    if isinstance(raw, dict) and isinstance(raw.get("c2r"), dict) and "collaborative_list" in raw["c2r"]:
        shown = {**raw, "c2r": {**raw["c2r"], "collaborative_list": "[...]"}}
    print(f"moepatch block ({CONFIG_KEY!r} in config.json): {json.dumps(shown) if raw is not None else 'absent'}")
    try:
        plan, errors = plan_each(moe, settings)  # each feature that parsed, its failures kept rather than raised
        for description in plan.describe():
            for line in description.splitlines():
                print(f"  {line}")
        problems.extend(line for error in errors for line in problem_lines(error))
    except ValueError as error:  # an UnsupportedModelError while planning: still one problem of this checkpoint
        problems.extend(problem_lines(error))
    from moepatch.cli.common import weights_problem

    weights_check = weights_problem(Path(args.path), model)
    print(f"weights:    {weights_check or 'the safetensors headers fit the config (no tensor read)'}")
    if weights_check is not None:
        problems.append(weights_check)
    for note in notes:
        print(f"  warning: {note}")
    for problem in problems:
        print(f"  error: {problem}")
    if not problems:
        print("  config: OK" + (" (no feature enabled)" if settings.is_empty else ""))
        return 0
    if weights_check is not None and len(problems) == 1:
        print(f"moepatch inspect: error: {weights_check}", file=sys.stderr)
        return 1
    print(f"moepatch inspect: error: {Path(args.path) / 'config.json'}: {len(problems)} problem(s) in the moepatch "
          "config or the weights (listed above)", file=sys.stderr)
    return 1
