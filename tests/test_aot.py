"""Ahead-of-time compilation for sm80/sm90 without a GPU: every launchable config, no spills.

Runs in subprocesses because this test process may have Triton's interpreter switched on,
which replaces the kernels that `triton.compile` needs.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")


def run_without_interpreter(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)


def test_every_launchable_config_compiles_for_sm80_and_sm90_without_spills():
    # The default kernel's every config for sm90 (the GPU the tuned table is for), and for sm80 every
    # config of 32-wide blocks, the block size patch_bert uses: about 400 compiles, the largest share
    # of the suite's time on two cores. `./run.sh aot` compiles everything for both archs (minutes);
    # the other kernels' representative subset is in test_gluon_kernels.py.
    lines, reports = [], []
    for arch, extra in (("90", ()), ("80", ("--block-size", "32"))):
        result = run_without_interpreter("-m", "nn_blocksparse.aot", "--arch", arch, "--epilogues", "widest",
                                         "--kernels", "triton", *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "0 failed or spilled" in result.stdout
        lines += [line for line in result.stdout.splitlines() if line.startswith("sm")]
        reports.append(result.stdout)
    assert any(line.startswith("sm80") for line in lines) and any(line.startswith("sm90") for line in lines)
    assert len(lines) > 300 and all(line.endswith(" ok") for line in lines)
    assert all(f"bs={bs}" in reports[0] for bs in (16, 32, 64))  # sm90: every block size


def test_spill_check_catches_a_spilling_config():
    # A 128x64 fp32 tile on 4 warps is far too big for the register file: the report must say so.
    script = (
        "import torch; from nn_blocksparse.aot import compile_main_kernel;"
        "from nn_blocksparse.kernels.configs import KernelConfig;"
        "r = compile_main_kernel(80, torch.float32, 64, True, 'gelu', KernelConfig(block_m=128, num_warps=4,"
        " num_stages=2), 'ieee'); print(r.registers, r.spill_bytes, r.ok)"
    )
    result = run_without_interpreter("-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    registers, spill, ok = result.stdout.split()
    assert int(registers) > 0 and int(spill) > 0 and ok == "False"


def test_aot_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "nn_blocksparse.aot"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr


def test_dense_walk_variant_compiles_without_spills():
    """The measurement variant of tools/gpu_diagnosis.py (block-columns from the step) on its widest tile."""
    script = (
        "import torch; from nn_blocksparse.aot import compile_main_kernel;"
        "from nn_blocksparse.kernels.configs import KernelConfig;"
        "r = compile_main_kernel(90, torch.float16, 32, False, None, KernelConfig(64, 8, 1, 8, 3, 8), 'tf32',"
        " dense_walk=True); print(r.ok and 'dense walk' in r.kernel, r.registers)"
    )
    result = run_without_interpreter("-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    ok, registers = result.stdout.split()
    assert ok == "True" and int(registers) > 0
