"""Survey: what moepatch does with every MoE causal-LM type of the installed transformers, feature by feature.

Builds a tiny random instance of every causal-LM model type that looks like a mixture of experts (its config has an
expert-count attribute, or its modeling file defines a class ending in ``SparseMoeBlock`` / ``MoE`` / ``Experts``)
and, per type, says which family :func:`model_patches.describe` resolves it to (or why it refuses it), the router kind
read from the resolved :class:`~model_patches.spec.RoutingRule`, and for every feature whether it is accepted, refused
(with the library's own message) or accepted but broken.  A feature counts as accepted only when it was really
applied: ``moepatch.apply`` succeeded, the forward ran with finite logits (equal to the unpatched ones where moepatch
documents bit-identity: freezing, statistics, fresh LoRA experts, C2R with ``top_t = E - 1``), whatever the feature
promises could be checked cheaply (statistics count every token k times; under a vanilla-equivalent C2R the balance
loss equals transformers' own wherever transformers recomputes the real choice; a bias-update step counts every token
and moves each bias by the rate; a renumbering planned by ``moepatch place`` keeps the logits), and
``handle.remove()`` gave back the unpatched logits and module state.  Finally the forward runs once with every
accepted feature on together.  One CPU thread, one seed: the document is the same on every run.

The tiny models: :func:`moepatch.testing.tiny_kinds.tiny_kind_model` where it knows the type (random non-zero
selection biases, group limits, scaling factors that matter), else the config class's defaults shrunk here
(:func:`tiny_instance`: hidden 32, 2 layers, 8 experts top-2, vocabulary 128), else moepatch's own
:func:`moepatch.testing.tiny.tiny_model`.  Everything is seeded, so the table is reproducible; it is written as
``docs/router-kinds.md`` and checked against the library by ``tests/test_family_survey.py``::

    python scripts/family_survey.py [--types mixtral,dbrx] [--timeout 60] [--width 240]
    python scripts/family_survey.py --markdown docs/router-kinds.md     # regenerate the document
    python scripts/family_survey.py --check docs/router-kinds.md        # exit 1 naming the first difference
    python scripts/family_survey.py --structure-only                     # the structure column alone (fast)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from moepatch.cli.arguments import positive_int

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_moe_experts",
                      "n_experts", "expert_num")
MOE_CLASS = re.compile(r"^class \w+(SparseMoeBlock|MoE|Experts)\b", re.MULTILINE)
SHRINK: dict[str, Any] = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "intermediate_size": 32, "ffn_hidden_size": 16,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "expert_intermediate_size": 16,
    "num_hidden_layers": 2, "n_layers": 2, "n_layer": 2, "num_layers": 2, "num_attention_heads": 4, "n_heads": 4,
    "n_head": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128, "max_position_embeddings": 128,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8, "num_moe_experts": 8,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_top_k": 2, "num_experts_per_token": 2, "first_k_dense_replace": 1,
    "n_group": 2, "topk_group": 1, "kv_lora_rank": 8, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "v_head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_d_state": 4, "mamba_expand": 2, "mamba_dt_rank": 4, "sliding_window": 64,
    "moe_layer_freq": 1, "decoder_sparse_step": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "ssm_state_size": 8, "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 1, "chunk_size": 8,
    "moe_shared_expert_intermediate_size": 16, "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 8,
}
"""Size fields set on every config that has them (nested text / attention / FFN sub-configs too)."""
LAYER_LISTS = ("layer_types", "mlp_only_layers", "layers_block_type", "moe_layers", "no_rope_layers")
"""Per-layer lists a config keeps at its default length: cut to the shrunk depth."""
KIND_LISTS = ("layer_types", "layers_block_type")
"""Per-layer kinds (linear / full attention, ...): the cut keeps one layer of each kind where the depth allows, since
a hybrid model whose layers are all linear attention does not run (transformers needs an attention layer's cache)."""
FILL_MISSING: dict[str, Any] = {"n_shared_experts": 1}
"""Fields whose default ``None`` the model cannot be built with (Dots1 multiplies by it)."""
OWN_TYPES = ("llama_moe", "moduleformer")
"""moepatch's own transformers-5 families (registered with the Auto classes when moepatch is imported)."""

SEED = 0
"""Seed of every tiny model, input batch, LoRA initialisation and collaborative list."""
EP_SIZE = 2
"""Expert-parallel degree of the placement check (divides every tiny model's expert count)."""
BATCH_SHAPE = (2, 8)
"""Tokens of the check batch; the second row's last :data:`PADDING` tokens are padding."""
PADDING = 3
LORA = {"method": "molora", "num_experts": 2, "r": 2}
"""The smallest LoRA-expert setting; the attention and routed-expert checks add their targets."""
ROUNDING = 1e-5
"""Largest |Δ| of the logits a feature documented as bit-identical may show before it counts as broken: below it the
cell is accepted with a note (a frozen parameter can make torch pick another kernel: Jamba's Mamba convolution)."""
PERMUTED_TOLERANCE = 1e-4
"""How far a renumbered model's logits may be from the original's: float32 rounding, not a changed routing (the
softmax sums experts in id order, so renamed experts get weights that differ by about one ulp)."""

OK = "ok"
REFUSED = "refused"
FAILED = "failed"
NOT_APPLICABLE = "n/a"
SYMBOLS = {OK: "✅", REFUSED: "❌", FAILED: "⚠️", NOT_APPLICABLE: "—"}
"""How each outcome is written in the table: accepted and checked, refused by the library (its message in the
reasons), accepted but broken (what broke in the reasons: a moepatch bug or an undocumented limit), not applicable."""
NOT_RUN = "accepted, not run"
"""The cell of an accepted feature on a tiny model whose own forward fails (the structure column says why)."""
STRUCTURE_COLUMN = "family"
"""The table column holding the resolved family (or ``refused`` / ``not built``); its reasons are listed under it."""


# ------------------------------------------------------------------------------------------------ tiny models
def moe_types() -> list[str]:
    """Causal-LM model types whose config counts experts or whose modeling file defines an MoE class."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config_class = CONFIG_MAPPING[model_type]
        except KeyError:
            continue
        module = sys.modules.get(config_class.__module__) or importlib.import_module(config_class.__module__)
        modeling = Path(module.__file__).with_name(Path(module.__file__).name.replace("configuration_", "modeling_"))
        source = modeling.read_text() if modeling.exists() else ""
        try:
            fields = _all_fields(config_class())
        except Exception:  # a config without usable defaults still counts when its modeling file is an MoE
            fields = set()
        if fields & set(EXPERT_COUNT_ATTRS) or MOE_CLASS.search(source):
            found.append(model_type)
    return found


def survey_types() -> list[str]:
    """Every type the survey covers by default: :func:`moe_types` and moepatch's own :data:`OWN_TYPES`."""
    known = moe_types()
    return known + [name for name in OWN_TYPES if name not in known]


def _all_fields(config: Any) -> set[str]:
    fields = set(config.to_dict())
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            fields |= set(value.to_dict())
    return fields


def _shrink(config: Any, depth: int = 0, mixed_layers: bool = True) -> None:
    """Set :data:`SHRINK` fields present on ``config`` and its sub-configs; cut per-layer lists (``mixed_layers``:
    keeping one layer of every kind, see :func:`_cut`)."""
    fields = config.to_dict()
    settings = {**SHRINK, **{key: value for key, value in FILL_MISSING.items() if fields.get(key, 0) is None}}
    if "kv_lora_rank" in fields:  # multi-head latent attention needs as many key / value heads as query heads
        settings["num_key_value_heads"] = settings["num_attention_heads"]
    for key, value in settings.items():
        if key in fields:
            try:
                setattr(config, key, value)
            except Exception:  # a read-only / validated field keeps its default
                continue
    layers = next((getattr(config, key) for key in ("num_hidden_layers", "n_layers", "num_layers")
                   if isinstance(getattr(config, key, None), int)), None)
    for key in LAYER_LISTS:
        value = getattr(config, key, None)
        if not isinstance(value, list) or layers is None:
            continue
        indices = key in ("mlp_only_layers", "moe_layers") and all(isinstance(v, int) for v in value)
        try:
            cut = _cut(value, layers, key) if mixed_layers else value[:layers]
            setattr(config, key, [v for v in value if v < layers] if indices else cut)
        except Exception:  # a derived (read-only) list follows the depth by itself
            continue
    if depth < 2:
        for value in list(vars(config).values()):
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                _shrink(value, depth + 1, mixed_layers)


def _cut(value: list, layers: int, key: str) -> list:
    """The first ``layers`` entries of a per-layer list; for :data:`KIND_LISTS` the first layer of every kind comes
    first (in the original order), so that a cut hybrid model still runs each kind of layer."""
    if key not in KIND_LISTS:
        return value[:layers]
    firsts = list(dict.fromkeys(value).keys())
    chosen = sorted(value.index(kind) for kind in firsts)[:layers]
    chosen += [index for index in range(len(value)) if index not in chosen][: layers - len(chosen)]
    return [value[index] for index in sorted(chosen)]


def tiny_instance(model_type: str, mixed_layers: bool = True) -> torch.nn.Module:
    """A shrunk random ``AutoModelForCausalLM`` of ``model_type`` in eval mode (``mixed_layers``: see
    :func:`_shrink`)."""
    from transformers import CONFIG_MAPPING
    from transformers import AutoModelForCausalLM

    config = CONFIG_MAPPING[model_type]()
    _shrink(config, mixed_layers=mixed_layers)
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _moepatch_tiny(model_type: str) -> torch.nn.Module | None:
    """moepatch's own tiny model of ``model_type`` (sizes that work around a config whose defaults do not build)."""
    from moepatch.testing import tiny

    if model_type not in tiny.TINY_FAMILIES + tiny.NEW_FAMILIES + OWN_TYPES:
        return None
    return tiny.tiny_model(model_type, seed=SEED)


def build_tiny(model_type: str) -> tuple[nn.Module, str, str]:
    """``(model, builder, note)``: the best tiny model of ``model_type`` — ``tiny_kinds`` (routing tensors that
    matter), else the shrunk defaults (layer kinds mixed, else cut plainly) if their forward runs, else
    ``moepatch.tiny`` (``note`` says why the defaults did not do), else shrunk defaults that build but do not run
    (the features are then only applied and removed).

    Raises:
        Exception: the builders' own error when none of them builds the type.
    """
    from moepatch.testing import tiny_kinds

    if model_type in tiny_kinds.ROUTER_KIND_TYPES:
        return tiny_kinds.tiny_kind_model(model_type, seed=SEED), "tiny_kinds", ""
    if model_type in OWN_TYPES:
        return _moepatch_tiny(model_type), "moepatch.tiny", ""
    problems: list[BaseException] = []
    built = None
    for mixed_layers in (True, False):
        try:
            model = tiny_instance(model_type, mixed_layers)
        except Exception as error:
            problems.append(error)
            continue
        try:
            _logits(model, _batch(model))  # a model whose own forward fails cannot show what a feature does
            return model, "shrunk defaults", ""
        except Exception as error:
            problems.append(error)
            if built is None:
                built = model
    fallback = _moepatch_tiny(model_type)
    if fallback is not None:
        return fallback, "moepatch.tiny", f"the shrunk defaults fail: {_message(problems[-1])}"
    if built is not None:
        return built, "shrunk defaults", ""
    raise problems[0]


# ------------------------------------------------------------------------------------------------ outcomes
@dataclass(frozen=True)
class Cell:
    """One feature's outcome on one model type (:data:`SYMBOLS`), with the reason when not plainly accepted."""

    status: str
    reason: str = ""

    def text(self) -> str:
        """The table cell: the symbol; a not-applicable cell carries its short reason."""
        if self.status == NOT_APPLICABLE and self.reason:
            return f"{SYMBOLS[self.status]} ({self.reason})"
        return SYMBOLS[self.status]


@dataclass
class Row:
    """The survey of one model type."""

    model_type: str
    builder: str = ""
    family: str = ""
    """Resolved family name, ``refused`` or ``not built``."""
    structure_reason: str = ""
    """Why the structure was refused / the model not built, or a note on how it was built."""
    kind: str = ""
    """Router kind letter of the router-kinds table (``?`` when the rule is unknown, ``—`` when no letter fits)."""
    rule: str = ""
    """The routing rule in words."""
    cells: dict[str, Cell] = field(default_factory=dict)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def _message(error: BaseException, width: int | None = None) -> str:
    """The library's message, trimmed: one line, no object addresses, no "cannot patch X (model_type=...)" preamble
    or supported-families list, no table separators; cut to ``width`` characters."""
    text = str(error)
    from moepatch.errors import UnsupportedModelError

    if isinstance(error, UnsupportedModelError) or text.startswith("moepatch "):
        text = text.split("): ", 1)[-1].split(". Supported families:")[0]
    if not isinstance(error, (ValueError, UnsupportedModelError)):
        text = f"{type(error).__name__}: {text}"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(text.split())).replace("|", "/")
    if width is not None and len(text) > width:
        text = text[: width - 1].rstrip() + "…"
    return text


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class Subject:
    """A tiny model under survey with its unpatched reference outputs."""

    model: nn.Module
    moe: Any
    """Its :class:`model_patches.MoEModel`."""
    batch: dict[str, torch.Tensor]
    reference: torch.Tensor | None
    """Unpatched logits of :attr:`batch` (``None`` when the unpatched forward itself fails)."""
    state: dict[str, Any]
    """:func:`_state` of the unpatched model."""
    width: int


