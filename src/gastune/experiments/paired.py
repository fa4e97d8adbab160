"""Paired differences between two methods, with bootstrap 95% intervals over questions and seeds.

Every run of a grid is scored on the same questions, and runs of one seed share the data
order, so the difference of two methods is taken question by question within a seed:
``d[s, q] = metric(a, seed s, question q) − metric(b, seed s, question q)``. The statistic is
the mean of ``d`` over the common seeds and the questions. Its interval comes from a
two-level (crossed) bootstrap: each replicate draws the seeds with replacement and, once for
all of them, the questions with replacement (the questions are shared by every seed, so they
are resampled together), and takes the mean of the resampled ``d``. The interval is the
replicates' 2.5% and 97.5% quantiles; a difference is **resolved** when that interval
excludes 0. The crossed bootstrap is conservative: noise specific to one (seed, question) is
counted by both levels (for pure noise, about √2 too wide), so "resolved" errs on the side of
"not resolved".

Metrics per question: ``nll`` (the gold response's NLL per token, lower is better; see
``gastune.eval.nll``) and ``accuracy`` (1 if right, else 0, higher is better; the mean over
questions equals the unweighted task average when every task has as many questions).

Example:
    >>> import numpy as np
    >>> d = np.array([[0.1, 0.2, 0.0, 0.1], [0.2, 0.1, 0.1, 0.2]])
    >>> low, high = bootstrap_interval(d, n_boot=500, seed=0)
    >>> bool(0 < low <= d.mean() <= high)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gastune.errors import GastuneError

# metric -> True when lower is better
METRICS: dict[str, bool] = {"nll": True, "accuracy": False}
N_BOOT = 4000
LEVEL = 0.95


def per_question(run: dict[str, Any], metric: str) -> list[float] | None:
    """One value per evaluation question of a run file, or None when the run lacks the metric."""
    evaluation = run.get("eval") or {}
    if metric == "nll":
        nll = evaluation.get("nll")
        if not nll:
            return None
        return [s / n for s, n in zip(nll["nll"], nll["tokens"])]
    if metric == "accuracy":
        correct = evaluation.get("correct")
        return None if correct is None else [float(c) for c in correct]
    raise GastuneError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")


def _counts(draws: np.ndarray, size: int) -> np.ndarray:
    """Per replicate row, how often each index 0..size-1 was drawn: shape (B, size)."""
    rows = np.arange(draws.shape[0])[:, None] * size
    return np.bincount((rows + draws).ravel(), minlength=draws.shape[0] * size).reshape(-1, size)


def bootstrap_draws(n_seeds: int, n_questions: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The resampled seed and question indices of every replicate: (B, S) and (B, Q)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds)), rng.integers(
        0, n_questions, size=(n_boot, n_questions)
    )


def bootstrap_replicates(diffs: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """The mean of ``diffs`` (seeds × questions) in each of ``n_boot`` crossed resamples."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 2 or diffs.size == 0:
        raise GastuneError(f"need a non-empty seeds × questions array, got shape {diffs.shape}")
    n_seeds, n_questions = diffs.shape
    seed_draws, question_draws = bootstrap_draws(n_seeds, n_questions, n_boot, seed)
    # mean over the resampled grid = Σ_s Σ_q count_s · d[s, q] · count_q / (S · Q)
    ws, wq = _counts(seed_draws, n_seeds), _counts(question_draws, n_questions)
    return np.einsum("bs,sq,bq->b", ws, diffs, wq) / (n_seeds * n_questions)


def bootstrap_interval(
    diffs: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """The ``level`` percentile interval of the mean of ``diffs`` (seeds × questions)."""
    stats = bootstrap_replicates(diffs, n_boot=n_boot, seed=seed)
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


def paired_contrast(
    runs: Sequence[dict[str, Any]],
    terms: Sequence[tuple[str, float]],
    labels: tuple[str, str],
    metric: str = "nll",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any] | None:
    """``Σ weight · metric(entry)`` question by question within a seed, bootstrapped; None without a seed.

    ``terms`` are (entry name, weight) pairs: ``[(a, 1), (b, -1)]`` is a − b; four terms give a
    difference of differences, e.g. what the noise costs one method minus what it costs another.
    Only the seeds every entry has go in. ``labels`` name the two sides ("a", "b") in the result,
    whose keys are those of :func:`paired_comparison`. Runs scored on different questions are refused.
    """
    by_key = {(r["name"], r["seed"]): r for r in runs}
    names = list(dict.fromkeys(name for name, _ in terms))
    values = {}
    for (name, s), run in by_key.items():
        if name in names:
            v = per_question(run, metric)
            if v is not None:
                values[(name, s)] = v
    seeds = sorted(s for (name, s) in values if name == names[0] and all((n, s) in values for n in names))
    if not seeds:
        return None
    for s in seeds:
        settings = [by_key[(n, s)]["eval"].get("settings") for n in names]
        if any(x != settings[0] for x in settings) or len({len(values[(n, s)]) for n in names}) > 1:
            raise GastuneError(
                f"{' and '.join(names)} (seed {s}) were scored on different questions: not comparable"
            )
    diffs = np.array([sum(w * np.asarray(values[(n, s)]) for n, w in terms) for s in seeds])
    low, high = bootstrap_interval(diffs, n_boot=n_boot, seed=seed)
    resolved = low > 0 or high < 0
    a_better = (diffs.mean() < 0) == METRICS[metric]
    a, b = labels
    return {
        "a": a,
        "b": b,
        "metric": metric,
        "seeds": seeds,
        "questions": diffs.shape[1],
        "mean": float(diffs.mean()),
        "per_seed": [float(x) for x in diffs.mean(axis=1)],
        "low": low,
        "high": high,
        "resolved": bool(resolved),
        "better": (a if a_better else b) if resolved else None,
    }


def paired_comparison(
    runs: Sequence[dict[str, Any]], a: str, b: str, metric: str = "nll", n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any] | None:
    """Method entry ``a`` minus ``b`` on ``metric``, over their common seeds; None without one.

    Returns ``{"a", "b", "metric", "seeds", "questions", "mean", "per_seed", "low", "high",
    "resolved", "better"}``: ``better`` is the entry the resolved difference favours (by the
    metric's direction), else None. Runs scored on different questions are refused.
    """
    return paired_contrast(runs, [(a, 1.0), (b, -1.0)], (a, b), metric, n_boot=n_boot, seed=seed)


def finding(c: dict[str, Any]) -> str:
    """What a resolved comparison found ("gast better", or a contrast's own wording)."""
    return c.get("finding") or f"{c['better']} better"


def _value(metric: str, x: float) -> str:
    return f"{100 * x:+.1f}" if metric == "accuracy" else f"{x:+.4f}"


def format_comparisons(comparisons: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per comparison, the difference, its interval and whether it is resolved."""
    lines = [
        "| a − b | metric | seeds | questions | per seed | mean | 95% interval | resolved |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for c in comparisons:
        m = c["metric"]
        unit = "points" if m == "accuracy" else "nats/token"
        per_seed = ", ".join(_value(m, x) for x in c["per_seed"])
        verdict = f"yes: {finding(c)}" if c["resolved"] else "no"
        lines.append(
            f"| {c['a']} − {c['b']} | {m} ({unit}) | {len(c['seeds'])} | {c['questions']} | {per_seed} | "
            f"{_value(m, c['mean'])} | [{_value(m, c['low'])}, {_value(m, c['high'])}] | {verdict} |"
        )
    return "\n".join(lines)
