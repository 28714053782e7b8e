"""``from_pretrained`` of moepatch's own model classes applies the checkpoint's moepatch config.

transformers prefers a locally registered class that does not live in ``transformers.`` over a folder's
``auto_map``, even with ``trust_remote_code=True``.  So once moepatch is imported, ``AutoModelForCausalLM`` loads a
LLaMA-MoE or MoLM folder — a published one, or one prepared by ``moepatch install`` — straight through these
classes; applying the config here makes plain Auto loading, :func:`moepatch.from_pretrained` and the install loader
return the same patched model.  ``moepatch_apply=False`` loads it unpatched.
"""

from __future__ import annotations

from typing import Any

from moepatch.loading.pretrained import drop_loader_auto_map
from moepatch.patch import apply


class AppliesMoePatchOnLoad:
    """Mixin for moepatch-native ``*ForCausalLM`` classes (put it first in the bases)."""

    applies_moepatch_on_load = True
    """Marker read by :func:`moepatch.loading.pretrained.from_pretrained` (which then asks this class not to
    apply twice)."""

    @classmethod
    def from_pretrained(cls, *args: Any, moepatch_apply: bool = True, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
        drop_loader_auto_map(model.config)
        if moepatch_apply:
            apply(model)
        return loaded
