"""MoLM / ModuleFormer for transformers 5 (``moepatch.models.moduleformer``) against the published ModuleFormer
code and checkpoint layout.

Expected key lists, shapes and parameter counts are written here from the spec tables; gating, the MoE, the
stick-breaking attention and the aux losses are checked against slow references written in this file (per-token
loops, float64 where useful), not against the module's own helpers.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig
from transformers import AutoModelForCausalLM
from transformers import DynamicCache

from moepatch.models import moduleformer as mf
from moepatch.models.moduleformer import ModuleFormerConfig
from moepatch.models.moduleformer import ModuleFormerForCausalLM
from moepatch.models.moduleformer import MoE
from moepatch.models.moduleformer import molm_config
from moepatch.models.moduleformer import register_moduleformer
from moepatch.models.moduleformer import tiny_moduleformer_config
from moepatch.models.moduleformer import top_k_gating

# --- spec §6.2: config.json of ibm/MoLM-700M-8B ----------------------------------------------------------------------
MOLM_700M_8B_CONFIG_JSON = {
    "activation_function": "gelu_new",
    "architectures": ["ModuleFormerForCausalLM"],
    "att_func": "stickbreaking",
    "att_hidden": 1024,
    "attn_pdrop": 0,
    "aux_loss_type": "mi",
    "aux_loss_weight": 0,
    "block_size": 512,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "embd_pdrop": 0,
    "ffd_hidden": 2048,
    "gate_type": "mlp",
    "gating_size": 256,
    "history_length": 512,
    "initializer_range": 0.02,
    "k_att": 2,
    "k_mlp": 2,
    "layer_norm_epsilon": 1e-05,
    "local_size": 1,
    "model_type": "moduleformer",
    "moe_pdrop": 0,
    "moe_type": "moe",
    "n_att_experts": 16,
    "n_ctx": 24576,
    "n_embd": 1024,
    "n_head": 1,
    "n_layer": 48,
    "n_mlp_experts": 32,
    "pre_norm": True,
    "resid_pdrop": 0,
    "sample_topk": 0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.28.1",
    "universal": False,
    "use_cache": True,
    "vocab_size": 50295,
    "world_size": None,
}

# --- spec §6.4: per-layer keys of MoLM-700M-8B (n_embd 1024, att_hidden 1024, ffd 2048, E_att 16, E_mlp 32) -----------
LAYER_KEYS_700M_8B = {
    "ln_1.weight": (1024,),
    "ln_1.bias": (1024,),
    "attn.q_proj.experts.weight": (16, 1024, 1024),
    "attn.q_proj.output_experts.weight": (16, 1024, 1024),
    "attn.q_proj.gate.w_gate.0.weight": (256, 1024),
    "attn.q_proj.gate.w_gate.0.bias": (256,),
    "attn.q_proj.gate.w_gate.3.weight": (16, 256),
    "attn.mask": (1024, 1024),
    "attn.cum_weight": (1024, 1024),
    "ln_2.weight": (1024,),
    "ln_2.bias": (1024,),
    "mlpf.experts.weight": (32, 1024, 2048),
    "mlpf.output_experts.weight": (32, 2048, 1024),
    "mlpf.gate.w_gate.0.weight": (256, 1024),
    "mlpf.gate.w_gate.0.bias": (256,),
    "mlpf.gate.w_gate.3.weight": (32, 256),
}
GLOBAL_KEYS_700M_8B = {
    "transformer.wte.weight": (50295, 1024),
    "transformer.ln_f.weight": (1024,),
    "transformer.ln_f.bias": (1024,),
    "lm_head.weight": (50295, 1024),
}


# --- independent references ------------------------------------------------------------------------------------------
def gelu_new_ref(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def gelu_erf_ref(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))


@torch.no_grad()
def gate_ref(gate: top_k_gating, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Published gate: Linear(+bias) → erf GELU → Linear(no bias) → softmax over all E → top-k of probs, no renorm."""
    w0, b0, w3 = gate.w_gate[0].weight, gate.w_gate[0].bias, gate.w_gate[3].weight
    logits = gelu_erf_ref(x @ w0.T + b0) @ w3.T
    probs = torch.softmax(logits, dim=-1)
    gates, idx = probs.topk(k, dim=-1)
    return logits, probs, gates, idx


