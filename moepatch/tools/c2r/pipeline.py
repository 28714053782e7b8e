"""C2R on a checkpoint folder, end to end: what ``moepatch profile`` and ``moepatch place`` run.

* **profile** — :func:`profile_checkpoint` loads the checkpoint (vanilla routing unless asked otherwise: C2R's
  method profiles the unmodified model) and counts co-activations over a corpus; :func:`save_profile_results`
  writes the matrices, a heatmap and the official ``top_t`` / ``collaborative_list`` fields.
* **place** — :func:`place_checkpoint` profiles under vanilla routing and, when the checkpoint has C2R fields,
  under C2R too, keeping every token's chosen experts, so copies per token are counted exactly;
  :func:`place_matrices` reports from saved matrices; :func:`write_planned_checkpoint` renumbers the experts so
  contiguous sharding places the planned groups together.

Arguments are expected checked (the command checks them against a weightless skeleton before calling these), so
the functions here only load, compute and write.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

import torch

from model_patches.structure import MoEModel
from model_patches.structure import describe
from moepatch.c2r.config import C2RConfig
from moepatch.c2r.selection import plan_c2r
from moepatch.config import CONFIG_KEY
from moepatch.config import MoePatchConfig
from moepatch.errors import CommandError
from moepatch.loading.pretrained import load_for_command
from moepatch.patch import apply
from moepatch.patch import patched
from moepatch.staged_output import staged_folder
from moepatch.tools.c2r.permutation import check_permutable
from moepatch.tools.c2r.permutation import routing_groups
from moepatch.tools.c2r.permutation import write_permuted_checkpoint
from moepatch.tools.c2r.placement import contiguous_placement
from moepatch.tools.c2r.placement import expert_permutation
from moepatch.tools.c2r.placement import placement_report
from moepatch.tools.c2r.profiling import CoactivationProfile
from moepatch.tools.c2r.profiling import corpus_batches
from moepatch.tools.c2r.profiling import profile_coactivation
from moepatch.tools.c2r.profiling import write_c2r_fields
from moepatch.tools.c2r.traffic import add_dispatch_from_copies
from moepatch.tools.c2r.traffic import dispatch_columns
from moepatch.tools.c2r.traffic import predict_dispatch
from moepatch.tools.c2r.traffic import row_size
from moepatch.tools.report import plot_coactivation

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MIN_CHOICES_PER_EXPERT = 64
"""Fewest top-k choices per expert, on average, that C2R fields are written from (see :func:`default_min_tokens`)."""


def default_min_tokens(num_experts: int, top_k: int) -> int:
    """Fewest tokens ``profile`` writes C2R fields from: 64 choices per expert on average (64·E/k)."""
    return math.ceil(MIN_CHOICES_PER_EXPERT * num_experts / top_k)




def has_c2r_fields(config: Any) -> bool:
    """The checkpoint routes under C2R when applied (official top-level fields or a ``c2r`` entry, not switched
    off)."""

    return MoePatchConfig.from_model(config).c2r is not None


# ---------------------------------------------------------------------------------------------------- profile
@dataclass
class CheckpointProfile:
    """One profiling run of a checkpoint, and how it routed during the run."""

    profile: CoactivationProfile
    moe: MoEModel
    """The loaded model's structure (C2R fields are validated against it before they are written)."""
    routed_under_c2r: bool
    """The run routed under the checkpoint's C2R (``as_configured`` and C2R fields present)."""
    c2r_switched_off: bool
    """The checkpoint has C2R fields, and they were switched off for the run (the default)."""
    row: dict[str, Any] | None = None
    """What one dispatched row weighs (:func:`dispatch_row`), for a placement report of the same run."""


@dataclass
class ProfileOutputs:
    """Files :func:`save_profile_results` wrote."""

    matrices: Path
    heatmap: Path | None
    """`None` when matplotlib is not installed."""
    config: Path | None
    """The config.json that received ``top_t`` and ``collaborative_list``; `None` when not written."""
    top_t: int