def _batch(model: nn.Module) -> dict[str, torch.Tensor]:
    """A seeded right-padded batch of ordinary token ids (0–2 are pad / bos / eos)."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(3, vocab, BATCH_SHAPE, generator=generator)
    attention_mask = torch.ones(BATCH_SHAPE, dtype=torch.long)
    attention_mask[1, -PADDING:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _state(model: nn.Module) -> dict[str, Any]:
    """What ``apply`` may change and ``remove`` must restore: instance attributes, flags, hooks, tensors."""
    return {
        "attributes": {name: sorted(module.__dict__) for name, module in model.named_modules()},
        "forwards": {name: id(module.__dict__.get("forward")) for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()},
        "tensors": sorted(name for name, _ in model.named_buffers()) + sorted(n for n, _ in model.named_parameters()),
        "block": copy.deepcopy(getattr(model.config, "moepatch", None)),
    }


def _restored(subject: Subject) -> str | None:
    """Why the model is not back to its unpatched self after ``remove()``, or ``None``."""
    state = _state(subject.model)
    for key, value in subject.state.items():
        if state[key] != value:
            return f"remove() left the model's {key} changed"
    if subject.reference is not None and not torch.equal(_logits(subject.model, subject.batch), subject.reference):
        return "remove() did not restore the unpatched logits"
    return None


# ------------------------------------------------------------------------------------------------ feature probes
Check = Callable[[Subject, Any], "str | None"]
"""``check(subject, handle) -> problem`` run while the feature is applied (``None``: fine)."""


@dataclass(frozen=True)
class Probe:
    """How the survey applies one feature: the column, the registered feature it needs, its minimal block."""

    column: str
    feature: str
    """Name in :func:`moepatch.feature.registered_features`; the column appears only while it is registered."""
    block: Callable[[Any], dict[str, Any]]
    """The ``"moepatch"`` block for a :class:`model_patches.MoEModel`."""
    identical: bool = True
    """moepatch documents the freshly applied feature as leaving the logits bit-identical."""
    check: Check | None = None
    what: str = ""
    """What the column checks, for the document's header."""


