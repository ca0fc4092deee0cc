"""numpy work shared among threads: numpy releases the GIL inside its loops, so blocks of one array can be
processed on several cores at once (preprocessing, the quality report's run-length pass)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def map_shares(work: Callable[[list[T]], R], items: Sequence[T], most: int) -> list[R]:
    """``work`` applied to interleaved shares of ``items`` (``items[i::n]``), one share per thread, on
    n = min(``most``, len(items), usable cores) threads; in the calling thread when n <= 1."""
    workers = min(most, len(items), usable_cores())
    if workers <= 1:
        return [work(list(items))]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, [list(items[i::workers]) for i in range(workers)]))