def profile_checkpoint(
    checkpoint: Path,
    tokenizer: Any,
    documents: list[str],
    *,
    as_configured: bool = False,
    batch_size: int = 4,
    max_length: int = 512,
    max_tokens: int | None = None,
    seed: int = 0,
    keep_choices: bool = False,
) -> CheckpointProfile:
    """Load ``checkpoint`` and count expert co-activations over ``documents`` (seeded order, padding excluded).

    The checkpoint's own moepatch block is applied with C2R switched off: C2R's method profiles the unmodified
    routing.  ``as_configured=True`` profiles the routing the checkpoint is configured with, C2R included.  The
    folder's own code never runs, and a checkpoint missing a weight is refused (random weights profile nothing).
    ``keep_choices`` keeps every token's experts too, for :func:`place_profiles` on the same run.

    Raises:
        CommandError: the weights cannot be read or some are missing.
    """

    model = load_for_command(checkpoint, patch=False)
    block = getattr(model.config, CONFIG_KEY, None)
    overrides = None if as_configured else {**(block if isinstance(block, dict) else {}), "c2r": False}
    handle = apply(model, overrides)
    batches = corpus_batches(tokenizer, documents, batch_size=batch_size, max_length=max_length, seed=seed)
    try:
        profile = profile_coactivation(model, batches, max_tokens=max_tokens, keep_choices=keep_choices)
    finally:
        handle.remove()
    return CheckpointProfile(
        profile=profile,
        moe=handle.require_moe_model(),
        routed_under_c2r=bool(handle.c2r_routers),
        c2r_switched_off=not as_configured and has_c2r_fields(model.config),
        row=dispatch_row(model),
    )


def save_profile_results(
    run: CheckpointProfile,
    output: Path,
    *,
    top_t: int,
    plot_positions: list[int],
    config_checkpoint: Path | None = None,
    placement: Mapping[str, Any] | None = None,
) -> ProfileOutputs:
    """Write ``output/coactivation.safetensors``, a heatmap of the MoE layers at ``plot_positions`` (positions
    among the MoE layers, negative from the end) and, into ``config_checkpoint/config.json`` when given, the
    official ``top_t`` / ``collaborative_list`` fields; ``placement`` (a report of :func:`place_profiles`) goes to
    ``output/placement.json``.

    The fields are planned on the profiled model first, so nothing is written from a ranking C2R would refuse.

    Raises:
        ValueError: ``top_t`` or the ranking do not fit the model.
    """

    profile = run.profile
    ranking = profile.collaborative_list()
    for layer in run.moe.hashed_layers:  # a hashed router has no learned choice to constrain: C2R leaves it alone
        ranking[layer] = None
    plan_c2r(run.moe, C2RConfig(top_t=top_t, collaborative_list=ranking, source="official"))  # validate

    plot_layers = [profile.layers[i] for i in plot_positions]
    heatmap: Path | None = output / "coactivation.png"
    with staged_folder(output, start_from_existing=True) as staging:  # all of it lands, or none of it
        profile.save(staging / "coactivation.safetensors")
        try:
            plot_coactivation(profile, plot_layers, staging / "coactivation.png")
        except ImportError:
            heatmap = None
        if placement is not None:

            (staging / "placement.json").write_text(json.dumps(placement, indent=1))
        config = write_c2r_fields(config_checkpoint, top_t, ranking) if config_checkpoint is not None else None
    return ProfileOutputs(matrices=output / "coactivation.safetensors", heatmap=heatmap, config=config, top_t=top_t)


# ------------------------------------------------------------------------------------------------------ place
def profile_for_placement(
    checkpoint: Path,
    tokenizer: Any,
    documents: list[str],
    *,
    batch_size: int = 4,
    max_length: int = 512,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, CoactivationProfile]:
    """Profile ``checkpoint`` under vanilla routing and, when it has C2R fields, under C2R, keeping every token's
    chosen experts.  Returns ``{"vanilla": …, "c2r": …}`` (``"c2r"`` only with C2R fields)."""

    model = load_for_command(checkpoint, patch=False)  # never runs the folder's own code; no weight missing
    return _profile_loaded(model, tokenizer, documents, batch_size=batch_size, max_length=max_length,
                           max_tokens=max_tokens, seed=seed, progress=progress)


