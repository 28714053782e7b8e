"""Dynamic data mixing (Zhu et al., 2024): the sampling-weight update rule, the mixture sampler, instruction data,
the probe callback and its trainer.  The fine-tuning runner that uses them (``scripts/finetune.py``) is
:mod:`moepatch.training`.

Earlier import paths keep working: ``moepatch.sampling`` (``update_rule``), ``moepatch.mixture`` (``sampler``),
``moepatch.data`` (``instruction_data``), ``moepatch.dynamic_sampling`` (``callback``), ``moepatch.finetune`` and
``moepatch.mixing.finetune`` (:mod:`moepatch.training.runner`).
"""
