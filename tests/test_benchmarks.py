"""The benchmark scripts keep working: each `--quick` mode runs on CPU into a temporary folder.

Checks the CSVs (documented columns, the `# key: value` environment record, positive times, small
differences between every fast path and dense F.linear / the unpatched model) and the PNGs. The
GPU-only scripts are checked as far as a CPU allows: `tune_kernel` exits with status 2 without
CUDA, and runs end to end on one tiny problem under Triton's interpreter.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import (bench_cpu, bench_e2e, bench_ffn_alignment, bench_kernel, common, graph_check,  # noqa: E402
                        launch_overhead, run_all, tune_kernel, warm_triton_cache)

ENVIRONMENT_KEYS = {"date", "device", "device_name", "cpu", "torch_threads", "torch", "cuda", "triton",
                    "transformers"}
THREADS = "1"  # deterministic and quick on a shared 2-core machine
# fp32: the fast paths only reorder sums (and patched models add fused QKV / SDPA).
MAX_KERNEL_DIFF = 1e-4
MAX_MODEL_DIFF = 1e-3


def read(path: Path, columns: list[str]) -> list[dict]:
    assert path.is_file(), f"missing {path}"
    environment, rows = common.read_csv(path)
    assert ENVIRONMENT_KEYS <= set(environment), sorted(environment)
    assert environment["device"] == "cpu"
    assert rows, f"{path} has no rows"
    assert list(rows[0]) == columns
    return rows


def assert_png(path: Path) -> None:
    assert path.is_file(), f"missing {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def number(value: str) -> float:
    return float(value) if value not in ("", None) else math.nan


def check_kernel_rows(rows: list[dict], methods, max_diff: float = MAX_KERNEL_DIFF) -> None:
    assert {r["method"] for r in rows} == set(methods)
    for row in rows:
        if row["method"] == "torch_bsr" and math.isnan(number(row["time_ms"])):
            assert row["note"].startswith("unsupported"), row  # allowed, but only with the reason
            continue
        assert number(row["time_ms"]) > 0, row
        assert number(row["tflops"]) > 0, row
        assert number(row["max_abs_diff"]) <= max_diff, row
        assert 0 < number(row["density"]) <= 1
        assert number(row["ideal_speedup"]) == pytest.approx(1 / number(row["density"]), rel=1e-4)
    assert all(number(r["speedup_vs_dense"]) == 1.0 for r in rows if r["method"] == "dense")


def check_e2e_rows(rows: list[dict], methods) -> None:
    assert {r["method"] for r in rows} == set(methods)
    for row in rows:
        # every mode patched and ran; hybrid says how many of its matrices went block-sparse
        expected = r"block-sparse \d+ of \d+ matrices" if row["method"] == "hybrid" else ""
        assert re.fullmatch(expected, row["note"]), row
        assert number(row["time_ms"]) > 0, row
        assert number(row["max_abs_diff"]) <= MAX_MODEL_DIFF, row
    assert all(r["published_speedup"] == "" for r in rows)  # the 1.84x target is BERT-base's only


def test_bench_kernel_quick(tmp_path):
    assert bench_kernel.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    tag = common.device_tag(torch.device("cpu"))
    rows = read(tmp_path / f"kernel_{tag}_quick.csv", bench_kernel.KERNEL_COLUMNS)
    check_kernel_rows(rows, bench_kernel.METHODS)
    assert {r["shape"] for r in rows} == {"128x128", "256x128"}
    assert {number(r["target_density"]) for r in rows} == {1.0, 0.5, 0.1}
    assert {r["dtype"] for r in rows} == {"fp32"}
    summary = read(tmp_path / f"kernel_crossover_{tag}_quick.csv", bench_kernel.CROSSOVER_COLUMNS)
    assert len(summary) == 2  # one per shape (one M, bs, dtype)
    assert_png(tmp_path / f"kernel_speedup_m64_{tag}_quick.png")


def test_bench_e2e_quick(tmp_path):
    assert bench_e2e.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    tag = common.device_tag(torch.device("cpu"))
    rows = read(tmp_path / f"e2e_{tag}_quick.csv", bench_e2e.E2E_COLUMNS)
    check_e2e_rows(rows, ("dense", *bench_e2e.PATCH_MODES))
    assert {(int(r["batch"]), int(r["seq"])) for r in rows} == {(1, 32), (2, 64)}
    assert {r["model"] for r in rows} == {"minilm"}
    resize = [r for r in rows if r["method"] == "resize"]
    dense = [r for r in rows if r["method"] == "dense"]
    assert int(resize[0]["heads"]) < int(dense[0]["heads"])  # resizing really removed heads
    assert_png(tmp_path / f"e2e_{tag}_quick.png")


def test_bench_ffn_alignment_quick(tmp_path):
    assert bench_ffn_alignment.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    tag = common.device_tag(torch.device("cpu"))
    rows = read(tmp_path / f"ffn_alignment_{tag}_quick.csv", bench_e2e.E2E_COLUMNS)
    assert [r["method"] for r in rows] == ["dense", "resize/pad1", "resize/pad8", "resize/pad32", "hybrid/pad32"]
    for row in rows:
        assert number(row["time_ms"]) > 0 and number(row["max_abs_diff"]) <= MAX_MODEL_DIFF, row
    # Padding stores zero neurons: more weights stored, the same nonzero ones.
    stored = [int(r["linear_weights_stored"]) for r in rows[1:4]]
    assert stored[0] < stored[1] < stored[2] < int(rows[0]["linear_weights_stored"])
    assert len({r["linear_weights_nonzero"] for r in rows}) == 1
    assert re.fullmatch(r"block-sparse \d+ of \d+ matrices", rows[-1]["note"])
    assert_png(tmp_path / f"ffn_alignment_{tag}_quick.png")


def test_bench_cpu_quick(tmp_path):
    threads_before = torch.get_num_threads()
    assert bench_cpu.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads_before  # restored
    tag = common.device_tag(torch.device("cpu"))
    kernel_path = tmp_path / f"cpu_kernel_{tag}_quick.csv"
    rows = read(kernel_path, bench_kernel.KERNEL_COLUMNS)
    environment = common.read_csv(kernel_path)[0]
    assert environment["torch_threads"] == THREADS and environment["cpu"] and environment["cpu_native_isa"]
    check_kernel_rows(rows, bench_cpu.kernel_methods())
    isa = environment["cpu_native_isa"]
    assert all(r["note"] == (f"isa={isa}" if isa != "none" else r["note"]) for r in rows if r["method"] == "ours")
    read(tmp_path / f"cpu_kernel_crossover_{tag}_quick.csv", bench_kernel.CROSSOVER_COLUMNS)
    e2e = read(tmp_path / f"cpu_e2e_{tag}_quick.csv", bench_e2e.E2E_COLUMNS)
    check_e2e_rows(e2e, ("dense", *bench_cpu.E2E_MODES))
    assert_png(tmp_path / f"cpu_kernel_speedup_m64_{tag}_quick.png")
    assert_png(tmp_path / f"cpu_e2e_{tag}_quick.png")


def test_bench_cpu_bf16_kernels_quick(tmp_path):
    argv = ["--quick", "--threads", THREADS, "--out", str(tmp_path), "--dtype", "bf16", "--skip-e2e"]
    assert bench_cpu.main(argv) == 0
    tag = common.device_tag(torch.device("cpu"))
    rows = read(tmp_path / f"cpu_kernel_bf16_{tag}_quick.csv", bench_kernel.KERNEL_COLUMNS)
    assert {r["dtype"] for r in rows} == {"bf16"}
    # bf16 outputs of O(1) differ from dense F.linear's by their rounding (2^-8 relative) and the
    # order of fp32 sums.
    check_kernel_rows(rows, bench_cpu.kernel_methods(), max_diff=0.05)
    assert_png(tmp_path / f"cpu_kernel_speedup_m64_bf16_{tag}_quick.png")


def test_crossover_is_the_largest_density_where_ours_beats_dense():
    def row(density, method, speedup):
        return {"shape": "768x768", "m": 128, "block_size": 32, "dtype": "fp16", "density": density,
                "method": method, "speedup_vs_dense": speedup}

    rows = [row(1.0, "ours", 0.8), row(0.5, "ours", 1.3), row(0.75, "ours", 0.95), row(0.1, "ours", 4.0),
            row(0.6, "ours", 1.1), row(1.0, "torch_bsr", 0.1), row(0.1, "torch_bsr", 0.9)]
    (summary,) = bench_kernel.crossover_rows(rows)
    assert summary["crossover_density"] == 0.6
    assert math.isnan(summary["crossover_density_torch_bsr"])
    assert summary["lowest_density"] == 0.1 and summary["speedup_at_lowest_density"] == 4.0


def test_csv_round_trip_keeps_the_environment(tmp_path):
    environment = common.environment_record(torch.device("cpu"))
    path = common.write_csv(tmp_path / "x.csv", [{"a": 1.5, "b": float("nan")}, {"a": 2, "b": None}], ["a", "b"],
                            environment)
    read_environment, rows = common.read_csv(path)
    assert read_environment == {key: " ".join(value.split()) for key, value in environment.items()}
    assert rows == [{"a": "1.5", "b": "nan"}, {"a": "2", "b": ""}]
    with pytest.raises(KeyError):
        common.write_csv(tmp_path / "y.csv", [{"c": 1}], ["a"], environment)


def test_random_block_layout_has_the_requested_density():
    weight = common.random_block_sparse_weight(256, 128, 32, 0.36, seed=3)
    blocks = weight.reshape(8, 32, 4, 32).ne(0).any(dim=3).any(dim=1)
    assert int(blocks.sum()) == round(0.36 * 32)
    sparser = common.random_block_sparse_weight(256, 128, 32, 0.1, seed=3)
    assert not (sparser.ne(0) & weight.eq(0)).any()  # nested layouts at equal seed


def test_run_all_plan():
    gpu = run_all.plan(True, Path("out"))
    assert [name for name, _ in gpu] == ["bench_kernel", "bench_kernel", "bench_e2e", "bench_e2e",
                                         "bench_ffn_alignment", "launch_overhead", "bench_cpu"]
    assert [("--cuda-graph" in argv) for _, argv in gpu] == [False, True, False, True, True, False, False]
    assert all("--quick" not in argv for _, argv in gpu)
    cpu = run_all.plan(False, Path("out"), threads=2)
    assert cpu[0] == ("bench_cpu", ["--out", "out", "--threads", "2"])
    assert all("--quick" in argv for name, argv in cpu[1:])
    assert [name for name, _ in cpu] == ["bench_cpu", "bench_kernel", "bench_e2e", "bench_ffn_alignment"]


def test_tune_kernel_arguments_and_candidates():
    args = tune_kernel.parse_args(["--quick"])
    assert args.dtypes == ["fp16"] and args.block_sizes == [32] and args.out is None and args.stages == (3,)
    assert tune_kernel.parse_args([]).stages == (2, 3, 4)
    full = tune_kernel.parse_args([])
    assert full.m[0] == 16 and full.m[-1] == 8192 and len(full.shapes) == 4
    configs = list(tune_kernel.candidate_configs(torch.float16, 32, m=16, longest_block_row=3))
    assert configs and all(c.block_m == 16 and c.split_k <= 2 for c in configs)
    # Per stage count: one row per program, one block per step: 4 BLOCK_M x 4 SPLIT_K x 2 warp counts;
    # 2 blocks per step (x tile up to 64x64 on 4 warps, 128x64 on 8): (3 + 4) x 4 SPLIT_K; 4 blocks
    # per step (128 deep): (2 + 3) BLOCK_M x 3 SPLIT_K (8 x 4 blocks > 24); row groups: 4 BLOCK_M for
    # each of R = 2, 4 x 2 warp counts, less the 128x128 tile on 4 warps, which spills.
    large = list(tune_kernel.candidate_configs(torch.float16, 32, m=8192, longest_block_row=24))
    assert len(large) == (4 * 4 * 2 + (3 + 4) * 4 + (2 + 3) * 3 + (4 + 4) * 2 - 1) * 3
    assert not [c for c in large if c.block_m * c.k_blocks * 32 > (64 * 64 if c.num_warps == 4 else 128 * 64)]
    assert not [c for c in large if c.num_warps == 4 and c.block_m * c.rows_per_program > 128 * 2]
    assert all(c.split_k == 1 and c.k_blocks == 1 for c in large if c.rows_per_program > 1)
    # Short rows: no split of fewer blocks than a step holds.
    short = list(tune_kernel.candidate_configs(torch.float16, 32, m=8192, longest_block_row=3))
    assert {(c.split_k, c.k_blocks) for c in short if c.k_blocks > 1} == {(1, 2)}
    # 64-wide blocks: row groups stop where the AOT check found spills (BLOCK_M x R x 64 <= 128 x 64).
    wide_blocks = list(tune_kernel.candidate_configs(torch.float16, 64, m=8192, longest_block_row=24))
    assert max(c.block_m * c.rows_per_program for c in wide_blocks) == 128
    assert {c.k_blocks for c in wide_blocks} == {1, 2}  # steps at most 128 deep


def run_module(module: str, *args: str, env_update: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_update or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_scripts_exit_with_status_2_without_cuda(tmp_path):
    result = run_module("benchmarks.tune_kernel", "--quick", "--out", str(tmp_path / "t.json"),
                        env_update={"TRITON_INTERPRET": "0"})
    assert result.returncode == 2 and "CUDA" in result.stderr
    assert not (tmp_path / "t.json").exists()
    assert bench_kernel.main(["--out", str(tmp_path)]) == 2
    assert bench_e2e.main(["--out", str(tmp_path)]) == 2
    assert bench_ffn_alignment.main(["--out", str(tmp_path)]) == 2
    assert warm_triton_cache.main(["--sets", "bench"]) == 2
    assert launch_overhead.main([]) == 2
    assert graph_check.main([]) == 2


def test_tune_kernel_end_to_end_under_the_interpreter(tmp_path):
    """One tiny problem through the whole tuner (the interpreter stands in for the GPU)."""
    out = tmp_path / "tuned.json"
    result = run_module("benchmarks.tune_kernel", "--device", "cpu", "--dtypes", "fp16", "--block-sizes", "32",
                        "--shapes", "64x64,32x64", "--m", "16", "--densities", "0.5", "--out", str(out),
                        "--log", str(tmp_path / "tune.csv"), env_update={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    from nn_blocksparse.kernels.configs import KernelConfig

    table = json.loads(out.read_text())
    assert set(table) >= {"configs", "device", "versions"}
    (entries,) = table["configs"].values()
    # Every shape's entry (the table is rewritten after each shape and must keep the earlier ones), sorted.
    assert list(entries) == ["fp16/bs32/n32/k64/m16/d0.50", "fp16/bs32/n64/k64/m16/d0.50"]
    KernelConfig.from_list(entries["fp16/bs32/n64/k64/m16/d0.50"])  # a valid configuration
    rows = read(tmp_path / "tune.csv", tune_kernel.LOG_COLUMNS)
    assert len(rows) == 2 and all(number(row["best_ms"]) > 0 and int(row["configs_timed"]) > 0 for row in rows)
    # The best of each kernel family is logged (nan where it had no candidate: at 50% density a row of
    # these 2-column layouts may hold fewer blocks than a 2-block step), and the best is the best of them.
    families = ["best_one_block_ms", "best_k_blocks_ms", "best_row_groups_ms"]
    timed = [[number(row[f]) for f in families if number(row[f]) == number(row[f])] for row in rows]
    assert all(number(row["best_ms"]) == min(times) for row, times in zip(rows, timed))
    assert all(number(row["best_one_block_ms"]) > 0 and number(row["best_row_groups_ms"]) > 0 for row in rows)
    assert {row["key"] for row in rows} == set(entries)


def test_warm_triton_cache_covers_what_the_timed_runs_launch():
    from nn_blocksparse.kernels.configs import launchable_configs

    def configs(jobs, has_bias=False):
        assert all(job[:3] == ("ours", "fp16", 32) and job[3] == has_bias for job in jobs)
        return {(job[5], job[4]) for job in jobs}

    tune = warm_triton_cache.variants(["tune"], ["fp16"], [32], (3,))
    candidates = {tuple(c.as_list()) for m in tune_kernel.M_BUCKETS
                  for c in tune_kernel.candidate_configs(torch.float16, 32, m, 96, (3,))}
    assert configs(tune) == {(c, None) for c in candidates}
    library = {tuple(c.as_list()) for c in launchable_configs(torch.float16, 32)}
    assert configs(warm_triton_cache.variants(["bench"], ["fp16"], [32], (3,))) == {(c, None) for c in library}
    e2e = warm_triton_cache.variants(["e2e"], ["fp16"], [32], (3,))
    assert configs(e2e, has_bias=True) == {(c, a) for c in library for a in (None, "gelu")}
    args = warm_triton_cache.parse_args(["--shapes", "768x768,3072x768", "--m", "128", "--densities", "1.0,0.5"])
    bsr = warm_triton_cache.variants(["torch_bsr"], ["fp16"], [32], (3,), args.bench_cases)
    assert bsr == [("torch_bsr", "fp16", 32, n, k, 128, d) for n, k in ((768, 768), (3072, 768)) for d in (1.0, 0.5)]
    everything = warm_triton_cache.variants(warm_triton_cache.SETS, ["fp16"], [32], (3,), args.bench_cases)
    assert len(everything) == len(set(everything)) == len(set(tune) | set(e2e) | set(bsr) | {
        ("ours", "fp16", 32, False, None, c) for c in library})


def test_warm_triton_cache_runs_each_job(kernel_device):
    """Each job really runs (our kernel under the interpreter without a GPU); a broken one is reported, not raised."""
    device = kernel_device.type
    for job in [("ours", "fp16", 32, False, None, (64, 8, 2, 4, 3, 1)), ("ours", "bf16", 16, True, "gelu",
                                                                          (32, 8, 1, 4, 3, 4)),
                ("torch_bsr", "fp32", 32, 64, 64, 16, 0.5)]:
        assert warm_triton_cache.compile_variant(job, device) == (job, "")
    job = ("ours", "fp16", 32, False, None, (64, 8, 1, 4, 3, 3))  # 3 rows per program: not a valid configuration
    assert "rows_per_program" in warm_triton_cache.compile_variant(job, device)[1]
