"""benchmarks/write_results.py on synthetic run files: verdicts, tables, figures, "not yet run"."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gastune.experiments.paired import paired_comparison
from gastune.experiments.runner import RESULT_KIND

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
write_results = pytest.importorskip("write_results")
pytest.importorskip("matplotlib")

QUESTIONS = 40
# Per method: shift of the per-question NLL against lora (negative = better), share correct.
SHIFTS = {"lora": (0.0, 0.5), "gast": (-0.2, 0.6), "ist": (-0.2, 0.5), "gast-batch": (-0.2, 0.6)}


def fake_run(name: str, seed: int, shift: float, right: float, results: Path) -> dict:
    rng = np.random.default_rng(1000 * seed + len(name))
    base = np.linspace(0.5, 1.5, QUESTIONS)  # the questions' own difficulty, shared by all runs
    per_token = base + shift + rng.normal(0, 0.02, QUESTIONS)
    tokens = [4] * QUESTIONS
    correct = [bool(i < right * QUESTIONS) for i in range(QUESTIONS)]
    tasks = {
        "boolq": {"n": 20, "correct": sum(correct[:20]), "accuracy": sum(correct[:20]) / 20},
        "piqa": {"n": 20, "correct": sum(correct[20:]), "accuracy": sum(correct[20:]) / 20},
    }
    doc = {
        "kind": RESULT_KIND,
        "grid": "synthetic",
        "name": name,
        "method": name.split("-")[0],
        "seed": seed,
        "settings": {"model": "tiny", "per_task": 8, "learning_rate": 0.001},
        "train": {
            "loss_curve": [{"step": s, "loss": 2.0 - 0.1 * s + shift} for s in (4, 8, 12)],
            "train_loss": 1.5,
            "steps": 12,
            "seconds_per_step": 2.0 if name == "gast" else 1.0,
            "train_seconds": 24.0 if name == "gast" else 12.0,
            "step_times_s": [2.0 if name == "gast" else 1.0] * 12,
            "peak_rss_bytes": 2**30,
            "peak_cuda_bytes": None,
        },
        "eval": {
            "seconds": 30.0,
            "settings": {
                "data": "commonsense",
                "split": "validation",
                "per_task": 20,
                "seed": 1234,
                "protocol": "loglik",
                "format": "rc",
                "rule": "mean",
                "n": QUESTIONS,
            },
            "results": {
                "tasks": tasks,
                "average": (tasks["boolq"]["accuracy"] + tasks["piqa"]["accuracy"]) / 2,
            },
            "correct": correct,
            "nll": {"mean": float(per_token.mean()), "nll": list(per_token * 4), "tokens": tokens},
        },
        "selection": {
            "frequency": [[1.0, 0.5], [0.0, 0.5]],
            "masks": 2,
            "first_step": 1,
            "last_step": 2,
            "groups": ["model.layers.0", "model.layers.1"],
        }
        if name.startswith("gast")
        else None,
        "git": {"commit": "abcdef1234", "dirty": False},
        "machine": {"device_name": "CPU (2 cores)"},
        "date": "2026-12-02T00:00:00+00:00",
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}-seed{seed}.json").write_text(json.dumps(doc))
    return doc


def grid_file(tmp_path: Path, name: str, source: str, seeds: list[int]) -> Path:
    data = yaml.safe_load((ROOT / "benchmarks" / source).read_text())
    data.update(results=str(tmp_path / name / "results"), docs=str(tmp_path / name), seeds=seeds)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_page_from_synthetic_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the CPU grid's committed run files are read where they live
    grid_a = grid_file(tmp_path, "a", "evidence_a.yaml", [0, 1, 2])
    grid_b = grid_file(tmp_path, "b", "evidence_b.yaml", [0, 1, 2])
    runs = [
        fake_run(name, seed, *SHIFTS[name], tmp_path / "a" / "results")
        for name in SHIFTS
        for seed in (0, 1, 2)
    ]
    out = tmp_path / "docs" / "RESULTS.md"
    argv = ["--grid-a", str(grid_a), "--grid-b", str(grid_b), "--base-a", str(tmp_path / "none.json")]
    assert write_results.main([*argv, "--out", str(out), "--n-boot", "300"]) == 0
    page = out.read_text()
    # The verdicts follow the synthetic truth: gast ahead of lora by 0.2 nats, level with ist.
    assert "**(i) gast vs lora: gast better on NLL (resolved).**" in page
    assert "**(ii) gast vs ist: no resolved difference on NLL.**" in page
    assert "**(iv) support = batch vs a drawn support set: no resolved difference on NLL.**" in page
    assert "**(iii) softmax vs random vs top-K selection: not yet run.**" in page
    assert "**(v) robustness to noisy labels (30% of the answers wrong): not yet run.**" in page
    expected = paired_comparison(runs, "gast", "lora", "nll", n_boot=300)
    assert f"[{expected['low']:+.4f}, {expected['high']:+.4f}]" in page and expected["high"] < -0.15
    assert "gast-lr3e-4 − lora-lr3e-4: not yet run" in page
    assert "Partial: 12 of 27 runs done" in page and "none of its 18 run files exists yet" in page
    # 3 gast runs x 24 s + 9 others x 12 s of training, 12 x 30 s of evaluation.
    assert "Compute: 0.15 core-hours (0.05 training + 0.10 evaluation" in page
    for figure in ("loss_step_time.png", "selection_heatmap.png"):
        assert (tmp_path / "a" / figure).read_bytes().startswith(b"\x89PNG")
        assert f"(../a/{figure})" in page
    # The CPU grid's section is kept as it was (its committed run files, its table).
    committed = (ROOT / "docs" / "RESULTS.md").read_text()
    cpu_grid = committed.split("## The CPU-sized grid", 1)[1]  # Experiment A has a lora row too
    row = next(line for line in cpu_grid.splitlines() if line.startswith("| lora "))
    assert row in page and "### Do the paper's orderings hold at this scale?" in page


def test_noisy_runs_report_what_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    grid_a = grid_file(tmp_path, "a", "evidence_a.yaml", [0])
    grid_b = grid_file(tmp_path, "b", "evidence_b.yaml", [0, 1, 2])
    fake_run("lora", 0, 0.0, 0.5, tmp_path / "a" / "results")
    fake_run("lora", 0, 0.5, 0.4, tmp_path / "b" / "results")
    fake_run("gast-heldout", 0, 0.25, 0.4, tmp_path / "b" / "results")
    fake_run("gast", 0, -0.2, 0.5, tmp_path / "a" / "results")  # gast-heldout's clean reference
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"nll": {"mean": 2.0}, "results": {"average": 0.3}}))
    out = tmp_path / "RESULTS.md"
    argv = ["--grid-a", str(grid_a), "--grid-b", str(grid_b), "--base-a", str(base), "--out", str(out)]
    assert write_results.main([*argv, "--n-boot", "200"]) == 0
    page = out.read_text()
    assert "gast-heldout vs lora (partial: 1 of 3 seeds): **gast-heldout better**" in page
    # lora: clean 1.0 → noisy 1.5 of a base 2.0 keeps half its gain; gast-heldout (clean reference
    # lora: no gast in A) keeps 75%.
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in page.splitlines() if line.endswith("% |")}
    assert (
        rows["lora"][2:4] == [f"{float(rows['lora'][2]):.4f}", "lora"]
        and abs(float(rows["lora"][2]) - 1.5) < 0.01
    )
    assert rows["lora"][1] == "0" and rows["lora"][5] == "50%"
    # gast-heldout is measured against clean gast now (NLL 0.8 of base 2.0): (2 - 1.25) / 1.2
    assert rows["gast-heldout"][3] == "gast" and abs(float(rows["gast-heldout"][5][:-1]) - 62.5) < 2
    # accuracy: base 30%, clean lora and gast 50%, noisy lora and gast-heldout 40%: half the gain kept
    assert rows["lora"][6:] == ["40.0", "50.0", "50% |"] and rows["gast-heldout"][8] == "50% |"
    # (v): the noise costs gast-heldout 0.25 - (-0.2) = 0.45 against clean gast, lora 0.5
    found = re.search(
        r"noise cost of gast-heldout − noise cost of lora \(each noisy run minus its clean reference of "
        r"the same seed in Experiment A\) \(partial: 1 of 3 seeds\): \*\*gast-heldout loses less\*\* on "
        r"NLL: noise cost of gast-heldout − noise cost of lora = ([-+]\d\.\d+)",
        page,
    )
    assert found and abs(float(found.group(1)) + 0.05) < 0.01
    # The paired cost of the noise: lora's noisy runs share the clean runs' per-question noise
    # here (same seed, same name), so the cost is exactly the 0.5 shift and the 10 points.
    assert "| lora (30% noise) − lora (clean) | nll (nats/token) | 1 | 40 | +0.5000 | +0.5000 |" in page
    assert "| lora (30% noise) − lora (clean) | accuracy (points) | 1 | 40 | -10.0 |" in page
    assert (
        "(v) robustness to noisy labels (30% of the answers wrong): gast − lora not yet run (partial" in page
    )


def test_a_verdict_from_some_of_the_seeds_says_partial_in_its_headline(tmp_path):
    from gastune.experiments.verdicts import QUESTIONS as ASKED
    from gastune.experiments.verdicts import question_verdict

    runs = [fake_run(name, 0, shift, 0.5, tmp_path) for name, shift in (("gast", 0.0), ("ist", 0.3))]
    gast_vs_ist = next(q for q in ASKED if q.key == "ii")
    partial = question_verdict(gast_vs_ist, runs, expected_seeds=range(5), n_boot=200)
    assert partial["summary"] == "gast better on NLL (resolved) — partial: 1 of 5 seeds"
    assert partial["lines"][0].startswith("gast vs ist (partial: 1 of 5 seeds): **gast better**")
    whole = question_verdict(gast_vs_ist, runs, expected_seeds=[0], n_boot=200)
    assert whole["summary"] == "gast better on NLL (resolved)"
    # Per-entry plans: a pair is partial only against the seeds both of its entries plan.
    planned = {"gast": range(5), "ist": [0]}
    assert (
        question_verdict(gast_vs_ist, runs, expected_seeds=planned, n_boot=200)["summary"] == whole["summary"]
    )
    planned = {"gast": range(5), "ist": range(3)}
    short = question_verdict(gast_vs_ist, runs, expected_seeds=planned, n_boot=200)
    assert short["summary"] == "gast better on NLL (resolved) — partial: 1 of 3 seeds"
