"""The embedded corpus: a few sentences about MoE routing, in the package so every command has documents to profile
and every test a tokenizer without downloading anything (the tiny models' tokenizer is trained on :data:`CORPUS`)."""

from __future__ import annotations

CORPUS = (
    "Mixture-of-experts language models route every token to a few experts chosen by a learned router.",
    "The router scores all experts, keeps the top k, and mixes their outputs with the routing weights.",
    "Collaboration-constrained routing limits which experts may be combined for one token.",
    "Freezing the gate keeps the routing decisions fixed while the experts are fine-tuned.",
    "Dynamic data mixing reweights the training datasets from the routing statistics of a probe set.",
    "Low-rank adapters can serve as light experts: many small matrices instead of one large one.",
    "A padding token carries no information and must not be counted in routing statistics.",
    "Researchers fine-tune Qwen, Mixtral, LLaMA-MoE and MoLM checkpoints with DeepSpeed on many GPUs.",
    "Expert parallelism places experts on different devices and sends tokens across the network.",
    "Small models built in code let every test run on a laptop without downloading any weights.",
    "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols + - * / = ( ) [ ] { } < > are tokens too.",
)

DEMO_TEXTS = (
    "The router keeps the top k experts for every token.",
    "Freezing the gate keeps routing fixed.",
    "Padding tokens are not counted.",
    "Mixture-of-experts models are sparse: each token activates only a few experts, so compute stays small.",
)


def embedded_corpus() -> list[str]:
    """The documents used when a command is given none: :data:`CORPUS` then :data:`DEMO_TEXTS`."""
    return list(CORPUS + DEMO_TEXTS)


__all__ = ["CORPUS", "DEMO_TEXTS", "embedded_corpus"]
