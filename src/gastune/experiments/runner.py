"""Run a grid: train and evaluate each (method, seed), one result file per run, resumable.

Each run trains through ``gastune.training.run.train`` and is scored on the grid's fixed
validation sample; its result file (``<results>/<name>-seed<k>.json``, written atomically)
holds the train loss curve, time per step, peak memory, per-task accuracy, the held-out NLL
of each question's gold response (``gastune.eval.nll``), GAST's selection frequency when the
method has one, the run's settings and provenance. A run whose file
exists is skipped, so a long grid can be run in pieces (``max_runs``) and resumed after an
interruption; a run interrupted in training resumes from its last checkpoint
(``gastune.experiments.resume``). By default each run is a fresh subprocess, so that its peak memory is its own
and a crash loses one run, not the grid.

Example:
    >>> grid = load_grid("benchmarks/commonsense_grid.yaml")  # doctest: +SKIP
    >>> outcome = run_grid(grid, max_runs=2)  # doctest: +SKIP
    >>> outcome.done, outcome.skipped, outcome.failed  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gastune.errors import GastuneError
from gastune.experiments.grid import Grid, RunSpec, build_configs, grid_from_dict
from gastune.experiments.resume import clear_checkpoints, plan_run_dir
from gastune.provenance import command_line, provenance, write_json

logger = logging.getLogger(__name__)

RESULT_KIND = "gastune-experiment-run"


# ---- memory and time ---------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux ``clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset (``VmHWM``), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _larger(a: int | None, b: int | None) -> int | None:
    """The larger of two peaks, either of which may be unknown (None)."""
    return b if a is None else a if b is None else max(a, b)


def _meter(saved: dict[str, Any] | None = None):
    """A Trainer callback timing each optimizer step and reading peak memory at the end.

    Its state (every step's time, the training wall clock and the summed train loss up to
    the step) is saved in each checkpoint's ``trainer_state.json`` (``ExportableState``), so a
    resumed run (``saved``: that state) still reports every step. It has the Trainer log at
    each checkpoint step, so that the summed loss covers exactly the steps saved.
    """
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    def cuda_peak() -> int | None:
        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    class BenchMeter(TrainerCallback, ExportableState):
        def __init__(self):
            earlier = saved or {}
            self.step_times: list[float] = list(earlier.get("step_times", []))
            self.wall_before = float(earlier.get("wall_s", 0.0))  # earlier segments' training
            self.loss_sum = float(earlier.get("loss_sum", 0.0))  # Σ per-step train loss so far
            self.segments: list[dict] = list(earlier.get("segments", []))
            self.first_step = len(self.step_times)
            self.logged_step = self.first_step
            # Peak memory is the largest of the segments': a resumed run that has nothing left
            # to train (stopped after its last checkpoint) still reports the earlier ones'.
            self.peak_rss: int | None = earlier.get("peak_rss")
            self.peak_cuda: int | None = earlier.get("peak_cuda")
            self.rss_reset = False
            self._begin = time.perf_counter()

        def state(self) -> dict:
            step = len(self.step_times)
            now = time.perf_counter() - self._begin
            segment = {"from_step": self.first_step, "to_step": step, "seconds": now}
            return {
                "args": {},
                "attributes": {
                    "step_times": self.step_times,
                    "wall_s": self.wall_before + now,
                    "loss_sum": self.loss_sum,
                    "segments": [*self.segments, segment],
                    "peak_rss": _larger(self.peak_rss, peak_rss_bytes()),
                    "peak_cuda": _larger(self.peak_cuda, cuda_peak()),
                },
            }

        def on_train_begin(self, args, state, control, **kwargs):
            # The model is loaded by now: the peak from here on is training's own.
            self.rss_reset = reset_peak_rss()
            self._begin = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.step_times.append(time.perf_counter() - self._t0)
            if control.should_save:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "learning_rate" not in logs:  # not a training step's log
                return
            if "loss" in logs:  # the mean loss of the steps since the last log
                self.loss_sum += logs["loss"] * (state.global_step - self.logged_step)
            self.logged_step = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            self.peak_rss = _larger(self.peak_rss, peak_rss_bytes())
            self.peak_cuda = _larger(self.peak_cuda, cuda_peak())

    return BenchMeter()


# ---- one run -------------------------------------------------------------------------------------


def settings_hash(settings: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """A short fingerprint of what a run did, to notice results from different settings."""
    text = json.dumps({"train": settings, "eval": evaluation}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_hash(grid: Grid, run: RunSpec) -> str:
    """The fingerprint ``run``'s file carries when the grid as written now produced it."""
    return settings_hash(grid.settings(run), grid.to_dict()["eval"])


