"""Training and evaluation data: the commonsense records, user data files, tokenisation.

Names resolve lazily (PEP 562) so that ``gastune.data.prompts`` stays a light import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> module under gastune.data
_EXPORTS = {
    "load_commonsense": "commonsense",
    "tasks_with_split": "commonsense",
    "render_instruction": "commonsense",
    "SPLITS": "commonsense",
    "load_records": "io",
    "normalize_record": "io",
    "write_records": "io",
    "tokenize_records": "collate",
    "CausalLMCollator": "collate",
    "TokenizedDataset": "collate",
    "IGNORE_INDEX": "collate",
    "TASK_LABELS": "prompts",
    "COMMONSENSE_TASKS": "prompts",
    "format_prompt": "prompts",
    "answer_text": "prompts",
}

__all__ = [
    "COMMONSENSE_TASKS",
    "IGNORE_INDEX",
    "SPLITS",
    "TASK_LABELS",
    "CausalLMCollator",
    "TokenizedDataset",
    "answer_text",
    "format_prompt",
    "load_commonsense",
    "load_records",
    "normalize_record",
    "render_instruction",
    "tasks_with_split",
    "tokenize_records",
    "write_records",
]

if TYPE_CHECKING:
    from gastune.data.collate import IGNORE_INDEX, CausalLMCollator, TokenizedDataset, tokenize_records
    from gastune.data.commonsense import SPLITS, load_commonsense, render_instruction, tasks_with_split
    from gastune.data.io import load_records, normalize_record, write_records
    from gastune.data.prompts import COMMONSENSE_TASKS, TASK_LABELS, answer_text, format_prompt


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gastune.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"gastune.data.{module}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
