"""Gate noise / balance loss / aux coefficient options: the right config field per family, checked on the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moepatch.routing.training_options import apply_training_options
from moepatch.routing.training_options import training_overrides
from moepatch.testing import tiny

HF_FAMILIES = ["qwen2_moe", "mixtral", "qwen3_moe", "olmoe"]


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain next-token cross-entropy, computed here (not by the model)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def _built(family: str, **options):
    config = tiny.tiny_config(family)
    changed = apply_training_options(config, **options)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train(), changed


def _loss_and_lm(model):
    batch = tiny.demo_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(1)
    output = model(**batch, labels=labels)
    return output.loss, _lm_loss(output.logits, labels)


@pytest.mark.parametrize("family", [*HF_FAMILIES, "qwen3_5_moe", "minimax", "jamba", "dbrx", "gpt_oss", "ernie4_5_moe",
                                    "minimax_m2"])
def test_balance_loss_switch_of_transformers_families(family):
    off, changed = _built(family, balance_loss=False)
    assert changed == {"output_router_logits": False}
    loss, lm = _loss_and_lm(off)
    torch.testing.assert_close(loss, lm)  # no balance term
    on, _ = _built(family, balance_loss=True, aux_loss_coef=0.5)
    loss, lm = _loss_and_lm(on)
    assert on.router_aux_loss_coef == 0.5  # the causal LM's coefficient (DBRX: from ffn_config.moe_loss_weight)
    assert loss - lm > 0.5 * 0.9  # transformers' Switch loss is about k = 2 near balance, never far below 1


@pytest.mark.parametrize(("model_type", "family"), [
    ("deepseek_v2", "deepseek_v2"), ("hunyuan_v1_moe", "hunyuan_v1_moe"), ("deepseek_v3", "deepseek_v3"),
    ("llama4_text", "llama4")])
def test_families_without_a_balance_loss_refuse_the_switch(model_type, family):
    """transformers' DeepSeek-V2 / V3, HunYuan-MoE-V1 and Llama 4 causal LMs add no load-balancing loss: nothing to
    switch on (DeepSeek-V3 balances with its selection bias: the bias_update option)."""
    config = tiny.tiny_config(model_type)
    with pytest.raises(ValueError, match=f"balance_loss: family '{family}' has no such switch"):
        apply_training_options(config, balance_loss=True)


def test_llama_moe_switches():
    model, changed = _built("llama_moe", gate_noise=False, balance_loss=False)
    assert changed == {"gate_add_noise": False, "gate_use_balance": False}
    loss, lm = _loss_and_lm(model)
    torch.testing.assert_close(loss, lm)
    again, _ = _loss_and_lm(model)
    assert torch.equal(loss, again)  # no noise: training forwards are deterministic
    noisy, _ = _built("llama_moe", gate_noise=True, balance_loss=True, aux_loss_coef=0.3)
    gate = noisy.model.layers[0].mlp.gate
    assert gate.add_noise and gate.use_balance and gate.balance_loss_weight == 0.3
    first, lm = _loss_and_lm(noisy)
    assert first > lm  # the CV² balance loss is added
    torch.manual_seed(2)
    second = noisy(**tiny.demo_batch(), labels=tiny.demo_batch()["input_ids"]).loss
    assert not torch.equal(first, second)  # noise is sampled in training


def test_moduleformer_coefficient_and_refusals():
    config = tiny.tiny_config("moduleformer")
    assert training_overrides(config, aux_loss_coef=0.01) == {"aux_loss_weight": 0.01}
    with pytest.raises(ValueError, match="gate_noise: family 'moduleformer' has no such switch"):
        training_overrides(config, gate_noise=True)


def test_bad_options_are_all_reported_and_nothing_changes():
    config = tiny.tiny_config("mixtral")
    before = config.to_dict()
    with pytest.raises(ValueError) as error:
        apply_training_options(config, gate_noise=True, balance_loss="yes", aux_loss_coef=-1.0, noise=3)
    message = str(error.value)
    for expected in ("gate_noise: family 'mixtral'", "balance_loss: expected true or false",
                     "aux_loss_coef: expected a finite number", "noise: unknown training option"):
        assert expected in message
    assert config.to_dict() == before


def test_options_left_unset_change_nothing():
    config = tiny.tiny_config("qwen2_moe")
    assert apply_training_options(config, gate_noise=None, balance_loss=None, aux_loss_coef=None) == {}


def test_a_sub_config_field_is_set_also_in_a_plain_dict():
    """DBRX's aux coefficient sits in ``ffn_config``; a config holding it as a dict gets it set there too."""
    from transformers import PretrainedConfig

    config = PretrainedConfig(model_type="dbrx", ffn_config={"moe_loss_weight": 0.01}, output_router_logits=False)
    changed = apply_training_options(config, balance_loss=True, aux_loss_coef=0.25)
    assert changed == {"output_router_logits": True, "ffn_config.moe_loss_weight": 0.25}
    assert config.ffn_config == {"moe_loss_weight": 0.25} and config.output_router_logits is True