def _counts_every_token(subject: Subject, handle: Any) -> str | None:
    """Routing statistics of one forward: every non-padding token counted ``k`` times in every recorded layer."""
    recorder = handle.recorder
    recorder.reset()
    _logits(subject.model, subject.batch)
    tokens = int(subject.batch["attention_mask"].sum())
    counts = recorder.counts.sum(dim=-1)
    expected = torch.full_like(counts, tokens * subject.moe.top_k)
    if not torch.equal(counts, expected) or not torch.equal(recorder.tokens, torch.full_like(recorder.tokens, tokens)):
        return (f"routing statistics counted {counts.tolist()} choices of {recorder.tokens.tolist()} tokens per layer, "
                f"expected {tokens} tokens × top-{subject.moe.top_k}")
    return None


def _bias_step_moves_biases(subject: Subject, handle: Any) -> str | None:
    """One training-mode forward and ``step()``: each layer's load counts every non-padding token ``k`` times and
    every bias moves by ``rate · sign(mean − load)`` of that load; the biases are restored afterwards."""
    updater = getattr(handle, "bias_updater", None)
    if updater is None or not all(hasattr(updater, name) for name in ("step", "biases", "restore_biases")):
        return None  # an interface the survey does not know yet: applying and removing is all it checks
    before = updater.biases()
    subject.model.train()
    try:
        with torch.no_grad():
            subject.model(**subject.batch)
        update = updater.step()
    finally:
        subject.model.eval()
    after = updater.biases()
    assignments = int(subject.batch["attention_mask"].sum()) * subject.moe.top_k
    try:
        for slot, layer in enumerate(update.layers):
            loads = update.loads[slot]
            if int(loads.sum()) != assignments:
                return (f"the bias update counted {int(loads.sum())} expert assignments in layer {layer}, expected "
                        f"{assignments} (non-padding tokens × top-{subject.moe.top_k})")
            signs = torch.sign(loads.sum() - loads.numel() * loads)  # sign(mean − load), exact in integers
            bias = before[layer]
            expected = bias + signs.reshape(bias.shape).to(bias.dtype) * updater.rate
            if not torch.allclose(after[layer], expected, rtol=0, atol=abs(updater.rate) * 1e-3):
                return f"a bias-update step did not move layer {layer}'s selection bias by rate · sign(mean − load)"
    finally:
        updater.restore_biases()
    return None


