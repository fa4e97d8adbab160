"""benchmarks/evidence_budget.py: the estimate per run, and the finished runs' cost against it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from gastune.experiments.runner import RESULT_KIND

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
budget = pytest.importorskip("evidence_budget")

STEP = {
    "lora": 2.0,
    "gast": 3.0,
    "ist": 2.0,
    "rst": 2.0,
    "gast-random": 3.0,
    "gast-topk": 3.0,
    "gast-batch": 2.5,
}


def _grid(tmp_path: Path) -> Path:
    data = yaml.safe_load((ROOT / "benchmarks" / "evidence_a.yaml").read_text())
    data.update(results=str(tmp_path / "results"), docs=str(tmp_path))
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_file(folder: Path, name: str, seed: int, train_s: float, eval_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"kind": RESULT_KIND, "name": name, "seed": seed}
    doc |= {"train": {"train_seconds": train_s}, "eval": {"seconds": eval_s}}
    (folder / f"{name}-seed{seed}.json").write_text(json.dumps(doc))


def test_spent_sets_each_finished_run_against_its_estimate(tmp_path):
    grid = _grid(tmp_path)
    per_question = 0.5
    # By hand: 96 steps of 8, 800 questions, 25 s of start-up per run.
    lora_run = 96 * 2.0 + 800 * 0.5 + budget.OVERHEAD_S
    gast_run = 96 * 3.0 + 800 * 0.5 + budget.OVERHEAD_S
    _run_file(tmp_path / "results", "lora", 0, 1000.0, 500.0)
    _run_file(tmp_path / "results", "gast", 0, 1500.0, 600.0)
    _run_file(tmp_path / "results", "gast", 1, 1300.0, 400.0)
    lines, measured, estimated, missing = budget.spent(str(grid), STEP, per_question)

    assert measured == pytest.approx(1000 + 500 + 1500 + 600 + 1300 + 400 + 3 * budget.OVERHEAD_S)
    assert estimated == pytest.approx(lora_run + 2 * gast_run)
    # lr3e-4 entries cost what lora and gast cost; every grid run but the three is missing.
    every = sum(
        (96 * STEP[budget.SAME_COST.get(r.name, r.name)] + 800 * 0.5 + budget.OVERHEAD_S)
        for r in budget.load_grid(str(grid)).runs()
    )
    assert missing == pytest.approx(every - lora_run - 2 * gast_run)
    gast_row = next(line for line in lines if line.startswith("| gast |"))
    gast_measured = 1500 + 600 + 1300 + 400 + 2 * budget.OVERHEAD_S
    assert gast_row == (
        f"| gast | 2 | {gast_measured / 3600:.2f} | {2 * gast_run / 3600:.2f} | {gast_measured / (2 * gast_run):.2f} |"
    )
    assert "3 of 41 runs finished" in lines[0] and lines[-1].startswith("| **total** | 3 |")
    assert not any(line.startswith("| ist |") for line in lines)  # no run of it yet: no row


def test_spent_page_says_how_to_rebuild_it(tmp_path):
    out = tmp_path / "docs" / "spent.md"
    budget.write_spent(out, "| entry | runs done |\nfinished: 1.0 core-hours", 0.94)
    page = out.read_text()
    assert page.startswith("# Evidence grids: compute spent against the estimate")
    assert f"`python benchmarks/evidence_budget.py --fold 0.94 --spent --out {out}`" in page
    assert " UTC at commit " in page and page.rstrip().endswith("finished: 1.0 core-hours")
