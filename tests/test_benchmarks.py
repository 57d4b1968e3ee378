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

from benchmarks import (bench_compile, bench_cpu, bench_cpu_attention, bench_cpu_engines, bench_cpu_norm,  # noqa: E402
                        bench_cpu_weights_cold, bench_e2e, bench_ffn_alignment, bench_kernel, common, engines, graph_check, launch_overhead,
                        profile_cpu_hybrid, run_all, tune_kernel, warm_triton_cache)
from nn_blocksparse.cpu import native_isa  # noqa: E402
from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name  # noqa: E402

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


# Without a GPU (the alternatives), or where the CPU lacks the ISA (oneDNN's bf16 inner product
# without AVX-512) or torch lacks the kernel (CPU BSR in bf16).
MAY_BE_UNSUPPORTED = {"torch_bsr", "dense_onednn", *bench_kernel.ALTERNATIVE_METHODS}


def check_kernel_rows(rows: list[dict], methods, max_diff: float = MAX_KERNEL_DIFF) -> None:
    assert {r["method"] for r in rows} == set(methods)
    for row in rows:
        if row["method"] in MAY_BE_UNSUPPORTED and math.isnan(number(row["time_ms"])):
            assert row["note"].startswith("unsupported"), row  # allowed, but only with the reason
            continue
        assert number(row["time_ms"]) > 0, row
        assert number(row["tflops"]) > 0, row
        assert number(row["max_abs_diff"]) <= max_diff, row
        assert 0 < number(row["density"]) <= 1
        assert number(row["ideal_speedup"]) == pytest.approx(1 / number(row["density"]), rel=1e-4)
    assert all(number(r["speedup_vs_dense"]) == 1.0 for r in rows if r["method"] == "dense")
    for row in rows:  # stored-block TFLOP/s over cuBLAS's: the speedup scaled by what the method stores
        if row["method"] in ("ours", "torch_bsr") and number(row["time_ms"]) > 0:
            expected = number(row["speedup_vs_dense"]) * number(row["density"])
            assert number(row["stored_tflops_over_cublas"]) == pytest.approx(expected, rel=1e-3), row


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


def test_bench_kernel_structured_layouts(tmp_path):
    argv = ["--quick", "--threads", THREADS, "--out", str(tmp_path), "--layouts", "head_structured,nn_pruning_like",
            "--shapes", "256x128", "--densities", "0.5", "--methods", "dense,ours"]
    assert bench_kernel.main(argv) == 0
    tag = common.device_tag(torch.device("cpu"))
    rows = read(tmp_path / f"kernel_{tag}_quick.csv", bench_kernel.KERNEL_COLUMNS)
    check_kernel_rows(rows, ("dense", "ours"))
    assert {r["layout"] for r in rows} == {"head_structured", "nn_pruning_like"}
    assert all(number(r["density"]) == 0.5 for r in rows)  # both layouts hit the density exactly
    summary = read(tmp_path / f"kernel_crossover_{tag}_quick.csv", bench_kernel.CROSSOVER_COLUMNS)
    assert {r["layout"] for r in summary} == {"head_structured", "nn_pruning_like"}
    for layout in ("head_structured", "nn_pruning_like"):
        assert_png(tmp_path / f"kernel_speedup_m64_{layout}_{tag}_quick.png")


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


def test_bench_compile_quick(tmp_path):
    assert bench_compile.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    tag = common.device_tag(torch.device("cpu"))
    path = tmp_path / f"compile_e2e_{tag}_quick.csv"
    rows = read(path, bench_compile.COLUMNS)
    assert "backend='eager'" in common.read_csv(path)[0]["compile"]
    assert [(r["method"], r["execution"]) for r in rows] == [
        (method, execution) for method in ("dense", *bench_compile.MODES) for execution in ("eager", "compiled")]
    for row in rows:
        assert row["model"] == "minilm" and row["layers"] == "1" and (row["batch"], row["seq"]) == ("1", "32")
        assert number(row["time_ms"]) > 0 and number(row["max_abs_diff"]) <= MAX_MODEL_DIFF, row
        assert number(row["speedup_vs_dense_eager"]) > 0 and number(row["speedup_vs_resize"]) > 0, row
        assert number(row["compile_s"]) >= 0, row
    assert {number(r["speedup_vs_eager"]) for r in rows if r["execution"] == "eager"} == {1.0}
    assert all(number(r["speedup_vs_resize"]) == 1.0 for r in rows if r["method"] == "resize")
    assert re.fullmatch(r"block-sparse \d+ of \d+ matrices", rows[-1]["note"])
    assert_png(tmp_path / f"compile_e2e_{tag}_quick.png")
    with pytest.raises(SystemExit):
        bench_compile.parse_args(["--executions", "reduce_overhead"])  # CUDA only


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
    for row in (r for r in rows if r["method"] == "ours"):  # the ISA that ran, or why the reference did
        assert (row["note"] == f"isa={isa}") if isa != "none" else row["note"].startswith("reference: "), row
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


