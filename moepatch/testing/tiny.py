"""The embedded default: tiny, real transformers MoE checkpoints built offline.

There is no model hub here (nor in many clusters' compute nodes), so tests, the demo and the benchmarks build
their models in code from the real transformers config classes, with a byte-level BPE tokenizer trained on an
embedded corpus, and save them with ``save_pretrained`` — the same files a hub checkpoint has, so the real loading
code (``AutoModelForCausalLM.from_pretrained``) is exercised.

Example:
    ```python
    from moepatch.testing import tiny
    path = tiny.save_tiny_checkpoint("/tmp/tiny-qwen", "qwen2_moe", moepatch={"freeze_gate": True})
    model = AutoModelForCausalLM.from_pretrained(path)
    ```
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import AutoModelForCausalLM
from transformers import DbrxConfig
from transformers import DeepseekV2Config
from transformers import HunYuanMoEV1Config
from transformers import JambaConfig
from transformers import MiniMaxConfig
from transformers import MixtralConfig
from transformers import OlmoeConfig
from transformers import PretrainedConfig
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase
from transformers import PreTrainedTokenizerFast
from transformers import Qwen2MoeConfig
from transformers import Qwen3_5MoeTextConfig
from transformers import Qwen3MoeConfig

from moepatch.config import CONFIG_KEY
from moepatch.config import MoePatchConfig
from moepatch.data.corpus import CORPUS  # the tiny tokenizer is trained on it
from moepatch.data.corpus import DEMO_TEXTS
from moepatch.models.llama_moe import tiny_llama_moe_config
from moepatch.models.moduleformer import tiny_moduleformer_config
from moepatch.testing import tiny_kinds

TINY_FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe", "llama_moe", "moduleformer")
"""Families the whole test suite runs every family-parametrised test on."""
NEW_FAMILIES = ("qwen3_5_moe", "minimax", "jamba", "deepseek_v2", "hunyuan_v1_moe", "dbrx")
KIND_FAMILIES = ("ernie4_5_moe", "gpt_oss", "minimax_m2", "deepseek_v3", "llama4_text")
"""One model type per router kind beyond softmax → top-k (softmax + selection bias, top-k of logits then softmax over
the k, sigmoid + selection bias, the same with a group limit, Llama 4's dense sigmoid matrix), built by
:mod:`moepatch.testing.tiny_kinds` with random non-zero selection biases, a group limit and a scaling factor ≠ 1: the
feature pipelines (profiling, install, dynamic mixing, task experts) run on them."""
"""Further families the factory builds; ``tests/test_new_families.py`` runs each through every feature."""
DEMO_FAMILIES = TINY_FAMILIES
"""Families ``moepatch demo --family`` runs end to end."""
TINY_NUM_EXPERTS = 8
"""Routed experts per MoE layer of every tiny model."""
TINY_TOP_K = 2
"""Experts per token of every tiny model."""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

@functools.lru_cache(maxsize=1)
def _tokenizer_json(vocab_size: int) -> str:

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on :data:`CORPUS` (pad ``<pad>``=0, bos ``<s>``, eos ``</s>``)."""

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_config(family: str = "qwen2_moe", *, vocab_size: int | None = None, **overrides: Any) -> PretrainedConfig:
    """A tiny config of the real transformers class for ``family`` (hidden 32, 8 experts, top-2).

    Qwen2-MoE has 4 layers with layer 1 dense (``mlp_only_layers=[1]``) so dense-layer handling is exercised; so do
    DeepSeek-V2 (layer 0 dense, ``first_k_dense_replace=1``) and Jamba (MoE on layers 1 and 3, Mamba and attention
    token mixers alternating).  DeepSeek-V2 is built in its V2-Lite routing setting (greedy top-k, scale 1.0).
    """
    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())
    common = tiny_kinds.common_config_fields(vocab_size)
    per_family: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
        "qwen2_moe": (Qwen2MoeConfig, dict(num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                           norm_topk_prob=False, mlp_only_layers=[1])),
        "mixtral": (MixtralConfig, dict(num_hidden_layers=3, intermediate_size=16, num_local_experts=8,
                                        num_experts_per_tok=2)),
        "qwen3_moe": (Qwen3MoeConfig, dict(num_hidden_layers=3, head_dim=8, intermediate_size=48,
                                           moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                           norm_topk_prob=True)),
        "olmoe": (OlmoeConfig, dict(num_hidden_layers=3, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False)),
        **_new_family_configs(),
    }
    if family == "llama_moe":
        return tiny_llama_moe_config(**{"vocab_size": vocab_size, **overrides})
    if family == "moduleformer":
        return tiny_moduleformer_config(**{"vocab_size": vocab_size, **overrides})
    if family not in per_family:
        if family in tiny_kinds.ROUTER_KIND_TYPES:
            return tiny_kinds.tiny_kind_config(family, **{"vocab_size": vocab_size, **overrides})
        raise ValueError(f"tiny_config: unknown family {family!r}; choose from "
                         f"{TINY_FAMILIES + NEW_FAMILIES + tiny_kinds.ROUTER_KIND_TYPES}")
    config_class, sizes = per_family[family]
    # overrides go to the constructor so that derived fields (layer_types, ...) follow them
    config = config_class(**{**common, **sizes, **overrides})
    return config


