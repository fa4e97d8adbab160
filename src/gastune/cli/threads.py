"""How many CPU threads torch uses in the CLI's long jobs (``gastune demo``, ``gastune eval``).

torch defaults to one thread per core. Its OpenMP threads meet at a barrier after every
matrix product, so when another process holds a core the whole step waits for the thread
that lost its turn: on this project's 2-core machine under load, a LoRA step on
SmolLM2-135M took 76 s with 2 threads against 20 s with 1 (``docs/results/threads_cpu.json``),
while on an idle machine the second thread gains at most 2×. The default therefore leaves
one core free: ``cores - 1`` threads, at least 1.

Override with ``--threads N`` or ``GASTUNE_THREADS=N``; an ``OMP_NUM_THREADS`` set in the
environment is respected as well.
"""

from __future__ import annotations

import os

from gastune.errors import GastuneError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """``(threads, why)``: ``--threads``, else ``$GASTUNE_THREADS``, else ``$OMP_NUM_THREADS``,
    else ``cores - 1`` (at least 1).

    Example:
        >>> choose_threads(3)
        (3, '--threads')
    """
    for value, source in (
        (requested, "--threads"),
        (os.environ.get("GASTUNE_THREADS"), "GASTUNE_THREADS"),
        (os.environ.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS"),
    ):
        if value is None or value == "":
            continue
        try:
            threads = int(value)
        except ValueError:
            raise GastuneError(f"{source} must be a whole number of threads, got '{value}'") from None
        if threads < 1:
            raise GastuneError(f"{source} must be >= 1, got {threads}")
        return threads, source
    return max(1, usable_cores() - 1), "default: cores - 1"


def set_threads(requested: int | None = None) -> tuple[int, str]:
    """Apply :func:`choose_threads` to torch; return what was chosen and why."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads, why
