"""Every sparse method under FSDP2 on 2 CPU processes (gloo) equals the data-parallel run.

The launches are those of test_distributed_engines.py (its ``Launcher``: the real CLI through
_engine_probe.py, FSDP2 forced on gloo with ``GASTUNE_TEST_CPU_FSDP=1``): a tiny 2-layer Llama,
16 records, batch 4 per rank, SGD at a constant lr with clipping active, 3 optimizer steps (into
the second epoch). For each method, on each rank, the FSDP2 run chose what the DDP run chose —
the same selection masks (per-block samples for GAST, layers for IST/RST/LISA/Fisher, rows for
data selection) at every step — and both end with the same adapter (allclose).

Run with ``make test-integration`` (``pytest -m integration``); ~2 launches per method.
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.test_distributed_engines import FSDP2, SGD, Launcher, Run, assert_same

pytestmark = pytest.mark.integration

STEPS = ["--max_steps", "3", "--save_steps", "3"]
# Small enough for 2 layers and 4 rows per rank; every method changes something every step.
METHOD_FLAGS = {
    "gast": [],
    "gast+ist": ["--ist_layer_fraction", "0.5", "--ist_interval", "1", "--ist_probe_batch", "4"],
    "ist": ["--ist_layer_fraction", "0.5", "--ist_interval", "1", "--ist_probe_batch", "4"],
    "rst": ["--rst_layer_fraction", "0.5"],
    "lisa": ["--lisa_layers", "1", "--lisa_interval", "1"],
    "fisher": ["--fisher_layers", "1", "--fisher_samples", "4"],
    "maxloss": [],
    "gradnorm": [],
    "greats": ["--greats_val_size", "2"],
    "random-half": [],
}
# Test case → (method, flags): every method as above, and GAST twice more with its support drawn
# from the training set (the library default; the recipe's `gast` uses the batch itself), with
# the support rows in the batch's forward/backward (one pass, the default) and in a pass of
# their own. Each rank draws its own support rows, in DDP and FSDP2/ZeRO-3 alike.
DRAWN = ["--gast_support", "train", "--gast_support_size", "2"]
CASES = {name: (name, flags) for name, flags in METHOD_FLAGS.items()} | {
    "gast-drawn": ("gast", DRAWN),
    "gast-drawn-twopass": ("gast", [*DRAWN, "--gast_support_pass", "two"]),
}


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Launcher:
    return Launcher(tmp_path_factory.mktemp("fsdp2-methods"))


def selections(run: Run, rank: int) -> dict[str, list[torch.Tensor]]:
    return torch.load(run.probe / f"selections_rank{rank}.pt")


def assert_same_selections(run: Run, reference: Run, method: str) -> None:
    for rank in (0, 1):
        mine, theirs = selections(run, rank), selections(reference, rank)
        masks = mine["masks"] or mine["inner_masks"]
        assert len(masks) >= 3, f"{method}: rank {rank} recorded {len(masks)} selections"
        for key in ("masks", "inner_masks"):
            assert len(mine[key]) == len(theirs[key]), (method, rank, key)
            for step, (a, b) in enumerate(zip(mine[key], theirs[key])):
                assert torch.equal(a, b), f"{method} rank {rank} {key} step {step}:\n{a}\nvs DDP\n{b}"


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_trains_every_method_like_data_parallel(case, launch):
    method, flags = CASES[case]
    extra = [*SGD, *STEPS, *flags]
    run = launch(f"fsdp2-{case}", FSDP2, method, extra, cpu_fsdp=True).ok()
    for rank in (0, 1):
        engine = run.engine(rank)
        assert engine["fsdp"] and engine["fsdp_version"] == 2 and engine["backend"] == "gloo", engine
        assert "FSDPLlamaDecoderLayer" in engine["fsdp_modules"], engine
        assert engine["dtensor_params"] == engine["params"] > 0, engine  # every parameter sharded
    assert_trained_like_ddp(run, launch.ddp(method, extra), method)


def assert_trained_like_ddp(run: Run, reference: Run, method: str) -> None:
    """Same selections as the DDP run at every step, both ranks identical, parameters and the
    saved adapter equal to the DDP run's (also used by test_zero3_methods.py)."""
    assert_same_selections(run, reference, method)
    params = run.params(0)
    assert_same(run.params(1), params, "rank 1 vs rank 0", atol=0.0)
    # LoRA B starts at zero; a layer-selective method may never draw one of the 2 layers
    assert any(params[k].abs().sum() > 0 for k in params if "lora_B" in k), "no LoRA B moved"
    diff = assert_same(params, reference.params(0), "parameters vs the DDP recipe", atol=1e-6)
    assert_same(run.adapter(), reference.adapter(), "saved adapter vs the DDP recipe", atol=1e-6)
    assert run.log.count(f"saved the {method} adapter") == 1, run.log[-4000:]
    print(f"{method}: max |parameter difference| vs DDP: {diff:.3g}")


