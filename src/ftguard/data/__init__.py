"""Data: sources, benign tasks, the harmful mix, prompt templates and batching.

Data roots: ``"bundled"`` (a small offline subset shipped in the package, see bundled/PROVENANCE.md) or a
directory laid out like ``../shared/data``.
"""

from ftguard.data.collate import CausalLMCollator
from ftguard.data.example import Example
from ftguard.data.mix import MixReport, build_harmful_mix, check_disjoint, harmful_count, take_disjoint
from ftguard.data.sources import (
    DATA_ROOT_BUNDLED,
    SOURCES,
    file_sha256,
    load_examples,
    resolve_root,
    source_files,
)
from ftguard.data.tasks import TASKS, Task, get_task
from ftguard.data.template import (
    ALPACA_PREAMBLE_INPUT,
    ALPACA_PREAMBLE_NO_INPUT,
    IGNORE_INDEX,
    format_prompt,
    tokenize_dataset,
    tokenize_example,
)

__all__ = [
    "ALPACA_PREAMBLE_INPUT",
    "ALPACA_PREAMBLE_NO_INPUT",
    "DATA_ROOT_BUNDLED",
    "IGNORE_INDEX",
    "SOURCES",
    "TASKS",
    "CausalLMCollator",
    "Example",
    "MixReport",
    "Task",
    "build_harmful_mix",
    "check_disjoint",
    "file_sha256",
    "format_prompt",
    "get_task",
    "harmful_count",
    "load_examples",
    "resolve_root",
    "source_files",
    "take_disjoint",
    "tokenize_dataset",
    "tokenize_example",
]
