"""The project's one timer: seconds per call of a function, measured in rounds (ractd.engine's calibration and
the speed benchmarks in bench/ use it).

`seconds_per_call` is the timer: the functions take turns round by round, so load drifting over time hits every
one alike, and each keeps its best and its worst round. `best_seconds_per_call` keeps the best rounds;
`time_call` times one function.

`setup` marks one-off set-up work done inside a call that is being timed (ractd.engine's builds and calibrations,
which happen at the first call of a new batch size); `setup_seconds` counts it, so that a timed cell (ractd.rollout's
time per action) leaves it out.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Callable

_setup_depth = threading.local()
_setup_total = [0.0]
_setup_lock = threading.Lock()


@contextlib.contextmanager
def setup():
    """Within: one-off set-up work whose seconds `setup_seconds` adds up (nested uses count once)."""
    depth = getattr(_setup_depth, "n", 0)
    _setup_depth.n = depth + 1
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _setup_depth.n = depth
        if depth == 0:
            with _setup_lock:
                _setup_total[0] += time.perf_counter() - t0


def setup_seconds() -> float:
    """Seconds this process has spent in `setup` so far (a timed call subtracts the difference across it)."""
    return _setup_total[0]


def seconds_per_call(fns: dict[str, Callable[[], object]], rounds: int, round_s: float,
                     drop_above: float = math.inf, warmup: int = 0,
                     max_calls: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(best, worst) seconds per call of each fn over `rounds` rounds of the mean per call within a round (>=
    round_s s or 1 call; at most max_calls calls), the fns taking turns round by round, so load drifting over time
    hits every fn alike. After the first round a fn slower than drop_above x the first fn's (the reference's) runs
    no more rounds. warmup: untimed calls of each fn first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: math.inf for name in fns}
    worst = {name: 0.0 for name in fns}
    live = list(fns)
    for r in range(rounds):
        for name in live:
            calls, t0 = 0, time.perf_counter()
            while True:
                fns[name]()
                calls += 1
                if time.perf_counter() - t0 >= round_s or (max_calls is not None and calls >= max_calls):
                    break
            per = (time.perf_counter() - t0) / calls
            best[name], worst[name] = min(best[name], per), max(worst[name], per)
        if r == 0 and live:
            ref = best[live[0]]
            live = [n for i, n in enumerate(live) if i == 0 or best[n] <= drop_above * ref]
    return best, worst


def best_seconds_per_call(fns: dict[str, Callable[[], object]], rounds: int, round_s: float, warmup: int = 0,
                          max_calls: int | None = None) -> dict[str, float]:
    """Seconds per call of each fn: the best of seconds_per_call's rounds (the benches' timing)."""
    return seconds_per_call(fns, rounds, round_s, warmup=warmup, max_calls=max_calls)[0]


def time_call(fn: Callable[[], object], min_time: float = 1.0, max_calls: int = 200, warmup: int = 2,
              rounds: int = 1) -> float:
    """Seconds per call of one fn: `warmup` untimed calls, then the best of `rounds` rounds of calls until
    min_time seconds or max_calls calls (min_time 0: one call a round)."""
    return best_seconds_per_call({"fn": fn}, rounds, min_time, warmup=warmup, max_calls=max_calls)["fn"]
