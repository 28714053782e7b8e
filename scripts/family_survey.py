"""Survey: which MoE causal-LM types of the installed transformers moepatch accepts, and why it refuses the others.

Builds a tiny random instance of every causal-LM model type that looks like a mixture of experts (its config has an
expert-count attribute, or its modeling file defines a class ending in ``SparseMoeBlock`` / ``MoE`` / ``Experts``),
from the config class's defaults shrunk (hidden 32, 2 layers, 8 experts top-2, vocabulary 128), calls
:func:`model_patches.describe` and prints one row per type: the accepted family or the refusal reason; then counts.
A type whose tiny instance cannot be built says so.  Runs in a few minutes on a CPU::

    python scripts/family_survey.py [--types mixtral,dbrx] [--timeout 60]
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

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
}
"""Size fields set on every config that has them (nested text / attention / FFN sub-configs too)."""
LAYER_LISTS = ("layer_types", "mlp_only_layers", "layers_block_type", "moe_layers", "no_rope_layers")
"""Per-layer lists a config keeps at its default length: cut to the shrunk depth."""


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


def _all_fields(config: Any) -> set[str]:
    fields = set(config.to_dict())
    for value in vars(config).values():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            fields |= set(value.to_dict())
    return fields


def _shrink(config: Any, depth: int = 0) -> None:
    """Set :data:`SHRINK` fields present on ``config`` and its sub-configs; cut per-layer lists."""
    for key, value in SHRINK.items():
        if key in config.to_dict():
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
            setattr(config, key, [v for v in value if v < layers] if indices else value[:layers])
        except Exception:  # a derived (read-only) list follows the depth by itself
            continue
    if depth < 2:
        for value in list(vars(config).values()):
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):
                _shrink(value, depth + 1)


def tiny_instance(model_type: str) -> torch.nn.Module:
    """A shrunk random ``AutoModelForCausalLM`` of ``model_type`` in eval mode."""
    from transformers import CONFIG_MAPPING
    from transformers import AutoModelForCausalLM

    config = CONFIG_MAPPING[model_type]()
    _shrink(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _moepatch_tiny(model_type: str) -> torch.nn.Module | None:
    """moepatch's own tiny model of ``model_type`` (sizes that work around a config whose defaults do not build)."""
    from moepatch.testing import tiny

    if model_type not in tiny.TINY_FAMILIES + tiny.NEW_FAMILIES:
        return None
    return tiny.tiny_model(model_type)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def survey(types: list[str], timeout: int) -> list[tuple[str, str, str]]:
    """``(model_type, outcome, detail)`` rows; outcome ``accepted`` / ``refused`` / ``not built``."""
    import model_patches

    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    for model_type in types:
        signal.alarm(timeout)
        note = ""
        try:
            try:
                model = tiny_instance(model_type)
            except _Timeout:
                raise
            except Exception as error:
                model = _moepatch_tiny(model_type)
                if model is None:
                    rows.append((model_type, "not built", f"could not build: {type(error).__name__}: {error}"))
                    continue
                note = f" [defaults fail ({type(error).__name__}: {error}); built by moepatch.tiny]"
            try:
                moe = model_patches.describe(model)
                rows.append((model_type, "accepted", f"{moe.family.name} ({len(moe.layers)} MoE layers, "
                                                     f"top-{moe.top_k} of {moe.num_experts}){note}"))
            except model_patches.UnsupportedModelError as error:
                reason = str(error).split("): ", 1)[-1].split(". Supported families:")[0]
                rows.append((model_type, "refused", reason))
        except _Timeout:
            rows.append((model_type, "not built", f"could not build: over {timeout}s"))
        finally:
            signal.alarm(0)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: every MoE causal-LM type)")
    parser.add_argument("--timeout", type=positive_int, default=60, help="seconds allowed per model type")
    parser.add_argument("--width", type=positive_int, default=240, help="cut each reason to this many characters")
    args = parser.parse_args(argv)
    known = moe_types()
    types = [name.strip() for name in args.types.split(",")] if args.types else known
    unknown = [name for name in types if name not in known]
    if unknown:
        parser.error(f"--types: not MoE causal-LM model types of transformers {transformers.__version__}: "
                     f"{', '.join(unknown)}")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.time()
    rows = survey(types, args.timeout)
    print("| model type | outcome | family or reason |\n|---|---|---|")
    for model_type, outcome, detail in rows:
        print(f"| {model_type} | {outcome} | {detail[: args.width].replace('|', '/')} |")
    counts = {outcome: sum(row[1] == outcome for row in rows) for outcome in ("accepted", "refused", "not built")}
    print(f"\n{len(rows)} MoE causal-LM types: " + ", ".join(f"{n} {k}" for k, n in counts.items())
          + f" ({time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
