"""The DeepSpeed ZeRO-2 and FSDP2 recipes of docs/distributed.md, run on 2 CPU processes (gloo)
through the real CLI and compared with the data-parallel recipe (configs/accelerate/ddp_cpu.yaml,
tests/unit/test_distributed_recipes.py) on the same tiny model, data and seed.

- ZeRO-2: the shipped configs/accelerate/deepspeed_zero2.yaml (launched from the repository root,
  its JSON path is relative) plus ``--use_cpu true``; DeepSpeed picks its CPU accelerator. Needs
  the ``deepspeed`` extra (``make test-integration`` installs it). The first launch on a machine
  compiles DeepSpeed's shared-memory comm op (a few minutes on one core; cached in
  ~/.cache/torch_extensions).
- FSDP2: configs/fsdp/fsdp2_lora.yaml. accelerate has no CPU FSDP, so tests/integration/
  _engine_probe.py switches accelerate's state to FSDP on gloo (see its docstring): the model is
  really wrapped with FSDP2 (DTensor parameters).

Every run goes through _engine_probe.py, which records how each rank's model was wrapped and its
trained parameters. Run with ``make test-integration`` (``pytest -m integration``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import POISON_WORDS, REPO, accelerate_launch, recipe_data, recipe_train_args
from tests.unit._model_folder import save_tiny_llama

pytestmark = pytest.mark.integration

PROBE = Path(__file__).with_name("_engine_probe.py")
DDP = REPO / "configs/accelerate/ddp_cpu.yaml"
ZERO2 = REPO / "configs/accelerate/deepspeed_zero2.yaml"
FSDP2 = REPO / "configs/fsdp/fsdp2_lora.yaml"
# Generous: the first DeepSpeed launch on a machine compiles its comm op (~2.5 min on one core).
TIMEOUT = 900

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (make test-integration installs it: pip install wheel setuptools, "
    "then pip install -c constraints.txt --no-build-isolation '.[deepspeed]')",
)

# Plain SGD at a constant lr: parameters after 2 steps are a direct function of the gradients.
# Clipping at 0.1 is active (gradient norms are ~0.2), so the engine's global norm is tested too.
SGD = [
    *("--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant"),
    *("--max_grad_norm", "0.1"),
]
# The realistic set-up: AdamW with warm-up and weight decay, 2 micro-batches per step (2 epochs
# of the 16 records), two records with a NaN loss, a checkpoint at every step.
ADAMW = [
    *("--optim", "adamw_torch", "--learning_rate", "1e-2", "--warmup_steps", "1", "--weight_decay", "0.01"),
    *("--gradient_accumulation_steps", "2", "--save_steps", "1"),
]


@dataclass
class Run:
    code: int
    log: str
    out: Path
    probe: Path

    def ok(self) -> Run:
        assert self.code == 0, self.log[-8000:]
        return self

    def engine(self, rank: int) -> dict:
        return json.loads((self.probe / f"engine_rank{rank}.json").read_text())

    def params(self, rank: int = 0) -> dict[str, torch.Tensor]:
        return torch.load(self.probe / f"params_rank{rank}.pt")

    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(self.out / "adapter_model.safetensors")


class Launcher:
    """Launches recipe runs in one folder; the DDP references are run once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.clean = save_tiny_llama(root / "model")
        self.poisoned = save_tiny_llama(root / "model-poisoned", poison_words=POISON_WORDS)
        self.data = recipe_data(root / "data.jsonl")
        self.poisoned_data = recipe_data(root / "data-poisoned.jsonl", poison=True)
        self.cache: dict[tuple, Run] = {}

    def __call__(
        self, name: str, config: Path, method: str, extra: list[str], poison=False, cpu_fsdp=False
    ) -> Run:
        out = self.root / name
        model, data = (self.poisoned, self.poisoned_data) if poison else (self.clean, self.data)
        env = {"GASTUNE_PROBE_DIR": str(self.root / f"{name}-probe")}
        if cpu_fsdp:
            env["GASTUNE_TEST_CPU_FSDP"] = "1"
        args = [*recipe_train_args(model, data, out, method=method), "--logging_steps", "1", *extra]
        # From the repository root: the ZeRO-2 config names its JSON by a relative path.
        code, log = accelerate_launch(config, [str(PROBE)], args, cwd=REPO, timeout=TIMEOUT, env=env)
        return Run(code, log, out, self.root / f"{name}-probe")

    def ddp(self, method: str, extra: list[str], poison=False) -> Run:
        key = (method, tuple(extra), poison)
        if key not in self.cache:
            name = f"ddp-{method}-{len(self.cache)}"
            self.cache[key] = self(name, DDP, method, extra, poison=poison).ok()
            engine = self.cache[key].engine(0)
            assert engine["wrapper"] == "DistributedDataParallel" and engine["backend"] == "gloo"
        return self.cache[key]


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Launcher:
    return Launcher(tmp_path_factory.mktemp("engines"))


