"""Task experts (MELD, Yan et al., KDD 2024) on MoE bases: one peft LoRA per task, a request router, exact merges.

* :mod:`~moepatch.task_experts.training`: ``scripts/finetune.py --task_experts true`` trains one LoRA per data source
  on the patched base and writes ``OUT/experts/<task>/`` + ``manifest.json`` (:mod:`~.manifest`).
* :mod:`~moepatch.task_experts.router`: request signatures (the base MoE's own hidden state and expert loads by
  default, or a local sentence-transformers model) and a centroid / linear head; top-k tasks and weights per request.
* :mod:`~moepatch.task_experts.merging`: peft ``add_weighted_adapter`` merges (``cat`` exact, ``svd`` with its error
  reported), checked against the experts' own files; :mod:`~.weighted_adapters` extends peft's merge to LoRA on the
  fused routed experts (``target_parameters``), which peft refuses.
* :mod:`~moepatch.task_experts.serving`: ``TaskExpertModel`` — mixed-adapter batches, ``serve-check``;
  :mod:`~.vllm_export` writes the adapters and engine settings for vLLM multi-LoRA.
"""

from moepatch.task_experts.manifest import ExpertManifest
from moepatch.task_experts.manifest import TaskExpert
from moepatch.task_experts.manifest import read_manifest
from moepatch.task_experts.merging import MergeRequest
from moepatch.task_experts.router import BaseModelEncoder
from moepatch.task_experts.router import SentenceTransformerEncoder
from moepatch.task_experts.router import TaskRouter

__all__ = ["BaseModelEncoder", "ExpertManifest", "MergeRequest", "SentenceTransformerEncoder", "TaskExpert",
           "TaskRouter", "read_manifest"]
