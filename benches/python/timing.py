"""The benches' one timing loop: competitors alternated in one process, medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List


def interleaved(runs: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median seconds of each run, the runs alternated `repeats` times after one warm-up."""
    times: Dict[str, List[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}