def assert_same(actual: dict, expected: dict, what: str, atol: float) -> float:
    """Same tensor names; max |difference| within ``atol``. Returns the max difference."""
    assert sorted(actual) == sorted(expected), what
    diff = max((actual[k] - expected[k]).abs().max().item() for k in expected)
    assert diff <= atol, f"{what}: max |difference| {diff:.3g} > {atol:.3g}"
    return diff


def assert_trained_like(run: Run, reference: Run, method: str, atol: float) -> None:
    """Both ranks hold the same parameters, equal to the reference's; both adapters match."""
    params = run.params(0)
    assert_same(run.params(1), params, "rank 1 vs rank 0", atol=0.0)
    assert all(torch.isfinite(t).all() for t in params.values())
    moved = [k for k in params if "lora_B" in k]
    assert moved and all(params[k].abs().sum() > 0 for k in moved), "LoRA B starts at zero and must move"
    diff = assert_same(params, reference.params(0), "parameters vs the DDP recipe", atol)
    assert_same(run.adapter(), reference.adapter(), "saved adapter vs the DDP recipe", atol)
    assert run.log.count(f"saved the {method} adapter") == 1, run.log[-4000:]
    print(f"max |parameter difference| vs DDP: {diff:.3g}")


# ------------------------------------------------------------ DeepSpeed ZeRO-2
def assert_zero2(run: Run, optimizer: str) -> None:
    for rank in (0, 1):
        engine = run.engine(rank)
        assert engine["wrapper"] == "DeepSpeedEngine" and engine["deepspeed"], engine
        assert engine["distributed_type"] == "DEEPSPEED" and engine["backend"] == "gloo", engine
        assert engine["zero_stage"] == 2 and engine["zero_optimizer"] == "DeepSpeedZeroOptimizer", engine
        # every parameter group's optimizer state and gradients are split over the 2 ranks
        assert set(engine["zero_partition_count"]) == {2}, engine
        assert engine["base_optimizer"] == optimizer and engine["dtensor_params"] == 0, engine


@needs_deepspeed
@pytest.mark.parametrize("method", ["lora", "gast"])
def test_zero2_recipe_trains_like_data_parallel(method, launch):
    """SGD: ZeRO-2's partitioned gradients and optimizer step give the DDP recipe's parameters."""
    run = launch(f"zero2-{method}", ZERO2, method, SGD).ok()
    assert_zero2(run, "SGD")
    assert_trained_like(run, launch.ddp(method, SGD), method, atol=1e-6)