def _new_family_configs() -> dict[str, tuple[type[PretrainedConfig], dict[str, Any]]]:
    """Config classes and tiny sizes of :data:`NEW_FAMILIES` (imported here: they are only built on demand)."""

    # DBRX's attention (v5.24) reads attn_config.rope_theta, which DbrxAttentionConfig does not define, and fails
    # with clip_qkv=None (clamp without bounds): both are given here.  DeepSeek-V2's MLA needs as many KV as Q heads.
    return {
        "qwen3_5_moe": (Qwen3_5MoeTextConfig, dict(
            num_hidden_layers=2, head_dim=8, moe_intermediate_size=16, shared_expert_intermediate_size=16,
            num_experts=8, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)),
        "minimax": (MiniMaxConfig, dict(
            num_hidden_layers=2, head_dim=8, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"])),
        "jamba": (JambaConfig, dict(
            num_hidden_layers=4, intermediate_size=16, num_experts=8, num_experts_per_tok=2, expert_layer_period=2,
            expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=2,
            mamba_expand=2, mamba_dt_rank=4)),
        "deepseek_v2": (DeepseekV2Config, dict(
            num_hidden_layers=3, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
            topk_method="greedy",
            routed_scaling_factor=1.0, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8)),
        "hunyuan_v1_moe": (HunYuanMoEV1Config, dict(
            num_hidden_layers=2, head_dim=8, intermediate_size=16, num_experts=8, moe_topk=2)),
        "dbrx": (DbrxConfig, dict(
            d_model=32, n_heads=4, n_layers=2, max_seq_len=256,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=1.0))),
    }


def tiny_model(
    family: str = "qwen2_moe", *, seed: int = 0, moepatch: MoePatchConfig | dict | None = None, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised tiny ``*ForCausalLM`` (float32, eval mode), deterministic for a given ``seed``.

    ``moepatch`` (optional) is stored as ``config.moepatch``; the model is *not* patched.
    """
    config = tiny_config(family, **overrides)
    if moepatch is not None:
        setattr(config, CONFIG_KEY, MoePatchConfig.from_dict(moepatch).to_dict())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family in tiny_kinds.RANDOMISED:  # transformers zero-initialises selection biases: make them matter
        tiny_kinds.randomise_routing_tensors(model, family, seed=seed)
    return model.eval()


def save_tiny_checkpoint(
    path: str | Path, family: str = "qwen2_moe", *, seed: int = 0, moepatch: MoePatchConfig | dict | None = None
) -> Path:
    """Build :func:`tiny_model` and save it with its tokenizer (``save_pretrained``) into ``path``."""
    path = Path(path)
    model = tiny_model(family, seed=seed, moepatch=moepatch)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_collaborative_list(num_layers: int, num_experts: int, seed: int = 0) -> list[list[list[int]]]:
    """A C2R ``collaborative_list`` in the official format: per layer and expert, the other experts in a seeded
    random order, the expert itself last (for tests and benchmarks of routing without a profiled model)."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(num_layers):
        rows = []
        for expert in range(num_experts):
            others = [e for e in torch.randperm(num_experts, generator=generator).tolist() if e != expert]
            rows.append(others + [expert])
        result.append(rows)
    return result


def demo_batch(tokenizer: PreTrainedTokenizerBase | None = None, texts: tuple[str, ...] = DEMO_TEXTS) -> dict:
    """A right-padded batch of :data:`DEMO_TEXTS` (``input_ids``, ``attention_mask``), with real padding."""
    tokenizer = tokenizer or tiny_tokenizer()
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True))