def _c2r_block(moe: Any) -> dict[str, Any]:
    from moepatch.testing.tiny import random_collaborative_list

    listed = random_collaborative_list(moe.num_layers, moe.num_experts, seed=SEED)
    for layer in moe.hashed_layers:  # a hashed router has no learned choice: C2R takes null there
        listed[layer] = None
    return {"c2r": {"top_t": moe.num_experts - 1, "collaborative_list": listed}}


PROBES: tuple[Probe, ...] = (
    Probe("freeze_gate", "freeze_gate", lambda moe: {"freeze_gate": "router"},
          what='`{"freeze_gate": "router"}`; logits bit-identical'),
    Probe("routing_stats", "routing_stats", lambda moe: {"routing_stats": True}, check=_counts_every_token,
          what="`true`; logits bit-identical, every non-padding token counted k times in every MoE layer"),
    Probe("LoRA default", "lora_experts", lambda moe: {"lora_experts": dict(LORA)},
          what="`lora_experts`: MoLoRA, 2 experts of rank 2 on the default targets (every attention, dense and "
               "shared-expert projection; routed experts only when asked); fresh experts bit-identical"),
    Probe("LoRA routed", "lora_experts", lambda moe: {"lora_experts": {**LORA, "routed_experts": True}},
          what="the same on the routed experts (`routed_experts: true`)"),
    Probe("C2R", "c2r", _c2r_block,
          what="`c2r` with `top_t = E - 1` and a seeded random collaborative list: bit-identical to vanilla routing"),
    Probe("bias_update", "bias_update", lambda moe: {"bias_update": {"rate": 0.001}}, check=_bias_step_moves_biases,
          what="`{\"rate\": 0.001}`; one training-mode step moves every selection bias by rate · sign(mean − load)"),
)
"""Every feature the survey applies, in column order (a probe's column appears while its feature is registered)."""
BALANCE_COLUMN = "balance loss"
PLACEMENT_COLUMN = "placement"
ALL_ON_COLUMN = "all on"
DERIVED_COLUMNS = {
    BALANCE_COLUMN: "C2R's balance loss on the experts actually chosen, with `output_router_logits`: equal to "
                    "transformers' own where transformers recomputes the real choice (no selection bias, no group "
                    "limit), present and finite elsewhere",
    PLACEMENT_COLUMN: f"a placement over {EP_SIZE} devices planned from the tiny model's co-activations (`moepatch "
                      "place`'s functions), the experts of a copy renumbered by it (`--write-permuted`'s): logits "
                      "equal up to float32 rounding",
    ALL_ON_COLUMN: "every accepted feature at once (LoRA targets merged); logits bit-identical",
}
"""What the columns that are not a single probe check."""


def active_probes() -> tuple[Probe, ...]:
    """The probes whose feature is registered now (a feature still being written gets its column once it lands)."""
    from moepatch.feature import registered_features

    names = {feature.name for feature in registered_features()}
    return tuple(probe for probe in PROBES if probe.feature in names)


def feature_columns() -> list[str]:
    """Every feature column of the table, in order."""
    columns = [probe.column for probe in active_probes()]
    if "C2R" in columns:
        columns.insert(columns.index("C2R") + 1, BALANCE_COLUMN)
    return columns + [PLACEMENT_COLUMN, ALL_ON_COLUMN]


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    torch.manual_seed(SEED)
    yield


def _apply(subject: Subject, block: dict[str, Any], identical: bool, check: Check | None) -> Cell:
    """Apply ``block``, run the forward (and ``check``), remove; the outcome."""
    import moepatch
    from moepatch.errors import UnsupportedModelError

    with _seeded():
        try:
            handle = moepatch.apply(subject.model, block)
        except (ValueError, UnsupportedModelError) as error:
            return Cell(REFUSED, _message(error, subject.width))
        except Exception as error:  # apply promises ValueError / UnsupportedModelError: anything else is a bug
            return Cell(FAILED, "apply raised " + _message(error, subject.width))
    problem = note = None
    try:
        if subject.reference is not None:
            logits = _logits(subject.model, subject.batch)
            difference = (logits - subject.reference).abs().max()
            if not torch.isfinite(logits).all():
                problem = "the forward gives non-finite logits"
            elif identical and difference > ROUNDING:
                problem = f"the logits differ from the unpatched model's (max |Δ| {_magnitude(difference)})"
            elif identical and difference > 0:
                note = (f"the logits are the unpatched model's up to float32 rounding (max |Δ| "
                        f"{_magnitude(difference)}), not bit for bit")
            if problem is None and check is not None:
                problem = check(subject, handle)
    except Exception as error:
        problem = "the forward fails: " + _message(error, subject.width)
    finally:
        try:
            handle.remove()
        except Exception as error:
            problem = problem or "remove() raised " + _message(error, subject.width)
    problem = problem or _restored(subject)
    if problem:
        return Cell(FAILED, problem[: subject.width])
    if subject.reference is None:
        return Cell(NOT_APPLICABLE, NOT_RUN)
    return Cell(OK, note or "")


def _magnitude(value: torch.Tensor) -> str:
    """An order of magnitude (stable across machines, unlike the exact difference)."""
    number = float(value)
    return "inf" if not math.isfinite(number) or number == 0 else f"~1e{math.floor(math.log10(number))}"


