"""How many CPU threads torch uses in the CLI's long jobs (``gastune demo``, ``gastune eval``).

torch defaults to one thread per core. Its OpenMP threads meet at a barrier after every
matrix product, so when another process holds a core the whole step waits for the thread
that lost its turn: on this project's 2-core machine under load (load average 15-18), a LoRA
step on SmolLM2-135M took 390 s with 2 threads against 96 s with 1
(``docs/results/threads_cpu.json``, ``benchmarks/threads.py``),
while on an idle machine a second thread can only help (at most 2×). The default therefore
measures: a short probe (matrix products of the default model's shapes; 3 s at load average
12-15) times 1 thread, the idle cores (usable cores minus the 1-minute load
average) and all usable cores, alternating, and takes the fastest. An idle 2-core machine
gets 2 threads; one busy with other work gets 1 (under load 15, 1 thread took 0.18-0.21 s
per probe round and 2 threads 0.36-0.69 s).

Override with ``--threads N`` or ``GASTUNE_THREADS=N``; an ``OMP_NUM_THREADS`` set in the
environment is respected as well.
"""

from __future__ import annotations

import os
import statistics
import time

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


def probe_seconds(threads: int, repeats: int = 8) -> float:
    """Seconds for ``repeats`` matrix products of a 256-token batch with a 576×1536 weight
    (an MLP projection of the default model) on ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 576, generator=generator)
    w = torch.randn(576, 1536, generator=generator)
    x @ w  # warm-up: thread pool start, allocation
    start = time.perf_counter()
    for _ in range(repeats):
        x @ w
    return time.perf_counter() - start


def fastest_threads(candidates: list[int], rounds: int = 3, timer=probe_seconds) -> int:
    """The candidate thread count with the lowest median probe time (rounds alternate
    candidates, so a burst of load hits them alike); ties go to fewer threads."""
    candidates = sorted(set(candidates))
    if len(candidates) == 1:
        return candidates[0]
    times: dict[int, list[float]] = {n: [] for n in candidates}
    for _ in range(rounds):
        for n in candidates:
            times[n].append(timer(n))
    return min(candidates, key=lambda n: (statistics.median(times[n]), n))


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """``(threads, why)``: ``--threads``, else ``$GASTUNE_THREADS``, else ``$OMP_NUM_THREADS``,
    else the fastest of 1, the idle cores and all cores in a short probe.

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
    cores = usable_cores()
    threads = fastest_threads([1, idle_cores(cores), cores])
    return threads, f"default: fastest in a probe of 1..{cores}"


def set_threads(requested: int | None = None) -> tuple[int, str]:
    """Apply :func:`choose_threads` to torch; return what was chosen and why."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads, why
