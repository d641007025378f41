"""Timing shared by the CPU benchmarks: every timed sample processes the same number of tokens.

A single forward+backward at 1K takes ~0.4 s on a shared 2-core VM and its time moves by +-30% from pass to
pass; the best of a few such passes against one 16K pass made t(16K)/t(1K) read 19-21 where the sustained cost
reads 14-16. So a sample at length N runs ceil(tokens / N) passes back to back and the per-pass time is the
sample's mean: short and long lengths are measured over the same amount of work.
"""

from __future__ import annotations

import math
import time
from typing import Callable


def passes_for(n: int, tokens: int) -> int:
    return max(1, math.ceil(tokens / n))


def per_pass_seconds(step: Callable[[], None], n: int, tokens: int, samples: int = 1) -> tuple[float, float]:
    """Best over ``samples`` of the mean (wall, process CPU) seconds of one ``step`` (a forward+backward of N
    tokens), each sample ``passes_for(n, tokens)`` steps long, after one untimed warm-up step. CPU time leaves out
    the time other tenants held this VM's cores (steal), so it is the steadier measure of cost."""
    step()
    k = passes_for(n, tokens)
    best, best_cpu = math.inf, math.inf
    for _ in range(max(1, samples)):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(k):
            step()
        best = min(best, (time.perf_counter() - start) / k)
        best_cpu = min(best_cpu, (time.process_time() - start_cpu) / k)
    return best, best_cpu