@torch.no_grad()
def moe_loop_ref(moe: MoE, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_s g_ts · act(x_t W_in[e_ts]) W_out[e_ts], one token and one slot at a time, in float64."""
    w_in = moe.experts.weight.double()
    w_out = moe.output_experts.weight.double()
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.size(0)):
        for s in range(idx.size(1)):
            e = int(idx[t, s])
            y[t] += float(gates[t, s]) * (gelu_new_ref(x[t].double() @ w_in[e]) @ w_out[e])
    return y


@torch.no_grad()
def attention_loop_ref(
    attn: mf.ModuleFormerAttention, h: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, pad: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stick-breaking attention of one sequence h [T, C] with identity k/v, in float64, loops over (query, slot).

    A_ij = σ(L_ij) Π_{j<m≤i} (1 − σ(L_im)) over visible (causal, non-padded) keys; out_t = Σ_s g_s (Σ_j A_ij h_j) W_out.
    """
    w_in = attn.q_proj.experts.weight.double()
    w_out = attn.q_proj.output_experts.weight.double()
    hd = h.double()
    length, dim = hd.shape
    k = idx.size(1)
    out = torch.zeros(length, dim, dtype=torch.float64)
    att = torch.zeros(k, length, length, dtype=torch.float64)
    for i in range(length):
        for s in range(k):
            e = int(idx[i, s])
            q = hd[i] @ w_in[e]
            sig = {j: torch.sigmoid(q @ hd[j] / math.sqrt(dim)) for j in range(i + 1) if pad is None or pad[j]}
            y = torch.zeros(dim, dtype=torch.float64)
            for j, sj in sig.items():
                a = sj * math.prod(float(1 - sig[m]) for m in sig if m > j)
                att[s, i, j] = a
                y += a * hd[j]
            out[i] += float(gates[i, s]) * (y @ w_out[e])
    return out, att


def randomize_(model: torch.nn.Module, std: float = 0.3) -> None:
    """Spread the routing: default 0.02-std weights give near-uniform gate probabilities."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" not in name:
                p.normal_(0.0, std)


@pytest.fixture(scope="module")
def tiny_model() -> ModuleFormerForCausalLM:
    torch.manual_seed(0)
    model = ModuleFormerForCausalLM(tiny_moduleformer_config()).eval()
    randomize_(model, 0.2)
    return model


def ids_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- config ----------------------------------------------------------------------------------------------------------
def test_config_defaults_and_published_fields() -> None:
    c = ModuleFormerConfig()
    assert c.model_type == "moduleformer"
    assert (c.vocab_size, c.block_size, c.history_length) == (50295, 512, 512)
    assert (c.n_embd, c.n_layer, c.n_head) == (1024, 24, 8)
    assert (c.att_hidden, c.ffd_hidden, c.gating_size) == (512, 2048, 256)
    assert (c.n_att_experts, c.k_att, c.n_mlp_experts, c.k_mlp, c.sample_topk) == (32, 2, 32, 2, 0)
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop, c.moe_pdrop) == (0, 0, 0, 0)
    assert (c.aux_loss_type, c.aux_loss_weight, c.gate_type, c.activation_function) == ("mi", 0, "mlp", "gelu_new")
    assert (c.bos_token_id, c.eos_token_id, c.tie_word_embeddings, c.use_cache) == (50256, 50256, False, True)
    assert (c.layer_norm_epsilon, c.initializer_range) == (1e-5, 0.02)
    assert c.n_ctx == 512 * 24  # history_length × n_layer
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (1024, 8, 24)
    assert getattr(c, "max_position_embeddings", None) is None  # maps to n_positions, never set (published)
    assert ModuleFormerConfig(num_hidden_layers=4, history_length=10).n_ctx == 40  # aliases resolved first


def test_published_config_json_loads_and_keeps_extra_keys(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(MOLM_700M_8B_CONFIG_JSON))
    c = ModuleFormerConfig.from_pretrained(tmp_path)
    assert (c.n_layer, c.n_head, c.att_hidden) == (48, 1, 1024)
    assert (c.n_att_experts, c.n_mlp_experts, c.n_ctx) == (16, 32, 24576)
    assert (c.att_func, c.local_size, c.moe_type, c.pre_norm, c.universal) == ("stickbreaking", 1, "moe", True, False)
    assert c.dtype == torch.bfloat16
    expected = molm_config("MoLM-700M-8B", architectures=["ModuleFormerForCausalLM"], **_extras()).to_dict()
    skip = {"_name_or_path", "transformers_version", "dtype"}
    loaded = {k: v for k, v in c.to_dict().items() if k not in skip}
    assert loaded == {k: v for k, v in expected.items() if k not in skip}


def _extras() -> dict:
    return dict(att_func="stickbreaking", local_size=1, moe_type="moe", pre_norm=True, universal=False, world_size=None)


def test_v5_clean_source() -> None:
    source = inspect.getsource(mf.modeling_moduleformer) + inspect.getsource(mf.configuration_moduleformer)
    assert "from transformers.onnx" not in source and "import transformers.onnx" not in source
    assert "get_head_mask(" not in source


# --- layout and sizes (spec §6.4, §7) --------------------------------------------------------------------------------
def test_molm_700m_8b_keys_shapes_and_param_count_on_meta() -> None:
    with torch.device("meta"):
        model = ModuleFormerForCausalLM(molm_config("MoLM-700M-8B"))
    state = model.state_dict()
    expected = dict(GLOBAL_KEYS_700M_8B)
    for i in range(48):
        expected.update({f"transformer.h.{i}.{k}": shape for k, shape in LAYER_KEYS_700M_8B.items()})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(state) == 4 + 48 * 16  # the Hub index: 779 lines = 7 framing + 4 globals + 48 × 16
    assert state["transformer.h.0.attn.mask"].dtype == torch.int8
    assert state["transformer.h.0.attn.cum_weight"].dtype == torch.float32
    # buffers are persistent (saved) but excluded from the §7 parameter counts
    assert {n.split(".")[-1] for n, _ in model.named_buffers()} == {"mask", "cum_weight"}
    assert sum(p.numel() for p in model.parameters()) == 8_182_046_720
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied: counted twice
    assert isinstance(model.transformer.h[0].attn.k_proj, torch.nn.Identity)


@pytest.mark.parametrize("name", ["MoLM-350M-4B", "MoLM-700M-4B"])
def test_molm_4b_param_count(name: str) -> None:
    with torch.device("meta"):
        model = ModuleFormerForCausalLM(molm_config(name))
    assert sum(p.numel() for p in model.parameters()) == 4_142_526_464


def test_tiny_config_matches_tiny_tokenizer() -> None:
    from moepatch.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_moduleformer_config()
    assert cfg.vocab_size == len(tok) == 512
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert cfg.n_head == 1 and cfg.att_hidden == cfg.n_embd == 32
    assert (cfg.n_mlp_experts, cfg.k_mlp, cfg.n_att_experts, cfg.k_att) == (8, 2, 4, 2)
    assert tiny_moduleformer_config(n_layer=2).n_layer == 2


# --- gating, MoE, aux losses -----------------------------------------------------------------------------------------
def test_gate_matches_reference_and_hook_sees_triple(tiny_model: ModuleFormerForCausalLM) -> None:
    gate = tiny_model.transformer.h[1].mlpf.gate
    x = torch.randn(40, 32)
    seen = []
    handle = gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        idx, gates, probs = gate(x)
    finally:
        handle.remove()
    _, probs_ref, gates_ref, idx_ref = gate_ref(gate, x, 2)
    torch.testing.assert_close(probs, probs_ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(gates, gates_ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(gates, probs.gather(1, idx))  # raw probabilities: no renorm, no scale
    assert (gates.sum(-1) < 1).all()
    assert len(seen) == 1 and all(a is b for a, b in zip(seen[0], (idx, gates, probs), strict=True))


def test_mlp_moe_matches_per_token_loop(tiny_model: ModuleFormerForCausalLM) -> None:
    moe = tiny_model.transformer.h[0].mlpf
    x = torch.randn(3, 7, 32)
    y, loss = moe(x)
    flat = x.reshape(-1, 32)
    _, _, gates_ref, idx_ref = gate_ref(moe.gate, flat, 2)
    ref = moe_loop_ref(moe, flat, idx_ref, gates_ref)
    torch.testing.assert_close(y.reshape(-1, 32).double(), ref, atol=1e-5, rtol=1e-5)
    assert loss is moe.gate.loss
    # published routing attributes
    assert moe.expert_size == torch.bincount(idx_ref.flatten(), minlength=8).tolist()
    assert sum(moe.expert_size) == 21 * 2
    order = moe.index_sorted_experts
    assert torch.equal(idx_ref.flatten()[order], idx_ref.flatten().sort().values)  # rows grouped by expert
    assert torch.equal(moe.batch_index, order // 2)
    torch.testing.assert_close(moe.batch_gates, gates_ref.flatten()[order], rtol=1e-6, atol=1e-7)


def test_attention_matches_stick_breaking_loop_with_padding(tiny_model: ModuleFormerForCausalLM) -> None:
    attn = tiny_model.transformer.h[0].attn
    h = torch.randn(2, 6, 32)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    additive = (1.0 - pad[:, None, None, None, :].float()) * torch.finfo(torch.float32).min
    out, att, _ = attn(h, attention_mask=additive)
    assert att.shape == (2, 2, 1, 6, 6)
    _, _, gates_ref, idx_ref = gate_ref(attn.q_proj.gate, h.reshape(-1, 32), 2)
    for b in range(2):
        sl = slice(6 * b, 6 * b + 6)
        out_ref, att_ref = attention_loop_ref(attn, h[b], idx_ref[sl], gates_ref[sl], pad[b].bool())
        torch.testing.assert_close(out[b].double(), out_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(att[b, :, 0].double(), att_ref, atol=1e-6, rtol=1e-5)
    assert (att[1, ..., :2] == 0).all()  # padded keys get no weight
    assert (out[1, :2] == 0).all()  # queries that only see padding output exactly 0
    assert (att.sum(-1) < 1).all()  # unnormalised


def test_mi_and_switch_aux_loss_match_reference() -> None:
    torch.manual_seed(3)
    x = torch.randn(50, 32)
    for kind in ("mi", "switch"):
        gate = top_k_gating(32, 8, 2, hidden_size=16, aux_loss=kind)
        randomize_(gate, 0.5)
        gate(x)
        logits, probs, gates, idx = (t.double() for t in gate_ref(gate, x, 2))
        if kind == "mi":
            cond_entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1).mean()  # H(e|x)
            marginal = probs.mean(0)
            entropy = -(marginal * torch.log(marginal + 1e-8)).sum()  # H(e)
            expected = cond_entropy - entropy
        else:
            routed = torch.zeros(50, 8, dtype=torch.float64).scatter(1, idx.long(), 1.0).sum(0)
            p = probs.sum(0)
            switch = 8 * ((p / p.sum()) * (routed / routed.sum())).sum()
            expected = switch + 0.1 * torch.logsumexp(logits, -1).pow(2).mean()
        torch.testing.assert_close(gate.loss.double(), expected, atol=1e-6, rtol=1e-5)


def test_routing_seam_override_per_instance(tiny_model: ModuleFormerForCausalLM) -> None:
    moe = tiny_model.transformer.h[2].mlpf
    other = tiny_model.transformer.h[1].mlpf

    def last_two(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([6, 7]).expand(probs.size(0), k)
        return probs.gather(1, idx), idx

    x = torch.randn(1, 5, 32)
    moe.gate.select_experts = last_two
    try:
        seen = []
        handle = moe.gate.register_forward_hook(lambda mod, args, out: seen.append(out))
        y, _ = moe(x)
        handle.remove()
        other(x)
    finally:
        del moe.gate.select_experts
    assert moe.expert_size == [0, 0, 0, 0, 0, 0, 5, 5]
    assert (seen[0][0] == torch.tensor([6, 7])).all()
    _, probs_ref, _, _ = gate_ref(moe.gate, x[0], 2)
    idx = torch.tensor([6, 7]).expand(5, 2)
    ref = moe_loop_ref(moe, x[0], idx, probs_ref.gather(1, idx))
    torch.testing.assert_close(y[0].double(), ref, atol=1e-5, rtol=1e-5)
    assert other.expert_size != [0, 0, 0, 0, 0, 0, 5, 5]  # other instances keep top-k
    moe(x)
    assert moe.expert_size != [0, 0, 0, 0, 0, 0, 5, 5]  # override removed


def test_sample_topk_only_in_training() -> None:
    torch.manual_seed(5)
    gate = top_k_gating(32, 8, 3, hidden_size=16, sample_topk=2)
    x = torch.randn(64, 32)
    gate.eval()
    idx, gates, probs = gate(x)
    assert torch.equal(idx, probs.topk(3, dim=-1).indices)
    gate.train()
    gate.w_gate[2].p = 0.0
    idx, gates, probs = gate(x)
    assert torch.equal(idx[:, 0], probs.argmax(-1))  # top (k - sample_topk) kept by probability
    assert all(len(set(row.tolist())) == 3 for row in idx)  # sampled without replacement, never the kept one
    assert torch.equal(gates, probs.gather(1, idx))
    assert not torch.equal(idx, probs.topk(3, dim=-1).indices)


# --- whole model -----------------------------------------------------------------------------------------------------
def test_full_model_matches_reference_and_ignores_eps_and_buffers() -> None:
    torch.manual_seed(7)
    model = ModuleFormerForCausalLM(tiny_moduleformer_config(layer_norm_epsilon=0.5, n_layer=2)).eval()
    randomize_(model, 0.2)
    ids = ids_of(1, 6)
    with torch.no_grad():
        logits = model(ids).logits
        x = model.transformer.wte.weight[ids[0]]
        for block in model.transformer.h:
            ln = F.layer_norm(x, (32,), block.ln_1.weight, block.ln_1.bias, 1e-5)  # eps fixed at 1e-5
            _, _, g, i = gate_ref(block.attn.q_proj.gate, ln, 2)
            x = x + attention_loop_ref(block.attn, ln, i, g, None)[0].float()
            ln = F.layer_norm(x, (32,), block.ln_2.weight, block.ln_2.bias, 1e-5)
            _, _, g, i = gate_ref(block.mlpf.gate, ln, 2)
            x = x + moe_loop_ref(block.mlpf, ln, i, g).float()
        x = F.layer_norm(x, (32,), model.transformer.ln_f.weight, model.transformer.ln_f.bias, 1e-5)
        torch.testing.assert_close(logits[0], x @ model.lm_head.weight.T, atol=1e-4, rtol=1e-4)
        assert logits.dtype == torch.float32
        for block in model.transformer.h:  # the saved buffers are never read
            block.attn.mask.zero_()
            block.attn.cum_weight.fill_(3.0)
        assert torch.equal(model(ids).logits, logits)


def test_outputs_finite_deterministic_and_recorded(tiny_model: ModuleFormerForCausalLM) -> None:
    ids = ids_of(2, 9)
    with torch.no_grad():
        a = tiny_model(ids, output_hidden_states=True, output_attentions=True)
        b = tiny_model(ids)
    assert torch.isfinite(a.logits).all() and torch.equal(a.logits, b.logits)
    assert a.loss is None
    assert len(a.hidden_states) == 3 + 1 and len(a.attentions) == 3
    assert a.attentions[0].shape == (2, 2, 1, 9, 9)  # [B, k_att, n_head, T, S]
    assert torch.equal(a.hidden_states[0], tiny_model.transformer.wte(ids))  # embeddings (dropout 0)
    assert isinstance(a.cache, DynamicCache) and a.cache.get_seq_length() == 9
    assert tiny_model(ids, use_cache=False).cache is None
    as_tuple = tiny_model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], a.logits)
    with torch.no_grad():  # token_type_ids are embedded with the same table and added (published)
        types = torch.ones_like(ids)
        embeds = tiny_model.transformer.wte(ids) + tiny_model.transformer.wte(types)
        with_types = tiny_model(ids, token_type_ids=types).logits
        torch.testing.assert_close(with_types, tiny_model(inputs_embeds=embeds).logits)


def test_padding_does_not_change_real_tokens(tiny_model: ModuleFormerForCausalLM) -> None:
    ids = ids_of(1, 6, seed=4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = tiny_model(ids).logits
        left = tiny_model(padded, attention_mask=mask).logits
    torch.testing.assert_close(left[:, 3:], plain, atol=1e-5, rtol=1e-5)


def test_cache_matches_full_forward_and_generate(tiny_model: ModuleFormerForCausalLM) -> None:
    ids = ids_of(2, 8, seed=2)
    with torch.no_grad():
        full = tiny_model(ids).logits
        first = tiny_model(ids[:, :5], use_cache=True)
        second = tiny_model(ids[:, 5:], cache=first.cache, use_cache=True)
        assert second.cache.get_seq_length() == 8
        torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=1e-5)
        # a past is ignored when use_cache is False (published)
        ignored = tiny_model(ids[:, 5:], cache=DynamicCache(), use_cache=False).logits
        torch.testing.assert_close(ignored, tiny_model(ids[:, 5:]).logits)
        with_cache = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        without = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache, without)


def test_deprecated_past_key_values_alias(tiny_model: ModuleFormerForCausalLM) -> None:
    ids = ids_of(1, 6)
    with torch.no_grad():
        first = tiny_model(ids[:, :4], use_cache=True)
        with pytest.warns(FutureWarning):
            out = tiny_model(ids[:, 4:], past_key_values=first.cache, use_cache=True)
        torch.testing.assert_close(out.logits, tiny_model(ids).logits[:, 4:], atol=1e-5, rtol=1e-5)


def test_aux_loss_reaches_loss_only_with_labels_and_positive_weight() -> None:
    torch.manual_seed(11)
    model = ModuleFormerForCausalLM(tiny_moduleformer_config()).eval()
    ids = ids_of(2, 7)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    gate_losses = [m.gate.loss for blk in model.transformer.h for m in (blk.attn.q_proj, blk.mlpf)]
    torch.testing.assert_close(model.transformer.aux_loss, sum(gate_losses))
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert model.aux_loss_weight == 0
    assert torch.equal(out.loss, ce)  # MoLM: aux loss computed but never added
    model.train()
    assert torch.equal(model(ids, labels=labels).loss, ce)  # not in training either (dropout is 0)
    model.aux_loss_weight = 0.5
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, ce + 0.5 * model.transformer.aux_loss)
    assert model(ids).loss is None


def test_bf16_loss_dtype_follows_hidden_states() -> None:
    model = ModuleFormerForCausalLM(tiny_moduleformer_config(n_layer=1)).to(torch.bfloat16).eval()
    ids = ids_of(1, 5)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.mask.dtype == torch.int8


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_backward_matches_plain(reentrant: bool) -> None:
    torch.manual_seed(13)
    cfg = tiny_moduleformer_config(aux_loss_weight=0.1)  # the aux loss must flow through the checkpointed blocks
    plain = ModuleFormerForCausalLM(cfg).train()
    randomize_(plain, 0.2)
    ckpt = ModuleFormerForCausalLM(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = []
    ckpt.transformer.h[0].mlpf.gate.register_forward_hook(lambda *_: calls.append(1))
    ids = ids_of(2, 6)
    for model in (plain, ckpt):
        model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the block really was recomputed in the backward
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert q.grad is not None and torch.isfinite(q.grad).all(), name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert ckpt.transformer.h[0].mlpf.gate.w_gate[0].weight.grad.abs().sum() > 0


def test_save_pretrained_round_trip_and_auto_classes(tmp_path: Path, tiny_model: ModuleFormerForCausalLM) -> None:
    register_moduleformer()
    register_moduleformer()  # idempotent
    tiny_model.save_pretrained(tmp_path)
    loaded, info = ModuleFormerForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    auto, auto_info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(auto, ModuleFormerForCausalLM) and not auto_info["missing_keys"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ModuleFormerConfig)
    ids = ids_of(2, 7)
    with torch.no_grad():
        ref = tiny_model(ids).logits
        assert torch.equal(loaded.eval()(ids).logits, ref)
        assert torch.equal(auto.eval()(ids).logits, ref)


def test_loads_published_style_sharded_bin_checkpoint(tmp_path: Path, tiny_model: ModuleFormerForCausalLM) -> None:
    """The Hub layout of MoLM: two ``pytorch_model-*.bin`` shards, an index, bf16, the published config keys."""
    register_moduleformer()
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tiny_model.state_dict().items()}
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2]}
    shards["pytorch_model-00002-of-00002.bin"] = keys[len(keys) // 2 :]
    for fname, names in shards.items():
        torch.save({k: state[k] for k in names}, tmp_path / fname)
    weight_map = {k: fname for fname, names in shards.items() for k in names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {**MOLM_700M_8B_CONFIG_JSON, **{k: v for k, v in tiny_model.config.to_dict().items() if k != "dtype"}}
    config.update(transformers_version="4.28.1", torch_dtype="bfloat16", n_ctx=48, **_extras())
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert model.dtype == torch.bfloat16 and model.config.att_func == "stickbreaking"
    with torch.no_grad():
        assert torch.isfinite(model(ids_of(1, 5)).logits).all()
