"""What label noise costs each method, paired by seed and question (verdicts.noise_costs), and
the general contrast behind it (paired.paired_contrast), against explicit loops."""

import numpy as np
import pytest

from gastune.errors import GastuneError
from gastune.experiments.paired import bootstrap_interval, paired_contrast
from gastune.experiments.verdicts import kept_rows, noise_costs

Q = 60


def run(name, seed, nll, correct, n=Q):
    return {
        "name": name,
        "seed": seed,
        "eval": {
            "settings": {"n": n, "seed": 1234},
            "nll": {"nll": [3 * v for v in nll], "tokens": [3] * len(nll), "mean": float(np.mean(nll))},
            "correct": correct,
        },
    }


@pytest.fixture
def grids():
    """A (clean) and B (noisy) runs with known per-question NLLs; seed 2 only in A."""
    rng = np.random.default_rng(0)
    values, clean, noisy = {}, [], []
    for grid, names in (("A", ("lora", "gast")), ("B", ("lora", "gast", "gast-heldout", "greats"))):
        for name in names:
            for seed in (0, 1, 2) if grid == "A" else (0, 1):
                v = rng.normal(1.0, 0.3, Q)
                c = list(rng.random(Q) < 0.5)
                values[(grid, name, seed)] = (v, np.array(c, dtype=float))
                (clean if grid == "A" else noisy).append(run(name, seed, list(v), c))
    return values, clean, noisy


def test_contrast_is_the_weighted_sum_question_by_question(grids):
    values, clean, _ = grids
    c = paired_contrast(clean, [("gast", 2.0), ("lora", -0.5)], ("x", "y"), "nll", n_boot=300)
    slow = np.array(
        [
            [2 * g - 0.5 * lo for g, lo in zip(values[("A", "gast", s)][0], values[("A", "lora", s)][0])]
            for s in (0, 1, 2)
        ]
    )
    assert c["seeds"] == [0, 1, 2] and c["questions"] == Q
    assert c["mean"] == pytest.approx(slow.mean()) and c["per_seed"] == pytest.approx(slow.mean(axis=1))
    assert (c["low"], c["high"]) == pytest.approx(bootstrap_interval(slow, n_boot=300))
    # a − b on accuracy, by an explicit loop too
    two = paired_contrast(clean, [("gast", 1.0), ("lora", -1.0)], ("gast", "lora"), "accuracy", n_boot=300)
    slow = np.array([values[("A", "gast", s)][1] - values[("A", "lora", s)][1] for s in (0, 1, 2)])
    assert two["mean"] == pytest.approx(slow.mean()) and (two["a"], two["b"]) == ("gast", "lora")


def test_contrast_refuses_runs_on_other_questions():
    runs = [run("a", 0, [1.0] * Q, [True] * Q), run("b", 0, [1.0] * 5, [True] * 5, n=5)]
    with pytest.raises(GastuneError, match="different questions"):
        paired_contrast(runs, [("a", 1.0), ("b", -1.0)], ("a", "b"))
    assert paired_contrast(runs, [("a", 1.0), ("c", -1.0)], ("a", "c")) is None


def test_noise_costs_against_explicit_loops(grids):
    values, clean, noisy = grids
    costs = noise_costs(clean, noisy, n_boot=300)
    by = {(c["a"], c["metric"]): c for c in costs}

    def per_q(grid, name, s, metric):
        return values[(grid, name, s)][0 if metric == "nll" else 1]

    for name, ref in (("lora", "lora"), ("gast", "gast"), ("gast-heldout", "gast"), ("greats", "lora")):
        for metric in ("nll", "accuracy"):
            c = by[(f"{name} (30% noise)", metric)]
            slow = np.array([per_q("B", name, s, metric) - per_q("A", ref, s, metric) for s in (0, 1)])
            assert c["b"] == f"{ref} (clean)" and c["seeds"] == [0, 1] and c["kind"] == "cost"
            assert c["mean"] == pytest.approx(slow.mean())
    # The difference of differences: only where the clean reference is not lora itself.
    versus = {c["a"] for c in costs if c["kind"] == "versus lora"}
    assert versus == {"noise cost of gast", "noise cost of gast-heldout"}
    c = by[("noise cost of gast-heldout", "nll")]
    slow = np.array(
        [
            per_q("B", "gast-heldout", s, "nll")
            - per_q("A", "gast", s, "nll")
            - per_q("B", "lora", s, "nll")
            + per_q("A", "lora", s, "nll")
            for s in (0, 1)
        ]
    )
    assert c["mean"] == pytest.approx(slow.mean()) and c["b"] == "noise cost of lora"