# ------------------------------------------------------------ frozen layers and resume
# AdamW with weight decay: a frozen layer that got any update (a decay step, a zero-gradient
# moment update) would show in its parameters or its optimizer state. A checkpoint every step.
ADAMW = [
    *("--optim", "adamw_torch", "--learning_rate", "1e-2", "--weight_decay", "0.1"),
    *("--max_steps", "3", "--save_steps", "1", "--lr_scheduler_type", "constant"),
]
LISA = ["--lisa_layers", "1", "--lisa_interval", "1"]


def optim(run: Run, rank: int = 0) -> dict[str, dict]:
    return torch.load(run.probe / f"optim_rank{rank}.pt")


def adamw_run(launch: Launcher, method: str, flags: list[str]) -> Run:
    """The FSDP2 AdamW run of ``method``, launched once per module."""
    key = ("fsdp2-adamw", method)
    if key not in launch.cache:
        launch.cache[key] = launch(
            f"fsdp2-{method}-adamw", FSDP2, method, [*ADAMW, *flags], cpu_fsdp=True
        ).ok()
    return launch.cache[key]


def test_fsdp2_frozen_layers_get_no_update_and_keep_their_optimizer_state(launch):
    """LISA, one of 2 layers per step: each adapter tensor's AdamW step count is the number of
    steps its layer trained (a frozen layer's state is neither advanced nor dropped), and
    parameters and moments equal the DDP run's."""
    run = adamw_run(launch, "lisa", LISA)
    reference = launch.ddp("lisa", [*ADAMW, *LISA])
    assert_same_selections(run, reference, "lisa")
    masks = selections(run, 0)["masks"]  # (N, layers) per step; a layer's column is all-or-nothing
    active = [m.any(dim=0) for m in masks]
    assert len(active) == 3 and any(not a.all() for a in active)
    state, params = optim(run), run.params(0)
    for name in params:
        layer = int(name.split(".layers.")[1].split(".")[0])
        trained = sum(int(a[layer]) for a in active)
        assert (int(state[name]["step"]) if trained else 0) == trained, (name, state[name].get("step"))
        if not trained:  # never drawn: no state at all, parameter as initialised
            assert state[name] == {}, name
    expected = optim(reference)
    for name, entry in state.items():
        assert sorted(entry) == sorted(expected[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry:
                torch.testing.assert_close(entry[key], expected[name][key], rtol=1e-5, atol=1e-7)
    assert_same(params, reference.params(0), "parameters vs the DDP recipe", atol=1e-6)


@pytest.mark.parametrize("method,flags", [("gast", []), ("lisa", LISA)])
def test_fsdp2_resume_with_method_state_equals_the_uninterrupted_run(method, flags, launch):
    """LISA's checkpoint-1 holds no optimizer state for the layer not drawn in step 1 (loaded
    non-strictly, gastune.training.fsdp_resume)."""
    run = adamw_run(launch, method, flags)
    ckpt = run.out / "checkpoint-1"
    assert (ckpt / "gastune_method_state_1.pt").is_file(), sorted(p.name for p in ckpt.iterdir())
    resumed = launch(
        f"fsdp2-{method}-adamw-resumed",
        FSDP2,
        method,
        [*ADAMW, *flags, "--resume_from_checkpoint", str(ckpt)],
        cpu_fsdp=True,
    ).ok()
    assert_same(resumed.params(0), run.params(0), "resumed vs uninterrupted", atol=1e-7)
    assert_same(resumed.adapter(), run.adapter(), "resumed vs uninterrupted adapter", atol=1e-7)
    # the resumed run made the same choices in steps 2 and 3
    for rank in (0, 1):
        done, again = selections(run, rank)["masks"], selections(resumed, rank)["masks"]
        assert len(again) == 2 and all(torch.equal(a, b) for a, b in zip(done[1:], again)), rank
