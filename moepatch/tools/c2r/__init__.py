"""C2R's offline side (Zhang et al., NAACL 2025): co-activation profiling (:mod:`.profiling`), matrix files
(:mod:`.matrices`), expert-parallel placement (:mod:`.placement`) and the dispatch traffic it predicts
(:mod:`.traffic`), renumbered checkpoints (:mod:`.permutation`), and the end-to-end ``profile`` / ``place`` pipelines
(:mod:`.pipeline`). The routing itself — the constrained selection applied at patch time — is :mod:`moepatch.c2r`."""
