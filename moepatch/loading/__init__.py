"""Patched loading: ``from_pretrained`` (a checkpoint loaded with moepatch's or transformers' classes and patched
from its config.json), ``install`` / ``uninstall`` (a checkpoint folder that loads patched through
``trust_remote_code``, for tools that never import moepatch) and the loader template they copy.
"""

from moepatch.loading.pretrained import LOADER_MODULE
from moepatch.loading.pretrained import drop_loader_auto_map
from moepatch.loading.pretrained import from_pretrained
from moepatch.loading.pretrained import load_config
from moepatch.loading.pretrained import load_for_command

__all__ = ["LOADER_MODULE", "drop_loader_auto_map", "from_pretrained", "load_config", "load_for_command"]
