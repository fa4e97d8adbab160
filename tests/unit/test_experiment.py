"""The experiment grid runner and its report, on a tiny model and tiny local data."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gastune.cli.main import main
from gastune.data.prompts import answer_text
from gastune.errors import GastuneError
from gastune.experiments import (
    build_report,
    format_summary_table,
    grid_from_dict,
    load_runs,
    run_grid,
    summarize,
)
from gastune.experiments import runner as runner_module
from gastune.models.loading import load_tokenizer
from gastune.provenance import command_line
from tests.conftest import tiny_llama_for

PNG = b"\x89PNG\r\n\x1a\n"


def record(task: str, i: int, answer: str, labels: str) -> dict:
    instruction = f"{task} question number {i}?\n\nAnswer format: {labels}"
    return {
        "instruction": instruction,
        "input": "",
        "output": answer_text(answer),
        "answer": answer,
        "task": task,
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny saved model (real tokenizer), 16 training records and 6 evaluation records."""
    root = tmp_path_factory.mktemp("experiment")
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama_for(tokenizer, tie_word_embeddings=True).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    train = [record("boolq", i, ("true", "false")[i % 2], "true/false") for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    evaluation = [record("boolq", i, ("true", "false")[i % 2], "true/false") for i in range(3)]
    evaluation += [record("arc_easy", i, f"answer{i + 1}", "answer1/answer2/answer3") for i in range(3)]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluation))
    return root


def grid_dict(assets, tmp_path, methods=None, seeds=(0, 1)) -> dict:
    return {
        "name": "tiny",
        "results": str(tmp_path / "results"),
        "docs": str(tmp_path / "docs"),
        "runs_dir": str(tmp_path / "runs"),
        "seeds": list(seeds),
        "threads": 1,
        "train": {
            "model": str(assets / "model"),
            "data": str(assets / "train.jsonl"),
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "lora_r": 2,
            "lora_alpha": 4,
            "gast_k": 2,
            "gast_support_size": 2,
            "use_cpu": True,
            "disable_tqdm": True,
        },
        "eval": {"data": str(assets / "eval.jsonl"), "batch_size": 4},
        "methods": methods or ["lora", {"name": "gast-random", "method": "gast", "gast_selection": "random"}],
    }


# ---- the grid ------------------------------------------------------------------------------------


def test_grid_entries_and_settings():
    grid = grid_from_dict(
        {
            "seeds": [3, 4],
            "train": {"max_steps": 7, "gast_selection": "softmax"},
            "methods": ["lora", {"name": "gast-topk", "method": "gast", "gast_selection": "topk"}],
        }
    )
    assert [r.run_id for r in grid.runs()] == [
        "lora-seed3",
        "lora-seed4",
        "gast-topk-seed3",
        "gast-topk-seed4",
    ]
    settings = grid.settings(grid.runs()[2])
    assert settings["method"] == "gast" and settings["seed"] == 3 and settings["gast_selection"] == "topk"
    assert (
        settings["max_steps"] == 7 and settings["save_strategy"] == "steps" and settings["save_steps"] == 16
    )
    assert settings["output_dir"].endswith("gast-topk-seed3")
    assert grid_from_dict(grid.to_dict()).to_dict() == grid.to_dict()  # round trip (subprocess hand-over)


def test_an_entry_with_its_own_seeds_runs_only_those():
    grid = grid_from_dict(
        {
            "seeds": [0, 1, 2, 3],
            "methods": ["lora", {"name": "lora-lr", "method": "lora", "seeds": [1, 3, 9]}],
        }
    )
    assert [r.run_id for r in grid.runs()] == [
        *(f"lora-seed{s}" for s in range(4)),
        "lora-lr-seed1",
        "lora-lr-seed3",
    ]
    assert grid_from_dict(grid.to_dict()).runs() == grid.runs()  # the subprocess hand-over keeps them
    assert "seeds" not in grid.settings(grid.runs()[-1])  # not a training setting
    narrowed = grid.to_dict() | {"seeds": [2, 3]}  # what --seeds 2,3 does
    assert [r.run_id for r in grid_from_dict(narrowed).runs()] == [
        "lora-seed2",
        "lora-seed3",
        "lora-lr-seed3",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"methods": []}, "no methods"),
        ({"methods": [{"name": "x", "method": "lora", "seeds": "0"}]}, "seeds must be a list of integers"),
        ({"methods": ["lora", "lora"]}, "unique"),
        (
            {"methods": [{"name": "x", "method": "gast", "gast_selction": "topk"}]},
            "did you mean gast_selection",
        ),
        ({"methods": ["lora"], "train": {"seed": 3}}, "set by the runner"),
        ({"methods": ["lora"], "seeds": ["a"]}, "integers"),
        ({"methods": ["lora"], "eval": {"protocol": "vibes"}}, "loglik or generate"),
        ({"methods": ["lora"], "colour": "red"}, "unknown grid key"),
        ({"methods": ["../lora"]}, "file name"),
    ],
)
def test_bad_grids_are_rejected(data, message):
    with pytest.raises(GastuneError, match=message):
        grid_from_dict(data)


