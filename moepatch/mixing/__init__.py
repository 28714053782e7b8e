"""Dynamic data mixing (Zhu et al., 2024): the sampling-weight update rule, the mixture sampler, instruction data,
the probe callback and its trainer, and the fine-tuning entry point (``scripts/finetune.py``).

Earlier import paths keep working: ``moepatch.sampling`` (``update_rule``), ``moepatch.mixture`` (``sampler``),
``moepatch.data`` (``instruction_data``), ``moepatch.dynamic_sampling`` (``callback``), ``moepatch.finetune``.
"""
