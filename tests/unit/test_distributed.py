"""GAST under 2-process CPU data parallelism (gloo): each rank selects among its own
samples, DDP averages the gated gradients, every rank ends with the same parameters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(outdir: Path) -> list[dict]:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",  # CPU + gloo even on a GPU machine
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",  # two processes on a small shared CPU
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(WORKER),
        str(outdir),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"DDP worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(outdir / f"rank{r}.pt") for r in range(2)]


def test_gast_step_under_ddp_equals_mean_of_per_rank_reference(tmp_path):
    r0, r1 = _launch(tmp_path)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == 2
    assert r0["ddp"] == "DistributedDataParallel", "the Trainer did not wrap the model in DDP"

    # Each rank trained on its own shard and drew its own selection.
    assert not set(r0["index"].tolist()) & set(r1["index"].tolist()), "ranks trained on the same samples"
    assert r0["seed"] != r1["seed"], "ranks share their selection seed"
    assert not torch.equal(r0["mask"], r1["mask"]), "ranks chose the same positions in every block"

    lr, names = r0["lr"], list(r0["final"])
    assert names and names == list(r1["final"])
    for name in names:
        # Same starting point on both ranks (DDP also broadcasts rank 0's parameters).
        assert torch.equal(r0["initial"][name], r1["initial"][name])
        mean_ref = (r0["reference_grad"][name] + r1["reference_grad"][name]) / 2
        # The gradient the optimizer used is the all-reduced mean of the per-rank GAST gradients
        # (not one rank's own gradient: the two references differ).
        assert not torch.allclose(r0["reference_grad"][name], r1["reference_grad"][name], atol=1e-5)
        for r in (r0, r1):
            torch.testing.assert_close(r["optimizer_grad"][name], mean_ref, rtol=1e-5, atol=1e-7)
        # Both ranks hold identical parameters, equal to one SGD step on that mean.
        assert torch.equal(r0["final"][name], r1["final"][name]), f"{name} differs across ranks"
        expected = r0["initial"][name] - lr * mean_ref
        torch.testing.assert_close(r0["final"][name], expected, rtol=1e-5, atol=1e-6)