# ---- running ---------------------------------------------------------------------------------------


def test_one_result_file_per_run_and_resume(assets, tmp_path, monkeypatch):
    grid = grid_from_dict(grid_dict(assets, tmp_path))
    first = run_grid(grid, isolate=False, max_runs=3)  # a piece of the grid
    assert first.done == ["lora-seed0", "lora-seed1", "gast-random-seed0"] and first.pending == [
        "gast-random-seed1"
    ]
    files = sorted(p.name for p in (tmp_path / "results").glob("*.json"))
    assert files == ["gast-random-seed0.json", "lora-seed0.json", "lora-seed1.json"]

    calls = []
    real = runner_module.run_one
    monkeypatch.setattr(runner_module, "run_one", lambda g, r: calls.append(r.run_id) or real(g, r))
    second = run_grid(grid, isolate=False)  # resume: only the missing run trains
    assert calls == ["gast-random-seed1"] and len(second.skipped) == 3 and not second.failed
    assert run_grid(grid, isolate=False).skipped == [r.run_id for r in grid.runs()]
    assert calls == ["gast-random-seed1"]

    lora = json.loads((tmp_path / "results" / "lora-seed0.json").read_text())
    gast = json.loads((tmp_path / "results" / "gast-random-seed1.json").read_text())
    assert lora["name"] == "lora" and lora["method"] == "lora" and lora["seed"] == 0
    assert gast["method"] == "gast" and gast["settings"]["gast_selection"] == "random"
    train = lora["train"]
    assert train["steps"] == 2 and [p["step"] for p in train["loss_curve"]] == [1, 2]
    assert train["seconds_per_step"] > 0 and len(train["step_times_s"]) == 2 and train["peak_rss_bytes"] > 0
    assert lora["eval"]["settings"]["n"] == 6 and set(lora["eval"]["results"]["tasks"]) == {
        "boolq",
        "arc_easy",
    }
    assert lora["git"]["commit"] and lora["machine"]["device"] == "cpu" and lora["date"]
    assert len(lora["eval"]["predicted"]) == 6 and sum(lora["eval"]["correct"]) == sum(
        s["correct"] for s in lora["eval"]["results"]["tasks"].values()
    )
    assert lora["selection"] is None
    nll = lora["eval"]["nll"]  # the gold response's NLL, one per question, in the sample's order
    assert len(nll["nll"]) == len(nll["tokens"]) == 6 and all(v > 0 for v in nll["nll"])
    assert nll["mean"] == pytest.approx(sum(v / n for v, n in zip(nll["nll"], nll["tokens"])) / 6)
    frequency = torch.tensor(gast["selection"]["frequency"])
    assert frequency.shape == (4, len(gast["selection"]["groups"])) and gast["selection"]["masks"] == 2
    assert ((frequency >= 0) & (frequency <= 1)).all()
    # Seeds matter (adapter init, data order, draws); the same seed reproduces exactly.
    assert (
        lora["train"]["loss_curve"]
        != json.loads((tmp_path / "results" / "lora-seed1.json").read_text())["train"]["loss_curve"]
    )


def test_failed_run_does_not_stop_the_grid(assets, tmp_path):
    data = grid_dict(assets, tmp_path, seeds=[0])
    data["methods"] = ["lora", "dora"]
    data["train"]["target_modules"] = "no_such_module"  # every run fails inside train()
    outcome = run_grid(grid_from_dict(data), isolate=False)
    assert outcome.failed == ["lora-seed0", "dora-seed0"] and not outcome.done
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").glob("*.json"))


def test_isolated_run_in_a_subprocess(assets, tmp_path):
    grid = grid_from_dict(grid_dict(assets, tmp_path, methods=["lora"], seeds=[0]))
    outcome = run_grid(grid, isolate=True)
    assert outcome.done == ["lora-seed0"]
    result = json.loads((tmp_path / "results" / "lora-seed0.json").read_text())
    assert result["train"]["peak_rss_since"] == "train_begin" and result["machine"]["torch_threads"] == 1
    # The run file names the command that started the grid, not the subprocess's "python -c".
    assert result["command"] == command_line() and " -c " not in result["command"]


