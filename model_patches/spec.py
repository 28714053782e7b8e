"""Declarative description of an MoE model family: the adapter interface every moepatch feature is written against.

A family file in ``model_patches/`` says *where* things are (the decoder's layer list, the sparse block inside a
layer, the router and the experts inside the block), *which classes* mark a sparse block, and *how the router
routes* (probabilities over all experts, top-k, whether the k weights are renormalised, their dtype).  Features in
``moepatch/`` (gate freezing, routing statistics, routing overrides such as C2R) never name a family: they read a
:class:`FamilySpec` through :func:`model_patches.structure.describe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal

from torch import nn

FFN_OUTPUT_PROJECTIONS = ("down_proj", "w2", "c_proj")
"""Names transformers' MLPs give the projection whose *input* is the FFN intermediate (what MoV scales)."""
KEY_VALUE_PROJECTIONS = ("k_proj", "v_proj")
"""Names transformers' attentions give the key and value projections (MoV scales their outputs per head)."""
FFN_GATE_PROJECTIONS = ("gate_proj", "w1", "gate_up_proj")
"""Names transformers' MLPs give the gated branch's projection (alone or fused with up): a block with one is gated."""
FFN_ACTIVATIONS = ("act_fn", "activation_fn", "act", "activation")
"""Names transformers' MLPs give their activation module (``ACT2FN[...]``: one instance per block)."""


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
    scores_are: Literal["logits", "sigmoid_logits", "probabilities", "topk_probabilities"] = "logits"
    """``"logits"``: router probabilities are their float softmax; ``"sigmoid_logits"``: each expert's score is the
    sigmoid of its logit (DeepSeek-V3, MiniMax-M2: the statistics' probability sums add those scores);
    ``"probabilities"``: already softmaxed; ``"topk_probabilities"``: ``scores`` are the ``[N, k]`` probabilities of
    the chosen experts only (LLaMA-MoE's softmax over the k chosen logits) and every other expert has probability 0."""
    weights: int | str = 1
    indices: int | str | None = 2
    """Where the chosen experts ``[N, k]`` are; ``None``: the router hands its experts a dense ``[N, E]`` weight
    matrix at :attr:`weights` (Llama 4, 0 for experts not chosen) and the choice is its ``k`` largest entries."""
    reader: Callable[[Any, int, int], tuple[Any, Any]] | None = None
    """The family's own reading of the router module's output, ``reader(output, top_k, num_experts) -> (scores,
    chosen [N, k])``, where the choice is not a tensor at a position: JetMoE's expert-sorted hand-off (rebuilt from
    ``index_sorted_experts`` and ``expert_size``), ZAYA's skip class.  ``scores`` are then read per
    :attr:`scores_are`; the positions above are unused."""


@dataclass(frozen=True, kw_only=True)
class GroupLimit:
    """A router's group limit (DeepSeek-V3's ``n_group`` / ``topk_group``): experts are split into ``G`` equal,
    contiguous groups, each group is scored, only the ``kept`` best groups may be chosen from.

    DeepSeek-V3 / GLM-4.5 / Kimi-K2: a group's score is the sum of its 2 best *biased* selection scores, the other
    groups' scores are masked to ``-inf`` (``score="top2_sum"``, ``fill="-inf"``); DeepSeek-V2's
    ``group_limited_greedy``: the group's best probability, the others set to ``0.0``.
    """

    groups: str
    """Path of ``G`` (router attribute, ``"^name"`` on the block): ``"num_group"`` / ``"n_group"``."""
    kept_groups: str
    """Path of the number of groups kept: ``"topk_group"``."""
    score: Literal["top2_sum", "max"] = "top2_sum"
    """How a group is scored from its experts' selection scores."""
    fill: Literal["-inf", "0"] = "-inf"
    """What the experts of the dropped groups get before the top-k."""
    when: tuple[str, object] | None = None
    """``(path, value)``: the limit applies only while that attribute equals ``value`` (DeepSeek-V2's
    ``topk_method == "group_limited_greedy"``)."""


