"""Tools that run a model end to end, above the patch-time code they use: C2R profiling, placement and permuted
checkpoints (:mod:`moepatch.tools.c2r`), LoRA-expert allocation search, importers, merge and export
(:mod:`moepatch.tools.lora_experts`), and the plots (:mod:`moepatch.tools.report`).  Nothing that runs while a model is
patched imports from here (``tests/test_architecture.py``)."""
