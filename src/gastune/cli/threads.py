"""How many CPU threads torch uses in the CLI's long jobs (``gastune demo``, ``gastune eval``).

torch defaults to one thread per core. Its OpenMP threads meet at a barrier after every
matrix product, so when another process holds a core the whole step waits for the thread
that lost its turn: on this project's 2-core machine under load (load average 15-18), a LoRA
step on SmolLM2-135M took 390 s with 2 threads against 96 s with 1
(``docs/results/threads_cpu.json``, ``benchmarks/threads.py``),
while on an idle machine a second thread can only help (at most 2×). The default therefore
uses the cores that are idle: the usable cores minus the 1-minute load average (rounded),
at least 1 and at most the usable cores. An idle 2-core machine gets 2 threads; one busy
with other work gets 1.

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


def idle_cores(cores: int | None = None, load: float | None = None) -> int:
    """Usable cores not already busy by the 1-minute load average, in ``[1, cores]``.

    Example:
        >>> idle_cores(cores=2, load=0.2), idle_cores(cores=2, load=1.6), idle_cores(cores=2, load=14.0)
        (2, 1, 1)
    """
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0  # no load average on this platform: assume idle
    return max(1, min(cores, cores - round(load)))


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """``(threads, why)``: ``--threads``, else ``$GASTUNE_THREADS``, else ``$OMP_NUM_THREADS``,
    else the idle cores (:func:`idle_cores`).

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
    threads = idle_cores()
    return threads, f"default: idle cores of {usable_cores()}"


def set_threads(requested: int | None = None) -> tuple[int, str]:
    """Apply :func:`choose_threads` to torch; return what was chosen and why."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads, why