@dataclass(frozen=True, kw_only=True)
class RoutingRule:
    """The whole routing decision of a router, declared once and run by :func:`model_patches.routing_rule.execute`.

    In order (each step exactly as the family computes it, so that the executor is bit-identical to the router):

    1. **logits** = ``F.linear(hidden, W, b)``: inputs cast per :attr:`logits_dtype`, the linear bias at
       :attr:`logit_bias` (gpt-oss), the result cast per :attr:`logits_cast`, soft-capped per :attr:`softcap` (or the
       family's own :attr:`logits_module` / :attr:`logits_function`);
    2. **scores** = :attr:`score` of the logits over all ``E`` experts (softmax, sigmoid, or the logits themselves)
       in :attr:`score_dtype` (over ``E + 1`` classes with a :attr:`skip_class`);
    3. **selection**: the selection score = scores (in :attr:`selection_dtype`) + the selection bias at
       :attr:`selection_bias` (DeepSeek-V3's
       ``e_score_correction_bias``); the :attr:`group_limit` masks the experts of dropped groups; ``torch.topk`` over
       what is left (:attr:`sorted_topk`) picks ``k`` experts — the one step a feature may replace
       (:mod:`moepatch.routing.seam`);
    4. **weights** of the chosen experts, from the *unbiased* scores (:attr:`weights_from`), renormalised per
       :attr:`renormalize` (with :attr:`renormalize_epsilon` / :attr:`renormalize_min`), multiplied by the
       :attr:`scaling` factor (and a learned :attr:`weights_scale`), cast to :attr:`weights_dtype`; Llama 4 hands its
       experts a dense ``[N, E]`` matrix (:attr:`dense_weights`); Inkling also weights the shared experts it scores
       (:attr:`shared_logits`); a chosen :attr:`skip_class` becomes expert 0 with weight 0.
    """

    # 1. logits
    logits_dtype: Literal["input", "float32", "float32_if_weight_is", "weight", "float32_mm_out"] = "input"
    """``"input"``: ``F.linear(hidden, W)`` as given; ``"float32"``: both cast to float32 first (DeepSeek-V2 / V3);
    ``"float32_if_weight_is"``: the hidden states are cast to float32 when ``W`` is float32 (HunYuan-MoE's float32
    ``wg``); ``"weight"``: the hidden states cast to ``W``'s dtype (MiniMax-M2); ``"float32_mm_out"``: float32 logits,
    computed as ``torch.mm(h, Wᵀ, out_dtype=float32)`` on CUDA when ``h`` and ``W`` share a dtype and no gradient is
    recorded (Kolibri-1's inference path), else as ``"float32"``."""
    input_norm: str | None = None
    """Router-relative path of a normalisation module the router runs on its input before the linear (Gemma 4's
    scale-free ``norm``), called as the router calls it."""
    input_scales: tuple[str, ...] = ()
    """Router-relative paths of factors the (normalised) input is multiplied by, in this order, before the linear
    (Gemma 4: ``h * scale * scalar_root_size``, a learned ``[H]`` vector then ``H^-0.5``)."""
    logits_module: str | None = None
    """Router-relative path of a module that computes the logits itself (Ergo's ``ErgoLinearWithFP32Output``, with its
    own casts, autocast and CUDA paths): called as the router calls it, the other logit fields unused."""
    logits_function: Callable[..., tuple[Any, Any]] | None = None
    """A family function that computes the logits from the router call's own arguments where the logit step is no
    map of the token's own hidden state, ``logits_function(router, hidden_states, *args, **kwargs) -> (logits [...,
    C], carried)``: ZAYA's router MLP over its down-projection plus the router state the previous layer's router
    hands on (``router_states``).  ``carried`` (the state for the next layer's router) is returned as the router's
    last output, after the indices; the logits are flattened to ``[N, C]`` for the steps below.  The other logit
    fields are unused."""
    logit_bias: str | None = None
    """Router-relative path of a bias the router's linear adds to its logits (gpt-oss ``bias``): part of the
    logits, so also of every score."""
    logits_cast: Literal["none", "float32"] = "none"
    """A cast of the linear's output (GraniteMoE's ``.float()``, AfMoE's ``.to(torch.float32)``)."""
    softcap: str | None = None
    """Path of a logit soft-capping value ``c`` (``tanh(logits / c) · c`` when ``c > 0``; Laguna)."""

    # 2. scores
    score: Literal["softmax", "sigmoid", "logits", "module"] = "softmax"
    """The function over all experts' logits the selection and the weights start from; ``"logits"``: none (top-k of
    the logits: gpt-oss, GraniteMoE, Aria, Llama 4); ``"module"``: the router's own activation module at
    :attr:`score_module` (DeepSeek-V4's configurable ``score_fn``, sqrt-softplus by default)."""
    score_module: str | None = None
    """Router-relative path of the score module when :attr:`score` is ``"module"``."""
    score_dtype: Literal["float32", "logits"] = "float32"
    """Dtype the score function runs in: float32 (``softmax(..., dtype=float)`` / ``sigmoid(logits.float())``) or the
    logits' own dtype (DBRX's softmax, a float32 router's sigmoid); also the softmax over the chosen logits of
    ``weights_from="softmax_of_chosen"`` (Cohere2-MoE: float32; gpt-oss: the logits' dtype)."""

    # 3. selection
    selection_dtype: Literal["scores", "float32"] = "scores"
    """The dtype the scores are in when the selection bias is added: their own, or float32 (ZAYA's
    ``probs.detach().to(torch.float32) + balancing_biases``: a float32 selection from bfloat16 probabilities, also
    where the model and its bias buffer were cast to bfloat16)."""
    selection_bias: str | None = None
    """Path of the selection bias added to the scores before the top-k only (router attribute, ``"^name"`` on the
    block: DeepSeek-V3 ``e_score_correction_bias``, ERNIE ``moe_statics.e_score_correction_bias``, MiniMax-M2
    ``^e_score_correction_bias``); the weights never see it."""
    selection_bias_argument: int | None = None
    """Position (after the hidden states) of the bias when the block passes it to the router's ``forward``
    (MiniMax-M2's ``gate(hidden, self.e_score_correction_bias)``): the patched forward takes it from there."""
    group_limit: GroupLimit | None = None
    selection: Literal["topk", "sparsemixer", "product_keys"] = "topk"
    """``"topk"``: one ``torch.topk`` over the selection scores; ``"sparsemixer"``: PhiMoE's two thresholded picks
    (:mod:`model_patches.sparsemixer`, sampled in training), whose weights are its multipliers; ``"product_keys"``:
    Doge's product-key retrieval (:mod:`model_patches.product_keys`): the "logits" are the block's ``[2, N, √E]``
    view of ``2·√E`` key scores, expert ``i·√E + j`` scores key ``i`` + key ``j``, the top-k of those pair sums is
    taken in the order of the sorted keys and weighted by a softmax over the k sums (renormalised per
    :attr:`renormalize`).  The two non-top-k selections ask a constrained selector only which experts a first choice
    allows (its ``allowed_for``) and choose themselves, in their own order."""
    jitter: str | None = None
    """Path of sparsemixer's relative threshold ``jitter_eps`` (PhiMoE's ``router_jitter_noise``)."""
    input_jitter: str | None = None
    """Path of a training-time multiplicative input noise the router applies to its input in place (PhiMoE's
    ``input_jitter_noise``), reproduced with the same draw."""
    skip_class: bool = False
    """The router scores one *skip class* after its ``E`` experts (ZAYA, whose ``C = E + 1`` classes share the
    softmax, the selection bias and the top-k): a token that chooses it (index ``E``) reaches the experts as expert 0
    with weight 0.  The skip class is no expert: C2R never masks it (it is in every allowed set, so a token may still
    skip), statistics count it as no expert, and a renumbering of the experts leaves its logit row and bias entry in
    place."""
    sorted_topk: bool = True
    """Whether the family's ``torch.topk`` sorts (DeepSeek-V2 / V3 pass ``sorted=False``): the vanilla selector
    makes the same call, so the patched router is bit-identical, order included."""

    # 4. weights
    weights_from: Literal["scores", "softmax_of_chosen", "sigmoid_of_chosen", "logsigmoid_softmax_of_chosen"] = (
        "scores")
    """``"scores"``: the chosen experts' unbiased scores (gathered); ``"softmax_of_chosen"``: softmax over the ``k``
    chosen logits, in their dtype (gpt-oss, GraniteMoE, Aria); ``"sigmoid_of_chosen"``: sigmoid of the chosen
    (unbiased) logits — into Llama 4's dense matrix (in float32, cast back) with :attr:`dense_weights`, else gathered
    (Kolibri-1, whose selection bias is added to the logits); ``"logsigmoid_softmax_of_chosen"``: ``exp(lp −
    logsumexp(lp))`` of ``lp = logsigmoid`` of the chosen logits followed by the shared experts' logits
    (:attr:`shared_logits`; Inkling: each sigmoid over the sum of the ``k + S`` sigmoids, computed in the log domain,
    which rounds otherwise than dividing by the sum)."""
    shared_logits: str | None = None
    """Path of ``S``, the number of always-on shared experts the router scores after its routed ones (Inkling's
    ``n_shared_experts``; its weight has ``E + S`` rows): the scores are taken over all ``E + S`` logits, the selection
    runs over the first ``E``, the weights (``"logsigmoid_softmax_of_chosen"``) share one normalisation with the ``S``
    shared logits, and the router returns ``(logits [N, E], weights [N, k], indices [N, k], shared weights [N, S])``.
    ``None``: no shared expert is scored by the router."""
    renormalize: bool | str = False
    """``True`` / ``False``, or the path of a router attribute (``"norm_topk_prob"``; ``"^name"`` reads the sparse
    block) read per instance; its truth value says whether the k weights are renormalised."""
    renormalize_with: Literal["sum", "l1_norm"] = "sum"
    """Divided by their ``sum`` or by ``torch.norm(p=1)`` (DBRX's ``moe_normalize_expert_weights=1``): the same
    value, called the family's way so that the override stays bit-identical."""
    renormalize_epsilon: float = 0.0
    """Added to the sum before dividing (DeepSeek-V3: ``1e-20``)."""
    renormalize_min: str | None = None
    """Path of a lower clamp of the sum (ERNIE's ``norm_min``): ``w / clamp(sum, min=norm_min)``."""
    scaling: str | None = None
    """Path of the factor the weights are multiplied by (``routed_scaling_factor``); ``None``: no multiplication."""
    weights_scale: str | None = None
    """Router-relative path of a learned tensor the weights are multiplied by after :attr:`scaling`, in float32
    (Inkling's ``global_scale``): read at every call, not at patch time, because training moves it."""
    weights_dtype: Literal["logits", "float32", "input", "input_float32"] = "logits"
    """``"logits"``: cast to the logits' dtype (Qwen2-MoE); ``"float32"``: kept (Mixtral); ``"input"``: cast to the
    hidden states' dtype (ERNIE, GraniteMoE); ``"input_float32"``: rounded to the hidden states' dtype, then float32
    (Ergo)."""
    no_autocast: bool = False
    """The router runs with autocast disabled (ERNIE's ``maybe_autocast(enabled=False)``): so does the executor."""
    expert_scale: str | None = None
    """Router-relative path of a learned per-expert ``[E]`` vector the weights are multiplied by, gathered at the
    chosen experts, after every other weight step (Gemma 4's ``per_expert_scale[top_k_index]``, with no cast after
    it): read at every call, so it follows training and follows the experts C2R chooses."""
    expert_sorted: bool = False
    """The router hands its experts expert-sorted rows, JetMoE's ``(index_sorted_experts, batch_index, batch_gates,
    expert_size, logits)`` (:mod:`model_patches.expert_sorted`), not ``(logits, weights, indices)``."""
    dense_weights: bool = False
    """The router returns ``(weights [N, E], logits)``, weight 0 for experts not chosen (Llama 4), not
    ``(logits, weights [N, k], indices [N, k])``."""

    def __post_init__(self) -> None:
        if self.shared_logits is not None and self.weights_from != "logsigmoid_softmax_of_chosen":
            raise ValueError("RoutingRule.shared_logits: the shared experts' weights come only from "
                             "weights_from='logsigmoid_softmax_of_chosen' (their logits join its normalisation)")
        if self.skip_class and (self.weights_from != "scores" or self.group_limit is not None or self.dense_weights
                                or self.expert_sorted or self.shared_logits is not None
                                or self.selection != "topk"):
            raise ValueError("RoutingRule.skip_class: a skip class is scored, chosen and weighted like an expert "
                             "(weights_from='scores', one top-k, no group limit, shared logits or other hand-off)")

    def renormalizes(self, router: nn.Module, block: nn.Module | None = None) -> bool:
        """Whether ``router`` (inside sparse block ``block``) renormalises its top-k weights."""
        if isinstance(self.renormalize, str):
            return bool(read_attribute(router, block, self.renormalize))
        return self.renormalize

    def active_group_limit(self, router: nn.Module, block: nn.Module | None = None) -> GroupLimit | None:
        """:attr:`group_limit` when it applies to this router instance (see :attr:`GroupLimit.when`)."""
        limit = self.group_limit
        if limit is None or limit.when is None:
            return limit
        path, value = limit.when
        return limit if read_attribute(router, block, path) == value else None

    @property
    def selects_on(self) -> str:
        """What the top-k runs over, in words (for messages and ``inspect``)."""
        what = {"softmax": "softmax probabilities", "sigmoid": "sigmoid scores", "logits": "logits",
                "module": f"scores of the router's `{self.score_module}`"}[self.score]
        if self.selection == "sparsemixer":
            return "logits, by sparsemixer (two thresholded picks)"
        if self.selection == "product_keys":
            return "product-key pair sums (expert i·√E + j scores key i + key j of 2·√E key scores)"
        if self.selection_bias:
            what += " + selection bias"
        if self.group_limit is not None:
            what += " within the kept groups"
        return what