def _profile_loaded(model: torch.nn.Module, tokenizer: Any, documents: list[str], *, batch_size: int,
                    max_length: int, max_tokens: int | None, seed: int, progress: bool
                    ) -> dict[str, CoactivationProfile]:
    """:func:`profile_for_placement` on an already loaded model."""

    profiles = {}
    for routing, config in (("vanilla", {"c2r": False}), ("c2r", None)):
        with patched(model, config) as handle:
            if routing == "c2r" and not handle.c2r_routers:
                continue
            batches = corpus_batches(tokenizer, documents, batch_size=batch_size, max_length=max_length, seed=seed)
            profiles[routing] = profile_coactivation(model, batches, max_tokens=max_tokens, keep_choices=True,
                                                     progress=progress)
    return profiles


def dispatch_row(model: torch.nn.Module) -> dict[str, Any]:
    """What one dispatched row of ``model`` weighs: the hidden size (the width of the hidden states the experts
    receive) times the element size of the dtype it runs in as loaded (the checkpoint's ``dtype``: transformers
    loads ``dtype="auto"``), for :func:`place_profiles`'s ``row``."""
    loaded = cast("PreTrainedModel", model)  # a transformers model, as load_for_command returns it
    return row_size(int(loaded.config.get_text_config().hidden_size), loaded.dtype, "the checkpoint's dtype as loaded")


def place_profiles(profiles: Mapping[str, CoactivationProfile], ep_size: int, *, seed: int = 0,
                   routing_groups: Mapping[int, int] | None = None, row: Mapping[str, Any] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Placement reports over ``ep_size`` devices from profiles with kept choices (copies per token counted
    exactly), with absolute decoder-layer indices in the per-layer rows.  ``routing_groups`` (absolute layer →
    ``G``, see :func:`moepatch.tools.c2r.permutation.routing_groups`) keeps those layers' plans inside routing groups.

    Each layer row also gets a ``"dispatch"`` entry (:func:`moepatch.tools.c2r.traffic.dispatch_columns`): remote rows
    per token of the per-pair and the dedup dispatch for the contiguous and the planned placement, predicted with
    :func:`moepatch.tools.c2r.traffic.predict_dispatch` from every profiled token's experts (a token's source rank
    taken as uniform over the ranks), and bytes when ``row`` (:func:`dispatch_row`) gives the row size; the report's
    ``"dispatch"`` says how."""

    routing_groups = dict(routing_groups or {})
    reports: dict[str, dict[str, Any]] = {}
    for routing, profile in profiles.items():
        kept = profile.choices
        if kept is None:
            raise ValueError(f"place_profiles: the {routing!r} profile kept no choices (profile with keep_choices)")
        report = placement_report(
            profile.matrices, ep_size, top_k=profile.top_k, seed=seed,
            indices={slot: kept[layer] for slot, layer in enumerate(profile.layers)},
            routing_groups={slot: routing_groups[layer] for slot, layer in enumerate(profile.layers)
                            if layer in routing_groups},
        )
        contiguous = contiguous_placement(report["num_experts"], ep_size)
        row_bytes = None if row is None else row["row_bytes"]
        for entry in report["layers"]:  # positions → absolute decoder-layer indices
            choices = kept[profile.layers[entry["layer"]]]
            entry["dispatch"] = dispatch_columns(
                predict_dispatch(choices, contiguous), predict_dispatch(choices, entry["groups"]),
                top_k=profile.top_k, ep_size=ep_size, row_bytes=row_bytes)
            entry["layer"] = profile.layers[entry["layer"]]
        report["dispatch"] = {"source_rank": "uniform", **(dict(row) if row is not None else {"row_bytes": None})}
        reports[routing] = report
    return reports


def place_checkpoint(
    checkpoint: Path,
    tokenizer: Any,
    documents: list[str],
    ep_size: int,
    *,
    batch_size: int = 4,
    max_length: int = 512,
    max_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
    permuted_for: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Placement reports of a checkpoint's experts over ``ep_size`` devices: ``"vanilla"`` routing, and ``"c2r"``
    when the checkpoint has C2R fields (see :func:`profile_for_placement` and :func:`place_profiles`).

    Layers whose router has a binding group limit are planned within their routing groups (read from the loaded
    model's rule).  Where the exact rule is unknown the plan cannot know of a group limit: the reports say so in
    ``"notes"``.  ``permuted_for`` names what will write a permuted copy from the plan (``--write-permuted``): the
    loaded model's experts are then checked renumberable first, before profiling, and a refusal names it.

    Raises:
        CommandError: ``permuted_for`` is given and the experts cannot be renumbered, or the group limit is
            malformed.
    """

    model = load_for_command(checkpoint, patch=False)  # never runs the folder's own code; no weight missing
    moe = describe(model)
    notes: list[str] = []
    if permuted_for is not None:
        try:
            check_permutable(moe)
        except ValueError as error:
            raise CommandError(f"{permuted_for}: {checkpoint}: {error}") from None
    try:
        if moe.routing_problem is None:
            groups = {index: limit.groups for index, limit in routing_groups(moe).items()}
        else:
            groups = {}
            notes.append(f"the routers' exact routing rule is unknown ({moe.routing_problem}): the plan cannot know "
                         "of a group limit, and a permuted copy of this checkpoint is refused")
    except ValueError as error:
        raise CommandError(f"{checkpoint}: {error}") from None
    profiles = _profile_loaded(model, tokenizer, documents, batch_size=batch_size, max_length=max_length,
                               max_tokens=max_tokens, seed=seed, progress=progress)
    reports = place_profiles(profiles, ep_size, seed=seed, routing_groups=groups, row=dispatch_row(model))
    if notes:
        for report in reports.values():
            report["notes"] = list(notes)
    return reports