def _balance_loss(subject: Subject, c2r: Cell) -> Cell:
    """The balance loss on the experts C2R chose: equal to transformers' own where C2R chooses like vanilla."""
    from moepatch.routing.aux_loss import install_actual_choice_aux_loss
    from moepatch.undo import UndoLog

    if c2r.status == REFUSED:
        return Cell(REFUSED, "same refusal as C2R (the balance loss on the actual choice is part of C2R)")
    undo = UndoLog()
    try:
        installs = install_actual_choice_aux_loss(subject.moe, undo)
    finally:
        undo.undo()
    if not installs:
        # a family whose own code weighs a balance loss (LLaMA-MoE's gate, MoLM: its config holds the coefficient
        # the aux_loss_coef option sets) computes it from the choice its router hands over, which C2R constrained
        config = subject.moe.inner.config
        native = any(option == "aux_loss_coef" and _config_value(config, path) is not None
                     for option, path in subject.moe.family.training_switches)
        return Cell(NOT_APPLICABLE, "native: the model computes it" if native else "no balance loss in the model")
    if subject.reference is None:
        return Cell(NOT_APPLICABLE, NOT_RUN)
    labels = subject.batch["input_ids"].masked_fill(subject.batch["attention_mask"] == 0, -100)

    def aux_loss() -> torch.Tensor | None:
        with torch.no_grad():
            return subject.model(**subject.batch, labels=labels, output_router_logits=True).aux_loss

    try:
        vanilla = aux_loss()
    except Exception as error:
        return Cell(NOT_APPLICABLE, "transformers' own forward with output_router_logits fails: "
                    + _message(error, subject.width))
    rule, first = subject.moe.family.routing, subject.moe.layers[0]
    # eval sparsemixer = top-2; product keys: Doge's causal LM recomputes the block's own product-key choice
    comparable = (rule.selection_bias is None and rule.active_group_limit(first.router, first.block) is None
                  and getattr(rule, "selection", "topk") in ("topk", "sparsemixer", "product_keys"))
    return _apply(subject, _c2r_block(subject.moe), False,
                  lambda s, handle: _same_loss(vanilla if comparable else None, aux_loss(), comparable))


def _config_value(config: Any, path: str) -> Any:
    """The config value at dotted ``path`` (a sub-config field: DBRX's ``ffn_config.moe_loss_weight``), or ``None``."""
    for part in path.split("."):
        config = getattr(config, part, None)
    return config


def _same_loss(vanilla: torch.Tensor | None, patched: torch.Tensor | None, comparable: bool) -> str | None:
    """Why moepatch's balance loss under a vanilla-equivalent C2R is wrong, or ``None``.  transformers recomputes
    the choice as the top-k of the softmaxed logits: that is the router's real choice only without a selection bias
    or group limit (sparsemixer's two eval picks are the top-2 too), so only then must the two losses be equal;
    elsewhere the value must merely exist."""
    if patched is None or not torch.isfinite(patched).all():
        return f"the forward under C2R with output_router_logits gives aux_loss {patched}"
    if not comparable:
        return None
    if vanilla is None:
        return "transformers computes no aux_loss, moepatch does"
    if not torch.equal(patched.float(), vanilla.float()):
        return ("the balance loss under C2R with top_t = E - 1 (vanilla choice) differs from transformers' own "
                f"(relative |Δ| {_magnitude((patched - vanilla).abs() / vanilla.abs().clamp(min=1e-30))})")
    return None


def _placement(subject: Subject) -> Cell:
    """Plan a placement from the tiny model's co-activations the way ``moepatch place`` does (within routing groups
    where the router has a binding group limit), renumber a copy's experts by it as ``place --write-permuted`` does,
    and check that the copy's logits are the original's."""
    from model_patches import describe
    from moepatch.errors import CommandError
    from moepatch.errors import UnsupportedModelError
    from moepatch.tools.c2r.permutation import check_permutable
    from moepatch.tools.c2r.permutation import permute_experts
    from moepatch.tools.c2r.permutation import routing_groups
    from moepatch.tools.c2r.pipeline import place_profiles
    from moepatch.tools.c2r.placement import expert_permutation
    from moepatch.tools.c2r.profiling import profile_coactivation

    if subject.reference is None:
        return Cell(NOT_APPLICABLE, NOT_RUN)
    try:
        check_permutable(subject.moe)
        groups = {index: limit.groups for index, limit in routing_groups(subject.moe).items()}
        profile = profile_coactivation(subject.model, [subject.batch], progress=False, keep_choices=True)
        reports = place_profiles({"vanilla": profile}, EP_SIZE, seed=SEED, routing_groups=groups)
        permutations = {row["layer"]: expert_permutation(row["groups"]) for row in reports["vanilla"]["layers"]}
        permuted = copy.deepcopy(subject.model)
        permute_experts(describe(permuted), permutations)
    except (ValueError, CommandError, UnsupportedModelError) as error:
        return Cell(REFUSED, _message(error, subject.width))
    except Exception as error:
        return Cell(FAILED, _message(error, subject.width))
    try:
        logits = _logits(permuted, subject.batch)
    except Exception as error:
        return Cell(FAILED, "the renumbered model's forward fails: " + _message(error, subject.width))
    if not torch.allclose(logits, subject.reference, rtol=PERMUTED_TOLERANCE, atol=PERMUTED_TOLERANCE):
        moved = sum(permutation != sorted(permutation) for permutation in permutations.values())
        return Cell(FAILED, f"renumbering the experts of {moved} layer(s) by the planned placement changes the "
                            "logits beyond float32 rounding (the routing is not equivariant under the renumbering)")
    return Cell(OK)


def _all_on(subject: Subject, accepted: list[dict[str, Any]]) -> Cell:
    """Every accepted feature at once (LoRA targets merged into one ``lora_experts`` entry)."""
    block: dict[str, Any] = {}
    for part in accepted:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(block.get(key), dict):
                block[key] = {**block[key], **value}
            else:
                block[key] = value
    if not block:
        return Cell(NOT_APPLICABLE, "nothing accepted")
    return _apply(subject, block, True, None)


# ------------------------------------------------------------------------------------------------ router kind
DESCRIBED_RULE_FIELDS = frozenset({
    "logits_dtype", "logit_bias", "logits_cast", "softcap", "score", "score_dtype", "selection_bias",
    "selection_bias_argument", "group_limit", "selection", "jitter", "input_jitter", "sorted_topk", "weights_from",
    "renormalize", "renormalize_with", "renormalize_epsilon", "renormalize_min", "scaling", "weights_dtype",
    "no_autocast", "dense_weights", "score_module", "logits_module", "shared_logits", "weights_scale",
    "input_norm", "input_scales", "expert_scale", "expert_sorted", "logits_function", "selection_dtype", "skip_class",
})
""":class:`~model_patches.spec.RoutingRule` fields :func:`router_kind` knows (numerics such as dtypes and epsilons
change no kind); a field added later shows up in the words with its value until it is described here."""