@dataclass(frozen=True, kw_only=True)
class RouterRequirement:
    """A setting a router (or its block) must have for the family's :class:`RoutingRule` to describe it.

    DeepSeek-V2's router is softmax → top-k only with ``topk_method="greedy"`` and ``routed_scaling_factor=1.0``;
    other settings are refused with ``reason`` (formatted with ``{value}``), never approximated.
    """

    attribute: str
    """Path from the router (``"^name"``: from the sparse block), as for :attr:`FamilySpec.top_k_attr`."""
    allowed: tuple[object, ...] = ()
    """The accepted values (compared with ``==``)."""
    reason: str
    """Why another value is refused; ``{value}`` is replaced by the value found."""
    holds: Callable[[Any], bool] | None = None
    """A test the value must pass instead of :attr:`allowed`, where the accepted values are no short list (Doge's
    expert count must be a square: its product keys reach ``⌊√E⌋²`` experts only)."""

    def problem(self, router: nn.Module, block: nn.Module | None) -> str | None:
        """The refusal text for this router, or ``None`` when the setting is allowed."""
        value = read_attribute(router, block, self.attribute)
        if self.holds is not None:
            if self.holds(value):
                return None
        elif any(value == allowed for allowed in self.allowed):
            return None
        return f"{self.attribute.lstrip('^')}={value!r}: {self.reason.format(value=value)}"