def place_matrices(source: Path, matrices: Mapping[str, torch.Tensor], ep_size: int, *, top_k: int, seed: int = 0,
                   row: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Placement reports from saved co-activation matrices (by name, as
    :func:`moepatch.tools.c2r.matrices.load_matrices`
    returns them) of a top-``top_k`` model; with ``row`` (:func:`moepatch.tools.c2r.traffic.row_size`: the file
    records no hidden size or dtype, the user gives them) the dispatch figures include bytes.

    Raises:
        CommandError: a matrix does not fit a placement, naming ``source`` and the matrix.
    """

    reports: dict[str, dict[str, Any]] = {}
    for name, stack in matrices.items():
        try:
            reports[name] = placement_report(stack, ep_size, top_k=top_k, seed=seed)
        except ValueError as error:
            raise CommandError(f"{source}, matrix {name!r}: {error}") from None
        add_dispatch_from_copies(reports[name], row)  # dedup rows only where copies are exact (top-2)
    return reports


def write_planned_checkpoint(source: Path, reports: Mapping[str, Mapping[str, Any]], target: Path, *,
                             c2r_within_groups: bool = False) -> Path:
    """Write a copy of ``source`` whose experts are renumbered so contiguous sharding hosts the planned groups
    together (the C2R report's plan when there is one, else the vanilla one), recording the EP size it was planned
    for (``expert_placement.json``, see :func:`moepatch.expert_parallel.check_placement`).  ``c2r_within_groups``
    routes the copy with C2R within groups planned on the vanilla profile instead, where there is one (see
    :func:`moepatch.tools.c2r.placement.contiguous_group_lists`): the lists replace the checkpoint's C2R, so the groups
    that keep most vanilla expert sets together change the fewest choices."""

    first, second = ("vanilla", "c2r") if c2r_within_groups else ("c2r", "vanilla")
    chosen = reports.get(first) or reports[second]
    permutations = {row["layer"]: expert_permutation(row["groups"]) for row in chosen["layers"]}
    return write_permuted_checkpoint(source, permutations, target, ep_size=chosen["ep_size"],
                                     c2r_within_groups=c2r_within_groups)


def group_c2r_dispatch(num_experts: int, top_k: int, ep_size: int) -> dict[str, Any]:
    """What C2R within the placement's groups sends per token and layer, exact with a uniform source rank: one copy
    (every expert of a token on its top-1's device), ``(D-1)/D`` remote rows for the deduplicating dispatch against
    ``k (D-1)/D`` for the per-pair one, whatever the routing."""

    remote = Fraction(ep_size - 1, ep_size)
    return {"top_t": num_experts // ep_size - 1, "copies_per_token": 1.0,
            "dedup_rows_remote_per_token": float(remote), "pair_rows_remote_per_token": float(top_k * remote),
            "dedup_vs_pair": float(Fraction(1, top_k))}
