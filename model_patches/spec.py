"""Declarative description of an MoE model family: the adapter interface every moepatch feature is written against.

A family file in ``model_patches/`` says *where* things are (the decoder's layer list, the sparse block inside a
layer, the router and the experts inside the block), *which classes* mark a sparse block, and *how the router
routes* (probabilities over all experts, top-k, whether the k weights are renormalised, their dtype).  Features in
``moepatch/`` (gate freezing, routing statistics, routing overrides such as C2R) never name a family: they read a
:class:`FamilySpec` through :func:`model_patches.structure.describe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Literal

from torch import nn

FFN_OUTPUT_PROJECTIONS = ("down_proj", "w2", "c_proj")
"""Names transformers' MLPs give the projection whose *input* is the FFN intermediate (what MoV scales)."""
KEY_VALUE_PROJECTIONS = ("k_proj", "v_proj")
"""Names transformers' attentions give the key and value projections (MoV scales their outputs per head)."""


@dataclass(frozen=True, kw_only=True)
class RouterOutput:
    """Where the routing results sit in the router module's output (tuple positions or dict keys).

    transformers 5 routers (``Qwen2MoeTopKRouter``, ``MixtralTopKRouter``, ...) return
    ``(router_logits [N, E], top_k_weights [N, k], top_k_index [N, k])``; ModuleFormer's ``top_k_gating`` returns
    ``(top_k_indices, top_k_gates, probs [N, E])``.  This is the router → experts hand-off that moepatch reads
    (statistics, the load-balancing loss) and, through the selection step, rewrites (routing overrides).
    """

    scores: int | str = 0
    """Per-expert scores ``[N, E]`` of every token."""
    scores_are: Literal["logits", "probabilities", "topk_probabilities"] = "logits"
    """``"logits"``: router probabilities are their float softmax; ``"probabilities"``: already softmaxed;
    ``"topk_probabilities"``: ``scores`` are the ``[N, k]`` probabilities of the chosen experts only (LLaMA-MoE's
    softmax over the k chosen logits) and every other expert has probability 0."""
    weights: int | str = 1
    indices: int | str = 2


@dataclass(frozen=True, kw_only=True)
class RoutingRule:
    """How a router turns logits into the k expert weights.

    The rule is always: logits = hidden · Wᵀ (in the dtype :attr:`logits_dtype` says); probabilities = softmax over
    all ``E`` experts (in :attr:`softmax_dtype`); choose ``k`` experts (the selection step, which
    :mod:`moepatch.routing.seam` lets a feature replace); weights = the chosen probabilities, divided by their sum when
    ``renormalize`` holds; cast to ``weights_dtype``.
    """

    renormalize: bool | str = False
    """``True`` / ``False``, or the path of a router attribute (``"norm_topk_prob"``; ``"^name"`` reads the sparse
    block) read per instance; its truth value says whether the k weights are renormalised."""

    weights_dtype: Literal["logits", "float32"] = "logits"
    """``"logits"``: weights cast back to the logits' dtype (Qwen2-MoE); ``"float32"``: kept in float32 (Mixtral)."""

    logits_dtype: Literal["input", "float32", "float32_if_weight_is"] = "input"
    """``"input"``: ``F.linear(hidden, W)`` as given; ``"float32"``: both cast to float32 first (DeepSeek-V2);
    ``"float32_if_weight_is"``: the hidden states are cast to float32 when ``W`` is float32 (HunYuan-MoE's float32
    ``wg``)."""

    softmax_dtype: Literal["float32", "logits"] = "float32"
    """Dtype of the softmax: float32 (every transformers 5 top-k router) or the logits' own dtype (DBRX)."""

    renormalize_with: Literal["sum", "l1_norm"] = "sum"
    """How the k weights are renormalised: divided by their ``sum`` (every transformers 5 top-k router) or by
    ``torch.norm(p=1)`` (DBRX's ``moe_normalize_expert_weights=1``): the same value, called the family's way so that
    the override stays bit-identical."""

    sorted_topk: bool = True
    """Whether the family's ``torch.topk`` returns the k experts sorted by probability (DeepSeek-V2 passes
    ``sorted=False``): the vanilla selector must make the same call for the router's output to be bit-identical."""

    def renormalizes(self, router: nn.Module, block: nn.Module | None = None) -> bool:
        """Whether ``router`` (inside sparse block ``block``) renormalises its top-k weights."""
        if isinstance(self.renormalize, str):
            return bool(read_attribute(router, block, self.renormalize))
        return self.renormalize


