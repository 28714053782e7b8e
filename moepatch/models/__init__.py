"""Model implementations that transformers does not ship (written for transformers 5, checkpoint-compatible)."""