def router_kind(moe: Any) -> tuple[str, str]:
    """``(letter, words)`` of the model's routing rule; the letter follows the router-kinds table (A softmax →
    top-k, B softmax + selection bias, C top-k of logits → softmax over the k, D sigmoid + selection bias, E D with a
    group limit, F top-k of logits → sigmoid into a dense matrix, G sparsemixer, H product keys), ``—`` where none
    fits, ``?`` when moepatch does not know the rule (hashed routers only, a probe that found no exact rule)."""
    from model_patches.routing_rule import router_settings

    if moe.routing_problem is not None:
        return "?", "not known exactly (see C2R)"
    rule = moe.family.routing
    first = next(layer for layer in moe.layers if layer.index not in moe.hashed_layers)
    limit = rule.active_group_limit(first.router, first.block)
    settings = router_settings(rule, first.router, first.block, top_k=moe.top_k,
                               weight_attr=moe.family.router_weight_attr)
    letter = _kind_letter(rule, limit is not None, bool(moe.hashed_layers))
    words = _selection_words(moe, rule, settings, limit is not None) + _rule_extras(rule, settings)
    return letter, words


def _kind_letter(rule: Any, group_limited: bool, hashed: bool) -> str:
    """The router-kinds table's letter of ``rule`` (see :func:`router_kind`)."""
    selection = getattr(rule, "selection", "topk")
    biased = rule.selection_bias is not None
    if selection == "sparsemixer":
        letter = "G"
    elif selection == "product_keys":
        letter = "H"
    elif selection != "topk":
        letter = "—"
    elif rule.dense_weights:
        letter = "F"
    elif rule.weights_from == "sigmoid_of_chosen" and biased:  # Kolibri-1: the bias added to the logits
        letter = "D"
    elif rule.score == "logits" and rule.weights_from == "softmax_of_chosen":
        letter = "C"
    elif rule.score == "softmax":
        letter = "B" if biased else "A"
    elif rule.score in ("sigmoid", "module") and biased:  # DeepSeek-V4: the router's own sqrt-softplus, like sigmoid
        letter = "D"
    else:
        letter = "—"
    if group_limited:
        letter = "E" if letter == "D" else ("—" if letter == "—" else f"{letter} + group limit")
    if hashed:
        letter = f"{letter} + H"
    return letter


def _selection_words(moe: Any, rule: Any, settings: Any, group_limited: bool) -> str:
    """What the rule selects on and how it weighs the chosen experts."""
    selection = getattr(rule, "selection", "topk")
    unbiased = "unbiased " if rule.selection_bias is not None else ""
    selects = rule.selects_on if group_limited else rule.selects_on.replace(" within the kept groups", "")
    if rule.logit_bias:
        selects = selects.replace("logits", "logits (+ linear bias)", 1)
    if selection == "product_keys":
        renormalised = ", renormalised" if moe.renormalize else ""
        return (f"top-{moe.top_k} of the {selects}, in the sorted keys' order (the block's view pairs two tokens' "
                f"key scores per row); weights: softmax over the k pair sums{renormalised}")
    if selection != "topk":
        return f"{selection} over the {selects}; weights: {selection}'s own"
    weights = {
        "scores": {"softmax": f"chosen {unbiased}probabilities", "sigmoid": f"chosen {unbiased}sigmoid scores",
                   "logits": "chosen logits", "module": f"chosen {unbiased}scores"}[rule.score],
        "softmax_of_chosen": "softmax over the k chosen logits",
        "sigmoid_of_chosen": ("sigmoid of the k chosen logits in a dense [T, E] matrix" if rule.dense_weights
                              else f"sigmoid of the k chosen {unbiased}logits"),
        "logsigmoid_softmax_of_chosen": (f"sigmoid of the k chosen {unbiased}logits"
                                         + (f" and the shared experts' logits (S={settings.shared_logits})"
                                            if settings.shared_logits else "")
                                         + ", normalised in the log domain"),
    }[rule.weights_from]
    if moe.renormalize and rule.weights_from in ("scores", "sigmoid_of_chosen") and not rule.dense_weights:
        weights += ", renormalised"
    return f"top-{moe.top_k} of {selects}; weights: {weights}"


def _rule_extras(rule: Any, settings: Any) -> str:
    """The rule's scalings, router-input transforms and hand-off details, and any field not described yet."""
    import dataclasses

    words = ""
    if settings.scaling is not None:
        words += f" × {rule.scaling.lstrip('^')} ({settings.scaling:g})"
    if rule.weights_scale:
        words += f" × learned {rule.weights_scale}"
    if rule.expert_scale:
        words += f" × {rule.expert_scale}[chosen]"
    if rule.input_norm or rule.input_scales:
        words += "; router input " + " × ".join((f"{rule.input_norm}(h)" if rule.input_norm else "h",
                                                  *rule.input_scales))
    if rule.expert_sorted:
        words += "; handed to the experts sorted by expert"
    if rule.skip_class:
        words += ("; a skip class scored after the experts (chosen: expert 0 with weight 0; C2R never masks it)")
    if rule.logits_function is not None:
        function = rule.logits_function
        words += f"; logits by `{function.__module__}.{function.__name__}`, which hands a state to the next layer"
    for item in dataclasses.fields(rule):
        value = getattr(rule, item.name)
        if item.name not in DESCRIBED_RULE_FIELDS and value != item.default:
            words += f"; {item.name}={value!r}"
    return words


