"""Every ```python block of README.md runs as written, on a tiny model with small budgets.

Each block runs alone (a fresh namespace, so a block must be complete: its own imports and
data), in a temporary working folder, after these substitutions of its text, in this order:

==========================================  ===============================================
in the block                                becomes
==========================================  ===============================================
``"smollm2-135m"`` (either quote)           a tiny random 2-layer Llama folder that carries
                                            the real default tokenizer (and chat template)
``max_steps=N``                             ``max_steps=2``
``per_task=N``                              ``per_task=2``
``per_device_train_batch_size=N``           ``per_device_train_batch_size=4``
``gast_k=N``, ``GastSettings(k=N``          ``gast_k=2``, ``GastSettings(k=2``
``gast_support_size=N``, ``support_size=N`` ``gast_support_size=2``, ``support_size=2``
==========================================  ===============================================

Opting out: a block that genuinely cannot run on a CPU (it needs CUDA, several GPUs, a hub
download) is preceded in README.md by the line ``<!-- readme-test: skip (REASON) -->``; the
reason is required and becomes the skip reason. Prefer making the block runnable.

A block that leaves a ``trainer`` (or a ``train()`` ``result``) must have run its 2 steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.unit._model_folder import save_tiny_llama

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
SUBSTITUTIONS = [
    (r"max_steps=\d+", "max_steps=2"),
    (r"per_task=\d+", "per_task=2"),
    (r"per_device_train_batch_size=\d+", "per_device_train_batch_size=4"),
    (r"gast_k=\d+", "gast_k=2"),
    (r"GastSettings\(k=\d+", "GastSettings(k=2"),
    (r"\b(gast_support_size|support_size)=\d+", r"\1=2"),
]


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line of the opening fence, code, skip reason or None)`` of each ```python block."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(above)
            blocks.append((start + 1, "\n".join(lines[start + 1 : end]) + "\n", skip and skip["reason"]))
            i = end
        i += 1
    return blocks


def substitute(code: str, model_dir: str) -> str:
    code = re.sub(r"""(["'])smollm2-135m\1""", repr(model_dir), code)
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks_and_the_parser_finds_skips():
    assert len(BLOCKS) >= 4
    sample = "text\n<!-- readme-test: skip (needs CUDA) -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert python_blocks(sample) == [(3, "x = 1\n", "needs CUDA"), (7, "y = 2\n", None)]
    assert substitute('m = "smollm2-135m"; c(max_steps=50, gast_k=8, support_size=4)', "/t") == (
        "m = '/t'; c(max_steps=2, gast_k=2, support_size=2)"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("readme") / "model"))


@pytest.mark.parametrize(("line", "code", "skip"), BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, skip, model_dir, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Compiled under README.md's name, so a traceback points at the README's lines.
        source = "\n" * line + substitute(code, model_dir)
        namespace = {"__name__": "__readme__"}
        exec(compile(source, str(README), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    trainer = namespace.get("trainer") or getattr(namespace.get("result"), "trainer", None)
    if trainer is not None and "max_steps=" in code:  # it really trained, for the substituted budget
        assert trainer.state.global_step == 2
