"""The five questions of the issue-16 experiments and their verdicts, computed from run files.

Each question names the method entries it compares; every comparison is a paired bootstrap
(``gastune.experiments.paired``) on the held-out NLL of the gold response (primary) and on
accuracy (secondary). The verdict is mechanical: a difference is stated as a finding only
when its 95% interval excludes 0, and a question whose run files are missing says so.

- (i)   gast vs lora: each at its better learning rate (by mean NLL; the grid runs both at
        two), then at each shared learning rate;
- (ii)  gast vs ist;
- (iii) softmax vs random vs top-K selection (gast, gast-random, gast-topk);
- (iv)  support = the batch itself (gast-batch) vs a drawn support set (gast);
- (v)   at 30% label noise (Experiment B): gast with a noisy support and with a clean
        held-out one (gast-heldout) vs lora, and the data-selection baselines vs lora.

Example:
    >>> v = question_verdict(QUESTIONS[0], runs)  # doctest: +SKIP
    >>> v["summary"]  # doctest: +SKIP
    'gast better on NLL (resolved)'
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gastune.experiments.paired import N_BOOT, finding, paired_comparison, paired_contrast

NOT_RUN = "not yet run"
LR_VARIANTS = {"lora": ("lora", "lora-lr3e-4"), "gast": ("gast", "gast-lr3e-4")}


@dataclass(frozen=True)
class Question:
    """One question: its key, wording, experiment (A or B) and the (a, b) pairs it compares.

    A name ``best:lora`` stands for the entry of ``LR_VARIANTS["lora"]`` with the lower mean
    NLL over its seeds (the learning-rate check).
    """

    key: str
    title: str
    experiment: str
    pairs: tuple[tuple[str, str], ...]


QUESTIONS: tuple[Question, ...] = (
    Question(
        "i",
        "gast vs lora",
        "A",
        (("best:gast", "best:lora"), ("gast", "lora"), ("gast-lr3e-4", "lora-lr3e-4")),
    ),
    Question("ii", "gast vs ist", "A", (("gast", "ist"),)),
    Question(
        "iii",
        "softmax vs random vs top-K selection",
        "A",
        (("gast", "gast-random"), ("gast", "gast-topk"), ("gast-random", "gast-topk")),
    ),
    Question("iv", "support = batch vs a drawn support set", "A", (("gast-batch", "gast"),)),
    Question(
        "v",
        "robustness to noisy labels (30% of the answers wrong)",
        "B",
        (
            ("gast", "lora"),
            ("gast-heldout", "lora"),
            ("gast-heldout", "gast"),
            ("greats", "lora"),
            ("maxloss", "lora"),
            ("random-half", "lora"),
        ),
    ),
)


def _of(runs: Sequence[dict[str, Any]], name: str, seeds: Collection[int] | None) -> list[dict[str, Any]]:
    return [r for r in runs if r["name"] == name and (seeds is None or r["seed"] in seeds)]


def mean_nll(runs: Sequence[dict[str, Any]], name: str, seeds: Collection[int] | None = None) -> float | None:
    """Mean over the seeds (all, or ``seeds``) of one entry of its held-out NLL; None without such runs."""
    values = [r["eval"]["nll"]["mean"] for r in _of(runs, name, seeds) if r["eval"].get("nll")]
    return statistics.fmean(values) if values else None


def resolve(name: str, runs: Sequence[dict[str, Any]]) -> str:
    """``best:X`` → the learning-rate variant of X with the lower mean NLL; other names as they are."""
    if not name.startswith("best:"):
        return name
    scored = [(mean_nll(runs, n), n) for n in LR_VARIANTS[name[5:]]]
    scored = [(v, n) for v, n in scored if v is not None]
    return min(scored)[1] if scored else LR_VARIANTS[name[5:]][0]


def _numbers(c: dict[str, Any]) -> str:
    scale, unit, fmt = (100, " points", "+.1f") if c["metric"] == "accuracy" else (1, "", "+.4f")
    return (
        f"{c['a']} − {c['b']} = {scale * c['mean']:{fmt}}{unit} "
        f"[{scale * c['low']:{fmt}}, {scale * c['high']:{fmt}}]"
    )


def pair_sentence(nll: dict[str, Any], accuracy: dict[str, Any] | None) -> str:
    """One line: the NLL finding (resolved or not), then accuracy's."""
    head = f"**{finding(nll)}**" if nll["resolved"] else "**no resolved difference**"
    text = (
        f"{head} on NLL: {_numbers(nll)} nats/token over {len(nll['seeds'])} seeds × "
        f"{nll['questions']} questions"
    )
    if accuracy is not None:
        found = finding(accuracy) if accuracy["resolved"] else "not resolved"
        text += f"; accuracy {_numbers(accuracy)} ({found})"
    return text