# ------------------------------------------------------------------------------------------------ the survey
def survey_type(model_type: str, width: int = 240, structure_only: bool = False) -> Row:
    """The survey of one model type (no timeout: :func:`survey` adds it)."""
    import model_patches

    row = Row(model_type)
    try:
        model, row.builder, row.structure_reason = build_tiny(model_type)
    except Exception as error:
        row.family, row.structure_reason = "not built", "could not build: " + _message(error, width)
        return row
    model.eval()
    try:
        moe = model_patches.describe(model)
    except model_patches.UnsupportedModelError as error:
        row.family, row.structure_reason = "refused", _message(error, width)
        return row
    row.family = moe.family.name
    row.kind, row.rule = router_kind(moe)
    if structure_only:
        row.rule += f" ({len(moe.layers)} MoE layers of {moe.num_experts} experts)"
        return row
    batch = _batch(model)
    try:
        reference = _logits(model, batch)
    except Exception as error:
        reference = None
        note = "the unpatched forward fails: " + _message(error, width)
        row.structure_reason = "; ".join(filter(None, (row.structure_reason, note)))
    with contextlib.suppress(Exception), torch.no_grad():  # transformers installs its router-output hooks lazily
        model(**batch, output_router_logits=True)
    subject = Subject(model, moe, batch, reference, _state(model), width)
    accepted: list[dict[str, Any]] = []
    for probe in active_probes():
        block = probe.block(moe)
        cell = _apply(subject, block, probe.identical, probe.check)
        row.cells[probe.column] = cell
        if cell.status == OK or cell.reason == NOT_RUN:
            accepted.append(block)
        if probe.column == "C2R":
            row.cells[BALANCE_COLUMN] = _balance_loss(subject, cell)
    row.cells[PLACEMENT_COLUMN] = _placement(subject)
    row.cells[ALL_ON_COLUMN] = _all_on(subject, accepted)
    return row


