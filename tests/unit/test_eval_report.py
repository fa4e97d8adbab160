"""Aggregation of predictions, the results tables and the results JSON."""

from __future__ import annotations

import json

import pytest

from gastune.errors import GastuneError
from gastune.eval.report import (
    format_comparison_table,
    format_results_table,
    read_results,
    results_document,
    write_json,
)
from gastune.eval.result import EvalResult, Prediction, aggregate


def pred(i: int, task: str, answer: str, predicted: str) -> Prediction:
    labels = ("answer1", "answer2", "answer3") if task == "siqa" else ("true", "false")
    return Prediction(i, task, answer, predicted, labels, (-1.0,) * len(labels), (-1.0,) * len(labels))


@pytest.fixture
def result() -> EvalResult:
    # boolq: 2 of 3 correct; siqa: 0 of 1 (listed first to check the canonical task order).
    return aggregate(
        [
            pred(0, "siqa", "answer1", "answer3"),
            pred(1, "boolq", "true", "true"),
            pred(2, "boolq", "false", "false"),
            pred(3, "boolq", "false", "true"),
        ]
    )


def test_aggregate_counts_per_task_and_unweighted_average(result):
    assert list(result.tasks) == ["boolq", "siqa"]
    assert (result.tasks["boolq"].n, result.tasks["boolq"].correct) == (3, 2)
    assert result.tasks["boolq"].accuracy == pytest.approx(2 / 3)
    assert result.tasks["siqa"].accuracy == 0.0
    # The mean of the task accuracies, not the pooled 2/4.
    assert result.average == pytest.approx((2 / 3 + 0.0) / 2)


def test_result_round_trips_through_dict(result):
    back = EvalResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.tasks == result.tasks and back.predictions == result.predictions
    with pytest.raises(GastuneError):
        EvalResult.from_dict({"tasks": {"boolq": {}}})


def test_results_table(result):
    lines = format_results_table(result).splitlines()
    assert lines[0].split("|")[1:4] == [" task    ", " n ", " accuracy "]
    assert "boolq" in lines[2] and "0.667" in lines[2]
    assert lines[-1].startswith("| average") and "0.333" in lines[-1]


def test_comparison_table(result):
    after = aggregate([pred(1, "boolq", "true", "true"), pred(2, "piqa", "true", "true")])
    text = format_comparison_table(result, after, names=("base", "lora"))
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
    }
    assert rows["task"] == ["n", "base", "lora", "change"]
    assert rows["boolq"] == ["1/3", "0.667", "1.000", "+0.333"]
    assert rows["siqa"] == ["1", "0.000", "-", "-"]
    assert rows["piqa"] == ["1", "-", "1.000", "-"]
    assert rows["average"] == ["", "0.333", "1.000", "+0.667"]


def test_results_json_has_provenance_and_is_written_atomically(result, tmp_path):
    path = tmp_path / "sub" / "results.json"
    document = results_document(
        result, model="smollm2-135m", adapter="runs/x", settings={"split": "validation"}
    )
    write_json(path, document)
    data = json.loads(path.read_text())
    assert {"model", "adapter", "git", "date", "machine", "settings", "results"} <= set(data)
    assert set(data["git"]) == {"commit", "dirty", "changed"}
    assert {"platform", "cpu_count", "torch", "device"} <= set(data["machine"])
    assert data["date"].endswith("+00:00")  # UTC
    assert data["results"]["average"] == pytest.approx(result.average)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left
    assert read_results(path).tasks == result.tasks


def test_read_results_rejects_bad_files(tmp_path):
    with pytest.raises(GastuneError):
        read_results(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(GastuneError):
        read_results(tmp_path / "bad.json")