def test_bench_cpu_engines_quick(tmp_path):
    """Runs with whichever engines are installed; a missing one leaves NaN and says why in `note`."""
    threads_before = torch.get_num_threads()
    assert bench_cpu_engines.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads_before
    path = tmp_path / f"cpu_engines_{common.device_tag(torch.device('cpu'))}_quick.csv"
    (row,) = read(path, bench_cpu_engines.COLUMNS)
    environment = common.read_csv(path)[0]
    assert {"torch_cpu_capability", "cpu_native_isa", "cpu_flags", "onnxruntime", "openvino",
            "loadavg_before", "loadavg_after"} <= set(environment)
    assert environment["threads"] == environment["torch_threads"] == THREADS
    assert (row["model"], row["batch"], row["seq"], row["dtype"]) == ("minilm", "1", "128", "fp32")
    for method in bench_cpu_engines.TORCH_METHODS:
        assert number(row[f"{method}_ms"]) > 0 and number(row[f"{method}_max_abs_diff"]) <= MAX_MODEL_DIFF, row
    for engine in engines.ENGINES:
        if engines.engine_unavailable(engine) is None:  # installed: it must have run, and agree with torch
            assert number(row[f"{engine}_ms"]) > 0 and number(row[f"{engine}_max_abs_diff"]) <= MAX_MODEL_DIFF, row
        else:
            assert math.isnan(number(row[f"{engine}_ms"])) and f"{engine}: " in row["note"], row
    if engines.engine_unavailable("openvino") is None:
        assert row["openvino_precision"] == "f32"  # fp32 rows ask for f32 explicitly
    assert math.isnan(number(row["hybrid_bf16w_ms"]))  # a bf16 column: fp32 rows leave it empty
    # The floor is hybrid's stored encoder linear FLOPs plus attention FLOPs at the measured GEMM rate.
    stored, heads = int(row["hybrid_linear_weights_stored"]), int(row["heads"])
    flops = 2 * 128 * stored + 4 * 128 * 128 * 32 * heads  # MiniLM: head size 32
    assert number(row["floor_ms"]) == pytest.approx(flops / (number(row["gemm_gflops"]) * 1e6), rel=1e-4)
    assert stored < int(row["resize_linear_weights_stored"]) and number(row["floor_ms"]) < number(row["resize_floor_ms"])
    assert number(row["hybrid_over_floor"]) == pytest.approx(number(row["hybrid_ms"]) / number(row["floor_ms"]),
                                                             rel=1e-4)
    assert number(row["hybrid_speedup_vs_resize"]) == pytest.approx(
        number(row["resize_ms"]) / number(row["hybrid_ms"]), rel=1e-4)
    assert re.fullmatch(r"(dense|dense_onednn) fp32", row["gemm_method"])
    assert re.fullmatch(r"block-sparse \d+ of \d+ matrices", row["hybrid_plan"])
    assert_png(path.with_suffix(".png"))


def test_bench_cpu_engines_padded_quick(tmp_path):
    """A padded batch: every engine installed runs it and agrees with the unpatched model."""
    assert bench_cpu_engines.main(["--quick", "--padded", "--sizes", "3x32", "--threads", THREADS,
                                   "--out", str(tmp_path)]) == 0
    path = tmp_path / f"cpu_engines_padded_{common.device_tag(torch.device('cpu'))}_quick.csv"
    (row,) = read(path, bench_cpu_engines.COLUMNS)
    assert (row["model"], row["batch"], row["seq"]) == ("minilm", "3", "32")
    for method in bench_cpu_engines.TORCH_METHODS:
        assert number(row[f"{method}_ms"]) > 0 and number(row[f"{method}_max_abs_diff"]) <= MAX_MODEL_DIFF, row
    for engine in engines.ENGINES:
        if engines.engine_unavailable(engine) is None:
            assert number(row[f"{engine}_max_abs_diff"]) <= MAX_MODEL_DIFF, row
    assert bench_cpu_engines.parse_args(["--padded"]).sizes == [(8, 128)]