# ---- the report ------------------------------------------------------------------------------------


def fake_run(
    name: str, seed: int, accuracy: dict[str, float], seconds: float, memory: float, selection=None
) -> dict:
    tasks = {t: {"n": 10, "correct": round(10 * a), "accuracy": a} for t, a in accuracy.items()}
    return {
        "kind": runner_module.RESULT_KIND,
        "name": name,
        "method": name.split("-")[0],
        "seed": seed,
        "settings": {"model": "tiny", "max_steps": 10, "per_task": 4},
        "train": {
            "loss_curve": [{"step": s, "loss": 2.0 - 0.1 * s + 0.01 * seed} for s in (1, 2, 3)],
            "train_loss": 1.8,
            "seconds_per_step": seconds,
            "peak_rss_bytes": memory,
            "peak_cuda_bytes": None,
        },
        "eval": {
            "settings": {
                "n": 20,
                "split": "validation",
                "data": "x",
                "per_task": 10,
                "seed": 1,
                "protocol": "loglik",
                "num_beams": 1,
            },
            "results": {"tasks": tasks, "average": sum(accuracy.values()) / len(accuracy)},
        },
        "selection": selection,
        "git": {"commit": "abcdef1234", "dirty": False},
        "machine": {"device_name": "CPU (2 cores)"},
        "date": f"2025-01-0{seed + 1}T00:00:00+00:00",
    }