@dataclass(frozen=True, kw_only=True)
class RouterRequirement:
    """A setting a router (or its block) must have for the family's :class:`RoutingRule` to describe it.

    DeepSeek-V2's router is softmax → top-k only with ``topk_method="greedy"`` and ``routed_scaling_factor=1.0``;
    other settings are refused with ``reason`` (formatted with ``{value}``), never approximated.
    """

    attribute: str
    """Path from the router (``"^name"``: from the sparse block), as for :attr:`FamilySpec.top_k_attr`."""
    allowed: tuple[object, ...]
    """The accepted values (compared with ``==``)."""
    reason: str
    """Why another value is refused; ``{value}`` is replaced by the value found."""

    def problem(self, router: nn.Module, block: nn.Module | None) -> str | None:
        """The refusal text for this router, or ``None`` when the setting is allowed."""
        value = read_attribute(router, block, self.attribute)
        if any(value == allowed for allowed in self.allowed):
            return None
        return f"{self.attribute.lstrip('^')}={value!r}: {self.reason.format(value=value)}"


@dataclass(frozen=True, kw_only=True)
class BlockSelection:
    """Where a family chooses its experts when its router returns only the logits (DBRX).

    ``DbrxRouter`` returns ``router_logits [N, E]``; the sparse block's method ``route_tokens_to_experts(logits) ->
    (weights [N, k], indices [N, k])`` chooses, and the block hands the choice to its experts module as call
    arguments ``experts(hidden, top_k_index, top_k_weights)``.  A routing override replaces :attr:`method` on the
    block instance; routing statistics read the router's output (the scores) and the experts' call (the choice).
    """

    method: str
    """Name of the block's selection method ``(router_logits [N, E]) -> (weights [N, k], indices [N, k])``."""
    indices_argument: tuple[int, str]
    """``(position, keyword)`` of the chosen experts ``[N, k]`` in the experts module's call."""
    weights_argument: tuple[int, str]
    """``(position, keyword)`` of the expert weights ``[N, k]`` in the experts module's call."""


_MISSING = object()


