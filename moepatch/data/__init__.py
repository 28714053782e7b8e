"""The data every tool shares, below the tools that read it: instruction records and their encoding
(:mod:`~moepatch.data.instruction`), the synthetic tasks of the demo and the tests (:mod:`~moepatch.data.synthetic`),
and the embedded corpus (:mod:`~moepatch.data.corpus`).

``moepatch.data`` was the instruction-data module in earlier releases: its names are still here.
"""

from moepatch.data.instruction import IGNORE_INDEX
from moepatch.data.instruction import PROMPT_FORMATS
from moepatch.data.instruction import DataSource
from moepatch.data.instruction import encode_messages
from moepatch.data.instruction import load_source
from moepatch.data.instruction import read_jsonl
from moepatch.data.instruction import read_jsonl_located
from moepatch.data.instruction import to_messages

__all__ = ["DataSource", "IGNORE_INDEX", "PROMPT_FORMATS", "encode_messages", "load_source", "read_jsonl",
           "read_jsonl_located", "to_messages"]
