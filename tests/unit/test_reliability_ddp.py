"""Skipped steps under data parallelism: whether a step trained on no sample is decided over
all ranks (docs/reliability.md), so a rank whose whole micro-batch was dropped neither fails
alone nor leaves the other rank waiting in a collective."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import POISON_WORDS, REPO, accelerate_launch, recipe_train_args
from tests.unit._model_folder import save_tiny_llama


@pytest.mark.integration  # two accelerate processes: about a minute on a loaded 2-core machine
def test_one_rank_dropping_its_whole_batch_is_not_a_skipped_step(tmp_path):
    """Sequential order, batch 4 per rank: rank 1's first micro-batch is records 4-7, all
    poisoned. Rank 0 trains on 0-3, so step 1 is not skipped and the run completes."""
    save_tiny_llama(tmp_path / "model", poison_words=POISON_WORDS)
    records = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(16)]
    for i in range(4, 8):
        records[i]["prompt"] = f"What is{POISON_WORDS}?"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    args = recipe_train_args(tmp_path / "model", data, out, method="lora")
    code, log = accelerate_launch(
        REPO / "configs/accelerate/ddp_cpu.yaml",
        ["-m", "gastune.cli.main"],
        [*args, "--train_sampling_strategy", "sequential", "--logging_steps", "1"],
        cwd=tmp_path,
        timeout=240,
    )
    assert code == 0, log[-6000:]
    assert re.findall(r"dropped (\d+) of (\d+) samples with a non-finite loss", log) == [("4", "4")], log[
        -4000:
    ]
    assert "trained on no sample" not in log
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file()