def read_attribute(router: nn.Module, block: nn.Module | None, path: str) -> object:
    """The value at dotted ``path`` from ``router``, or from ``block`` when ``path`` starts with ``^``; ``None`` when a
    step is missing (families keep E, k and routing switches on the router or, like DBRX, on the block)."""
    value: object = router
    if path.startswith("^"):
        value, path = block, path[1:]
    for part in path.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            return None
    return value


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """Where the MoE parts of one model family live and how its router behaves.

    Paths are attribute names (dotted for nested ones): ``decoder.<layers_attr>[i].<block_attr>`` is layer ``i``'s
    MLP, a sparse MoE block when its class (or one of its base classes) is named in ``block_classes``; inside it
    ``<router_attr>`` is the router and ``<experts_attr>`` the routed experts.  The decoder is the model's
    ``base_model`` (the module that receives ``attention_mask``).
    """

    name: str
    """Family name, used in ``moepatch.family`` and in messages."""

    model_types: tuple[str, ...]
    """``config.model_type`` values this family claims (exact match)."""

    block_classes: tuple[str, ...]
    """Exact class names of the sparse MoE block, matched against the block's MRO."""

    routing: RoutingRule
    """Routing semantics of the family's router."""

    layers_attr: str = "layers"
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_output: RouterOutput = field(default_factory=RouterOutput)
    num_experts_attr: str = "num_experts"
    """Dotted path from the router to ``E`` (a leading ``^`` reads it from the sparse block instead)."""
    top_k_attr: str = "top_k"
    """Dotted path from the router to ``k`` (``"^top_k"``: DBRX keeps ``k`` on its ``DbrxFFN`` block)."""
    hidden_dim_attr: str = "hidden_dim"
    """Dotted path from the router to the hidden size (the router flattens its input to ``[-1, hidden_dim]``;
    HunYuan-MoE: ``wg.in_features``)."""
    router_weight_attr: str = "weight"
    """Dotted path from the router to its ``[E, H]`` logit weight (HunYuan-MoE: ``wg.weight``), which a routing
    override multiplies the hidden states with."""
    router_requirements: tuple[RouterRequirement, ...] = ()
    """Settings the router must have for :attr:`routing` to describe it; other values are refused by name."""
    selection_in_block: BlockSelection | None = None
    """Set when the router returns only its logits and the sparse block chooses the experts (DBRX): the router's
    output is then the ``[N, E]`` logits tensor itself (:attr:`router_output` is not used)."""
    selection_method: str | None = None
    """Name of the router's own selection method ``(probs [N, E], k) -> (values [N, k], indices [N, k])``, for
    families whose router has that seam (ModuleFormer's ``select_experts``): a routing override replaces that method
    on the instance.  ``None``: the router's ``forward`` is replaced by :func:`model_patches.routing_rule.route`."""
    selection_kind: Literal["probs_top_k", "logits_top_k_plus_one"] = "probs_top_k"
    """Contract of the selection step: ``"probs_top_k"``: ``(probs [N, E], k) -> (values [N, k], indices [N, k])``;
    ``"logits_top_k_plus_one"`` (LLaMA-MoE's ``select_experts``): ``(logits [N, E]) -> (top_logits [N, k+1],
    top_indices [N, k+1])``, the extra column being the best excluded candidate for the noisy load estimate."""
    router_expert_parameters: tuple[str, ...] | None = None
    """Router parameters (names inside the router) whose first dimension indexes experts — the rows producing the
    per-expert scores (LLaMA-MoE: ``gate_network.2.weight``, ``weight_noise.weight``).  ``None``: every router
    parameter.  Used to renumber experts (expert-parallel placement)."""
    expert_modules: tuple[str, ...] | None = None
    """Block-relative modules holding per-expert weights (stacked ``[E, ...]`` tensors or ``ParameterList``s of E
    entries); ``None``: just ``experts_attr`` (ModuleFormer adds ``output_experts``)."""
    per_expert_config: tuple[str, ...] = ()
    """Config attributes shaped ``[layers][E]`` that follow a renumbering (LLaMA-MoE's ``size_experts``)."""
    seam_donor: str | None = None
    """``"module:Class"`` of a router whose ``forward`` routes through ``selection_method``: bound onto a router
    instance that lacks the seam (a running remote-code copy of the published class) so routing overrides reach it.
    The class provides ``seam_problem(router) -> str | None`` and ``SEAM_HELPERS`` (methods to bind if missing)."""
    extra_routers: tuple[str, ...] = ()
    """Further routers, as attribute paths from the decoder layer (ModuleFormer's attention-expert gate
    ``attn.q_proj.gate``): frozen by ``freeze_gate="router"``, not recorded or re-routed."""
    aux_loss_coef_attr: str | None = "router_aux_loss_coef"
    """Attribute of the causal-LM model holding the load-balancing coefficient, when the family's causal LM adds
    transformers' ``load_balancing_loss_func`` (vanilla top-k recomputed from ``router_logits``) to its loss."""
    shared_expert_attrs: tuple[str, ...] = ()
    """Block attributes of always-on shared experts and their gates (never routed, never counted)."""
    expert_storage: Literal["fused", "parameter_list", "parallel", "stacked_rows"] = "fused"
    """How routed experts store their projections, for LoRA experts on them: ``"fused"`` (transformers 5
    ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``), ``"parameter_list"`` (LLaMA-MoE ``weight_{gate,up,down}``
    ``ParameterList``s with ``forward(x, e)``) or ``"parallel"`` (MoLM ``ParallelExperts`` ``[E, in, out]`` modules
    called with ``(inputs, expert_size)``) or ``"stacked_rows"`` (DBRX ``w1`` / ``v1`` / ``w2``: the experts' rows
    stacked into ``[E·I, H]`` matrices; renumbering experts moves blocks of ``I`` rows)."""
    training_switches: tuple[tuple[str, str], ...] = (
        ("balance_loss", "output_router_logits"),
        ("aux_loss_coef", "router_aux_loss_coef"),
    )
    """``(option, config attribute)`` pairs (dotted for a sub-config: DBRX's ``ffn_config.moe_loss_weight``): the
    config.json field behind each training option of
    :mod:`moepatch.routing.training_options` (``gate_noise``, ``balance_loss``, ``aux_loss_coef``) in this
    family.  An option
    the family does not list is refused.  transformers' MoE LMs add their balance loss only when
    ``output_router_logits`` is on, so that flag is their ``balance_loss`` switch."""
    identity_projections: tuple[str, ...] = ()
    """Decoder-layer-relative paths of projections the family leaves as ``nn.Identity`` (MoLM's attention keys
    and values are the hidden states themselves): width-preserving, so a scaling feature (MoV) may adapt them."""
    gate_substring_note: str = ""
    """What the ``freeze_gate="gate_substring"`` rule (Dynamic Data Mixing, Zhu et al., 2024) freezes in this
    family, for docs and ``inspect``."""

    def is_sparse_block(self, module: nn.Module) -> bool:
        """True when ``module`` is this family's sparse block (exact class-name match through the MRO)."""
        names = {cls.__name__ for cls in type(module).__mro__}
        return any(name in names for name in self.block_classes)

    def claims(self, model_type: str | None) -> bool:
        """True when this family is registered for ``model_type``."""
        return model_type in self.model_types

    def check_router(self, router: nn.Module, block: nn.Module, *, top_k: int) -> str | None:
        """Return why ``router`` (in sparse block ``block``) does not follow :attr:`routing`, or ``None``.

        Named families trust their declaration (their routers are tested against it); the generic family probes.
        """
        return None

    def requirement_problem(self, router: nn.Module, block: nn.Module) -> str | None:
        """The first of :attr:`router_requirements` that ``router`` fails, as refusal text; ``None`` when all hold.

        Settings are read, not probed, so this also holds on a meta-device skeleton.
        """
        for requirement in self.router_requirements:
            problem = requirement.problem(router, block)
            if problem is not None:
                return problem
        return None

    def router_weight(self, router: nn.Module) -> object:
        """The router's ``[E, H]`` logit weight (``None`` when the declared path is missing)."""
        return read_attribute(router, None, self.router_weight_attr)