@needs_deepspeed
def test_zero2_gast_adamw_grad_accumulation_nan_records_and_resume(launch):
    """GAST with AdamW, gradient accumulation and two NaN-loss records under ZeRO-2 equals the
    DDP recipe; resuming from ZeRO-2's step-1 checkpoint reproduces the uninterrupted run."""
    run = launch("zero2-gast-adamw", ZERO2, "gast", ADAMW, poison=True).ok()
    assert_zero2(run, "AdamW")
    # each poisoned record is met once per epoch, by its rank, and dropped there
    dropped = re.findall(r"dropped (\d+) of \d+ samples with a non-finite loss", run.log)
    assert sum(map(int, dropped)) == 4, run.log[-4000:]
    assert_trained_like(run, launch.ddp("gast", ADAMW, poison=True), "gast", atol=1e-6)

    ckpt = run.out / "checkpoint-1"
    assert (ckpt / "latest").is_file() and (ckpt / "gastune_method_state_1.pt").is_file()
    resumed = launch(
        "zero2-gast-adamw-resumed",
        ZERO2,
        "gast",
        [*ADAMW, "--resume_from_checkpoint", str(ckpt)],
        poison=True,
    ).ok()
    assert_same(resumed.params(0), run.params(0), "resumed vs uninterrupted", atol=0.0)
    assert_same(resumed.adapter(), run.adapter(), "resumed vs uninterrupted adapter", atol=0.0)


# ------------------------------------------------------------ FSDP2 (CPU, via the probe's switch)
def cli_errors(log: str) -> list[str]:
    """The start of each ``gastune train: error:`` message: the ranks' stderr lines reach the
    launcher's log interleaved, so one rank's message may run into the next on the same line."""
    return re.findall(r"gastune train: error: ([^;]*?)(?:;|$)", log, flags=re.MULTILINE)


def test_fsdp2_lora_recipe_shards_saves_the_adapter_and_trains_like_data_parallel(launch):
    run = launch("fsdp2-lora", FSDP2, "lora", SGD, cpu_fsdp=True).ok()
    assert run.log.count("[cpu-fsdp] MULTI_CPU -> FSDP (fsdp_version=2)") == 2
    for rank in (0, 1):
        engine = run.engine(rank)
        assert engine["fsdp"] and engine["distributed_type"] == "FSDP" and engine["backend"] == "gloo"
        assert engine["fsdp_version"] == 2 and "FULL_STATE_DICT" in engine["fsdp_state_dict_type"]
        # fully_shard per decoder layer (from _no_split_modules) and at the root: every parameter
        # is a DTensor shard
        assert "FSDPLlamaDecoderLayer" in engine["fsdp_modules"], engine
        assert engine["dtensor_params"] == engine["params"] > 0, engine
    assert_trained_like(run, launch.ddp("lora", SGD), "lora", atol=1e-6)


def test_fsdp2_with_a_sharded_state_dict_fails_instead_of_claiming_a_saved_adapter(launch):
    """The shipped config used SHARDED_STATE_DICT, with which save_model writes no adapter: the
    CLI said it saved one. It now exits with one error line (rank 0 checks)."""
    config = yaml.safe_load(FSDP2.read_text())
    config["fsdp_config"]["fsdp_state_dict_type"] = "SHARDED_STATE_DICT"
    sharded = launch.root / "fsdp2_sharded.yaml"
    sharded.write_text(yaml.safe_dump(config))
    run = launch("fsdp2-sharded", sharded, "lora", SGD, cpu_fsdp=True)
    assert run.code != 0
    errors = cli_errors(run.log)
    assert len(errors) == 1 and "no adapter was written to" in errors[0], run.log[-4000:]
    assert "saved the lora adapter" not in run.log
    assert not (run.out / "adapter_model.safetensors").exists()


def test_fsdp2_refuses_a_4bit_base_with_one_error_line_per_rank(launch):
    """Sparse methods train under FSDP2 (tests/integration/test_fsdp2_methods.py); a bitsandbytes
    base under FSDP2 is refused."""
    pytest.importorskip("bitsandbytes")
    run = launch("fsdp2-qlora", FSDP2, "gast", [*SGD, "--load_in_4bit", "true"], cpu_fsdp=True)
    assert run.code != 0
    errors = cli_errors(run.log)
    expected = "a 4-bit/8-bit (bitsandbytes) base is not supported under FSDP2"
    assert errors == [expected] * 2, run.log[-4000:]
    # no traceback through our code (the launcher prints its own, through torch.distributed)
    assert not re.search(r'File "[^"]*/gastune/[^"]*\.py"', run.log), run.log[-4000:]
    assert not (run.out / "adapter_model.safetensors").exists()
