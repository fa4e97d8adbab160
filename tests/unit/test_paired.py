"""The paired bootstrap against a slow obviously-correct reference, and on run files."""

from __future__ import annotations

import numpy as np
import pytest

from gastune.errors import GastuneError
from gastune.experiments.paired import (
    bootstrap_draws,
    bootstrap_interval,
    bootstrap_replicates,
    format_comparisons,
    paired_comparison,
    per_question,
)


def slow_replicates(diffs: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """Obviously correct: build each resampled seeds × questions table and average it."""
    seed_draws, question_draws = bootstrap_draws(len(diffs), len(diffs[0]), n_boot, seed)
    out = []
    for seeds, questions in zip(seed_draws.tolist(), question_draws.tolist()):
        table = [[diffs[s][q] for q in questions] for s in seeds]
        out.append(sum(sum(row) for row in table) / (len(seeds) * len(questions)))
    return out


def test_replicates_match_the_slow_reference():
    rng = np.random.default_rng(7)
    diffs = rng.normal(0.1, 1.0, size=(3, 37))
    fast = bootstrap_replicates(diffs, n_boot=300, seed=11)
    assert fast.shape == (300,)
    np.testing.assert_allclose(fast, slow_replicates(diffs.tolist(), 300, 11), rtol=1e-12, atol=1e-12)
    low, high = bootstrap_interval(diffs, n_boot=300, seed=11)
    assert (low, high) == pytest.approx(
        tuple(np.quantile(slow_replicates(diffs.tolist(), 300, 11), [0.025, 0.975]))
    )


def test_draws_resample_seeds_and_questions_with_replacement():
    seeds, questions = bootstrap_draws(5, 800, 2000, seed=0)
    assert seeds.shape == (2000, 5) and questions.shape == (2000, 800)
    assert seeds.min() == 0 and seeds.max() == 4 and questions.max() == 799
    # With replacement: a resample of 800 of 800 repeats questions (about 63% distinct).
    assert 0.6 < np.mean([len(set(row)) / 800 for row in questions[:50].tolist()]) < 0.66


def test_interval_width_and_resolution():
    rng = np.random.default_rng(1)
    constant = np.full((4, 50), 0.3)
    assert bootstrap_interval(constant, n_boot=200) == pytest.approx((0.3, 0.3))
    noise = rng.normal(0.0, 1.0, size=(5, 800))
    low, high = bootstrap_interval(noise, n_boot=1000)
    assert low < 0 < high  # no true difference: not resolved
    # Pure seed × question noise is counted by both resampling levels (the crossed bootstrap is
    # conservative there): variance 1/(800·5) + 1/(5·800), a width of 2·1.96·√(2/4000) ≈ 0.088.
    assert 0.07 < high - low < 0.11
    shifted = noise + 0.1
    low, high = bootstrap_interval(shifted, n_boot=1000)
    assert 0 < low < 0.1 < high
    # Seed-to-seed variation widens the interval: a per-seed offset is resampled too.
    offsets = noise + np.array([[-0.2], [0.3], [0.0], [0.25], [-0.3]])
    assert np.subtract(*bootstrap_interval(offsets, n_boot=1000)[::-1]) > high - low


def run(name: str, seed: int, nll: list[float], correct: list[bool], settings=None) -> dict:
    return {
        "name": name,
        "seed": seed,
        "eval": {
            "settings": settings or {"n": len(nll), "seed": 1234},
            "nll": {"nll": [2 * v for v in nll], "tokens": [2] * len(nll), "mean": sum(nll) / len(nll)},
            "correct": correct,
        },
    }


def test_paired_comparison_on_run_files():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 1.5, size=200)
    runs = []
    for s in range(3):
        runs.append(run("gast", s, list(base - 0.05 + 0.01 * s), [True] * 120 + [False] * 80))
        runs.append(run("lora", s, list(base + rng.normal(0, 0.01, 200)), [True] * 100 + [False] * 100))
    runs.append(run("lora", 9, list(base), [True] * 200))  # no gast partner: left out
    c = paired_comparison(runs, "gast", "lora", "nll", n_boot=500)
    assert c["seeds"] == [0, 1, 2] and c["questions"] == 200
    assert c["mean"] == pytest.approx(-0.04, abs=0.005) and c["resolved"] and c["better"] == "gast"
    assert c["high"] < 0 and len(c["per_seed"]) == 3
    acc = paired_comparison(runs, "gast", "lora", "accuracy", n_boot=500)
    assert acc["mean"] == pytest.approx(0.1) and acc["better"] == "gast"
    assert per_question(runs[0], "nll") == pytest.approx(list(base - 0.05))
    assert paired_comparison(runs, "gast", "dora") is None
    table = format_comparisons([c, acc])
    assert "| gast − lora | nll (nats/token) | 3 | 200 |" in table and "yes: gast better" in table
    assert "+10.0" in table  # accuracy in points


def test_runs_on_different_questions_are_refused():
    runs = [
        run("a", 0, [1.0, 2.0], [True, False]),
        run("b", 0, [1.0, 2.0], [True, True], {"n": 2, "seed": 9}),
    ]
    with pytest.raises(GastuneError, match="different questions"):
        paired_comparison(runs, "a", "b")
    with pytest.raises(GastuneError, match="unknown metric"):
        per_question(runs[0], "bleu")
