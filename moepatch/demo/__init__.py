"""``moepatch demo``: every feature end to end on a tiny model built in code (profile → C2R → placement →
dynamic data mixing → LoRA experts → task experts), the README's main command.  An entry point, apart from the
tiny-model fixtures in :mod:`moepatch.testing` that the tests use."""