@dataclass(frozen=True, kw_only=True)
class BlockSelection:
    """Where a family chooses its experts when its router returns only the logits (DBRX, Doge).

    ``DbrxRouter`` returns ``router_logits [N, E]``; the sparse block's method ``route_tokens_to_experts(logits) ->
    (weights [N, k], indices [N, k])`` chooses, and the block hands the choice to its experts module as call
    arguments ``experts(hidden, top_k_index, top_k_weights)``.  A routing override replaces :attr:`method` on the
    block instance; routing statistics read the router's output (the scores) and the experts' call (the choice).

    ``DogeCDMoE`` chooses inline, inside its own ``forward``, and has no such method: the family then gives a
    :attr:`forward` (the block's own, call for call, with the inline selection moved into :attr:`method`), which a
    routing override binds on the block instance together with the method; undoing the override restores the
    class's forward.  Its "experts module" is the ``down_embed`` embedding, whose input is the chosen ids.
    """

    method: str
    """Name of the block's selection method ``(router_logits) -> (weights [N, k], indices [N, k])``."""
    indices_argument: tuple[int, str]
    """``(position, keyword)`` of the chosen experts ``[N, k]`` in the experts module's call."""
    weights_argument: tuple[int, str] | None = None
    """``(position, keyword)`` of the expert weights ``[N, k]`` in the experts module's call; ``None`` where the block
    applies them itself (Doge multiplies its experts' activations by them)."""
    forward: Callable[..., Any] | None = None
    """The family's replacement of the block's ``forward`` where the block has no :attr:`method` (Doge): the
    published forward call for call, except that it chooses through ``self.<method>(router_logits)``."""
    forward_problem: Callable[[nn.Module], str | None] | None = None
    """Why :attr:`forward` cannot stand in for this block instance's own (another forward than the one it
    reproduces: another transformers version, remote code, an instance override), or ``None``; checked before any
    change."""
    scores: Callable[[Any, int], Any] | None = None
    """``scores(router_output, num_experts) -> [N, E]`` per-expert scores where the router's output is not them
    (Doge's ``[B, S, 2·√E]`` key scores: each expert's pair sum), read per :attr:`RouterOutput.scores_are`;
    ``None``: the router's output is the ``[N, E]`` logits."""


