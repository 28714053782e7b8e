"""LLaMA-MoE on transformers 5: published layout, gate semantics, loading, RoPE, generation, checkpointing.

Every expectation is computed independently of the implementation: the key layout and parameter count are written
out from the published checkpoint, the gate and MoE layer are checked against NumPy / dense references
of the spec's pseudo-code (§5.5 / §5.6), the whole tiny model against a float64 reference forward, RoPE against the
closed formula.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from real_data import LLAMA_MOE_TOPT5_CONFIG
from transformers import AutoConfig
from transformers import AutoModelForCausalLM
from transformers import DynamicCache

from moepatch.models.llama_moe import LinearGLUMoELayer
from moepatch.models.llama_moe import LlamaMoEConfig
from moepatch.models.llama_moe import LlamaMoEForCausalLM
from moepatch.models.llama_moe import LlamaMoEModel
from moepatch.models.llama_moe import TopKBalancedNoisyGate
from moepatch.models.llama_moe import register_llama_moe
from moepatch.models.llama_moe import tiny_llama_moe_config
from moepatch.testing import tiny

OFFICIAL_CONFIG = LLAMA_MOE_TOPT5_CONFIG
PUBLISHED_TOTAL_PARAMS = 6_740_514_816  # the published LLaMA-MoE-v1-3_5B-2_8 model card (buffers excluded)


# ----------------------------------------------------------------------------------------------------------------------
# helpers: independent references
# ----------------------------------------------------------------------------------------------------------------------


def published_3_5b_2_8_config() -> LlamaMoEConfig:
    """LLaMA-MoE-v1-3_5B-2_8 from the published numbers (not from the shipped file)."""
    return LlamaMoEConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_scaling=None,
        use_cache=False,
        num_experts=8,
        num_selects=2,
        size_experts=[[1376] * 8 for _ in range(32)],
        score_scale_factor=4.0,
    )


def expected_published_layout() -> dict[str, tuple[int, ...]]:
    """The published state dict (H=4096, E=8, expert width 1376, V=32000, head_dim 128)."""
    hidden, experts, width, vocab, layers = 4096, 8, 1376, 32000, 32
    layout: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            layout[f"{prefix}self_attn.{name}_proj.weight"] = (hidden, hidden)
        layout[f"{prefix}self_attn.rotary_emb.inv_freq"] = (64,)
        layout[f"{prefix}mlp.gate.gate_network.0.weight"] = (experts, hidden)
        layout[f"{prefix}mlp.gate.gate_network.2.weight"] = (experts, experts)
        layout[f"{prefix}mlp.gate.weight_noise.weight"] = (experts, hidden)
        for e in range(experts):
            layout[f"{prefix}mlp.calculator.experts.weight_gate.{e}"] = (width, hidden)
            layout[f"{prefix}mlp.calculator.experts.weight_up.{e}"] = (width, hidden)
            layout[f"{prefix}mlp.calculator.experts.weight_down.{e}"] = (hidden, width)
        layout[f"{prefix}input_layernorm.weight"] = (hidden,)
        layout[f"{prefix}post_attention_layernorm.weight"] = (hidden,)
    return layout


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_cv_squared(v: np.ndarray) -> float:
    v = v.astype(np.float64)
    if v.shape[0] == 1:
        return 0.0
    return float(v.var(ddof=1) / (v.mean() ** 2 + 1e-10))


def np_phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def reference_gate(
    x: np.ndarray,
    w0: np.ndarray,
    w2: np.ndarray,
    w_noise: np.ndarray,
    *,
    k: int,
    training: bool,
    std_normal: np.ndarray | None = None,
    noise_epsilon: float = 0.01,
    weight: float = 0.01,
    use_softmax: bool = True,
) -> dict[str, np.ndarray | float]:
    """The published gate and MoE forward, step by step, in float64."""
    n_experts = w0.shape[0]
    g = np.tanh(x @ w0.T) @ w2.T  # [N, E]
    if training:
        control = np.log1p(np.exp(x @ w_noise.T)) + noise_epsilon  # softplus + eps
        noise = std_normal * control
        z = g + noise
    else:
        z = g
    order = np.argsort(-z, axis=1, kind="stable")[:, : min(k + 1, n_experts)]  # top-(k+1), descending
    top = np.take_along_axis(z, order, axis=1)
    selected = order[:, :k]
    scores = np_softmax(top[:, :k]) if use_softmax else top[:, :k]
    filtered = np.zeros_like(z)
    np.put_along_axis(filtered, selected, scores, axis=1)
    importance = filtered.sum(0)
    if training and k < n_experts:
        thr_in, thr_out = top[:, k : k + 1], top[:, k - 1 : k]
        prob = np.where(noise > thr_in, np_phi((g - thr_in) / control), np_phi((g - thr_out) / control))
        load = prob.sum(0)
    else:
        load = (filtered > 0).sum(0)
    balance = weight * (np_cv_squared(importance) + np_cv_squared(load))
    return {"indices": selected, "scores": scores, "importance": importance, "load": load, "balance": balance}


def gate_weights(gate: TopKBalancedNoisyGate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        gate.gate_network[0].weight.detach().double().numpy(),
        gate.gate_network[2].weight.detach().double().numpy(),
        gate.weight_noise.weight.detach().double().numpy(),
    )


def randomize_gate(gate: TopKBalancedNoisyGate, scale: float = 0.5) -> None:
    """Spread the gate logits (the default init is tiny) so that ties and saturation cannot hide a bug."""
    with torch.no_grad():
        for param in gate.parameters():
            param.normal_(0.0, scale)


def formula_cos_sin(head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of RoPE from the closed formula in float64 (``emb = cat(freqs, freqs)``)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def reference_forward(model: LlamaMoEForCausalLM, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense float64 forward of the published LLaMA-MoE in eval mode (no padding), written from §5.5/§5.6."""
    cfg = model.config
    w = {k: v.detach().double() for k, v in model.state_dict().items()}
    batch, length = input_ids.shape
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim, k = hidden // heads, cfg.num_selects
    eps = cfg.rms_norm_eps
    cos, sin = formula_cos_sin(head_dim, torch.arange(length))  # [T, d]

    def rms(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps))

    def rotate(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((-t[..., head_dim // 2 :], t[..., : head_dim // 2]), dim=-1)

    causal = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    h = w["model.embed_tokens.weight"][input_ids]  # [B, T, H]
    balance = 0.0
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = rms(h, w[p + "input_layernorm.weight"])
        q, kk, v = (
            (a @ w[p + f"self_attn.{n}_proj.weight"].T).view(batch, length, heads, head_dim).transpose(1, 2)
            for n in "qkv"
        )
        q, kk = q * cos + rotate(q) * sin, kk * cos + rotate(kk) * sin
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1)
        h = h + ((att @ v).transpose(1, 2).reshape(batch, length, hidden)) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"]).reshape(-1, hidden)  # [N, H]
        logits = torch.tanh(x @ w[p + "mlp.gate.gate_network.0.weight"].T) @ w[p + "mlp.gate.gate_network.2.weight"].T
        top_logits, top_idx = logits.topk(k, dim=1)
        scores = torch.softmax(top_logits, dim=1)
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(k):
                e = int(top_idx[t, j])
                ex = p + "mlp.calculator.experts."
                ffn = w[f"{ex}weight_down.{e}"] @ (
                    F.silu(w[f"{ex}weight_gate.{e}"] @ x[t]) * (w[f"{ex}weight_up.{e}"] @ x[t])
                )
                y[t] += scores[t, j] * cfg.score_scale_factor * ffn
        importance = torch.zeros(cfg.num_experts, dtype=torch.float64).index_add(0, top_idx.flatten(), scores.flatten())
        load = torch.bincount(top_idx.flatten(), minlength=cfg.num_experts).double()
        cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731 - unbiased variance, as published
        balance = balance + cfg.gate_balance_loss_weight * (cv2(importance) + cv2(load))
        h = h + y.view(batch, length, hidden)
    h = rms(h, w["model.norm.weight"])
    return {"logits": h @ w["lm_head.weight"].T, "balance_loss": balance}


@pytest.fixture(scope="module")
def tiny_model() -> LlamaMoEForCausalLM:
    torch.manual_seed(0)
    model = LlamaMoEForCausalLM(tiny_llama_moe_config())
    with torch.no_grad():  # spread the gates so routing is decided by clear margins
        for layer in model.model.layers:
            randomize_gate(layer.mlp.gate)
    return model.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, 512, (2, 9), generator=generator)


# ----------------------------------------------------------------------------------------------------------------------
# layout and configs
# ----------------------------------------------------------------------------------------------------------------------


def test_published_layout_keys_shapes_and_parameter_count() -> None:
    with torch.device("meta"):
        model = LlamaMoEForCausalLM(published_3_5b_2_8_config())
    layout = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = expected_published_layout()
    assert set(layout) - set(expected) == set(), "unexpected keys"
    assert set(expected) - set(layout) == set(), "missing keys"
    assert layout == expected
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_TOTAL_PARAMS
    assert sum(math.prod(s) for n, s in expected.items() if not n.endswith("inv_freq")) == PUBLISHED_TOTAL_PARAMS
    # inv_freq is a persistent buffer (in the checkpoint), not a parameter: 32 layers x 64 values
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("inv_freq")) == 2048
    experts = model.model.layers[0].mlp.calculator.experts
    assert [type(experts.weight_gate).__name__, len(experts.weight_gate)] == ["ParameterList", 8]
    assert experts.bias_gate is None and experts.bias_up is None and experts.bias_down is None
    assert isinstance(model.model.layers[0].mlp, LinearGLUMoELayer)
    assert type(model.model.layers[0].mlp.gate).__name__ == "TopKBalancedNoisyGate"
    assert type(model.model.layers[0].mlp.calculator).__name__ == "UniversalCalculator"


def test_official_config_file_builds_tiny_width_model() -> None:
    raw = json.loads(OFFICIAL_CONFIG.read_text())
    config = LlamaMoEConfig.from_dict(raw)
    # every published field arrives with the published value, C2R extras and the stray "gates" are kept
    for key in ("num_experts", "num_selects", "score_scale_factor", "gate_noise_epsilon", "capacity_factor"):
        assert getattr(config, key) == raw[key]
    assert config.size_experts == raw["size_experts"] and config.top_t == raw["top_t"]
    assert config.collaborative_list == raw["collaborative_list"] and config.gates == "mlp"
    # v5 standardises the null rope_scaling into a default-type dict: that is not a scaling request
    assert raw["rope_scaling"] is None and config.rope_scaling is not None
    assert config.rope_scaling_request() is None

    layers, experts = raw["num_hidden_layers"], raw["num_experts"]
    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
    small["size_experts"] = [[8] * experts for _ in range(layers)]
    small["vocab_size"] = 512
    tiny_cfg = LlamaMoEConfig.from_dict({**raw, **small})
    torch.manual_seed(0)
    model = LlamaMoEForCausalLM(tiny_cfg).eval()
    assert len(model.model.layers) == 32
    assert all(len(layer.mlp.calculator.experts.weight_up) == 8 for layer in model.model.layers)
    assert all(layer.mlp.calculator.score_scale_factor == 4.0 for layer in model.model.layers)
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 512, (1, 6)))
    assert torch.isfinite(out.logits).all() and len(out.gate_load) == 32

    with tempfile.TemporaryDirectory() as tmp:  # the C2R fields survive a round trip through config.json
        tiny_cfg.save_pretrained(tmp)
        again = LlamaMoEConfig.from_pretrained(tmp)
        # a Hub-style directory: our weights next to the *official* config.json (auto_map, torch_dtype, rope_scaling
        # null, C2R fields); after registration it loads through the Auto classes without trust_remote_code
        model.save_pretrained(tmp)
        (Path(tmp) / "config.json").write_text(json.dumps({**raw, **small}))
        register_llama_moe()
        auto, info = AutoModelForCausalLM.from_pretrained(tmp, output_loading_info=True, dtype=torch.float32)
    assert again.top_t == raw["top_t"] and again.collaborative_list == raw["collaborative_list"]
    assert again.size_experts == small["size_experts"]
    assert type(auto) is LlamaMoEForCausalLM and auto.config.top_t == raw["top_t"]
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()