def survey(types: list[str], timeout: int, width: int = 240, structure_only: bool = False) -> list[Row]:
    """One :class:`Row` per type, each type given ``timeout`` seconds (``not built`` past it).

    The timeout is ``SIGALRM``; a timer already running (pytest-timeout's) gets its handler and its remaining time
    back afterwards.
    """
    rows = []
    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _alarm)
    remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    try:
        for model_type in types:
            signal.alarm(timeout)
            try:
                rows.append(survey_type(model_type, width, structure_only))
            except _Timeout:
                rows.append(Row(model_type, family="not built", structure_reason=f"over {timeout}s"))
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.monotonic() - started), 0.001))
    return rows


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The survey's settings, restored afterwards: transformers' and moepatch's warnings silenced, and one CPU
    thread — the tiny models' matrices are far too small to gain from more, a shared machine makes extra threads
    spin (ten times slower), and one thread gives the same float sums on every machine."""
    import logging

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    moepatch_logger = logging.getLogger("moepatch")
    level = moepatch_logger.level
    moepatch_logger.setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        moepatch_logger.setLevel(level)


# ------------------------------------------------------------------------------------------------ markdown
TABLE_START = "| model type |"
VERSIONS = re.compile(r"^transformers (?P<transformers>\S+), moepatch (?P<moepatch>\S+):", re.MULTILINE)
"""The header line naming the versions a document was generated with."""
REASON_LINE = re.compile(r"^- `(?P<type>[\w.-]+)` · (?P<column>[^:]+): (?P<text>.*)$")


def _table_columns() -> list[str]:
    return ["model type", "tiny model", STRUCTURE_COLUMN, "kind", "routing rule", *feature_columns()]


def _table_row(row: Row, columns: list[str]) -> str:
    cells = {"model type": row.model_type, "tiny model": row.builder or "—", STRUCTURE_COLUMN: row.family,
             "kind": row.kind or "—", "routing rule": row.rule or "—"}
    for column in columns[5:]:
        cell = row.cells.get(column)
        cells[column] = cell.text() if cell is not None else "—"
    return "| " + " | ".join(cells[column] for column in columns) + " |"


def _reason_lines(row: Row) -> list[str]:
    lines = []
    if row.structure_reason:
        lines.append(f"- `{row.model_type}` · {STRUCTURE_COLUMN}: {row.structure_reason}")
    for column, cell in row.cells.items():
        if cell.status in (OK, REFUSED, FAILED) and cell.reason:
            lines.append(f"- `{row.model_type}` · {column}: {SYMBOLS[cell.status]} {cell.reason}")
    return lines


def totals(rows: list[Row]) -> dict[str, dict[str, int]]:
    """Per column (the structure, each feature): how many types had each outcome."""
    result = {STRUCTURE_COLUMN: {outcome: sum((r.family if r.family in ("refused", "not built") else "accepted")
                                               == outcome for r in rows)
                                 for outcome in ("accepted", "refused", "not built")}}
    for column in feature_columns():
        result[column] = {SYMBOLS[status]: sum(1 for r in rows if r.cells.get(column, Cell("")).status == status)
                          for status in (OK, REFUSED, FAILED, NOT_APPLICABLE)}
    return result


def render(rows: list[Row]) -> str:
    """The Markdown document: header with counts, the table, the reasons per type."""
    import moepatch

    columns = _table_columns()
    counts = totals(rows)
    structure = counts[STRUCTURE_COLUMN]
    own = sum(row.model_type in OWN_TYPES for row in rows)
    lines = [
        "# What moepatch does with every MoE model of transformers",
        "",
        "<!-- generated by scripts/family_survey.py; do not edit by hand -->",
        "",
        f"transformers {transformers.__version__}, moepatch {moepatch.__version__}: {len(rows)} MoE causal-LM types"
        + (f" ({own} of them moepatch's own families)" if own else "")
        + f", {structure['accepted']} accepted, {structure['refused']} refused, {structure['not built']} not built. "
        "Each type is built tiny and random (seeded: `tiny_kinds` where it knows the type, else its config's "
        "defaults shrunk, else `moepatch.tiny`) and every feature is applied to it, run and removed.",
        "",
        f"{SYMBOLS[OK]} accepted and checked · {SYMBOLS[REFUSED]} refused by moepatch (its message below) · "
        f"{SYMBOLS[FAILED]} accepted but broken (below) · {SYMBOLS[NOT_APPLICABLE]} does not apply. Kind: the "
        "letters of the router-kinds table (A softmax → top-k, B softmax + selection bias, C top-k of logits → "
        "softmax over the k, D sigmoid + selection bias, E D with a group limit, F top-k of logits → sigmoid into a "
        "dense matrix, G sparsemixer), read from the routing rule moepatch resolved; `?` where moepatch does not know "
        "the rule, `—` where no letter fits.",
        "",
        "Regenerate: `python scripts/family_survey.py --markdown docs/router-kinds.md`; check: "
        "`python scripts/family_survey.py --check docs/router-kinds.md` (`tests/test_family_survey.py` runs the "
        "survey and compares).",
        "",
        "What each column applies and checks (every feature is then removed, and the logits and module state must be "
        "the unpatched model's again):",
        "",
    ]
    described = {probe.column: probe.what for probe in active_probes()} | DERIVED_COLUMNS
    lines += [f"- **{column}**: {described[column]}" for column in feature_columns()]
    lines += [
        "",
        "| feature | " + " | ".join(SYMBOLS[s] for s in (OK, REFUSED, FAILED, NOT_APPLICABLE)) + " |",
        "|---|---|---|---|---|",
    ]
    for column in feature_columns():
        lines.append(f"| {column} | " + " | ".join(str(n) for n in counts[column].values()) + " |")
    lines += ["", "## Types", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [_table_row(row, columns) for row in rows]
    lines += ["", "## Reasons", ""]
    for row in rows:
        lines += _reason_lines(row)
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, dict[str, str]]:
    """``{model_type: {column: text}}`` of a document: its table cells and its reason lines (column ``"<column>
    reason"``), so two documents can be compared type by type and feature by feature."""
    parsed: dict[str, dict[str, str]] = {}
    columns: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(TABLE_START):
            columns = [cell.strip() for cell in line.strip().strip("|").split("|")]
            continue
        if columns is not None and line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            # strict=False: a row of an edited file may lack cells; the keys it lacks then show as differences
            parsed.setdefault(cells[0], {}).update(zip(columns, cells, strict=False))
            continue
        match = REASON_LINE.match(line)
        if match:
            parsed.setdefault(match["type"], {})[f"{match['column']} reason"] = match["text"]
    return parsed


def first_difference(expected: str, found: str, types: list[str] | None = None) -> str | None:
    """Where document ``found`` first differs from ``expected`` (the fresh survey), naming the type and the column;
    ``types`` limits the comparison to those rows (``None``: the whole document, header included)."""
    fresh, old = parse(expected), parse(found)
    for model_type in types or list(fresh):
        if model_type not in old:
            return f"{model_type}: not in the file"
        keys = list(dict.fromkeys([*fresh.get(model_type, {}), *old[model_type]]))
        for key in keys:
            want, have = fresh.get(model_type, {}).get(key), old[model_type].get(key)
            if want != have:
                return f"{model_type} / {key}: the file has {have!r}, the survey gives {want!r}"
    if types is None:
        extra = [model_type for model_type in old if model_type not in fresh]
        if extra:
            return f"{extra[0]}: in the file but not a surveyed type"
        # strict=False: the shorter document's end is a difference too, reported after the loop
        for number, (want, have) in enumerate(zip(expected.splitlines(), found.splitlines(), strict=False), start=1):
            if want != have:
                return f"line {number}: the file has {have!r}, the survey gives {want!r}"
        if len(expected.splitlines()) != len(found.splitlines()):
            return "the file's length differs from the survey's"
    return None


def _structure_table(rows: list[Row], width: int) -> str:
    """The structure-only table: the family (with its rule and sizes) or why the type is refused / not built."""
    lines = ["| model type | outcome | family or reason |", "|---|---|---|"]
    for row in rows:
        outcome = row.family if row.family in ("refused", "not built") else "accepted"
        detail = row.structure_reason if outcome != "accepted" else f"{row.family}: {row.rule}"
        lines.append(f"| {row.model_type} | {outcome} | {detail[:width].replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: every MoE causal-LM type)")
    parser.add_argument("--timeout", type=positive_int, default=60, help="seconds allowed per model type")
    parser.add_argument("--width", type=positive_int, default=240, help="cut each reason to this many characters")
    parser.add_argument("--markdown", metavar="PATH", help="write the full table as a Markdown document to PATH")
    parser.add_argument("--check", metavar="PATH",
                        help="exit 1 when PATH differs from what the survey gives now (only the rows of --types "
                             "when given), naming the first differing type and feature")
    parser.add_argument("--structure-only", action="store_true",
                        help="only resolve each type's family (no feature is applied): the quick table")
    args = parser.parse_args(argv)
    if args.structure_only and (args.markdown or args.check):
        parser.error("--structure-only: the document needs the features; drop --markdown / --check")
    if args.check and not Path(args.check).is_file():
        parser.error(f"--check: {args.check} is not a file")
    if args.markdown:
        target = Path(args.markdown)
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
            parser.error(f"--markdown: {args.markdown} is not a writable file path (a folder, or its folder is "
                         "missing or not writable)")
    with quiet():  # building every config class's defaults makes transformers talk
        known = survey_types()
    types = [name.strip() for name in args.types.split(",")] if args.types else known
    unknown = [name for name in types if name not in known]
    if unknown:
        parser.error(f"--types: not MoE causal-LM model types of transformers {transformers.__version__}: "
                     f"{', '.join(unknown)}")
    started = time.time()
    with quiet():
        rows = survey(types, args.timeout, args.width, args.structure_only)
    elapsed = time.time() - started
    if args.structure_only:
        print(_structure_table(rows, args.width))
        counts = totals(rows)[STRUCTURE_COLUMN]
        print(f"\n{len(rows)} MoE causal-LM types: " + ", ".join(f"{n} {k}" for k, n in counts.items())
              + f" ({elapsed:.0f}s)")
        return 0
    document = render(rows)
    if args.check:
        difference = first_difference(document, Path(args.check).read_text(), types if args.types else None)
        if difference is not None:
            print(f"{args.check} differs from the survey: {difference}\nregenerate it with python "
                  f"scripts/family_survey.py --markdown {args.check}", file=sys.stderr)
            return 1
        print(f"{args.check} matches the survey ({len(rows)} types, {elapsed:.0f}s)")
        return 0
    if args.markdown:  # written beside and moved into place: a survey killed halfway leaves the old file whole
        target = Path(args.markdown)
        scratch = target.with_name(f".{target.name}.partial")
        scratch.write_text(document)
        os.replace(scratch, target)
    print(document + f"\n({elapsed:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