def test_random_inputs_pad_every_sequence_but_the_first():
    inputs = bench_e2e.random_inputs(6, 40, 5000, torch.device("cpu"), padded=True)
    mask = inputs["attention_mask"]
    lengths = mask.sum(1)
    assert lengths[0] == 40 and (lengths >= 20).all() and (lengths[1:] < 40).any()
    assert all(torch.equal(mask[row, :length], torch.ones(int(length), dtype=torch.long))
               for row, length in enumerate(lengths))  # ones, then zeros
    assert torch.equal(bench_e2e.random_inputs(6, 40, 5000, torch.device("cpu"))["attention_mask"],
                       torch.ones(6, 40, dtype=torch.long))
    with pytest.raises(ValueError):
        bench_e2e.random_inputs(2, 8, 5000, torch.device("cpu"), with_mask=False, padded=True)


def test_engines_missing_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # "import onnxruntime" now fails, as if not installed
    reason = engines.engine_unavailable("onnxruntime")
    assert "onnxruntime" in reason and "pip install" in reason
    args = bench_cpu_engines.parse_args(["--quick", "--engines", "onnxruntime"])
    built, skipped = bench_cpu_engines.build_engines(None, {}, args, Path("unused"))
    assert built == {} and skipped == {"onnxruntime": reason}
    with pytest.raises(ValueError, match="engine must be one of"):
        engines.engine_unavailable("tensorrt")
    assert bench_cpu_engines.parse_args(["--engines", "none"]).engines == []