def test_config_defaults_and_validation() -> None:
    config = LlamaMoEConfig()
    published_defaults = {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "num_experts": 16,
        "num_selects": 4,
        "size_experts": None,
        "gate_type": "TopKBalancedNoisyGate",
        "gate_network": "mlp",
        "gate_use_softmax": True,
        "gate_use_balance": True,
        "gate_balance_loss_weight": 1e-2,
        "gate_add_noise": True,
        "gate_noise_epsilon": 1e-2,
        "calculator_type": "UniversalCalculator",
        "multiply_gate_scores": True,
        "score_scale_factor": 1.0,
        "add_weight_norm": False,
        "drop_tokens": True,
        "dropped_padding": "zero",
        "capacity_factor": 1.25,
    }
    assert {key: getattr(config, key) for key in published_defaults} == published_defaults
    assert config.model_type == "llama_moe"
    # size_experts None -> equal shares; per-layer score_scale_factor lists
    assert tiny_llama_moe_config().expert_sizes(1) == [8] * 8
    per_layer = tiny_llama_moe_config(score_scale_factor=[2.0, 3.0])
    assert [per_layer.layer_score_scale_factor(i) for i in range(2)] == [2.0, 3.0]
    model = LlamaMoEForCausalLM(per_layer)
    assert [layer.mlp.calculator.score_scale_factor for layer in model.model.layers] == [2.0, 3.0]
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama_moe_config(intermediate_size=60)
    with pytest.raises(ValueError, match="rope scaling"):
        tiny_llama_moe_config(rope_scaling={"type": "yarn", "factor": 2.0})
    linear = tiny_llama_moe_config(rope_scaling={"type": "linear", "factor": 2.0})
    assert linear.rope_scaling_request() == ("linear", 2.0)
    with pytest.raises(NotImplementedError):
        LlamaMoEForCausalLM(tiny_llama_moe_config(add_weight_norm=True))