def _eval_records(grid: Grid) -> list[dict]:
    spec = grid.eval
    if spec.data == "commonsense":
        from gastune.data.commonsense import load_commonsense

        return load_commonsense(
            spec.split, tasks=spec.tasks, per_task=spec.per_task, seed=spec.seed, prompt_format=spec.format
        )
    path = Path(spec.data)
    try:
        text = path.read_text()
        records = (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except (OSError, ValueError) as exc:
        raise GastuneError(f"cannot read evaluation records from '{path}': {exc}") from exc
    if spec.tasks:
        records = [r for r in records if r.get("task") in spec.tasks]
    return records


def _evaluate(grid: Grid, model, tokenizer, records: list[dict]):
    """``(result, gold NLL)``: under loglik both from one pass (the gold response is scored on
    its prompt's cached prefix, ``evaluate_commonsense_and_nll``), else a separate NLL pass."""
    spec = grid.eval
    if spec.protocol == "generate":
        from gastune.eval import evaluate_commonsense_generation
        from gastune.eval.nll import gold_response_nll

        result = evaluate_commonsense_generation(
            model, tokenizer, records, spec.max_new_tokens, spec.num_beams, spec.batch_size, progress=False
        )
        return result, gold_response_nll(model, tokenizer, records, batch_size=spec.batch_size)
    from gastune.eval.loglik import evaluate_commonsense_and_nll

    return evaluate_commonsense_and_nll(
        model,
        tokenizer,
        records,
        batch_size=spec.batch_size,
        progress=False,
        rule=spec.rule,
        prompt_format=spec.format,
    )


def _selection(method) -> dict[str, Any] | None:
    """GAST's data × layer selection frequency over the kept masks (for the heatmap)."""
    from gastune.methods import GastMethod
    from gastune.viz import selection_frequency

    if not isinstance(method, GastMethod) or not method.masks:
        return None
    return {
        "frequency": selection_frequency(method.masks).tolist(),  # (N, L)
        "masks": len(method.masks),
        "first_step": method.masks[0][0],
        "last_step": method.masks[-1][0],
        "groups": [g.name for g in method.engine.groups] if method.engine is not None else None,
    }


def run_one(grid: Grid, run: RunSpec) -> dict[str, Any]:
    """Train and evaluate one run in this process; write and return its result document."""
    import torch
    from transformers import set_seed

    from gastune.training.run import train

    if grid.threads:
        torch.set_num_threads(grid.threads)
    settings = grid.settings(run)
    model_cfg, data_cfg, config = build_configs(settings)
    records = _eval_records(grid)  # before training: a bad eval file fails in seconds
    # A run being (re)run has no result: its folder holds an interrupted attempt, resumed
    # from its last checkpoint if that was made with these settings, else cleared.
    plan = plan_run_dir(config.output_dir, settings)
    config.resume_from_checkpoint = plan.checkpoint
    config.overwrite_output_dir = plan.checkpoint is None
    # train() builds the adapter before the Trainer seeds: seed here so that the adapter's
    # initialisation, too, is the run's seed (and independent of earlier runs in the process).
    set_seed(run.seed)
    meter = _meter(plan.meter)
    start = time.perf_counter()
    trained = train(model_cfg, data_cfg, config, callbacks=[meter])
    train_seconds = time.perf_counter() - start
    state = trained.trainer.state
    steps = max(state.global_step, 1)
    train_runtime = trained.metrics.get("train_runtime", train_seconds)
    train_loss = trained.metrics.get("train_loss")
    resumed = None
    if plan.checkpoint is not None:
        # This process trained steps plan.step+1.. only: add the earlier segments' wall clock
        # (from their train begin to the checkpoint) and loss sum, as saved in the checkpoint.
        now_steps = state.global_step - plan.step
        segment = trained.metrics.get("train_runtime", 0.0) if now_steps else 0.0
        train_runtime = meter.wall_before + segment
        train_seconds = meter.wall_before + train_seconds
        before = plan.meter["loss_sum"]
        train_loss = (before + (train_loss or 0.0) * now_steps) / steps
        resumed = {
            "from_step": plan.step,
            "checkpoint": Path(plan.checkpoint).name,
            "steps_trained_now": now_steps,
            "segments": [
                *plan.meter.get("segments", []),
                {"from_step": plan.step, "to_step": state.global_step, "seconds": segment},
            ],
        }
    start = time.perf_counter()
    result, nll = _evaluate(grid, trained.model, trained.tokenizer, records)
    eval_seconds = time.perf_counter() - start
    evaluation = {**grid.to_dict()["eval"], "n": len(records)}
    document = {
        "kind": RESULT_KIND,
        "grid": grid.name,
        "name": run.name,
        "method": run.method,
        "seed": run.seed,
        "settings": settings,
        "settings_hash": run_hash(grid, run),
        "train": {
            "loss_curve": [
                {"step": e["step"], "loss": e["loss"]}
                for e in state.log_history
                if "loss" in e and "step" in e
            ],
            "train_loss": train_loss,
            "steps": state.global_step,
            "train_seconds": train_seconds,
            # All of training's wall time per step: periodic work (IST probes, GAST support
            # passes, a Fisher pre-pass, checkpoints) counts, as it does for whoever pays for
            # the run. A resumed run counts each segment up to its last checkpoint (the steps
            # after it, lost and trained again, count once) plus the last segment.
            "seconds_per_step": train_runtime / steps,
            "step_times_s": meter.step_times,
            "resumed": resumed,
            "peak_rss_bytes": meter.peak_rss,
            "peak_rss_since": "train_begin" if meter.rss_reset else "process_start",
            "peak_cuda_bytes": meter.peak_cuda,
        },
        "eval": {
            "settings": evaluation,
            "seconds": eval_seconds,
            "results": {**result.to_dict(), "predictions": []},
            # Per question, in the sample's order: enough for paired comparisons between
            # methods, at a fraction of the size of every candidate's log-probabilities.
            "predicted": [p.predicted for p in result.predictions],
            "correct": [p.correct for p in result.predictions],
            # The gold response's NLL per question (same order): the primary metric of the
            # issue-16 experiments, paired across methods question by question.
            # "seconds" covers both: the NLL is scored within the ranking's pass (nll.folded
            # questions; the rest, and all under generate, by a separate pass).
            "nll": nll.to_dict(),
        },
        "selection": _selection(trained.trainer.method),
        **provenance(str(trained.trainer.args.device)),
    }
    document["command"] = os.environ.get(GRID_COMMAND_ENV, document["command"])
    write_json(grid.result_path(run), document)
    clear_checkpoints(config.output_dir)  # the run is done: its adapter stays, not its checkpoints
    logger.info(
        "%s: average accuracy %.3f, gold NLL %.4f, %.2f s/step",
        run.run_id,
        result.average,
        nll.mean,
        document["train"]["seconds_per_step"],
    )
    return document


# ---- the grid ------------------------------------------------------------------------------------


@dataclass
class GridOutcome:
    """Run ids done now, skipped (result file present), failed, and left for a later piece."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


def check_grid(grid: Grid) -> None:
    """Build every run's configs now, so a typo fails before hours of training, not after."""
    for run in grid.runs():
        build_configs(grid.settings(run))


# A run's subprocess is "python -c ... GRID.json NAME SEED" on a temporary file, which tells a
# reader nothing; its run file names the command that started the grid instead.
GRID_COMMAND_ENV = "GASTUNE_GRID_COMMAND"


def _run_subprocess(grid: Grid, run: RunSpec) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(grid.to_dict(), handle)
    try:
        entry = "import sys; from gastune.experiments.runner import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", entry, handle.name, run.name, str(run.seed)]
        env = {**os.environ, GRID_COMMAND_ENV: os.environ.get(GRID_COMMAND_ENV, command_line())}
        done = subprocess.run(cmd, check=False, env=env)  # its output streams to ours: progress stays visible
    finally:
        os.unlink(handle.name)
    return done.returncode == 0 and grid.result_path(run).is_file()


