"""Run under torchrun (gloo, CPU): one tiny Qwen2-MoE checkpoint under expert parallelism, dispatched by moepatch's
``"moepatch_dedup"`` and by transformers' ``"all_to_all"``, against the single-process model, for several routings.

Usage: ``ep_worker.py CHECKPOINT OUTPUT LAYOUT[,LAYOUT...] ROUTING[,ROUTING...] [UNEVEN_CHECKPOINT]``

- LAYOUT ``shared``: ``DistributedConfig(tp_size=N, ep_size=N, tp_plan={})``, every rank holds the same batch (the
  dispatch slices it over the TP group); ``separate``: ``DistributedConfig(tp_size=1, fsdp_size=N, ep_size=N)``, each
  rank holds its own batch (FSDP2 shards the dense weights and averages gradients over the batches); ``mixed``:
  ``tp_size=2, fsdp_size=N/2, ep_size=N``: pairs of ranks share a batch, the pairs hold different ones (the
  ``AllToAllEP`` docstring's layout).
- ROUTING ``natural``: the router's own top-k; ``rank0``: each token's top-k among rank 0's experts only (every other
  rank receives nothing); ``local``: each token's top-k among the experts of the rank that dispatches it (nothing
  leaves its rank); ``one_token`` (layouts whose TP ranks share a batch only): every batch is one token, which only
  the first rank of its TP group dispatches, so the others send nothing at all, not even to themselves; it goes to
  the last rank's experts (so the last rank, which sends nothing, receives and computes, and every other rank
  receives nothing). A forced routing is a forward hook on every router, the same on the reference model, keeping
  the weights the router's softmax probabilities so gradients still reach the router weights.

Writes ``rank{r}.json``: per layout and routing, per implementation, the max abs differences to the reference
(logits with and without gradients, inputs' embedding gradients, the gradient of the routing weights handed to each
experts module, expert-weight and router-weight gradients, gathered), the dedup dispatch's traffic per layer in one
forward, and the routing that forward took (per MoE layer, the ``[tokens, k]`` global expert ids of this rank's
batch) for the test's independent byte count. With UNEVEN_CHECKPOINT (a model whose expert count ``ep_size = N`` does
not divide), first the error its EP load raises.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers import DistributedConfig

import moepatch  # noqa: F401  (registers "moepatch_dedup")
from moepatch.expert_parallel import dedup_dispatches
from moepatch.expert_parallel import model_traffic
from moepatch.testing import tiny

TEXTS = list(tiny.DEMO_TEXTS) + list(tiny.CORPUS[:4])
IMPLEMENTATIONS = ("moepatch_dedup", "all_to_all")


def layout_sizes(layout: str, world: int) -> dict[str, int]:
    """TP / FSDP / EP sizes of ``layout`` on ``world`` ranks."""
    tp_size = {"shared": world, "separate": 1, "mixed": 2}[layout]
    return dict(tp_size=tp_size, fsdp_size=world // tp_size, ep_size=world)


def batch_of(index: int, num_batches: int, routing: str = "natural") -> dict[str, torch.Tensor]:
    """Batch ``index`` of ``num_batches`` (one per FSDP rank; the ranks of a TP group share one), with labels; for the
    ``one_token`` routing the first token of one text, without labels (one token has no next one to predict)."""
    if routing == "one_token":
        return {key: value[:, :1] for key, value in tiny.demo_batch(texts=(TEXTS[index],)).items()}
    texts = tuple(TEXTS[:4]) if num_batches == 1 else tuple(TEXTS[index::num_batches])
    batch = tiny.demo_batch(texts=texts)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def owner_of_tokens(routing: str, num_tokens: int, batch_index: int, tp_size: int, world: int) -> torch.Tensor | None:
    """Per token, the rank whose experts a forced routing restricts it to (None: the router's own choice)."""
    if routing == "natural":
        return None
    if routing == "rank0":
        return torch.zeros(num_tokens, dtype=torch.long)
    if routing == "one_token":
        return torch.full((num_tokens,), world - 1)
    # local: the rank that dispatches the token, i.e. the rank of its TP group whose slice (Replicate -> Shard(0),
    # torch.chunk sizes) it falls in; TP groups are consecutive ranks, one per batch
    return batch_index * tp_size + torch.arange(num_tokens) // math.ceil(num_tokens / tp_size)


class RoutingControl:
    """Forward hooks on the routers of a model: force the routing (:func:`owner_of_tokens`) and record it."""

    def __init__(self, model: torch.nn.Module, world: int) -> None:
        self.world = world
        self.owner: Callable[[int], torch.Tensor | None] = lambda num_tokens: None
        self.recorded: list[torch.Tensor] = []
        self.routers = [m.mlp.gate for m in model.model.layers if hasattr(m.mlp, "experts")]
        for router in self.routers:
            router.register_forward_hook(self._hook)

    def _hook(self, router: torch.nn.Module, inputs: tuple, output: tuple) -> tuple:
        logits, weights, indices = output
        owner = self.owner(logits.size(0))
        if owner is not None:
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            per_rank = router.num_experts // self.world
            allowed = (torch.arange(router.num_experts) // per_rank).unsqueeze(0) == owner.unsqueeze(1)
            indices = probs.masked_fill(~allowed, -1.0).topk(router.top_k, dim=-1).indices
            weights = probs.gather(1, indices).to(logits.dtype)
        self.recorded.append(indices.detach().clone())
        return logits, weights, indices


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A gathered copy of a (possibly DTensor) tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward + backward of ``batch`` (its loss; without labels the summed log-partition of the logits): logits, the
    inputs' embedding gradients, the gradients of the routing weights each experts module was handed (this rank's
    whole batch, the tensor the dispatch slices and sends), and the gathered gradients of the expert weights and the
    routers (per MoE layer)."""
    captured: dict = {"weights": {}}

    def keep_embeddings(module, inputs, output):
        output.retain_grad()
        captured["embeddings"] = output

    def keep_weights(index: int) -> Callable:
        def hook(module, inputs):
            hidden_states, top_k_index, top_k_weights = inputs  # the experts' call: (hidden, ids, weights)
            top_k_weights.retain_grad()
            captured["weights"][index] = top_k_weights
        return hook

    moe = {index: layer.mlp for index, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}
    handles = [model.get_input_embeddings().register_forward_hook(keep_embeddings)]
    handles += [mlp.experts.register_forward_pre_hook(keep_weights(index)) for index, mlp in moe.items()]
    try:
        output = model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    loss = output.loss if "labels" in batch else output.logits.float().logsumexp(dim=-1).sum()
    loss.backward()
    grads = {"logits": output.logits.detach(), "embeddings": captured["embeddings"].grad.detach()}
    for index, mlp in moe.items():
        grads[f"{index}.routing_weights"] = full(captured["weights"][index].grad).detach()
        for name in ("gate_up_proj", "down_proj"):
            grads[f"{index}.experts.{name}"] = full(getattr(mlp.experts, name).grad).detach()
        grads[f"{index}.gate"] = full(mlp.gate.weight.grad).detach()
    model.zero_grad(set_to_none=True)
    return grads


def kinds_of(names: list[str]) -> dict[str, list[str]]:
    """The compared tensors by kind: logits, embeddings, routing_weights, experts, gate."""
    return {"logits": ["logits"], "embeddings": ["embeddings"],
            "routing_weights": [n for n in names if n.endswith(".routing_weights")],
            "experts": [n for n in names if ".experts." in n], "gate": [n for n in names if n.endswith(".gate")]}


def max_diffs(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference per kind of compared tensor (:func:`kinds_of`)."""
    diffs = {name: float((got[name] - expected[name]).abs().max()) for name in expected}
    return {kind: max(diffs[n] for n in names) for kind, names in kinds_of(list(diffs)).items()}


def run_layout(checkpoint: str, layout: str, routings: list[str], rank: int, world: int) -> dict:
    """Every routing of one layout: both implementations against the single-process model (see the module doc).
    ``LAYOUT:bfloat16`` runs the layout with every model in bfloat16 (the natural routing only)."""
    layout, _, dtype_name = layout.partition(":")
    dtype = getattr(torch, dtype_name or "float32")
    if dtype != torch.float32:
        routings = ["natural"]
    sizes = layout_sizes(layout, world)
    tp_size, num_batches = sizes["tp_size"], sizes["fsdp_size"]
    if tp_size == 1:  # one token per batch leaves no rank empty-handed without TP ranks sharing the batch
        routings = [routing for routing in routings if routing != "one_token"]
    models = {
        name: AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=dtype,
            distributed_config=DistributedConfig(**sizes, tp_plan={}, ep_implementation=name))
        for name in IMPLEMENTATIONS
    }
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    controls = {name: RoutingControl(model, world) for name, model in {**models, "reference": reference}.items()}
    own = rank // tp_size  # the batch this rank's TP group holds
    dispatch_layers = [name for name, _ in dedup_dispatches(models["moepatch_dedup"])]

    result: dict = {"tp_size": tp_size, "dispatch_layers": dispatch_layers, "cases": {}, "dtype": str(dtype),
                    "hidden_size": reference.config.hidden_size, "top_k": reference.config.num_experts_per_tok,
                    "num_local_experts": reference.config.num_experts // world}
    for routing in routings:
        batches = [batch_of(index, num_batches, routing) for index in range(num_batches)]
        # reference, single process: this rank's batch for the logits and the gradients of the inputs' embeddings
        # and of the routing weights; the parameters' gradients averaged over the batches, as FSDP averages them
        # (dp_size = number of batches)
        references = []
        for index, batch in enumerate(batches):
            controls["reference"].owner = lambda n, b=index, r=routing: owner_of_tokens(r, n, b, tp_size, world)
            controls["reference"].recorded.clear()
            references.append((step(reference, batch), list(controls["reference"].recorded)))
        expected, reference_routing = dict(references[own][0]), references[own][1]
        for name in expected:
            if name not in ("logits", "embeddings") and not name.endswith(".routing_weights"):
                expected[name] = torch.stack([r[0][name] for r in references]).mean(dim=0)

        case: dict = {}
        got_by_name = {}
        for name, model in models.items():
            control = controls[name]
            control.owner = lambda n, r=routing: owner_of_tokens(r, n, own, tp_size, world)
            with torch.no_grad():  # inference: no autograd through the exchanges
                inference_logits = model(**batches[own]).logits
            control.recorded.clear()
            for _, implementation in dedup_dispatches(model):
                implementation.traffic.reset()
            got = step(model, batches[own])
            got_by_name[name] = got
            same_routing = len(control.recorded) == len(reference_routing) and all(
                torch.equal(a, b) for a, b in zip(control.recorded, reference_routing, strict=True))
            case[name] = {"vs_reference": max_diffs(got, expected), "same_routing_as_reference": same_routing,
                          "inference_logits": float((inference_logits - expected["logits"]).abs().max())}
        case["dedup_vs_all_to_all"] = max_diffs(got_by_name["moepatch_dedup"], got_by_name["all_to_all"])
        kinds = kinds_of(list(expected)).items()
        case["reference_max"] = {kind: max(float(expected[n].abs().max()) for n in names) for kind, names in kinds}
        case["reference_norms"] = {kind: min(float(expected[n].norm()) for n in names) for kind, names in kinds}
        # the forward of step() only: the traffic of one forward, and the routing that forward took
        case["traffic"] = [impl.traffic.to_dict() for _, impl in dedup_dispatches(models["moepatch_dedup"])]
        case["routing"] = [indices.tolist() for indices in controls["moepatch_dedup"].recorded]
        case["model_traffic"] = model_traffic(models["moepatch_dedup"]).to_dict()
        case["group_traffic"] = model_traffic(models["moepatch_dedup"]).all_reduce().to_dict()
        result["cases"][routing] = case
    return result


def refusal(checkpoint: str, world: int) -> str | None:
    """The ValueError loading ``checkpoint`` with ``ep_size=world`` raises (None if it loads)."""
    config = DistributedConfig(tp_size=world, ep_size=world, tp_plan={}, ep_implementation="moepatch_dedup")
    try:
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, distributed_config=config)
    except ValueError as error:
        return str(error)
    return None


def main(checkpoint: str, output_dir: str, layouts: list[str], routings: list[str], uneven: str | None) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    result: dict = {"rank": rank, "world": world}
    if uneven is not None:
        result["uneven_refusal"] = refusal(uneven, world)
    result["layouts"] = {layout: run_layout(checkpoint, layout, routings, rank, world) for layout in layouts}
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(","),
         sys.argv[5] if len(sys.argv) > 5 else None)
