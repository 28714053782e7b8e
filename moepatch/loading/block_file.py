"""A moepatch block read from a file a command names (``scripts/finetune.py --moepatch_config``, ``moepatch eval
--model_args moepatch_config=...``), validated before any model is loaded.

It lives in the loading layer because both the fine-tuning runner and the tools (the lm-eval model) replace a
checkpoint's block with such a file before loading it.
"""

from __future__ import annotations

from moepatch.config import CONFIG_KEY
from moepatch.config import MoePatchConfig
from moepatch.errors import CommandError
from moepatch.validation import read_json_argument

EXPECTED_BLOCK = "a moepatch block (see configs/moepatch/)"


def read_moepatch_block(path: str, flag: str) -> MoePatchConfig:
    """The block in ``path``, validated: a whole config.json-like file (its ``"moepatch"`` key) or just the block.

    Errors name ``flag`` as the user spelled it (``moepatch eval`` passes ``--model_args moepatch_config``) and the
    file.

    Raises:
        UsageError: naming ``flag``: no such file, or a folder.
        CommandError: naming the file and ``flag``: not JSON, not an object, not a valid block.
    """
    block = read_json_argument(path, flag, EXPECTED_BLOCK)
    if isinstance(block, dict):
        block = block.get(CONFIG_KEY, block)
    if not isinstance(block, dict):  # a malformed file (exit 1), named with the flag, like --initial_weights
        raise CommandError(f"{path} ({flag}): expected a JSON object holding {EXPECTED_BLOCK}, got "
                           f"{type(block).__name__}")
    try:
        return MoePatchConfig.from_dict(block)
    except ValueError as error:
        raise CommandError(f"{path} ({flag}): {error}") from None


__all__ = ["EXPECTED_BLOCK", "read_moepatch_block"]
