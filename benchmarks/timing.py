"""Interleaved, repeated timing for the benchmarks, and how their results are summarized.

One run of each variant, always in the same order, measures the order (caches, clocks, a
neighbour's load) as much as the variants. ``interleave`` runs every variant ``repeats`` times,
reversing the order every other round (ABC, CBA, ABC, ...), so each pair of variants
alternates which goes first. A ratio is taken per round, between runs that were neighbours in time, and reported
by its median and its spread (min..max) over the rounds.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence


def interleave(
    variants: Mapping[str, Callable[[], object]], repeats: int, on_run: Callable[[int, str, float], None] | None = None
) -> dict[str, list[float]]:
    """Seconds of each call of each variant: ``{name: [seconds of round 0, round 1, ...]}``.

    Even rounds run the variants in their given order, odd rounds in reverse. ``on_run(round, name,
    seconds)`` is called after each run (progress output)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least 1 run of each variant")
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - t0)
            if on_run is not None:
                on_run(r, name, seconds[name][-1])
    return seconds


def rates(work: float, seconds: Sequence[float]) -> list[float]:
    """Work per second of each run (tokens/s from the tokens of one run)."""
    return [work / s for s in seconds]


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[r] / b[r]`` for each round ``r``: a ratio between runs of the same round."""
    if len(a) != len(b):
        raise ValueError(f"paired_ratios: {len(a)} runs against {len(b)}; pair runs of the same rounds")
    return [x / y for x, y in zip(a, b)]


def summary(values: Sequence[float], fmt: str = ".0f") -> str:
    """``median (min..max, n=N)``."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}}, n={len(values)})"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