@dataclass(frozen=True, kw_only=True)
class BalanceLoss:
    """A causal LM's own balance loss where it is not transformers' usual ``load_balancing_loss_func`` over ``[N, E]``
    router logits (Doge's product-key loss), so that the loss on the experts actually chosen (C2R) keeps the family's
    formula and, with the family's own choice, its value bit for bit."""

    router_logits: Callable[[Any], Any]
    """The router module's output → the ``router_logits`` entry the causal LM records for one layer."""
    loss: Callable[..., Any]
    """``loss(router_logits per layer, chosen [N, k] per layer, num_experts, top_k, attention_mask) -> scalar``: the
    family's formula with the given choices in place of the ones it recomputes."""


_MISSING = object()


def read_attribute(router: object, block: object, path: str) -> object:
    """The value at dotted ``path`` from ``router``, or from ``block`` when ``path`` starts with ``^``; ``None`` when a
    step is missing (families keep E, k and routing switches on the router or, like DBRX, on the block).  ``router``
    and ``block`` are modules, or what a probe reads in their place (copies of a block's own tensors)."""
    value: object = router
    if path.startswith("^"):
        value, path = block, path[1:]
    for part in path.split("."):
        if part.isdigit() and isinstance(value, (tuple, list)):  # "weight.shape.0": E from the router's weight
            value = value[int(part)] if int(part) < len(value) else _MISSING
        else:
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
    """``""``: the decoder layer itself is the sparse block (Gemma 4 keeps ``router`` and ``experts`` on the layer,
    beside its dense ``mlp``)."""
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_output: RouterOutput = field(default_factory=RouterOutput)
    num_experts_attr: str = "num_experts"
    """Dotted path from the router to ``E`` (a leading ``^`` reads it from the sparse block instead)."""
    top_k_attr: str = "top_k"
    """Dotted path from the router to ``k`` (``"^top_k"``: DBRX keeps ``k`` on its ``DbrxFFN`` block)."""
    router_weight_attr: str = "weight"
    """Dotted path from the router to its ``[E, H]`` logit weight (HunYuan-MoE: ``wg.weight``; the executor flattens the
    router's input to ``[-1, H]`` by its width), which a routing
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
    balance_loss: BalanceLoss | None = None
    """The causal LM's own balance-loss formula where it is not transformers' usual one (Doge); ``None``: the usual
    one (:func:`moepatch.routing.aux_loss.load_balancing_loss`)."""
    shared_expert_attrs: tuple[str, ...] = ()
    """Block attributes of always-on shared experts and their gates (never routed, never counted)."""
    expert_storage: Literal["fused", "parameter_list", "parallel", "stacked_rows", "scaled_dense"] = "fused"
    """How routed experts store their projections, for LoRA experts on them: ``"fused"`` (transformers 5
    ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` in every layout ``use_experts_implementation`` describes:
    transposed, interleaved, biased, gate-less), ``"parameter_list"`` (LLaMA-MoE ``weight_{gate,up,down}``
    ``ParameterList``s with ``forward(x, e)``) or ``"parallel"`` (MoLM ``ParallelExperts`` ``[E, in, out]`` modules
    called with ``(inputs, expert_size)``) or ``"stacked_rows"`` (DBRX ``w1`` / ``v1`` / ``w2``: the experts' rows
    stacked into ``[E·I, H]`` matrices; renumbering experts moves blocks of ``I`` rows) or ``"scaled_dense"`` (Llama 4:
    ``gate_up_proj [E, H, 2I]`` run on every token by every expert, the inputs scaled by the router's dense
    weights)."""
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

    routing_problem: str | None = None
    """Set by a structural fallback whose probe found no exact rule, or declared by a family whose router the rule
    cannot express: the structure is usable, the rule is not."""
    renumbering_problem: str | None = None
    """Why this family's experts cannot be renumbered (expert placement), where the routing rule is exact but the
    experts are not addressed by per-expert router rows (Doge's product keys); ``None``: the spec's per-expert
    tensors say what moves."""
    hashed_routers: tuple[str, ...] = ()
    """Router class names (matched through the MRO) that choose by a fixed hash of the token id, not by a learned
    score (DeepSeek-V4's first ``hash_moe`` layers): statistics count them; C2R, freezing, the bias update and expert
    renumbering leave those layers out, by name."""
    structural: bool = False
    """A fallback that reads its attribute names from the model (:meth:`specialise`) instead of declaring them."""

    def specialise(self, model: nn.Module, *, verify: bool = True) -> FamilySpec | str:
        """A structural fallback's family for ``model`` (attribute names and rule read from it), or why it does not
        fit.  Declared families are already specific."""
        return self

    def block_of(self, decoder_layer: nn.Module) -> nn.Module | None:
        """The module at :attr:`block_attr` of ``decoder_layer`` (the layer itself for ``""``), ``None`` if absent."""
        return decoder_layer if not self.block_attr else getattr(decoder_layer, self.block_attr, None)

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