def test_bench_cpu_engines_arguments():
    quick = bench_cpu_engines.parse_args(["--quick"])
    assert (quick.models, quick.sizes, quick.dtypes, quick.threads) == (["minilm"], [(1, 128)], [torch.float32], 2)
    full = bench_cpu_engines.parse_args([])
    assert full.models == ["minilm", "bert-base"] and full.sizes == [(1, 128), (8, 128)]
    assert full.dtypes == [torch.float32, torch.bfloat16] and full.engines == list(engines.ENGINES)
    for bad in (["--engines", "tensorrt"], ["--dtypes", "fp16"], ["--models", "gpt2"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            bench_cpu_engines.parse_args(bad)


def test_bench_cpu_engines_bf16_row_fills_the_bf16_weights_column():
    """A tiny pruned BERT through one bf16 row: hybrid_bf16w keeps fp32 activations, so it is closer to
    the fp32 reference than the all-bf16 hybrid."""
    from transformers import BertConfig, BertModel

    from nn_blocksparse.bert import prune_like_nn_pruning

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2,
                        vocab_size=1100)
    model = BertModel(config).eval()
    prune_like_nn_pruning(model, seed=0)
    args = bench_cpu_engines.parse_args(["--quick", "--repeats", "1", "--warmup", "0"])
    inputs = bench_e2e.random_inputs(1, 32, config.vocab_size, torch.device("cpu"))
    with torch.inference_mode():
        reference = model(**inputs).last_hidden_state

    variants, failures = bench_cpu_engines.torch_variants(model, torch.bfloat16)
    assert set(variants) == {"dense", "resize", "hybrid", "hybrid_bf16w"} and not failures
    assert next(variants["hybrid_bf16w"].parameters()).dtype == torch.float32  # the embeddings stay fp32
    row = bench_cpu_engines.run_case("tiny", variants, failures, {}, {}, torch.bfloat16, 1, 32, reference,
                                     (100.0, "dense"), args)
    scale = max(1.0, reference.abs().max().item())
    assert row["hybrid_bf16w_ms"] > 0 and 0 < row["hybrid_bf16w_max_abs_diff"] <= 0.05 * scale
    assert 0 < row["hybrid_max_abs_diff"] <= 0.05 * scale  # real bf16
    assert row["hybrid_bf16w_max_abs_diff"] < row["hybrid_max_abs_diff"]
    assert row["dtype"] == "bf16" and row["note"] == ""


def test_bench_cpu_engines_refuses_to_time_a_wrong_answer():
    reference = torch.ones(2, 3) * 4
    assert bench_cpu_engines.check_accuracy("x", reference + 1e-4, reference, torch.float32) == pytest.approx(1e-4, rel=1e-2)
    with pytest.raises(RuntimeError, match="openvino .fp32. differs"):
        bench_cpu_engines.check_accuracy("openvino", reference + 0.01, reference, torch.float32)
    bench_cpu_engines.check_accuracy("openvino", reference + 0.1, reference, torch.bfloat16)  # within 5e-2 x 4
    with pytest.raises(RuntimeError):
        bench_cpu_engines.check_accuracy("x", reference * float("nan"), reference, torch.float32)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_cpu_attention_quick(tmp_path, dtype):
    assert bench_cpu_attention.main(["--quick", "--threads", THREADS, "--out", str(tmp_path), "--dtype", dtype]) == 0
    stem = "cpu_attention" if dtype == "fp32" else f"cpu_attention_{dtype}"
    path = tmp_path / f"{stem}_{common.device_tag(torch.device('cpu'))}_quick.csv"
    rows = read(path, bench_cpu_attention.COLUMNS)
    assert {"loadavg_before", "loadavg_after"} <= set(common.read_csv(path)[0])
    torch_dtype = dtype_from_name(dtype)
    assert {(row["mask"], row["method"]) for row in rows} == {
        (mask, method) for mask in bench_cpu_attention.MASKS for method in bench_cpu_attention.method_names(torch_dtype)}
    for row in rows:
        assert (row["model"], row["batch"], row["seq"], row["heads"], row["head_dim"], row["dtype"]) == (
            "bert-base", "1", "64", "12", "64", dtype)
        if row["method"] == "native" and native_isa() is None:  # no native kernel here: no time, and why
            assert math.isnan(number(row["time_ms"])) and "no native kernel" in row["note"], row
            continue
        if row["method"] == "native" and dtype == "bf16" and native_isa() not in bench_cpu_attention.BF16_ISAS:
            assert math.isnan(number(row["time_ms"])) and "no bf16 attention" in row["note"], row
            continue
        time_ms = number(row["time_ms"])
        assert time_ms > 0 and number(row["max_abs_diff"]) <= (1e-4 if dtype == "fp32" else 2e-2), row
        assert number(row["gflops"]) == pytest.approx(4 * 12 * 64 * 64 * 64 / (time_ms * 1e6), rel=1e-4)
        sdpa = next(r for r in rows if r["mask"] == row["mask"] and r["method"] == "sdpa")
        assert number(row["speedup_vs_sdpa"]) == pytest.approx(number(sdpa["time_ms"]) / time_ms, rel=1e-4)
    assert_png(path.with_suffix(".png"))


def test_bench_cpu_attention_refuses_a_wrong_answer(monkeypatch):
    monkeypatch.setattr(bench_cpu_attention, "sdpa_attention", lambda qkv, heads, head_dim, mask:
                        torch.zeros(qkv.shape[0], qkv.shape[1], heads * head_dim))
    with pytest.raises(RuntimeError, match="sdpa differs from float64"):
        bench_cpu_attention.run_case("minilm", 1, 8, 2, "none", warmup=0, repeats=1)


def test_bench_cpu_norm_quick(tmp_path):
    assert bench_cpu_norm.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    path = tmp_path / f"cpu_norm_{common.device_tag(torch.device('cpu'))}_quick.csv"
    rows = read(path, bench_cpu_norm.COLUMNS)
    assert {"loadavg_before", "loadavg_after"} <= set(common.read_csv(path)[0])
    cases = {(DTYPE_NAMES[x], DTYPE_NAMES[residual]) for x, residual in bench_cpu_norm.DTYPE_CASES}
    assert {(row["x_dtype"], row["residual_dtype"], row["method"]) for row in rows} == {
        (x, residual, method) for x, residual in cases for method in bench_cpu_norm.method_names()}
    for row in rows:
        assert (row["model"], row["batch"], row["seq"], row["width"]) == ("bert-base", "1", "128", "768")
        if row["method"] == "native" and native_isa() is None:  # no native kernel here: no time, and why
            assert math.isnan(number(row["time_ms"])) and "no native kernel" in row["note"], row
            continue
        time_ms = number(row["time_ms"])
        out_dtype = "fp32" if "fp32" in (row["x_dtype"], row["residual_dtype"]) else "bf16"
        # The script checked max(1, max |reference|) times the tolerance; layer norm outputs stay under 10.
        limit = 10 * bench_cpu_norm.TOLERANCE[dtype_from_name(out_dtype)]
        assert time_ms > 0 and number(row["max_abs_diff"]) <= limit, row
        reference = next(r for r in rows if (r["x_dtype"], r["residual_dtype"], r["method"]) ==
                         (row["x_dtype"], row["residual_dtype"], "torch"))
        assert number(row["speedup_vs_torch"]) == pytest.approx(number(reference["time_ms"]) / time_ms, rel=1e-4)
    assert_png(path.with_suffix(".png"))


def test_bench_cpu_weights_cold_quick(tmp_path):
    assert bench_cpu_weights_cold.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    path = tmp_path / f"cpu_weights_cold_{common.device_tag(torch.device('cpu'))}_quick.csv"
    rows = read(path, bench_cpu_weights_cold.COLUMNS)
    assert {"loadavg_before", "loadavg_after"} <= set(common.read_csv(path)[0])
    assert {(row["operation"], row["chain"]) for row in rows} == {
        (operation, chain) for operation in bench_cpu_weights_cold.OPERATIONS for chain in bench_cpu_weights_cold.CHAINS}
    times = {(row["operation"], row["chain"]): number(row["time_us"]) for row in rows}
    for row in rows:
        assert (row["model"], row["batch"], row["seq"], row["dtype"], row["layers"]) == ("minilm", "1", "128", "fp32", "6")
        assert number(row["time_us"]) > 0
        if row["chain"] == "model_order":
            for other, column in (("one_layer", "model_order_over_one_layer"),
                                  ("model_order_warmed", "model_order_over_warmed")):
                assert number(row[column]) == pytest.approx(
                    times[row["operation"], "model_order"] / times[row["operation"], other], rel=1e-4)
        else:
            assert math.isnan(number(row["model_order_over_warmed"]))
        linear = row["operation"] in ("qkv", "attention_output", "ffn_in", "ffn_out")
        assert (number(row["weight_mb"]) > 0) if linear else math.isnan(number(row["weight_mb"]))
    assert_png(path.with_suffix(".png"))


def test_profile_cpu_hybrid_quick(tmp_path):
    assert profile_cpu_hybrid.main(["--quick", "--threads", THREADS, "--out", str(tmp_path)]) == 0
    path = tmp_path / f"cpu_hybrid_profile_{common.device_tag(torch.device('cpu'))}_quick.csv"
    rows = read(path, profile_cpu_hybrid.COLUMNS)
    assert {"loadavg_before", "loadavg_after"} <= set(common.read_csv(path)[0])
    assert {row["method"] for row in rows} == {"hybrid", profile_cpu_hybrid.PLAIN_LAYERS}
    for method in ("hybrid", profile_cpu_hybrid.PLAIN_LAYERS):
        method_rows = [row for row in rows if row["method"] == method]
        calls = {row["category"]: number(row["calls_per_forward"]) for row in method_rows}
        assert set(calls) <= set(profile_cpu_hybrid.CATEGORIES)
        # MiniLM: 6 layers x (fused QKV, attention output, FFN in, FFN out), one attention each, two
        # layer norms each (the embeddings' own runs inside their labelled range), each after a
        # residual add: thin layers run the two as one native op.
        assert calls.get("linear_blocksparse", 0) + calls.get("linear_dense", 0) == 24
        assert calls["attention"] == 6 and calls["layer_norm"] == 12
        native_norm = method == "hybrid" and native_isa() is not None
        assert calls.get("residual_add", 0) == (0 if native_norm else 12)
        assert calls["embeddings"] == calls["attention_mask"] == calls["pooler"] == 1
        # Thin layers skip the eval-mode dropouts that transformers' BertLayer.forward still dispatches.
        assert calls.get("dropout", 0) == (0 if method == "hybrid" else 12)
        assert "copies" not in calls  # none around the fused QKV or SDPA: views only
        forward = number(method_rows[0]["forward_ms_profiled"])
        assert sum(number(row["ms_per_forward"]) for row in method_rows) == pytest.approx(forward, rel=1e-4)  # CSV: 6 digits
        assert all(number(row["ms_per_forward"]) >= 0 for row in method_rows
                   if row["category"] not in ("python_and_dispatch",))


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


def test_side_by_side_timing_records_a_failing_method_and_times_the_rest():
    calls = {"ok": 0, "broken": 0}

    def ok():
        calls["ok"] += 1

    def broken():
        calls["broken"] += 1
        raise RuntimeError("kernel exploded")

    times, errors = common.time_side_by_side({"ok": ok, "broken": broken}, torch.device("cpu"), warmup=1, repeats=4)
    assert times["ok"] >= 0 and math.isnan(times["broken"])
    assert "kernel exploded" in errors["broken"] and "ok" not in errors
    assert calls["broken"] == 1 and calls["ok"] > 4  # not called again after failing; the other timed in full


def test_csv_round_trip_keeps_the_environment(tmp_path):
    environment = common.environment_record(torch.device("cpu"))
    path = common.write_csv(tmp_path / "x.csv", [{"a": 1.5, "b": float("nan")}, {"a": 2, "b": None}], ["a", "b"],
                            environment)
    read_environment, rows = common.read_csv(path)
    assert read_environment == {key: " ".join(value.split()) for key, value in environment.items()}
    assert rows == [{"a": "1.5", "b": "nan"}, {"a": "2", "b": ""}]
    with pytest.raises(KeyError):
        common.write_csv(tmp_path / "y.csv", [{"c": 1}], ["a"], environment)


def test_run_all_plan():
    gpu = run_all.plan(True, Path("out"))
    assert [name for name, _ in gpu] == ["bench_kernel", "bench_kernel", "bench_e2e", "bench_e2e",
                                         "bench_ffn_alignment", "launch_overhead", "bench_compile", "bench_cpu"]
    assert [("--cuda-graph" in argv) for _, argv in gpu] == [False, True, False, True, True, False, False, False]
    assert all("--quick" not in argv for _, argv in gpu)
    assert ("bench_compile", ["--out", "out", "--device", "cuda"]) in gpu
    cpu = run_all.plan(False, Path("out"), threads=2)
    assert cpu[:2] == [("bench_cpu", ["--out", "out", "--threads", "2"]),
                       ("bench_compile", ["--out", "out", "--threads", "2"])]
    assert all("--quick" in argv for name, argv in cpu[2:])
    assert [name for name, _ in cpu] == ["bench_cpu", "bench_compile", "bench_kernel", "bench_e2e",
                                         "bench_ffn_alignment"]


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



def test_tune_kernel_writes_where_it_is_told_never_into_the_package_by_default(tmp_path, capsys):
    from nn_blocksparse.kernels.configs import TUNED_CONFIGS_ENV, TUNED_TABLE_PATH

    for quick in (False, True):
        default = tune_kernel.output_path(None, torch.device("cpu"), quick)
        tag = common.device_tag(torch.device("cpu"))
        assert default.parent == common.DEFAULT_RESULTS_DIR / tag and default != TUNED_TABLE_PATH
        assert default.name.startswith("tuned_configs_") and default.name.endswith("_quick.json" if quick else ".json")
    assert tune_kernel.output_path(tmp_path / "mine.json", torch.device("cpu"), False) == tmp_path / "mine.json"
    with pytest.raises(SystemExit):
        tune_kernel.parse_args(["--help"])
    assert TUNED_CONFIGS_ENV in " ".join(capsys.readouterr().out.split())  # --help says how to use the table
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"configs": {"sm90": {"fp16/bs32/n768/k768/m128/d0.50": [48, 8, 1, 4, 3]}}}')
    with pytest.raises(ValueError, match="block_m must be one of"):  # refused, not merged into and overwritten
        tune_kernel.load_table(damaged)


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
    assert bench_compile.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
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
    # What the tuner wrote is what the library launches with, once NN_BLOCKSPARSE_TUNED_CONFIGS names it.
    probe = ("import torch; from nn_blocksparse.kernels.configs import select_config; "
             "print(select_config(torch.float16, 32, 64, 64, 16, 2, torch.device('cpu')).as_list())")
    used = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "NN_BLOCKSPARSE_TUNED_CONFIGS": str(out)})
    assert used.returncode == 0, used.stderr[-2000:]
    assert json.loads(used.stdout.strip().splitlines()[-1].replace("'", '"')) == entries["fp16/bs32/n64/k64/m16/d0.50"]


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


def test_generated_docs_match_the_committed_results():
    """docs/results.md and the README's tables are generated from benchmarks/results: never stale."""
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gen_docs.py"), "--check"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
