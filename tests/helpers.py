"""Shared test helpers: per-dtype tolerances, the float64 reference, the CUDA skip mark.

Random block-sparse weights come from `nn_blocksparse.layouts`, the project's one layout generator.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# GPU-only tests: they skip cleanly without CUDA, and a CPU twin (the interpreter) runs instead.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU twin runs the interpreter")

# Tolerances relative to the output's scale (max |reference|): fp32 accumulate everywhere, so
# the error is the rounding of inputs/outputs to the dtype, not the length of the sum.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    """`actual` (any dtype) against an fp32/fp64 reference, within the dtype's relative tolerance."""
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    scale = max(reference.abs().max().item(), 1.0)
    # The reference lives on the CPU; the kernel's output may be on the GPU.
    error = (actual.double().cpu() - reference.double().cpu()).abs().max().item() if actual.numel() else 0.0
    assert error <= RELATIVE_TOLERANCE[dtype] * scale, f"max abs error {error} > {RELATIVE_TOLERANCE[dtype]} x {scale}"


def dense_reference(x: torch.Tensor, weight: torch.Tensor, bias=None, activation=None) -> torch.Tensor:
    """Independent reference: the dense product in float64 on the CPU."""
    y = x.double().cpu() @ weight.double().cpu().T
    if bias is not None:
        y = y + bias.double().cpu()
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    return y


def run_python(code: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`code` (dedented) in a fresh Python process at the repository root, with `env` added."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **env}, timeout=timeout)
