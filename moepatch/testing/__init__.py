"""Tiny real checkpoints of every supported family and synthetic instruction data, for tests, the demo and
users' own experiments (``moepatch.tiny`` is this package's ``tiny`` module)."""