def seeds_short(comparison: dict[str, Any], expected_seeds: Sequence[int]) -> str:
    """ "partial: s of S seeds" when fewer seeds than expected went into ``comparison``, else ""."""
    done, expected = len(comparison["seeds"]), len(expected_seeds)
    return f"partial: {done} of {expected} seeds" if done < expected else ""


def planned_seeds(expected_seeds: Sequence[int] | Mapping[str, Collection[int]], a: str, b: str) -> list[int]:
    """The seeds a pair ``a`` − ``b`` is planned to have: the grid's, or, given each entry's own
    (an entry may run fewer, like the learning-rate check), the seeds both entries plan."""
    if isinstance(expected_seeds, Mapping):
        return sorted(set(expected_seeds.get(a, ())) & set(expected_seeds.get(b, ())))
    return list(expected_seeds)


def question_verdict(
    question: Question,
    runs: Sequence[dict[str, Any]],
    expected_seeds: Sequence[int] | Mapping[str, Collection[int]],
    n_boot: int = N_BOOT,
) -> dict[str, Any]:
    """``{"key", "title", "summary", "lines", "comparisons"}`` for one question.

    ``summary`` is "not yet run" when no pair has a run on both sides, else about the headline
    (first) pair: "gast better on NLL (resolved)" (whoever its resolved difference favours),
    "no resolved difference on NLL", or that it has not run yet while others have, followed by
    "— partial: s of S seeds" when fewer seeds than the pair plans went in (``expected_seeds``:
    the grid's seeds, or each entry's, see ``planned_seeds``); ``lines`` hold every pair's
    sentence, each marked "partial" likewise.
    """
    lines, comparisons, seen = [], [], set()
    for a, b in question.pairs:
        ra, rb = resolve(a, runs), resolve(b, runs)
        if (ra, rb) in seen:  # the better learning rates are the grid's own: already compared
            continue
        seen.add((ra, rb))
        nll = paired_comparison(runs, ra, rb, "nll", n_boot=n_boot)
        if nll is None:
            lines.append(f"{a} − {b}: {NOT_RUN}")
            continue
        accuracy = paired_comparison(runs, ra, rb, "accuracy", n_boot=n_boot)
        comparisons += [c for c in (nll, accuracy) if c is not None]
        label = f"{ra} vs {rb}" + (
            " (each at its better learning rate among those run, by mean NLL)" if a != ra or b != rb else ""
        )
        partial = seeds_short(nll, planned_seeds(expected_seeds, ra, rb))
        lines.append(f"{label}{f' ({partial})' if partial else ''}: {pair_sentence(nll, accuracy)}")
    headline = next((c for c in comparisons if c["metric"] == "nll"), None)
    first_a, first_b = (resolve(x, runs) for x in question.pairs[0])
    if headline is None:
        summary = NOT_RUN
    elif (headline["a"], headline["b"]) != (first_a, first_b):
        summary = f"{first_a} − {first_b} {NOT_RUN} (partial: see the comparisons that ran)"
    elif headline["resolved"]:
        summary = f"{headline['better']} better on NLL (resolved)"
    else:
        summary = "no resolved difference on NLL"
    short = (
        seeds_short(headline, planned_seeds(expected_seeds, headline["a"], headline["b"]))
        if headline is not None
        else ""
    )
    if short:  # a verdict from some of the seeds may not survive the rest: the headline says so too
        summary += f" — {short}"
    return {
        "key": question.key,
        "title": question.title,
        "summary": summary,
        "lines": lines,
        "comparisons": comparisons,
    }


def clean_counterpart(name: str, clean_names: set[str]) -> str | None:
    """The Experiment A entry a noisy-data entry is measured against: itself, else gast, else lora."""
    if name in clean_names:
        return name
    if name.startswith("gast") and "gast" in clean_names:
        return "gast"
    return "lora" if "lora" in clean_names else None


def mean_accuracy(
    runs: Sequence[dict[str, Any]], name: str, seeds: Collection[int] | None = None
) -> float | None:
    """Mean over the seeds (all, or ``seeds``) of one entry of its accuracy over the questions; None without runs."""
    values = [
        statistics.fmean(r["eval"]["correct"]) for r in _of(runs, name, seeds) if r["eval"].get("correct")
    ]
    return statistics.fmean(values) if values else None


