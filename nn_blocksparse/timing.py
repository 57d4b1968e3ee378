"""`median_ms`: the one timer of the library, the benchmarks and the tools (median milliseconds of a call),
and `interleaved_median_ms`, the same for several calls timed in turns (CPU).

On CPU: `warmup` untimed calls, then the median of `repeats` `time.perf_counter` intervals.
Methods compared side by side on a CPU are timed in turns (`interleaved_median_ms`): on a shared
machine whose speed drifts over minutes (another tenant, the clock), timing one method after the
other would put the drift into their ratio.

On CUDA, by `cuda`:
- `"events"` (default): `warmup` untimed calls, then the median of `repeats` calls, each between
  two CUDA events. Each call is timed as a module's eager forward runs, so the host's launch work
  counts wherever it is longer than the GPU's; L2 stays warm. What `measure_block_sparse` decides
  on and what the demo prints.
- `"do_bench"`: `triton.testing.do_bench(warmup=cuda_warmup_ms, rep=cuda_rep_ms)`, median. Also
  eager, but it flushes L2 between calls and sizes its repeats by time, not count: the benchmarks'
  default, so kernels are compared from a cold cache.
- `"cudagraph"`: `triton.testing.do_bench_cudagraph(rep=cuda_rep_ms)`, median. The calls are
  captured in a CUDA graph and replayed back to back, which leaves only the kernels' GPU time
  (what a CUDA-graph or compiled serving stack gets; L2 is not flushed between replays).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch

CUDA_METHODS = ("events", "do_bench", "cudagraph")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, repeats: int = 20,
              cuda: str = "events", cuda_warmup_ms: float = 25, cuda_rep_ms: float = 100) -> float:
    """Median milliseconds of one call of `fn` on `device` (the module docstring gives the methods)."""
    device = torch.device(device)
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if device.type == "cuda":
        if cuda not in CUDA_METHODS:
            raise ValueError(f"cuda timing method must be one of {CUDA_METHODS}, got {cuda!r}")
        if cuda == "do_bench":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=cuda_warmup_ms, rep=cuda_rep_ms, return_mode="median"))
        if cuda == "cudagraph":
            from triton.testing import do_bench_cudagraph

            return float(do_bench_cudagraph(fn, rep=cuda_rep_ms, return_mode="median"))
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return statistics.median(_cpu_times_ms(fn, repeats))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cpu_times_ms(fn: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_median_ms(fns: Mapping[str, Callable[[], object]], warmup: int = 3, repeats: int = 20,
                          rounds: int = 5) -> dict[str, float]:
    """CPU: `{name: median milliseconds of one call}` of each of `fns`, timed in turns.

    Each fn first gets `warmup` untimed calls. Then come `rounds` rounds (at most `repeats`); in each,
    every fn in turn runs one untimed call (its caches and thread pool back after the others had
    the cores) and then its share of `repeats` timed calls, split as evenly as the rounds allow.
    The rounds' orders are the rows of a balanced Latin square (`round_orders`): over n rounds of n
    fns (2n where n is odd) each fn takes each place equally often and follows each other fn equally
    often. What a call leaves behind that one untimed call does not clear (a kernel timed right after
    oneDNN's bf16 GEMM ran measurably slower than behind another method) then weighs on every fn
    alike; rotating one order would keep each fn behind the same neighbour in every round. The median
    is over all of a fn's timed calls.
    """
    if warmup < 0 or repeats < 1 or rounds < 1:
        raise ValueError(f"warmup must be >= 0, repeats and rounds >= 1, got warmup={warmup}, repeats={repeats}, "
                         f"rounds={rounds}")
    rounds = min(rounds, repeats)
    shares = [repeats // rounds + (1 if index < repeats % rounds else 0) for index in range(rounds)]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    orders = round_orders(len(items))
    for index, share in enumerate(shares):
        for position in orders[index % len(orders)]:
            name, fn = items[position]
            fn()
            times[name] += _cpu_times_ms(fn, share)
    return {name: statistics.median(values) for name, values in times.items()}


def round_orders(n: int) -> list[list[int]]:
    """The rows of a balanced Latin square (Williams' design) on n items: n orders where n is even,
    2n where it is odd; over them every item takes every place, and follows every other item, equally
    often."""
    base, low, high = [0], 1, n - 1
    while len(base) < n:
        base.append(low)
        low += 1
        if len(base) < n:
            base.append(high)
            high -= 1
    orders = [[(item + shift) % n for item in base] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders
