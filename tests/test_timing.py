"""timing.median_ms: warmup calls untimed, the median of the timed ones, bad arguments refused."""

import time

import pytest
import torch

from nn_blocksparse.timing import median_ms


def test_cpu_calls_warmup_then_repeats_and_takes_the_median():
    """Timed calls sleep 1, 1, 30 ms: the median is near 1 ms where the mean would be over 10."""
    sleeps = [0.0, 0.0, 0.001, 0.001, 0.030]  # two warmup calls first

    def call():
        time.sleep(sleeps.pop(0))

    ms = median_ms(call, torch.device("cpu"), warmup=2, repeats=3)
    assert not sleeps  # exactly warmup + repeats calls
    assert 1.0 <= ms < 10.0


def test_bad_arguments_are_refused_before_any_call():
    def call():
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="repeats"):
        median_ms(call, "cpu", repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        median_ms(call, "cpu", warmup=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU timing is tested above)")
def test_cuda_methods_agree_on_a_matmul():
    x = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
    times = {method: median_ms(lambda: x @ x, "cuda", cuda=method) for method in ("events", "do_bench", "cudagraph")}
    assert all(t > 0 for t in times.values())
    assert max(times.values()) < 3 * min(times.values()), times
    with pytest.raises(ValueError, match="cuda timing method"):
        median_ms(lambda: x @ x, "cuda", cuda="wall")
