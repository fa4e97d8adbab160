"""The CPU dry run of ``benchmarks/gpu_check.sh`` (tiny shape), so the GPU check cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [
            "bash",
            str(REPO / "benchmarks" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "all checks passed" in out.stdout
    cost = json.loads((tmp_path / "step_cost_gpu.json").read_text())
    assert set(cost["summary"]) == {"peer", "lora", "gast", "gast-batch", "gast-twopass", "ist"}
    assert cost["settings"]["bf16"] and cost["settings"]["shape"] == "tiny"
    assert all(s["peak_memory_bytes"] > 0 and s["median_step_s"] > 0 for s in cost["summary"].values())
    run = json.loads((tmp_path / "train_eval.json").read_text())
    assert len(run["losses"]) == 4 and all(math.isfinite(v) for v in run["losses"])
    assert run["losses"][-1] < run["losses"][0]
    assert 0.0 <= run["accuracy"] <= 1.0 and run["device_of_parameters"] == "cpu"