CLEAN, NOISY = " (clean)", " (30% noise)"


def noise_costs(
    clean: Sequence[dict[str, Any]], noisy: Sequence[dict[str, Any]], n_boot: int = N_BOOT
) -> list[dict[str, Any]]:
    """What the noise costs each method, paired over seeds and questions, on NLL and accuracy.

    For a noisy entry ``m`` with clean counterpart ``c`` (``clean_counterpart``): ``m`` at 30%
    noise − ``c`` on clean data (same seed, same question), and, where ``c`` is not lora, that
    minus what the noise costs lora: ``(m_noisy − c_clean) − (lora_noisy − lora_clean)``, a
    difference of differences whose resolved sign says which loses less. (For a method
    measured against clean lora, the second would be ``m_noisy − lora_noisy``: question (v)
    already has it.) Each result is ``paired_contrast``'s dict plus ``kind`` ("cost" or
    "versus lora") and, when resolved, ``finding``.
    """
    clean_names = {r["name"] for r in clean}
    tagged = [{**r, "name": r["name"] + CLEAN} for r in clean] + [
        {**r, "name": r["name"] + NOISY} for r in noisy
    ]
    lora_both = "lora" in clean_names and any(r["name"] == "lora" for r in noisy)
    out = []
    for name in dict.fromkeys(r["name"] for r in noisy):
        ref = clean_counterpart(name, clean_names)
        if ref is None:
            continue
        cost = [(name + NOISY, 1.0), (ref + CLEAN, -1.0)]
        for metric in ("nll", "accuracy"):
            c = paired_contrast(tagged, cost, (name + NOISY, ref + CLEAN), metric, n_boot=n_boot)
            if c is not None:
                out.append({**c, "kind": "cost"})
        if ref == "lora" or not lora_both:
            continue
        versus = [*cost, ("lora" + NOISY, -1.0), ("lora" + CLEAN, 1.0)]
        labels = (f"noise cost of {name}", "noise cost of lora")
        for metric in ("nll", "accuracy"):
            c = paired_contrast(tagged, versus, labels, metric, n_boot=n_boot)
            if c is not None:
                if c["resolved"]:
                    c["finding"] = f"{name if c['better'] == labels[0] else 'lora'} loses less"
                out.append({**c, "kind": "versus lora"})
    return out


def kept_rows(
    clean: Sequence[dict[str, Any]],
    noisy: Sequence[dict[str, Any]],
    base_nll: float | None,
    base_accuracy: float | None = None,
) -> list[dict[str, Any]]:
    """Per noisy entry: its mean NLL, its clean counterpart's, and the share of the gain kept.

    Both means are over the seeds the two share (A has more seeds than B; unpaired means would
    mix seed-to-seed spread into the ratio), listed in ``seeds``. The gain of training is
    ``base NLL − trained NLL`` (the base model on the same questions); ``kept = gain at 30%
    noise / gain on clean data`` (1.0: noise cost nothing; 0: all of the gain lost); None
    without the base model's NLL or when the clean run gained nothing. ``acc_kept`` is the same
    share on accuracy, given ``base_accuracy``.
    """
    clean_names = {r["name"] for r in clean}
    rows = []
    for name in dict.fromkeys(r["name"] for r in noisy):
        ref = clean_counterpart(name, clean_names)
        seeds = sorted(
            {r["seed"] for r in _of(noisy, name, None)} & {r["seed"] for r in _of(clean, ref, None)}
        )
        noisy_nll, clean_nll = mean_nll(noisy, name, seeds), mean_nll(clean, ref, seeds)
        kept = None
        if None not in (noisy_nll, clean_nll, base_nll) and base_nll - clean_nll > 0:
            kept = (base_nll - noisy_nll) / (base_nll - clean_nll)
        noisy_acc, clean_acc = mean_accuracy(noisy, name, seeds), mean_accuracy(clean, ref, seeds)
        acc_kept = None
        if None not in (noisy_acc, clean_acc, base_accuracy) and clean_acc - base_accuracy > 0:
            acc_kept = (noisy_acc - base_accuracy) / (clean_acc - base_accuracy)
        rows.append(
            {
                "name": name,
                "seeds": seeds,
                "nll": noisy_nll,
                "clean": ref,
                "clean_nll": clean_nll,
                "kept": kept,
                "accuracy": noisy_acc,
                "clean_accuracy": clean_acc,
                "acc_kept": acc_kept,
            }
        )
    return rows
