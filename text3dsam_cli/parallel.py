"""numpy work shared among threads: numpy releases the GIL inside its loops, so blocks of one array can be
processed on several cores at once (preprocessing, the quality report's run-length pass)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from text3dsam_cli.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: Threads the process's own parallel steps may use, set by ``--threads`` (:func:`set_thread_budget`); None: the
#: usable cores.
_budget: int | None = None


def set_thread_budget(threads: int | None) -> None:
    """Cap the threads of every parallel step (``--threads``); None or 0: as many as the usable cores."""
    global _budget
    if threads is not None and threads < 0:
        raise UsageError("--threads must be positive")
    _budget = threads or None


def thread_budget() -> int:
    """Threads a parallel step may use: ``--threads`` when given, else the cores this process may run on.

    One number sizes every step (normalisation slabs, the quality report's passes, compression, torch's own
    threads), so the work scales from a 2-core laptop to a many-core server without a constant per step."""
    return _budget or usable_cores()


def map_shares(work: Callable[[list[T]], R], items: Sequence[T], most: int | None = None) -> list[R]:
    """``work`` applied to interleaved shares of ``items`` (``items[i::n]``), one share per thread, on
    n = min(``most``, len(items), :func:`thread_budget`) threads; in the calling thread when n <= 1."""
    workers = min(most or thread_budget(), len(items), thread_budget())
    if workers <= 1:
        return [work(list(items))]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, [list(items[i::workers]) for i in range(workers)]))
