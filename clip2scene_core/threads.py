"""CPU threads for torch, chosen once per process by every entry point.

On a machine shared with other jobs (every CI and developer machine here has 2 cores),
torch's default of one OpenMP thread per core spins its workers against the other processes:
demo inference was measured at 10–15 s per frame with two threads and 0.1 s with one. So the
default is one thread on machines with two cores or fewer, and OpenMP workers wait passively
(``OMP_WAIT_POLICY=PASSIVE``: they sleep instead of spinning on a core another process needs).
This module does not import torch at import time, so an entry point can call
`prepare_openmp` before torch (and its OpenMP runtime) is loaded.
"""
from __future__ import annotations

import os

from .errors import ConfigError


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> int:
    """1 on two cores or fewer (shared machines), else half the cores, at most 4.

    Measured on an idle 2-core CPU, two threads were at best 1.3× faster than one; on a busy
    one, many times slower. Sparse convolutions scale poorly beyond a few threads.
    """
    cores = available_cores() if cores is None else int(cores)
    return 1 if cores <= 2 else min(4, cores // 2)


def prepare_openmp() -> None:
    """Passive OpenMP waiting, unless the user chose a policy; effective before torch loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_cpu_threads(threads: int | None = 0) -> int:
    """Set torch's intra-op CPU threads; 0 or None: `default_threads`. Returns the count."""
    if threads is None:
        threads = 0
    threads = int(threads)
    if threads < 0:
        raise ConfigError(f"CPU threads must be >= 0 (0: automatic), got {threads}")
    prepare_openmp()
    import torch

    torch.set_num_threads(threads or default_threads())
    return torch.get_num_threads()
