"""The multi-node recipe (configs/accelerate/multinode_cpu.yaml): 2 "machines" × 1 process on
localhost, each side launched with its own ``--machine_rank``, trains GAST exactly like the
single-machine data-parallel recipe (same global ranks, same per-rank selections).

Run with ``make test-integration`` (``pytest -m integration``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, free_port, recipe_train_args
from tests.integration.test_distributed_engines import PROBE, SGD, TIMEOUT, Launcher, Run, assert_trained_like

pytestmark = pytest.mark.integration

MULTINODE = REPO / "configs/accelerate/multinode_cpu.yaml"


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Launcher:
    return Launcher(tmp_path_factory.mktemp("multinode"))


def launch_two_machines(launch: Launcher, name: str, method: str, extra: list[str]) -> Run:
    out, probe = launch.root / name, launch.root / f"{name}-probe"
    port = str(free_port())
    args = [*recipe_train_args(launch.clean, launch.data, out, method=method), "--logging_steps", "1", *extra]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "GASTUNE_PROBE_DIR": str(probe),
    }
    procs = []
    for machine in (0, 1):
        cmd = [
            *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTINODE)),
            *("--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", port),
            *(str(PROBE), "train", *args),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    code = max(p.returncode for p in procs)
    return Run(code, "\n".join(f"--- machine {i}\n{log}" for i, log in enumerate(logs)), out, probe)


def test_two_machines_train_gast_like_the_single_machine_recipe(launch):
    run = launch_two_machines(launch, "two-machines-gast", "gast", SGD).ok()
    for rank in (0, 1):
        engine = run.engine(rank)
        assert engine["wrapper"] == "DistributedDataParallel" and engine["world_size"] == 2, engine
    reference = launch.ddp("gast", SGD)
    for rank in (0, 1):  # each global rank chose among its own samples, as on one machine
        mine = torch.load(run.probe / f"selections_rank{rank}.pt")["masks"]
        theirs = torch.load(reference.probe / f"selections_rank{rank}.pt")["masks"]
        assert len(mine) == 2 and all(torch.equal(a, b) for a, b in zip(mine, theirs)), rank
    assert_trained_like(run, reference, "gast", atol=1e-6)
    assert (run.out / "checkpoint-2" / "gastune_method_state_1.pt").is_file()