def run_grid(grid: Grid, isolate: bool = True, max_runs: int | None = None) -> GridOutcome:
    """Run every run of ``grid`` that has no result file yet (at most ``max_runs`` of them).

    ``isolate`` runs each in a fresh Python process (own peak memory; a crash loses one
    run); ``isolate=False`` runs them here (faster to start; for tests and small grids).
    """
    check_grid(grid)
    outcome = GridOutcome()
    for run in grid.runs():
        state = run_state(grid, run)
        if state != "to do":
            outcome.skipped.append(run.run_id)
            if state == "stale":
                logger.warning(
                    "%s was produced with other settings than the grid's now: delete it to re-run",
                    grid.result_path(run),
                )
            continue
        if max_runs is not None and len(outcome.done) + len(outcome.failed) >= max_runs:
            outcome.pending.append(run.run_id)
            continue
        logger.info("run %s (%s, seed %d) ...", run.run_id, run.method, run.seed)
        try:
            ok = _run_subprocess(grid, run) if isolate else bool(run_one(grid, run))
        except Exception:  # one failed run must not end a grid of many hours
            logger.exception("run %s failed", run.run_id)
            ok = False
        (outcome.done if ok else outcome.failed).append(run.run_id)
    return outcome


def run_state(grid: Grid, run: RunSpec) -> str:
    """``"to do"`` (no run file), ``"done"``, or ``"stale"``: its file holds other settings."""
    path = grid.result_path(run)
    if not path.is_file():
        return "to do"
    # A stale file is still skipped, never silently overwritten: hours of training are the
    # user's to throw away. It is only ever reported (by run_grid and `gastune bench --dry-run`).
    try:
        found = json.loads(path.read_text()).get("settings_hash")
    except (OSError, ValueError):
        found = None
    return "done" if found == run_hash(grid, run) else "stale"


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``main([GRID.json, NAME, SEED])`` runs that one run of the grid."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    grid_file, name, seed = argv if argv is not None else sys.argv[1:]
    grid = grid_from_dict(json.loads(Path(grid_file).read_text()))
    matches = [r for r in grid.runs() if r.name == name and r.seed == int(seed)]
    if not matches:
        raise SystemExit(f"no run {name}-seed{seed} in the grid")
    run_one(grid, matches[0])
    return 0
