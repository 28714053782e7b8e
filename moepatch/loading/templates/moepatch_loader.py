"""Loads this checkpoint through moepatch, already patched (written by ``moepatch install``; no model code here).

Any tool that calls ``AutoModelForCausalLM.from_pretrained(<this folder>, trust_remote_code=True)`` — lm-eval, a
Trainer script, a notebook — gets the model built by moepatch's loader with the patches described in this folder's
config.json (the ``"moepatch"`` block, official C2R fields).  ``moepatch uninstall <this folder>`` restores the
folder byte for byte.
"""

REQUIRED_MOEPATCH = "0.0.0"  # replaced by `moepatch install`


def _moepatch():
    """Import moepatch, or explain what to install."""
    try:
        import moepatch
    except ImportError as error:
        raise ImportError(
            f"This checkpoint was prepared with `moepatch install` and loads through moepatch >= {REQUIRED_MOEPATCH}, "
            "which is not installed: pip install moepatch (or `moepatch uninstall <folder>` to undo the install)"
        ) from error
    found = tuple(int(part) for part in moepatch.__version__.split(".")[:3] if part.isdigit())
    needed = tuple(int(part) for part in REQUIRED_MOEPATCH.split(".")[:3])
    if found < needed:
        raise ImportError(
            f"This checkpoint needs moepatch >= {REQUIRED_MOEPATCH}, found {moepatch.__version__}: "
            "`pip install --upgrade moepatch`"
        )
    return moepatch


class MoePatchedConfig:
    """``AutoConfig`` entry: the checkpoint's real config class, resolved by moepatch (never this folder's code)."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to register: the real config class is moepatch's or transformers'."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return _moepatch().load_config(pretrained_model_name_or_path, **kwargs)


class MoePatchedForCausalLM:
    """``AutoModelForCausalLM`` entry: ``moepatch.from_pretrained``, which loads and applies the patches."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """Nothing to register: the real model class is moepatch's or transformers'."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return _moepatch().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
