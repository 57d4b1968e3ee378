"""The kernels besides the default one: Gluon (sm90) member-MMA and wide-MMA, and the swapped Triton kernel.

Triton's interpreter cannot run Gluon, so the Gluon kernels are checked on CPU three ways:
- `gluon_schedule.py` replays their schedule (grid mapping, TMA boxes, mbarrier protocol, which
  MMAs issue, epilogue) over the same row-group tables in float64, against the dense reference;
- their Triton twin, the row-group kernel (same tables, same launch order, same epilogue; it
  multiplies the absent members' zeros that the member kernel skips), runs under the interpreter
  for R = 2, 4 and 8;
- they compile ahead of time for sm90 (a representative subset here, all of them in
  `python -m nn_blocksparse.aot`) with no spills and with HGMMA in the SASS.
The swapped kernel is plain Triton and runs under the interpreter (or on a GPU) like the default one.
On a Hopper GPU the Gluon kernels themselves run against the reference (`tools/gpu_kernels_probe.py`
checks every variant before timing it, and the GPU test below).
"""

import os
import subprocess
import sys
from itertools import product

import pytest
import torch

import gluon_schedule
from benchmarks import common
from helpers import assert_close_to_reference, dense_reference
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
from nn_blocksparse.layouts import block_sparse_weight, head_structured_layout
from nn_blocksparse.functional import block_sparse_linear
from nn_blocksparse.kernels.configs import (
    GLUON_KERNELS,
    KernelConfig,
    heuristic_config,
    launchable_configs,
    variant_candidate_configs,
)
from nn_blocksparse.kernels.gluon_common import GLUON_AVAILABLE


LAYOUTS = {
    "random": lambda n, k, bs, seed: random_block_sparse_weight(n, k, bs, 0.5, seed, empty_block_rows=(1,)),
    "heads": lambda n, k, bs, seed: block_sparse_weight(head_structured_layout(n // bs, k // bs, 0.6, 4, seed), bs,
                                                        seed),
    "dense": lambda n, k, bs, seed: torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5,
}


def schedule_case(layout, rows, seed, n_block_rows=10, k_blocks=6, bs=16, m=150):
    weight = LAYOUTS[layout](n_block_rows * bs, k_blocks * bs, bs, seed).double()
    matrix = BlockSparseMatrix.from_dense(weight, bs)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, weight.shape[1], generator=generator, dtype=torch.float64)
    bias = torch.randn(weight.shape[0], generator=generator, dtype=torch.float64)
    return weight, matrix, matrix.row_groups(rows), x, bias


AOT_SUBSET = [
    # kernel, block_m, num_warps, num_stages, rows: each kernel and pipeline, the 4- and 8-warp tiles, R = 4 and 8
    ("gluon_member", 128, 4, 3, 4),
    ("gluon_member_ws", 128, 8, 4, 8),
    ("gluon_wide", 128, 4, 3, 4),
    ("gluon_wide_ws", 64, 4, 4, 8),
]


