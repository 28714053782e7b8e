"""Reading a layer's routing as it happens: the router's scores and the experts actually chosen, one way for every
reader (routing statistics, the balance loss on the actual choice).

Most families hand ``(logits, weights, indices)`` from the router module to the experts
(:class:`~model_patches.spec.RouterOutput` says where each sits, or gives the family's own reader of another
hand-off): one forward hook on the router reads both.  Where
the router returns only its logits and the sparse block chooses (:class:`~model_patches.spec.BlockSelection`, DBRX),
the router's output is the scores (or the family turns it into them: Doge's pair sums of its key scores) and the
choice is read from the experts module's call arguments (Doge: the ids its ``down_embed`` looks up), so a reader
always sees the experts that really received the tokens, after any routing override.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from model_patches.structure import MoELayer
from model_patches.structure import MoEModel

RoutingReader = Callable[[torch.Tensor, torch.Tensor], None]
"""``reader(scores [N, E] (or [N, k], per the family's ``scores_are``), chosen experts [N, k])``, called once per
call of the layer (tensors as the model produced them: detach them to keep them)."""


def _argument(args: tuple, kwargs: dict, where: tuple[int, str]) -> Any:
    position, keyword = where
    return kwargs[keyword] if keyword in kwargs else args[position]


def tap_routing(
    model: MoEModel, layer: MoELayer, reader: RoutingReader, *, raw: bool = False
) -> list[RemovableHandle]:
    """Call ``reader`` with each routing decision of ``layer``; returns the hook handles (remove them to stop).

    ``raw``: hand the reader the router module's output as it returned it, in place of the ``[N, E]`` scores (a
    family's own balance loss reads its router outputs: Doge's key scores); the choice is read as always."""
    selection = model.family.selection_in_block
    if selection is None:
        layout = model.family.router_output
        top_k = model.top_k

        def read_router(module: nn.Module, args: tuple, output: Any) -> None:
            if layout.reader is not None:  # the family decodes its own hand-off (JetMoE, ZAYA)
                scores, chosen = layout.reader(output, top_k, model.num_experts)
            elif layout.indices is None:  # a dense [N, E] weight matrix (Llama 4): the choice is its k largest entries
                chosen = torch.topk(output[layout.weights].detach(), top_k, dim=-1).indices
                scores = output[layout.scores]
            else:
                scores, chosen = output[layout.scores], output[layout.indices]
            reader(output if raw else scores, chosen)

        return [layer.router.register_forward_hook(read_router)]

    pending: list[torch.Tensor] = []  # the router's logits of the current call, until its experts are called

    def keep_logits(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        pending[:] = [output]

    def read_choice(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if pending:
            output = pending.pop()
            if selection.scores is not None and not raw:  # the router scores something else than the experts
                output = selection.scores(output, model.num_experts)
            reader(output, _argument(args, kwargs, selection.indices_argument))

    return [layer.router.register_forward_hook(keep_logits),
            layer.experts.register_forward_pre_hook(read_choice, with_kwargs=True)]