@pytest.fixture
def results_dir(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    selection = {"frequency": [[1.0, 0.5], [0.0, 0.5], [0.5, 0.25]], "masks": 4, "first_step": 1, "last_step": 4,
                 "groups": ["model.layers.0", "model.layers.1"]}  # fmt: skip
    runs = [
        fake_run("lora", 0, {"boolq": 0.5, "piqa": 0.6}, seconds=2.0, memory=2 * 2**30),
        fake_run("lora", 1, {"boolq": 0.6, "piqa": 0.8}, seconds=4.0, memory=2 * 2**30),
        fake_run("gast", 0, {"boolq": 0.7, "piqa": 0.9}, seconds=4.5, memory=3 * 2**30, selection=selection),
        fake_run("gast", 1, {"boolq": 0.9, "piqa": 0.9}, seconds=4.5, memory=3 * 2**30, selection=selection),
        fake_run("gast", 2, {"boolq": 0.8, "piqa": 0.6}, seconds=4.5, memory=3 * 2**30, selection=selection),
    ]
    for r in runs:
        (folder / f"{r['name']}-seed{r['seed']}.json").write_text(json.dumps(r))
    (folder / "notes.json").write_text(json.dumps({"something": "else"}))  # not a run: ignored
    return folder


def test_mean_and_std_over_seeds(results_dir):
    summary = summarize(load_runs(results_dir))
    assert list(summary) == ["lora", "gast"]  # the reference first
    lora, gast = summary["lora"], summary["gast"]
    assert lora["seeds"] == [0, 1] and gast["seeds"] == [0, 1, 2]
    assert lora["tasks"]["boolq"]["mean"] == pytest.approx(0.55)
    assert lora["tasks"]["boolq"]["std"] == pytest.approx(0.0707107, abs=1e-6)  # sample std: |a-b|/sqrt(2)
    assert gast["tasks"]["boolq"]["mean"] == pytest.approx(0.8) and gast["tasks"]["boolq"][
        "std"
    ] == pytest.approx(0.1)
    assert gast["tasks"]["piqa"]["std"] == pytest.approx(0.1732051, abs=1e-6)
    assert gast["average"]["mean"] == pytest.approx((0.8 + 0.9 + 0.7) / 3)  # mean of per-seed averages
    assert gast["time_ratio"] == pytest.approx(4.5 / 3.0) and gast["memory_ratio"] == pytest.approx(1.5)
    assert lora["time_ratio"] == 1.0
    rows = cells(format_summary_table(summary))
    assert rows["method"] == [
        "method",
        "seeds",
        "boolq",
        "piqa",
        "average",
        "s/step",
        "× LoRA",
        "peak GiB",
        "× LoRA",
    ]
    assert rows["lora"] == [
        "lora",
        "2",
        "55.0 ± 7.1",
        "70.0 ± 14.1",
        "62.5 ± 10.6",
        "3.00",
        "1.00",
        "2.00",
        "1.00",
    ]
    assert rows["gast"] == [
        "gast",
        "3",
        "80.0 ± 10.0",
        "80.0 ± 17.3",
        "80.0 ± 10.0",
        "4.50",
        "1.50",
        "3.00",
        "1.50",
    ]
    one_seed = summarize([r for r in load_runs(results_dir) if r["seed"] == 0])
    assert one_seed["gast"]["tasks"]["boolq"]["std"] is None
    assert cells(format_summary_table(one_seed))["gast"][:5] == ["gast", "1", "70.0", "90.0", "80.0"]


def cells(table: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell (the rule line dropped)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return {r[0]: r for r in rows if not r[0].startswith("-")}


def test_report_writes_table_summary_and_pngs(results_dir, tmp_path):
    paths = build_report(results_dir, tmp_path / "docs", order=["gast", "lora"])
    for key in ("loss_curves", "accuracy", "selection_heatmap"):
        assert paths[key].read_bytes()[:8] == PNG and paths[key].stat().st_size > 1000
    table = paths["table"].read_text()
    assert table.index("| gast") < table.index("| lora")  # the grid's order
    assert "commits abcdef12" in table and "max_steps 10" in table and "![accuracy](accuracy.png)" in table
    assert "protocol loglik, format mc, rule sum" in table  # runs from before eval.format existed
    summary = json.loads(paths["summary"].read_text())
    assert summary["summary"]["gast"]["average"]["n"] == 3 and summary["report"]["git"]
    # gast > lora, paired on the seeds both have (0, 1): 0.8-0.55 and 0.9-0.7 points
    (pair,) = summary["orderings"]
    assert (pair["a"], pair["b"], pair["seeds"], pair["wins"]) == ("gast", "lora", [0, 1], 2)
    assert pair["differences"] == pytest.approx([0.25, 0.2]) and pair["mean"] == pytest.approx(0.225)
    assert "| gast > lora | 2 | +25.0, +20.0 | +22.5 ± 3.5 | 2 of 2 |" in table


def test_report_with_nll_has_a_column_and_paired_intervals(results_dir, tmp_path):
    # Give every run a per-question NLL (gast 0.1 nats/token below lora on each of 20 questions).
    for path in results_dir.glob("*-seed*.json"):
        run = json.loads(path.read_text())
        shift = -0.1 if run["name"] == "gast" else 0.0
        per_token = [1.0 + 0.05 * q + shift + 0.001 * run["seed"] for q in range(20)]
        run["eval"]["nll"] = {
            "mean": sum(per_token) / 20,
            "nll": [2 * v for v in per_token],
            "tokens": [2] * 20,
        }
        run["eval"]["correct"] = [q < 10 + 5 * (run["name"] == "gast") for q in range(20)]
        path.write_text(json.dumps(run))
    paths = build_report(results_dir, tmp_path / "docs")
    table = cells(paths["table"].read_text())
    assert table["method"][2] == "NLL" and table["lora"][2] == "1.4755 ± 0.0007"
    summary = json.loads(paths["summary"].read_text())
    nll, accuracy = summary["comparisons"]
    assert (nll["a"], nll["b"], nll["metric"], nll["seeds"]) == ("gast", "lora", "nll", [0, 1])
    assert nll["mean"] == pytest.approx(-0.1) and nll["resolved"] and nll["better"] == "gast"
    assert accuracy["mean"] == pytest.approx(0.25) and accuracy["better"] == "gast"
    assert "| gast − lora | nll (nats/token) | 2 | 20 |" in paths["table"].read_text()


def test_paired_differences_match_a_direct_count():
    from gastune.experiments.summary import PAPER_ORDERINGS, paired_differences

    values = {("gast", 0): 0.50, ("gast", 1): 0.40, ("ist", 0): 0.45, ("ist", 1): 0.45, ("ist", 2): 0.3,
              ("lora", 1): 0.41, ("gast-random", 0): 0.5}  # fmt: skip
    runs = [{"name": n, "seed": s, "eval": {"results": {"average": v}}} for (n, s), v in values.items()]
    pairs = {(p["a"], p["b"]): p for p in paired_differences(runs)}
    # gast-random vs gast-topk has no topk run; ist vs lora and gast vs lora share seed 1 only
    assert set(pairs) == {("gast", "ist"), ("ist", "lora"), ("gast", "lora"), ("gast", "gast-random")}
    assert set(pairs) < set(PAPER_ORDERINGS)
    assert pairs[("gast", "ist")]["differences"] == pytest.approx([0.05, -0.05])
    assert pairs[("gast", "ist")]["wins"] == 1 and pairs[("gast", "ist")]["mean"] == pytest.approx(0.0)
    assert pairs[("ist", "lora")]["seeds"] == [1] and pairs[("ist", "lora")]["std"] is None
    assert pairs[("gast", "gast-random")]["wins"] == 0  # a tie is not a win


def test_cli_bench_runs_reports_and_rebuilds(assets, tmp_path, capsys, caplog):
    import yaml

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_dict(assets, tmp_path, methods=["lora", "gast"], seeds=[0])))
    argv = ["bench", "--config", str(config), "--in-process"]
    generate = ["--eval-set", "protocol=generate", "--eval-set", "max_new_tokens=2"]
    assert main([*argv, "--methods", "gast", "--set", "max_steps=1", *generate]) == 0
    out = capsys.readouterr().out
    assert "runs done now 1" in out and "| gast" in out and "| lora" not in out
    result = json.loads((tmp_path / "results" / "gast-seed0.json").read_text())
    assert result["settings"]["max_steps"] == 1 and result["eval"]["settings"]["protocol"] == "generate"
    assert result["eval"]["results"]["rule"] == "greedy"
    # Listed against the settings that made it, the run is done; against the grid as written
    # (other max_steps and protocol) its file is stale, and the listing says so.
    assert main([*argv, "--methods", "gast", "--set", "max_steps=1", *generate, "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"gast-seed0\s+done ", listing) and "stale" not in listing
    assert main(["bench", "--config", str(config), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"gast-seed0\s+stale ", listing) and re.search(r"lora-seed0\s+to do ", listing)
    assert "1 run file(s) stale" in listing
    # Running the grid as written keeps the stale file (hours of work are not silently
    # redone or overwritten) and warns about it.
    before = (tmp_path / "results" / "gast-seed0.json").read_bytes()
    assert main([*argv, "--methods", "gast"]) == 0
    assert "already done 1" in capsys.readouterr().out
    assert "other settings than the grid's now" in caplog.text
    assert (tmp_path / "results" / "gast-seed0.json").read_bytes() == before
    (tmp_path / "docs" / "accuracy.png").unlink()
    report = [
        "bench",
        "--report-only",
        "--results",
        str(tmp_path / "results"),
        "--docs",
        str(tmp_path / "docs"),
    ]
    assert main(report) == 0
    assert (tmp_path / "docs" / "accuracy.png").read_bytes()[:8] == PNG
    assert (tmp_path / "docs" / "selection_heatmap.png").is_file()
    assert main([*argv, "--methods", "nope"]) == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": "cloze"}, "eval.format must be mc or rc"),
        ({"rule": "max"}, "eval.rule must be sum or mean"),
        ({"format": "rc", "protocol": "generate"}, "needs eval.protocol loglik"),
    ],
)
def test_bad_eval_format_and_rule_are_refused(fields, message):
    from gastune.experiments.grid import EvalSpec

    with pytest.raises(GastuneError, match=message):
        EvalSpec(**fields)
    assert EvalSpec(format="rc", rule="mean").format == "rc"


def _bench_args(config, **flags):
    from argparse import Namespace

    base = dict(config=str(config), methods=None, seeds=None, set=[], eval_set=[], docs=None, threads=None)
    return Namespace(**{**base, "results": None, "runs_dir": None, **flags})


def test_results_elsewhere_get_run_folders_of_their_own(tmp_path):
    # A quick check writing its results elsewhere must not use the grid's run folders: it
    # would delete a real run's checkpoints there as "other settings", or write into a run
    # in progress.
    from gastune.cli.bench_cmd import build_grid

    config = tmp_path / "grid.yaml"
    config.write_text(
        f"methods: [lora]\nresults: {tmp_path}/results\nruns_dir: {tmp_path}/runs\ntrain: {{model: tiny}}\n"
    )
    assert build_grid(_bench_args(config)).runs_dir == f"{tmp_path}/runs"
    same = build_grid(_bench_args(config, results=f"{tmp_path}/results/"))
    assert same.runs_dir == f"{tmp_path}/runs"  # the grid's own results: its own run folders
    quick = build_grid(_bench_args(config, results=str(tmp_path / "quick")))
    other = build_grid(_bench_args(config, results=str(tmp_path / "other")))
    assert quick.runs_dir.startswith(f"{tmp_path}/runs-") and len({quick.runs_dir, other.runs_dir}) == 2
    assert build_grid(_bench_args(config, results=str(tmp_path / "quick"))).runs_dir == quick.runs_dir
    explicit = build_grid(_bench_args(config, results=str(tmp_path / "quick"), runs_dir=str(tmp_path / "x")))
    assert explicit.runs_dir == str(tmp_path / "x")