def _versus(clean, noisy, metric):
    return next(
        c
        for c in noise_costs(clean, noisy, n_boot=200)
        if c["kind"] == "versus lora" and c["metric"] == metric
    )


def test_noise_cost_finding_says_who_loses_less():
    base = np.linspace(0.5, 1.5, Q)
    right = [True] * 30 + [False] * 30
    # NLL (lower is better): noise adds 0.5 to lora's and 0.2 to gast's, so gast loses less
    clean = [run("lora", 0, list(base), right), run("gast", 0, list(base - 0.2), right)]
    noisy = [run("lora", 0, list(base + 0.5), right), run("gast", 0, list(base), right)]
    c = _versus(clean, noisy, "nll")
    assert c["mean"] == pytest.approx(-0.3) and c["resolved"] and c["finding"] == "gast loses less"
    acc = _versus(clean, noisy, "accuracy")
    assert acc["mean"] == 0 and not acc["resolved"] and "finding" not in acc
    # the other way round: lora loses less on NLL; on accuracy (higher is better) gast drops
    # from 50% to 20%, lora from 50% to 40%: lora loses less there too
    noisy = [
        run("lora", 0, list(base + 0.1), [True] * 24 + [False] * 36),
        run("gast", 0, list(base + 0.3), [True] * 12 + [False] * 48),
    ]
    c = _versus(clean, noisy, "nll")
    assert c["mean"] == pytest.approx(0.4) and c["finding"] == "lora loses less"
    acc = _versus(clean, noisy, "accuracy")
    assert acc["mean"] == pytest.approx(-0.2) and acc["resolved"] and acc["finding"] == "lora loses less"
    # and gast losing less accuracy
    noisy = [run("lora", 0, list(base), [True] * 12 + [False] * 48), run("gast", 0, list(base), right)]
    acc = _versus(clean, noisy, "accuracy")
    assert acc["mean"] == pytest.approx(0.3) and acc["finding"] == "gast loses less"


def test_kept_on_accuracy_by_hand():
    clean = [run("lora", 0, [1.0] * Q, [True] * 36 + [False] * 24)]  # 60%
    noisy = [run("lora", 0, [1.5] * Q, [True] * 30 + [False] * 30)]  # 50%
    (row,) = kept_rows(clean, noisy, base_nll=2.0, base_accuracy=0.4)
    assert row["kept"] == pytest.approx(0.5) and row["acc_kept"] == pytest.approx(0.5)
    assert row["accuracy"] == pytest.approx(0.5) and row["clean_accuracy"] == pytest.approx(0.6)
    (row,) = kept_rows(clean, noisy, base_nll=2.0)
    assert row["acc_kept"] is None


def test_kept_uses_the_seeds_both_sides_have(grids):
    values, clean, noisy = grids  # A has seeds 0-2, B 0-1
    rows = {r["name"]: r for r in kept_rows(clean, noisy, base_nll=3.0, base_accuracy=0.1)}
    lora = rows["lora"]
    assert lora["seeds"] == [0, 1]
    clean_nll = np.mean([values[("A", "lora", s)][0].mean() for s in (0, 1)])
    noisy_nll = np.mean([values[("B", "lora", s)][0].mean() for s in (0, 1)])
    assert lora["clean_nll"] == pytest.approx(clean_nll) and lora["nll"] == pytest.approx(noisy_nll)
    assert lora["kept"] == pytest.approx((3.0 - noisy_nll) / (3.0 - clean_nll))
    assert rows["gast-heldout"]["clean"] == "gast" and rows["gast-heldout"]["seeds"] == [0, 1]


def test_kept_is_none_when_the_clean_run_gained_nothing():
    clean = [run("lora", 0, [2.5] * Q, [True] * 20 + [False] * 40)]  # worse than the base on both
    noisy = [run("lora", 0, [2.6] * Q, [True] * 18 + [False] * 42)]
    (row,) = kept_rows(clean, noisy, base_nll=2.0, base_accuracy=0.4)
    assert row["kept"] is None and row["acc_kept"] is None
