"""timing.median_ms and interleaved_median_ms: warmup calls untimed, the median of the timed ones (in turns for
several calls), bad arguments refused."""

import time
from collections import Counter

import pytest
import torch

from nn_blocksparse.timing import interleaved_median_ms, median_ms


def test_cpu_calls_warmup_then_repeats_and_takes_the_median():
    """Timed calls sleep 1, 1, 30 ms: the median is near 1 ms where the mean would be over 10."""
    sleeps = [0.0, 0.0, 0.001, 0.001, 0.030]  # two warmup calls first

    def call():
        time.sleep(sleeps.pop(0))

    ms = median_ms(call, torch.device("cpu"), warmup=2, repeats=3)
    assert not sleeps  # exactly warmup + repeats calls
    assert 1.0 <= ms < 10.0


def test_interleaved_calls_take_turns_and_each_gets_its_own_median():
    """Warm-up of each, then rounds in which each runs one untimed call and its share of the timed ones."""
    order = []

    def sleeper(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)
        return call

    times = interleaved_median_ms({"fast": sleeper("fast", 0.001), "slow": sleeper("slow", 0.012)},
                                  warmup=1, repeats=5, rounds=2)
    # warm-up; round 1: untimed + 3 timed each; round 2 (the order rotated): untimed + 2 timed each.
    assert order == ["fast", "slow"] + ["fast"] * 4 + ["slow"] * 4 + ["slow"] * 3 + ["fast"] * 3
    assert 1.0 <= times["fast"] < 10.0 <= 12.0 <= times["slow"]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])
def test_each_fn_takes_each_place_and_follows_each_other_fn_equally_often(count):
    """The rounds' orders: a balanced Latin square (2n rounds for an odd n, n for an even one)."""
    names = "abcdef"[:count]
    rounds = 2 * count if count % 2 else count
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in names}
    interleaved_median_ms(fns, warmup=0, repeats=rounds, rounds=rounds)
    # Each fn: 1 untimed + 1 timed call per round.
    played = [order[i:i + 2 * count:2] for i in range(0, 2 * count * rounds, 2 * count)]
    assert all(sorted(one) == list(names) for one in played)
    for place in range(count):
        assert Counter(one[place] for one in played) == {name: rounds // count for name in names}
    followers = Counter((one[i], one[i + 1]) for one in played for i in range(count - 1))
    pairs = [(a, b) for a in names for b in names if a != b]
    assert set(followers) == set(pairs) and len(set(followers.values())) <= 1, followers


def test_interleaving_keeps_a_drift_out_of_the_ratio():
    """The machine slows down after round 1 of 4: timed in turns, two equal calls still come out equal.

    Each fn then has 5 fast and 15 slow timed calls, so both medians lie well inside the slow ones
    (a slow-down at the half-way mark would put each median between the two groups, where one
    late fast call under load moves it by the whole gap).
    """
    clock = {"calls": 0}

    def call():
        clock["calls"] += 1
        time.sleep(0.001 if clock["calls"] <= 12 else 0.004)  # 1 round x 2 calls x (1 untimed + 5 timed)

    times = interleaved_median_ms({"a": call, "b": call}, warmup=0, repeats=20, rounds=4)
    assert 0.8 < times["a"] / times["b"] < 1.25, times
    # One after the other, the same drift would have given "a" 12 fast calls of its 20 (a median of
    # about 1 ms) and "b" none (about 4 ms): a ratio of about 4.


def test_bad_arguments_are_refused_before_any_call():
    def call():
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="repeats"):
        median_ms(call, "cpu", repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        median_ms(call, "cpu", warmup=-1)
    with pytest.raises(ValueError, match="rounds"):
        interleaved_median_ms({"a": call}, rounds=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU timing is tested above)")
def test_cuda_methods_agree_on_a_matmul():
    x = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
    times = {method: median_ms(lambda: x @ x, "cuda", cuda=method) for method in ("events", "do_bench", "cudagraph")}
    assert all(t > 0 for t in times.values())
    assert max(times.values()) < 3 * min(times.values()), times
    with pytest.raises(ValueError, match="cuda timing method"):
        median_ms(lambda: x @ x, "cuda", cuda="wall")