def test_register_is_idempotent_and_tiny_vocab_matches_tokenizer() -> None:
    register_llama_moe()
    register_llama_moe()
    with tempfile.TemporaryDirectory() as tmp:
        tiny_llama_moe_config().save_pretrained(tmp)
        assert type(AutoConfig.from_pretrained(tmp)) is LlamaMoEConfig
    model = AutoModelForCausalLM.from_config(tiny_llama_moe_config())
    assert type(model) is LlamaMoEForCausalLM
    tokenizer = tiny.tiny_tokenizer()
    config = tiny_llama_moe_config()
    assert len(tokenizer) == config.vocab_size == 512
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == 0 and tokenizer.convert_tokens_to_ids(["<s>", "</s>"]) == [1, 2]


# ----------------------------------------------------------------------------------------------------------------------
# gate and MoE layer vs the spec's pseudo-code
# ----------------------------------------------------------------------------------------------------------------------


def make_gate(**kwargs: object) -> TopKBalancedNoisyGate:
    torch.manual_seed(3)
    gate = TopKBalancedNoisyGate(16, 8, 2, **kwargs)
    if hasattr(gate, "weight_noise"):
        randomize_gate(gate)
    else:
        with torch.no_grad():
            for param in gate.parameters():
                param.normal_(0.0, 0.5)
    return gate


def test_gate_eval_matches_reference() -> None:
    gate = make_gate().eval()
    x = torch.randn(40, 16)
    with torch.no_grad():
        out = gate(x)
    assert set(out) == {"topK_indices", "topK_scores", "balance_loss", "load", "importance"}
    w0, w2, wn = gate_weights(gate)
    ref = reference_gate(x.double().numpy(), w0, w2, wn, k=2, training=False)
    np.testing.assert_array_equal(out["topK_indices"].numpy(), ref["indices"])
    np.testing.assert_allclose(out["topK_scores"].numpy(), ref["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["importance"].numpy(), ref["importance"], rtol=1e-5, atol=1e-5)
    assert out["load"].dtype == torch.int64  # hard counts outside noisy training
    np.testing.assert_array_equal(out["load"].numpy(), ref["load"])
    assert out["balance_loss"].dtype == torch.float32
    np.testing.assert_allclose(out["balance_loss"].item(), ref["balance"], rtol=1e-5)
    # no noise in eval: deterministic, and the scores of a token sum to one (softmax over the k chosen only)
    with torch.no_grad():
        again = gate(x)
    assert torch.equal(again["topK_scores"], out["topK_scores"])
    torch.testing.assert_close(out["topK_scores"].sum(1), torch.ones(40))


def test_gate_training_smooth_load_matches_reference() -> None:
    gate = make_gate().train()
    x = torch.randn(40, 16)
    torch.manual_seed(11)
    std_normal = torch.randn(40, 8)  # what randn_like(logits_gate) draws after the same seed
    torch.manual_seed(11)
    out = gate(x)
    w0, w2, wn = gate_weights(gate)
    ref = reference_gate(x.double().numpy(), w0, w2, wn, k=2, training=True, std_normal=std_normal.double().numpy())
    np.testing.assert_array_equal(out["topK_indices"].numpy(), ref["indices"])
    np.testing.assert_allclose(out["topK_scores"].detach().numpy(), ref["scores"], rtol=1e-5, atol=1e-6)
    assert out["load"].dtype == torch.float32  # smooth estimate
    np.testing.assert_allclose(out["load"].detach().numpy(), ref["load"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["balance_loss"].item(), ref["balance"], rtol=1e-4)
    # the smooth load is differentiable w.r.t. the noise projection
    out["balance_loss"].backward()
    assert gate.weight_noise.weight.grad is not None and gate.weight_noise.weight.grad.abs().sum() > 0


def test_gate_cdf_equals_torch_normal() -> None:
    from torch.distributions import Normal

    from moepatch.models.llama_moe.modeling_llama_moe import _standard_normal_cdf

    z = torch.randn(64, 8) * 3
    published = Normal(torch.tensor([0.0]), torch.tensor([1.0]))  # what the published gate held
    assert torch.equal(_standard_normal_cdf(z), published.cdf(z))
    assert torch.equal(_standard_normal_cdf(z.bfloat16()), published.cdf(z.bfloat16()))


def test_gate_options_softmax_off_balance_off_and_k_equals_e() -> None:
    x = torch.randn(30, 16)
    raw = make_gate(use_softmax=False).eval()
    w0, w2, wn = gate_weights(raw)
    ref = reference_gate(x.double().numpy(), w0, w2, wn, k=2, training=False, use_softmax=False)
    out = raw(x)
    np.testing.assert_allclose(out["topK_scores"].detach().numpy(), ref["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["load"].numpy(), ref["load"])  # non-positive raw scores are not counted

    no_balance = make_gate(use_balance=False).eval()
    assert no_balance(x)["balance_loss"].item() == -100.0

    full = TopKBalancedNoisyGate(16, 4, 4).train()  # k == E: hard counts even with noise
    full_load = full(x)["load"]
    assert full_load.dtype == torch.int64 and full_load.tolist() == [30, 30, 30, 30]

    quiet = make_gate(add_noise=False).train()
    assert not hasattr(quiet, "weight_noise")
    with pytest.warns(UserWarning, match="add_noise"):
        assert quiet(x)["load"].dtype == torch.int64


def test_select_experts_is_the_routing_seam() -> None:
    """An instance override of ``select_experts`` drives indices, scores, thresholds and the dispatch."""
    gate = make_gate().train()
    x = torch.randn(24, 16)

    def lowest_three(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = logits.argsort(dim=1)[:, :3]  # [N, 3], deliberately the *worst* experts
        return logits.gather(1, idx), idx

    gate.select_experts = lowest_three
    torch.manual_seed(5)
    std_normal = torch.randn(24, 8)
    torch.manual_seed(5)
    out = gate(x)
    w0, w2, wn = gate_weights(gate)
    g = np.tanh(x.double().numpy() @ w0.T) @ w2.T
    control = np.log1p(np.exp(x.double().numpy() @ wn.T)) + 0.01
    noise = std_normal.double().numpy() * control
    z = g + noise
    idx = np.argsort(z, axis=1, kind="stable")[:, :3]
    top = np.take_along_axis(z, idx, axis=1)
    np.testing.assert_array_equal(out["topK_indices"].numpy(), idx[:, :2])
    np.testing.assert_allclose(out["topK_scores"].detach().numpy(), np_softmax(top[:, :2]), rtol=1e-5, atol=1e-6)
    thr_in, thr_out = top[:, 2:3], top[:, 1:2]  # thresholds come from the override's columns k and k-1
    load = np.where(noise > thr_in, np_phi((g - thr_in) / control), np_phi((g - thr_out) / control)).sum(0)
    np.testing.assert_allclose(out["load"].detach().numpy(), load, rtol=1e-4, atol=1e-5)

    torch.manual_seed(0)
    layer = LlamaMoEForCausalLM(tiny_llama_moe_config(num_hidden_layers=1)).model.layers[0].mlp.eval()
    assert layer.gate.layer_index == 0
    chosen = torch.tensor([[5, 6, 7]]).expand(10, 3)
    layer.gate.select_experts = lambda logits: (logits.gather(1, chosen), chosen)
    out = layer(torch.randn(10, 32))
    assert out.gate_load.tolist() == [0, 0, 0, 0, 0, 10, 10, 0]


def dense_moe_reference(layer: LinearGLUMoELayer, x: torch.Tensor, scale: float, multiply: bool) -> torch.Tensor:
    gate = layer.gate
    logits = gate.gate_network(x)
    top_logits, top_idx = logits.topk(layer.num_selects, dim=1)
    scores = torch.softmax(top_logits.float(), dim=1)
    experts = layer.calculator.experts
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(layer.num_selects):
            e = int(top_idx[t, j])
            ffn = experts.weight_down[e] @ (F.silu(experts.weight_gate[e] @ x[t]) * (experts.weight_up[e] @ x[t]))
            y[t] += (scores[t, j] * scale if multiply else 1.0) * ffn
    return y


@pytest.mark.parametrize("multiply", [True, False])
def test_moe_layer_matches_dense_reference(multiply: bool) -> None:
    torch.manual_seed(2)
    config = tiny_llama_moe_config(num_hidden_layers=1, multiply_gate_scores=multiply, score_scale_factor=4.0)
    layer = LlamaMoEForCausalLM(config).model.layers[0].mlp.eval()
    randomize_gate(layer.gate)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        out = layer(x)
        ref = dense_moe_reference(layer, x.reshape(-1, 32), 4.0, multiply).reshape(3, 5, 32)
    torch.testing.assert_close(out.hidden_states, ref, rtol=1e-5, atol=1e-6)
    assert out.num_dropped_tokens.item() == -1.0
    assert int(out.gate_load.sum()) == 15 * 2


# ----------------------------------------------------------------------------------------------------------------------
# whole model
# ----------------------------------------------------------------------------------------------------------------------


def test_model_matches_float64_reference_and_is_deterministic(
    tiny_model: LlamaMoEForCausalLM, tokens: torch.Tensor
) -> None:
    with torch.no_grad():
        out = tiny_model(input_ids=tokens, labels=tokens, output_hidden_states=True)
        again = tiny_model(input_ids=tokens, labels=tokens)
    ref = reference_forward(tiny_model, tokens)
    torch.testing.assert_close(out.logits.double(), ref["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.balance_loss.double(), ref["balance_loss"], rtol=1e-4, atol=1e-7)
    assert torch.equal(out.logits, again.logits) and torch.equal(out.loss, again.loss)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert len(out.hidden_states) == tiny_model.config.num_hidden_layers + 1
    assert len(out.gate_load) == len(out.gate_importance) == len(out.num_dropped_tokens) == 2
    assert all(load.shape == (8,) and int(load.sum()) == tokens.numel() * 2 for load in out.gate_load)


def test_loss_adds_balance_loss_exactly_when_published(tiny_model: LlamaMoEForCausalLM, tokens: torch.Tensor) -> None:
    labels = tokens.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = tiny_model(input_ids=tokens, labels=labels)
        lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
        assert out.balance_loss > 0
        assert torch.equal(out.loss, lm_loss + out.balance_loss)  # eval too
        assert tiny_model(input_ids=tokens).loss is None  # no labels, no loss
    tiny_model.set_moe_gate_use_balance(False)
    try:
        with torch.no_grad():
            off = tiny_model(input_ids=tokens, labels=labels)
        assert off.balance_loss.item() == -100.0 * 2  # the sentinel is summed over layers, never added
        assert torch.equal(off.loss, lm_loss)
    finally:
        tiny_model.set_moe_gate_use_balance(True)
    assert tiny_model.config.gate_use_balance is True

    # training mode: noisy gates, balance loss still added
    tiny_model.train()
    try:
        torch.manual_seed(0)
        out = tiny_model(input_ids=tokens, labels=labels)
    finally:
        tiny_model.eval()
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.gate_load[0].dtype == torch.float32
    torch.testing.assert_close(out.loss, lm_loss + out.balance_loss)


def test_padded_batch_and_return_tuple(tiny_model: LlamaMoEForCausalLM) -> None:
    batch = tiny.demo_batch()
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        out = tiny_model(**batch)
        single = tiny_model(input_ids=batch["input_ids"][:1, : int(batch["attention_mask"][0].sum())])
        as_tuple = tiny_model(**batch, return_dict=False)
    assert torch.isfinite(out.logits).all()
    real = int(batch["attention_mask"][0].sum())  # right padding: the real tokens of row 0 see no padded key
    torch.testing.assert_close(out.logits[0, :real], single.logits[0], rtol=1e-4, atol=1e-5)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


def test_rotary_tables_follow_the_formula_after_loading_and_meta_init(
    tiny_model: LlamaMoEForCausalLM, tokens: torch.Tensor
) -> None:
    head_dim = 8
    positions = torch.arange(300).unsqueeze(0)  # beyond max_position_embeddings (256) too
    x = torch.zeros(1, 1, 1, head_dim)
    cos_ref, sin_ref = formula_cos_sin(head_dim, positions)

    def rotary_of(model: LlamaMoEForCausalLM, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = model.model.layers[1].self_attn.rotary_emb
        return rotary(x.to(dtype), positions, seq_len=300)

    fresh_cos, fresh_sin = rotary_of(tiny_model)
    torch.testing.assert_close(fresh_cos[0, 0].double(), cos_ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh_sin[0, 0].double(), sin_ref[0], rtol=0, atol=1e-5)

    with tempfile.TemporaryDirectory() as tmp:
        with torch.no_grad():  # what the published checkpoints hold: bf16-rounded inv_freq
            for layer in tiny_model.model.layers:
                buffer = layer.self_attn.rotary_emb.inv_freq
                buffer.copy_(buffer.to(torch.bfloat16).float())
        tiny_model.save_pretrained(tmp)
        with torch.no_grad():
            for layer in tiny_model.model.layers:
                buffer = layer.self_attn.rotary_emb.inv_freq
                buffer.copy_(1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        loaded, info = LlamaMoEForCausalLM.from_pretrained(tmp, output_loading_info=True)
        loaded_bf16 = LlamaMoEForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    loaded.eval()
    stored = loaded.model.layers[1].self_attn.rotary_emb.inv_freq
    assert not torch.equal(stored, tiny_model.model.layers[1].self_attn.rotary_emb.inv_freq)  # really rounded
    cos, sin = rotary_of(loaded)
    assert torch.equal(cos, fresh_cos) and torch.equal(sin, fresh_sin)
    cos16, _ = rotary_of(loaded_bf16, torch.bfloat16)
    assert cos16.dtype == torch.bfloat16 and torch.equal(cos16, fresh_cos.to(torch.bfloat16))
    assert torch.isfinite(cos).all() and torch.isfinite(cos16).all()

    # identical weights and logits (parameters re-materialised: mmapped tensors may pick other CPU kernels)
    reference_state = tiny_model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if not name.endswith("inv_freq"):
            assert torch.equal(tensor, reference_state[name]), name
    with torch.no_grad():
        for param in loaded.parameters():
            param.data = param.data.clone()
        assert torch.equal(loaded(input_ids=tokens).logits, tiny_model(input_ids=tokens).logits)

    # meta-device construction: the buffer is uninitialised memory, the tables are still the formula
    with torch.device("meta"):
        meta_model = LlamaMoEForCausalLM(tiny_llama_moe_config())
    meta_model.to_empty(device="cpu")
    with torch.no_grad():
        meta_model.model.layers[1].self_attn.rotary_emb.inv_freq.fill_(float("nan"))
    cos, sin = rotary_of(meta_model)
    assert torch.equal(cos, fresh_cos) and torch.equal(sin, fresh_sin)


def test_checkpoint_without_inv_freq_loads_clean(tiny_model: LlamaMoEForCausalLM, tokens: torch.Tensor) -> None:
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        tiny_model.save_pretrained(tmp)
        path = Path(tmp) / "model.safetensors"
        state = {k: v for k, v in load_file(path).items() if not k.endswith("inv_freq")}  # SFT-era layout
        save_file(state, path, metadata={"format": "pt"})
        loaded, info = LlamaMoEForCausalLM.from_pretrained(tmp, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    inv_freq = loaded.model.layers[0].self_attn.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(input_ids=tokens).logits).all()


def test_generate_and_dynamic_cache(tiny_model: LlamaMoEForCausalLM, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        cached = tiny_model.generate(tokens, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = tiny_model.generate(tokens, max_new_tokens=4, do_sample=False, use_cache=False)
        assert cached.shape == (2, tokens.shape[1] + 4) and torch.equal(cached, uncached)
        full = tiny_model(input_ids=cached).logits
        prefix = tiny_model(input_ids=cached[:, :-1], use_cache=True)
        assert isinstance(prefix.cache, DynamicCache) and prefix.cache.get_seq_length() == cached.shape[1] - 1
        step = tiny_model(input_ids=cached[:, -1:], cache=prefix.cache, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    # the deprecated `past_key_values=` keyword still reaches the cache
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prefix = tiny_model(input_ids=cached[:, :-1], use_cache=True)
        legacy = tiny_model(input_ids=cached[:, -1:], past_key_values=prefix.cache, use_cache=True)
    assert torch.equal(legacy.logits, step.logits)


def test_gradient_checkpointing_backward_matches_plain(tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = LlamaMoEForCausalLM(tiny_llama_moe_config()).train()

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)  # the same gate noise in both runs (checkpointing replays the RNG state)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ckpt_loss, ckpt = grads()
    assert torch.equal(plain_loss, ckpt_loss) and set(plain) == set(ckpt)
    assert any(name.endswith("weight_noise.weight") for name in ckpt)  # the smooth load trains the noise
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    model.activation_checkpointing_disable()
    with pytest.warns(FutureWarning):
        model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    legacy_loss, _ = grads()
    assert torch.equal(legacy_loss, plain_loss)


def test_runtime_setters_update_modules_and_config() -> None:
    torch.manual_seed(0)
    model = LlamaMoEForCausalLM(tiny_llama_moe_config())
    model.set_moe_num_selects(3)
    assert model.config.num_selects == 3 and all(layer.mlp.gate.num_selects == 3 for layer in model.model.layers)
    model.set_moe_calculator_score_scale_factor(2.5, layer_index=1)
    assert model.config.score_scale_factor == [4.0, 2.5]
    assert [layer.mlp.calculator.score_scale_factor for layer in model.model.layers] == [4.0, 2.5]
    with pytest.raises(ValueError):
        model.set_moe_num_selects(9)
    with pytest.raises(KeyError):
        model.set_moe_calculator_drop_tokens(False)  # the UniversalCalculator has no such knob (as published)
    with torch.no_grad():
        out = model.eval()(input_ids=torch.randint(3, 512, (1, 5)))
    assert all(int(load.sum()) == 5 * 3 for load in out.gate_load)
    assert isinstance(model.get_decoder(), LlamaMoEModel)
    experts = model.model.layers[0].mlp.calculator.experts
    before = experts.weight_up[0].detach().clone()
    model.reset_experts()
    assert not torch.equal(before, experts.weight_up[0])
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=√5) on [8, 32] draws from U(-1/√fan_in, 1/√fan_in)
    assert experts.weight_up[0].abs().max() <= bound
