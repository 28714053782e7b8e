"""Paths of the real C2R data shipped in the repository (``data/c2r-moe``, UNITES-Lab/c2r-moe, MIT)."""

from __future__ import annotations

from pathlib import Path

C2R_DATA = Path(__file__).resolve().parents[1] / "data" / "c2r-moe"
QWEN_TOPT30_CONFIG = C2R_DATA / "qwen1.5-moe-a2.7b.topt30.config.json"
LLAMA_MOE_TOPT5_CONFIG = C2R_DATA / "llama-moe-v1-3_5b-2_8.topt5.config.json"
LLAMA_MOE_MATRICES = C2R_DATA / "llama-moe-v1-3_5b-2_8.collaboration.json"
