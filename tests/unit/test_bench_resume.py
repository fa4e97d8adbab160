"""An interrupted bench run resumes from its last checkpoint (gastune.experiments.resume)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from gastune.experiments import grid_from_dict, run_grid
from gastune.experiments import runner as runner_module
from tests.unit.test_experiment import assets, grid_dict  # noqa: F401 (a fixture)

GAST = {"name": "gast-random", "method": "gast", "gast_selection": "random"}
RUN = "gast-random-seed0"


def _grid(assets, folder, **train):  # noqa: F811 (the fixture's name)
    data = grid_dict(assets, folder, methods=[GAST], seeds=[0])
    # 6 steps of 4 of 16 records: the run crosses an epoch; a checkpoint every 2 steps.
    data["train"].update({"max_steps": 6, "save_steps": 2, **train})
    return grid_from_dict(data)


def _interrupt_at(monkeypatch, step: int) -> None:
    """Every run raises when optimizer step ``step + 1`` begins (checkpoint-``step`` is saved)."""
    real = runner_module._meter

    def meter(saved=None):
        callback = real(saved)
        begin = callback.on_step_begin

        def on_step_begin(args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("interrupted")
            return begin(args, state, control, **kwargs)

        callback.on_step_begin = on_step_begin
        return callback

    monkeypatch.setattr(runner_module, "_meter", meter)


def _result(folder) -> dict:
    return json.loads((folder / "results" / f"{RUN}.json").read_text())


def _adapter(folder) -> dict:
    return load_file(str(folder / "runs" / RUN / "adapter_model.safetensors"))


def test_interrupted_run_resumes_and_matches_the_uninterrupted_one(assets, tmp_path, monkeypatch):  # noqa: F811
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_grid(_grid(assets, whole), isolate=False).done == [RUN]

    with monkeypatch.context() as patch:
        _interrupt_at(patch, 4)
        assert run_grid(_grid(assets, cut), isolate=False).failed == [RUN]
    assert not (cut / "results" / f"{RUN}.json").exists()
    saved = sorted(p.name for p in (cut / "runs" / RUN).glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4"]  # save_total_limit 2

    assert run_grid(_grid(assets, cut), isolate=False).done == [RUN]
    a, b = _result(whole), _result(cut)
    assert a["train"]["resumed"] is None
    resumed = b["train"]["resumed"]
    assert resumed["from_step"] == 4 and resumed["checkpoint"] == "checkpoint-4"
    assert resumed["steps_trained_now"] == 2  # steps 1-4 were not trained again
    assert [(s["from_step"], s["to_step"]) for s in resumed["segments"]] == [(0, 4), (4, 6)]
    # The curves are complete and equal the uninterrupted run's.
    assert b["train"]["steps"] == 6 and len(b["train"]["step_times_s"]) == 6
    assert all(t > 0 for t in b["train"]["step_times_s"])  # steps 1-4 from the checkpoint's meter
    steps = [p["step"] for p in a["train"]["loss_curve"]]
    assert steps == [1, 2, 3, 4, 5, 6] == [p["step"] for p in b["train"]["loss_curve"]]
    assert [p["loss"] for p in b["train"]["loss_curve"]] == pytest.approx(
        [p["loss"] for p in a["train"]["loss_curve"]], rel=1e-5
    )
    assert b["train"]["train_loss"] == pytest.approx(a["train"]["train_loss"], rel=1e-5)
    seg = sum(s["seconds"] for s in resumed["segments"])
    assert b["train"]["seconds_per_step"] == pytest.approx(seg / 6)
    weights_a, weights_b = _adapter(whole), _adapter(cut)
    assert weights_a.keys() == weights_b.keys() and weights_a
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6)
    assert b["eval"]["nll"]["nll"] == pytest.approx(a["eval"]["nll"]["nll"], rel=1e-5)
    assert b["eval"]["predicted"] == a["eval"]["predicted"]
    assert not list((cut / "runs" / RUN).glob("checkpoint-*"))  # cleared once the result is written


def test_checkpoint_of_other_settings_restarts_with_a_warning(assets, tmp_path, monkeypatch, caplog):  # noqa: F811
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 4)
        assert run_grid(_grid(assets, tmp_path), isolate=False).failed == [RUN]
    assert (tmp_path / "runs" / RUN / "checkpoint-4").is_dir()

    with caplog.at_level(logging.WARNING, logger="gastune.experiments.resume"):
        assert run_grid(_grid(assets, tmp_path, learning_rate=2e-3), isolate=False).done == [RUN]
    assert "other training settings" in caplog.text and "from step 0" in caplog.text
    result = _result(tmp_path)
    assert result["train"]["resumed"] is None and len(result["train"]["step_times_s"]) == 6
    assert result["settings"]["learning_rate"] == 2e-3

    # Same result as a clean run with the new settings: nothing of the old checkpoint leaked in.
    clean = tmp_path / "clean"
    run_grid(_grid(assets, clean, learning_rate=2e-3), isolate=False)
    for key, value in _adapter(clean).items():
        torch.testing.assert_close(_adapter(tmp_path)[key], value, rtol=1e-5, atol=1e-6)


def test_run_stopped_after_its_last_checkpoint_is_not_trained_again(assets, tmp_path, monkeypatch):  # noqa: F811
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_grid(_grid(assets, whole), isolate=False)
    real = runner_module._meter

    def meter(saved=None):  # stopped after training (checkpoint-6 saved), before evaluation
        callback = real(saved)

        def on_train_end(args, state, control, **kwargs):
            raise RuntimeError("interrupted")

        callback.on_train_end = on_train_end
        return callback

    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "_meter", meter)
        assert run_grid(_grid(assets, cut), isolate=False).failed == [RUN]
    assert run_grid(_grid(assets, cut), isolate=False).done == [RUN]
    a, b = _result(whole), _result(cut)
    assert b["train"]["resumed"]["from_step"] == 6 and b["train"]["resumed"]["steps_trained_now"] == 0
    assert len(b["train"]["step_times_s"]) == 6 and b["train"]["seconds_per_step"] > 0
    # Nothing trained in the last segment, so its peak memory is the earlier segment's.
    assert b["train"]["peak_rss_bytes"] > 0
    assert b["train"]["train_loss"] == pytest.approx(a["train"]["train_loss"], rel=1e-5)
    assert [p["step"] for p in b["train"]["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert [p["loss"] for p in b["train"]["loss_curve"]] == pytest.approx(
        [p["loss"] for p in a["train"]["loss_curve"]], rel=1e-5
    )
    for key, value in _adapter(whole).items():
        torch.testing.assert_close(_adapter(cut)[key], value, rtol=1e-5, atol=1e-6)