# ---------------------------------------------------------------------------------- schedule model
@pytest.mark.parametrize("wide", [False, True], ids=["member", "wide"])
@pytest.mark.parametrize("warp_specialized", [False, True], ids=["pipelined", "ws"])
@pytest.mark.parametrize("rows", [2, 4, 8])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_schedule_model_reproduces_the_dense_product(wide, warp_specialized, rows, layout):
    weight, matrix, groups, x, bias = schedule_case(layout, rows, seed=rows)
    m, block_m = x.shape[0], 64  # 150 rows: the last M-tile is partial
    kernel = gluon_schedule.Kernel(wide, x, matrix.values, groups, block_m, group_m=2, stages=3,
                                   warp_specialized=warp_specialized)
    y = gluon_schedule.emulate(kernel, m, weight.shape[0], bias, "gelu", seed=rows)
    torch.testing.assert_close(y, dense_reference(x, weight, bias, "gelu"), rtol=1e-12, atol=1e-12)
    # Every stored block is multiplied exactly once per M-tile; the member kernel multiplies nothing
    # else, the wide one the zero slices that `RowGroups.inflation` counts.
    tiles = -(-m // block_m)
    assert kernel.mma_blocks == {(tile * block_m, block): 1 for tile in range(tiles) for block in range(matrix.nnz_blocks)}
    padded = (groups.step_count * rows - matrix.nnz_blocks) * tiles
    assert kernel.padded_mmas == (padded if wide else 0)
    if layout == "dense" and matrix.block_rows % rows == 0:
        assert padded == 0


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_schedule_model_warp_specialised_ring_in_random_orders(stages, seed):
    # Long groups (12 steps) through short rings: the loader laps the ring several times, waiting on
    # the MMA side's hand-backs, while copies land in random orders.
    weight, matrix, groups, x, bias = schedule_case("random", 4, seed, n_block_rows=8, k_blocks=24, m=64)
    for wide in (False, True):
        kernel = gluon_schedule.Kernel(wide, x, matrix.values, groups, 64, 8, stages, warp_specialized=True)
        y = gluon_schedule.emulate(kernel, 64, weight.shape[0], None, None, seed=seed)
        torch.testing.assert_close(y, dense_reference(x, weight), rtol=1e-12, atol=1e-12)


def test_schedule_model_catches_protocol_mistakes(monkeypatch):
    """The model fails on the mistakes it exists to catch: a loader waiting on the wrong parity
    (deadlock), and an expected byte count that the copies do not deliver."""
    weight, matrix, groups, x, _ = schedule_case("random", 4, seed=3, n_block_rows=8, k_blocks=24, m=64)

    def wrong_parity_loader(self, program, first, n_steps, m0):
        for s in range(n_steps):
            yield program.empty[s % self.stages], (s // self.stages) & 1  # forgets the ^ 1: fresh barriers block
            self.load_step(program, first + s, s % self.stages, m0)

    kernel = gluon_schedule.Kernel(False, x, matrix.values, groups, 64, 8, 3, warp_specialized=True)
    monkeypatch.setattr(gluon_schedule.Kernel, "_loader", wrong_parity_loader)
    with pytest.raises(AssertionError, match="deadlock"):
        gluon_schedule.emulate(kernel, 64, weight.shape[0], None, None)
    monkeypatch.undo()

    kernel = gluon_schedule.Kernel(False, x, matrix.values, groups, 64, 8, 3, warp_specialized=False)
    # Expecting R blocks whatever is present (the wide kernel's count) without loading the absent ones.
    monkeypatch.setattr(kernel, "member_expected_bytes", lambda present: kernel.x_bytes + kernel.rows * kernel.w_bytes)
    with pytest.raises(AssertionError, match="expected bytes"):
        gluon_schedule.emulate(kernel, 64, weight.shape[0], None, None)


# ---------------------------------------------------------------------------------- Triton twins
def _launch_row_group_twin(x, matrix, bias, activation, rows, block_m=32):
    """The Triton row-group kernel over the Gluon kernels' tables; through the public launcher for
    R = 2 and 4, through the jit kernel itself for R = 8 (a size only the Gluon kernels are offered)."""
    import triton

    from nn_blocksparse.kernels import block_sparse_linear as launch
    from nn_blocksparse.kernels.block_sparse_linear import (
        _block_sparse_linear_kernel,
        input_precision_for,
        interpreter_enabled,
    )

    groups = matrix.row_groups(rows)
    if rows in (2, 4):
        config = KernelConfig(block_m=block_m, num_warps=4, num_stages=2, rows_per_program=rows)
        return launch(x, matrix.values, matrix.row_offsets, matrix.col_indices, matrix.row_order, matrix.shape[0],
                      bias, activation, config, groups)
    m = x.shape[0]
    out = torch.empty(m, matrix.shape[0], dtype=x.dtype, device=x.device)
    _block_sparse_linear_kernel[(triton.cdiv(m, block_m) * groups.group_count, 1)](
        x, matrix.values, groups.step_offsets, groups.step_cols, groups.step_blocks, groups.group_rows,
        groups.group_order, bias if bias is not None else out, out, m, groups.group_count,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), 0,
        HAS_BIAS=bias is not None, ACTIVATION=1 if activation == "gelu" else 0,
        INPUT_PRECISION=input_precision_for(x.dtype), BLOCK_SIZE=matrix.block_size, ROWS_PER_PROGRAM=rows,
        BLOCK_M=block_m, GROUP_M=8, SPLIT_K=1, K_BLOCKS=1,
        UPCAST_OPERANDS=x.dtype == torch.bfloat16 and interpreter_enabled(), num_warps=4, num_stages=2)
    return out


@pytest.mark.parametrize("rows", [2, 4, 8])
@pytest.mark.parametrize("layout", ["random", "heads"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_group_twin_on_the_gluon_tables(kernel_device, rows, layout, dtype):
    weight = LAYOUTS[layout](10 * 32, 5 * 32, 32, rows).to(dtype).to(kernel_device)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(45, weight.shape[1], generator=generator).to(dtype).to(kernel_device)
    bias = torch.randn(weight.shape[0], generator=generator).to(dtype).to(kernel_device)
    y = _launch_row_group_twin(x, matrix, bias, "gelu", rows)
    assert_close_to_reference(y, dense_reference(x, weight, bias, "gelu"), dtype)


@pytest.mark.parametrize("rows, block_t", [(2, 64), (4, 64), (2, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_swapped_kernel_matches_the_reference(kernel_device, rows, block_t, dtype, activation):
    # 7 block-rows: the last group is padded; 70 tokens: the last token tile is partial; an empty block-row.
    weight = random_block_sparse_weight(7 * 32, 6 * 32, 32, 0.5, seed=rows, dtype=dtype, empty_block_rows=(2,))
    weight = weight.to(kernel_device)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    generator = torch.Generator().manual_seed(block_t)
    x = torch.randn(70, weight.shape[1], generator=generator).to(dtype).to(kernel_device)
    bias = torch.randn(weight.shape[0], generator=generator).to(dtype).to(kernel_device)
    config = KernelConfig(block_t, 8, 1, 4, 2, rows, kernel="triton_swapped")
    y = block_sparse_linear(x, matrix, bias, activation, backend="triton", config=config)
    assert_close_to_reference(y, dense_reference(x, weight, bias, activation), dtype)


def test_swapped_kernel_without_stored_blocks_writes_the_epilogue(kernel_device):
    weight = torch.zeros(64, 64, dtype=torch.float16, device=kernel_device)
    x = torch.randn(5, 64).to(torch.float16).to(kernel_device)
    bias = torch.randn(64).to(torch.float16).to(kernel_device)
    config = KernelConfig(64, 8, 1, 4, 2, 2, kernel="triton_swapped")
    y = block_sparse_linear(x, BlockSparseMatrix.from_dense(weight, 32), bias, "gelu", backend="triton", config=config)
    assert_close_to_reference(y, dense_reference(x, weight, bias, "gelu"), torch.float16)


# ---------------------------------------------------------------------------------- configs and errors
def test_kernel_field_round_trips_and_is_validated():
    for config in (KernelConfig(128, 8, 1, 4, 3, 4, kernel="gluon_member"),
                   KernelConfig(128, 8, 1, 8, 4, 8, kernel="gluon_wide_ws"),
                   KernelConfig(256, 8, 1, 8, 3, 2, kernel="triton_swapped")):
        assert config.as_list()[-1] == config.kernel and KernelConfig.from_list(config.as_list()) == config
    assert KernelConfig.from_list([64, 8, 1, 4, 3, 1]).kernel == "triton"
    # As ints only (a launch table of ints): the kernel by its position.
    wide = KernelConfig(128, 8, 1, 8, 4, 8, kernel="gluon_wide_ws")
    assert KernelConfig(128, 8, 1, 8, 4, 8, 1, wide.kernel_index) == wide and KernelConfig().kernel_index == 0
    with pytest.raises(ValueError, match="kernel must be one of"):
        KernelConfig(kernel="cutlass")
    with pytest.raises(ValueError, match="split_k = 1"):
        KernelConfig(64, 8, 2, 4, 3, 4, kernel="gluon_member")
    with pytest.raises(ValueError, match="8 with block_m = 128"):
        KernelConfig(64, 8, 1, 8, 3, 4, kernel="gluon_member")
    with pytest.raises(ValueError, match="rows_per_program"):
        KernelConfig(128, 8, 1, 4, 3, 1, kernel="gluon_wide")
    with pytest.raises(ValueError, match="rows_per_program"):
        KernelConfig(64, 8, 1, 4, 3, 3)  # the Triton kernel keeps its own choices


def test_only_a_table_or_an_explicit_config_picks_another_kernel():
    for m in (16, 128, 2048, 16384):
        config = heuristic_config(torch.float16, 32, m, 24, 24 * 24, 132, ((2, 1.0), (4, 1.0), (8, 1.0)))
        assert config.kernel == "triton" and config.rows_per_program in (1, 2, 4)
    assert not any(c.is_gluon for c in launchable_configs(torch.float16, 32))
    sm90 = launchable_configs(torch.float16, 32, arch="sm90")
    assert {c.kernel for c in sm90} == {"triton", "triton_swapped", *GLUON_KERNELS}
    assert not variant_candidate_configs(torch.float32, 32, "sm90")  # fp32 stays on the Triton kernel


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the Gluon kernels run (GPU test below)")
def test_gluon_config_on_cpu_is_a_clear_error():
    weight = random_block_sparse_weight(128, 64, 32, 1.0, dtype=torch.float16)
    x = torch.randn(4, 64).to(torch.float16)
    for kernel in GLUON_KERNELS:
        with pytest.raises(ValueError, match="Hopper|Gluon"):
            block_sparse_linear(x, BlockSparseMatrix.from_dense(weight, 32), backend="triton",
                                config=KernelConfig(64, 8, 1, 4, 3, 4, kernel=kernel))


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs a Hopper GPU; on CPU the schedule model and the Triton twin run")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gluon_kernels_on_hopper(dtype):
    device = torch.device("cuda")
    for layout in ("random", "heads"):
        weight = LAYOUTS[layout](768, 768, 32, 7).to(dtype).to(device)
        matrix = BlockSparseMatrix.from_dense(weight, 32)
        x = torch.randn(333, 768, device=device).to(dtype)
        bias = torch.randn(768, device=device).to(dtype)
        reference = dense_reference(x, weight, bias, "gelu")
        # Each kernel and pipeline on 4 and 8 warps (tools/gpu_kernels_probe.py checks all it times).
        for kernel, block_m, num_warps, num_stages, rows in AOT_SUBSET:
            config = KernelConfig(block_m, 8, 1, num_warps, num_stages, rows, kernel=kernel)
            y = block_sparse_linear(x, matrix, bias, "gelu", backend="triton", config=config)
            assert_close_to_reference(y, reference, dtype)


# ---------------------------------------------------------------------------------- ahead of time


@pytest.mark.skipif(not GLUON_AVAILABLE, reason="this Triton has no Gluon for Hopper")
def test_gluon_and_swapped_kernels_compile_with_wgmma_and_no_spills():
    script = f"""
import torch
from nn_blocksparse.aot import compile_variant_kernel, format_report
from nn_blocksparse.kernels.configs import KernelConfig

reports = [compile_variant_kernel(90, torch.float16, 32, True, "gelu", KernelConfig(bm, 8, 1, w, s, r, kernel=k))
           for k, bm, w, s, r in {AOT_SUBSET!r}]
reports.append(compile_variant_kernel(90, torch.bfloat16, 32, False, None,
                                      KernelConfig(128, 8, 1, 4, 3, 4, kernel="gluon_member_ws")))
swapped = [compile_variant_kernel(arch, torch.float16, 32, True, "gelu",
                                  KernelConfig(128, 8, 1, 4, 3, 2, kernel="triton_swapped")) for arch in (80, 90)]
for report in reports + swapped:
    print(format_report(report))
print("SUMMARY", all(r.ok for r in reports), min(r.wgmma for r in reports), min(r.hgmma for r in reports),
      max(r.spill_bytes for r in reports))
print("SWAPPED", all(r.ok for r in swapped), swapped[1].wgmma)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("SUMMARY")).split()
    assert summary[1] == "True", result.stdout
    wgmma, hgmma, spill = map(int, summary[2:])
    assert wgmma > 0 and spill == 0
    assert hgmma != 0  # -1: no cuobjdump bundled (then only the PTX count is checked)
    # The swapped kernel is plain Triton: it compiles for sm80 too, and on sm90 its 64-row dot is a wgmma.
    swapped = next(line for line in result.stdout.splitlines() if line.startswith("SWAPPED")).split()
    assert swapped[1] == "True" and int(swapped[2]) > 0, result.stdout


# ---------------------------------------------------------------------------------- tuner
def test_tuner_covers_the_other_kernels(kernel_device, tmp_path):
    from benchmarks import tune_kernel

    every = ("triton", *tune_kernel.VARIANT_KERNELS)
    sm90 = list(tune_kernel.candidate_configs(torch.float16, 32, 2048, 24, (3,), kernels=every, arch="sm90"))
    assert {c.kernel for c in sm90} == set(every)
    assert not [c for c in tune_kernel.candidate_configs(torch.float16, 32, 2048, 24, (3,), every, "sm80") if c.is_gluon]
    assert tune_kernel.parse_args(["--kernels", "all"]).kernels == every
    assert tune_kernel.parse_args([]).kernels == ("triton",)  # the default tuning grid is unchanged
    # Entries naming a kernel keep the table's one-line-per-entry form and read back.
    path = tmp_path / "table.json"
    config = KernelConfig(128, 8, 1, 4, 3, 4, kernel="gluon_member_ws")
    tune_kernel.save_table({"configs": {"sm90": {"fp16/bs32/n768/k768/m2048/d1.00": config.as_list()}}}, path)
    assert '[128, 8, 1, 4, 3, 4, 1, "gluon_member_ws"]' in path.read_text()
    assert KernelConfig.from_list(tune_kernel.load_table(path)["configs"]["sm90"]["fp16/bs32/n768/k768/m2048/d1.00"]) == config
    # One problem timed over the swapped kernel's candidates (the Gluon ones need a Hopper GPU).
    with torch.inference_mode():
        row = tune_kernel.tune_problem(torch.float16, 32, 64, 64, 16, 0.5, kernel_device, 1, 1, stages=(2,),
                                       kernels=("triton_swapped",))
    # (the heuristic's Triton config is always timed beside them; on CPU either may be faster)
    assert row["best_triton_swapped_ms"] > 0 and row["configs_failed"] == 0 and row["configs_timed"] > 1


# ---------------------------------------------------------------------------------- GPU probe script
def _probe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_kernels_probe.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_probe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_probe_smoke_run(tmp_path):
    """The probe's CPU smoke mode: every kernel family (Gluon ones through their Triton twin) checked
    against float64, CSV with the ratio column, no timings."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "gpu_kernels_probe.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (csv_path,) = tmp_path.glob("gpu_kernels_probe_*.csv")
    environment, rows = common.read_csv(csv_path)
    assert environment["problems_skipped"] == "0" and environment["dropped_variants"] == "none"
    assert {row["layout"] for row in rows} == {"random", "heads"}
    assert {row["method"] for row in rows} == {"cublas", "today", "triton_swapped", *GLUON_KERNELS}
    assert all(float(row["max_rel_err"]) < 5e-3 for row in rows)
    assert all("Triton twin" in row["note"] for row in rows if row["method"].startswith("gluon"))
    assert "stored_tflops_over_cublas" in rows[0] and all(row["time_ms"] == "nan" for row in rows)
    # --compile-only (what gpu_session.sh runs beside the GPU tests): the checks alone, no CSV.
    result = subprocess.run([sys.executable, str(script), "--smoke", "--compile-only", "--out", str(tmp_path / "c")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "5 of 5 variants passed" in result.stdout, result.stdout[-2000:]
    assert not (tmp_path / "c").exists()


def test_gpu_probe_times_only_aot_checked_configs_in_priority_order(tmp_path):
    probe = _probe()
    candidates = set(variant_candidate_configs(torch.float16, 32, "sm90"))
    assert set(probe.probe_configs()) <= candidates  # so `python -m nn_blocksparse.aot` compiles each
    assert {c.kernel for c in probe.probe_configs()} == {"triton_swapped", *GLUON_KERNELS}
    args = probe.parse_args([])
    problems = probe.problems_in_priority_order(args)
    assert len(problems) == 2 * 4 * 4 * 4 * 2
    first = problems[: 2 * 2 * 4]  # fp16, M 2048 and 8192, densities 1.0 and 0.5, random layout first
    assert {(p.dtype, p.layout) for p in first} == {("fp16", "random")} and {p.m for p in first} == {2048, 8192}
    assert {p.density for p in first} == {1.0, 0.5} and problems[-1].dtype == "bf16"
    # The plot and summary from timed rows (as a GPU run writes them).
    rows = []
    for density, (method, ratio) in product((0.5, 1.0), (("cublas", 1.0), ("today", 0.4), ("gluon_wide", 0.8))):
        rows.append({"dtype": "fp16", "layout": "random", "shape": "768x768", "m": 2048, "target_density": density,
                     "method": method, "variant": method, "stored_tflops_over_cublas": ratio, "cublas_tflops": 400.0,
                     "time_ms": 0.01})
    probe.print_summary(rows)
    (png,) = probe.plot(rows, lambda layout: tmp_path / f"{layout}.png", "test")
    assert png.exists() and png.stat().st_size > 0
