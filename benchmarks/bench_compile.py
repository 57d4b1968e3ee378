"""torch.compile end to end: pruned BERTs eager and compiled, as dense, resize and hybrid, in one run.

    python -m benchmarks.bench_compile [--out DIR] [--quick] [--threads N] [--device cpu|cuda]
        [--models minilm,bert-base] [--sizes 1x128,8x128] [--modes resize,hybrid] [--dtype fp32]
        [--executions eager,compiled] [--dynamic] [--backend inductor] [--layers N] [--repeats N] [--rep-ms 500]
        [--seed 0]

Each model (the real MiniLM, a random-weight BERT-base) is pruned like nn_pruning's hybrid models
(`prune_like_nn_pruning`) and run as `dense` (the pruned model unpatched), `resize` and `hybrid`
(`patch_bert`), each in several executions:

- `eager`: the forward as Python runs it;
- `compiled`: `torch.compile(model, fullgraph=True)` (Inductor; static shapes, so each size compiles
  once, unless `--dynamic`); `compile_s` is the first call's time;
- CUDA only, `reduce_overhead`: `torch.compile(mode="reduce-overhead")`, Inductor's CUDA graphs, as a
  server calls it; and `cuda_graph_forward`: the eager model captured by
  `nn_blocksparse.bert.CudaGraphForward` (no mask: it serves unpadded inputs only), so that the two
  CUDA-graph serving paths meet in one run.

Inputs are random token ids with an all-ones attention mask (`bench_e2e.random_inputs`). Timing
(`common.time_ms`): CPU, the median of `--repeats` calls; CUDA, `eager` and the two serving paths
with `do_bench` (each call as the host issues it), `compiled` as CUDA-graph replays of the compiled
forward (`do_bench_cudagraph`: the GPU time alone). Speedups are ratios within this one run:
`speedup_vs_eager` (the same method eagerly), `speedup_vs_dense_eager` and `speedup_vs_resize` (resize
in the same execution: what compiled hybrid must beat). `max_abs_diff`: last hidden state against
eager dense.

Full run: CPU fp32, MiniLM and BERT-base, 1x128 and 8x128, eager and compiled (CUDA: fp16, BERT-base
1x128 and 8x384, all four executions). `--quick`: a CPU smoke run of the script (its times mean
nothing): the MiniLM cut to its first layer (`--layers 1`), 1x32, two repeats, compiled by Dynamo
alone (`--backend eager`: Inductor's compile takes minutes on 2 cores; tests/test_compile.py checks
Inductor's output). Writes `compile_e2e_<device>[_quick].csv` (columns
`COLUMNS`) and `.png` (speedup over eager dense, bars grouped by model and size).
"""

from __future__ import annotations

import time

import torch

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name
from nn_blocksparse.timing import synchronize

from . import bench_e2e, common

COLUMNS = ["model", "layers", "batch", "seq", "dtype", "method", "execution", "time_ms", "speedup_vs_eager",
           "speedup_vs_dense_eager", "speedup_vs_resize", "compile_s", "max_abs_diff", "note"]
MODES = ("resize", "hybrid")
CPU_EXECUTIONS = ("eager", "compiled")
CUDA_EXECUTIONS = ("eager", "compiled", "reduce_overhead", "cuda_graph_forward")
EXECUTIONS = CUDA_EXECUTIONS

FULL_MODELS = {"cpu": ("minilm", "bert-base"), "cuda": ("bert-base",)}
FULL_SIZES = {"cpu": ((1, 128), (8, 128)), "cuda": ((1, 128), (8, 384))}
QUICK_SIZES = ((1, 32),)
QUICK_LAYERS = 1
BACKENDS = ("inductor", "aot_eager", "eager")


def keep_layers(model: torch.nn.Module, layers: int | None) -> torch.nn.Module:
    """The model with only its first `layers` encoder layers (None: all of them), in place."""
    if layers is not None:
        if not 1 <= layers <= len(model.encoder.layer):
            raise ValueError(f"--layers must be in 1..{len(model.encoder.layer)}, got {layers}")
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model


class Execution:
    """One way of running one model: `prepare(inputs)` makes the callable (compiling or capturing on
    its first call, timed as `compile_s`), `timed(fn)` times it as this execution's method says."""

    def __init__(self, name: str, model: torch.nn.Module, device: torch.device, dynamic: bool, backend: str,
                 warmup: int, repeats: int, rep_ms: float) -> None:
        self.name, self.model, self.device = name, model, device
        self.warmup, self.repeats, self.rep_ms = warmup, repeats, rep_ms
        if name == "compiled":
            self.forward = torch.compile(model, fullgraph=True, dynamic=dynamic, backend=backend)
        elif name == "reduce_overhead":
            self.forward = torch.compile(model, fullgraph=True, dynamic=dynamic, mode="reduce-overhead")
        else:
            self.forward = model

    def prepare(self, inputs: dict):
        """(callable returning the last hidden state, seconds its first calls took, note)."""
        start = time.perf_counter()
        if self.name == "cuda_graph_forward":
            from nn_blocksparse.bert import CudaGraphForward

            batch, seq = inputs["input_ids"].shape
            graph = CudaGraphForward(self.model, batch, seq)
            ids = inputs["input_ids"]
            fn = lambda: graph(ids).last_hidden_state  # noqa: E731
            note = "no attention mask (captured for unpadded inputs)"
        else:
            fn = lambda: self.forward(**inputs).last_hidden_state  # noqa: E731
            note = ""
        # Compiles (one size at a time without --dynamic) or records CUDA graphs (three calls).
        for _ in range(3 if self.name == "reduce_overhead" else 1):
            fn()
        synchronize(self.device)
        return fn, time.perf_counter() - start, note

    def timed(self, fn) -> float:
        graph_timed = self.device.type == "cuda" and self.name == "compiled"
        return common.time_ms(fn, self.device, warmup=self.warmup, repeats=self.repeats, cuda_rep_ms=self.rep_ms,
                              cuda_graph=graph_timed)


def run_model(model_name: str, sizes, device: torch.device, dtype: torch.dtype, modes, executions, dynamic: bool,
              backend: str, layers: int | None, warmup: int, repeats: int, rep_ms: float,
              seed: int = 0) -> list[dict]:
    model, report = bench_e2e.load_pruned(model_name, seed=seed)
    model = keep_layers(model, layers).to(device=device, dtype=dtype)
    layer_count = len(model.encoder.layer)
    print(f"{model_name} ({layer_count} layers): pruned like nn_pruning, {report.kept_fraction:.1%} of encoder "
          f"linear weights kept", flush=True)
    variants, failures = bench_e2e.build_variants(model, modes)
    runs = {(name, execution): Execution(execution, variant, device, dynamic, backend, warmup, repeats, rep_ms)
            for name, variant in variants.items() for execution in executions}
    nan = float("nan")
    rows = []
    for batch, seq in sizes:
        inputs = bench_e2e.random_inputs(batch, seq, model.config.vocab_size, device, seed=seed)
        times = {}
        with torch.inference_mode():
            reference = variants["dense"](**inputs).last_hidden_state
            for (name, execution), run in runs.items():
                note = bench_e2e._choice_note(variants[name])
                try:
                    fn, compile_s, execution_note = run.prepare(inputs)
                    diff = common.max_abs_diff(fn(), reference)
                    time_value = run.timed(fn)
                    note = "; ".join(filter(None, (note, execution_note)))
                except Exception as error:  # noqa: BLE001 - a failing execution gets a NaN row with the reason
                    compile_s = diff = time_value = nan
                    note = common.error_note(error, "failed")
                times[name, execution] = time_value
                rows.append({"model": model_name, "layers": layer_count, "batch": batch, "seq": seq,
                             "dtype": DTYPE_NAMES[dtype], "method": name, "execution": execution,
                             "time_ms": time_value, "compile_s": compile_s, "max_abs_diff": diff, "note": note})
                print(f"{model_name} {batch}x{seq} {name:<7} {execution:<18} {time_value:9.3f} ms  "
                      f"(first calls {compile_s:6.1f} s)  max|diff| {diff:.2e} {note}", flush=True)
        for row in rows[-len(runs):]:
            own_eager = times.get((row["method"], "eager"), nan)
            row["speedup_vs_eager"] = own_eager / row["time_ms"]
            row["speedup_vs_dense_eager"] = times.get(("dense", "eager"), nan) / row["time_ms"]
            row["speedup_vs_resize"] = times.get(("resize", row["execution"]), nan) / row["time_ms"]
        for name, error in failures.items():
            rows.extend({"model": model_name, "layers": layer_count, "batch": batch, "seq": seq,
                         "dtype": DTYPE_NAMES[dtype], "method": name, "execution": execution,
                         "time_ms": nan, "note": error} for execution in executions)
    torch._dynamo.reset()  # frees the compiled graphs and CUDA graphs before the next model
    return rows


def plot(rows: list[dict], path, title: str):
    categories = list(dict.fromkeys(f"{r['model']} {r['batch']}x{r['seq']}" for r in rows))
    series_names = list(dict.fromkeys(f"{r['method']} {r['execution']}" for r in rows))
    speedup = {(f"{r['model']} {r['batch']}x{r['seq']}", f"{r['method']} {r['execution']}"):
               float(r.get("speedup_vs_dense_eager", float("nan"))) for r in rows}
    series = {name: [speedup.get((c, name), float("nan")) for c in categories] for name in series_names}
    return common.grouped_bars(categories, series, path, title, "speedup vs eager dense (x)")


def print_summary(rows: list[dict]) -> None:
    print(f"\n{'model':<10}{'size':>8} {'method':<8}{'execution':<19}{'ms':>9}{'vs eager':>9}{'vs resize':>10}")
    for r in rows:
        print(f"{r['model']:<10}{r['batch']:>4}x{r['seq']:<4}{r['method']:<8}{r['execution']:<19}"
              f"{r['time_ms']:9.3f}{r.get('speedup_vs_eager', float('nan')):9.2f}"
              f"{r.get('speedup_vs_resize', float('nan')):10.2f}")


def parse_args(argv=None):
    parser = common.base_parser("pruned BERT end to end, eager vs torch.compile: dense, resize, hybrid",
                                default_threads=common.available_cores())
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu; --quick: always cpu")
    parser.add_argument("--models", help=f"subset of {','.join(bench_e2e.MODELS)} (default: CPU both, CUDA bert-base)")
    parser.add_argument("--sizes", help="batch x seq list (default: CPU 1x128,8x128; CUDA 1x128,8x384)")
    parser.add_argument("--modes", default=",".join(MODES), help="patch modes beside dense (default resize,hybrid)")
    parser.add_argument("--dtype", choices=tuple(DTYPE_NAMES.values()), help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--executions", help=f"subset of {','.join(EXECUTIONS)} (default: every one the device has)")
    parser.add_argument("--dynamic", action="store_true", help="compile once with dynamic shapes for every size")
    parser.add_argument("--backend", choices=BACKENDS, help="torch.compile backend of `compiled` (default inductor; "
                        "--quick: eager, Dynamo alone)")
    parser.add_argument("--layers", type=int, help="keep only the first N encoder layers (default: all; --quick: 1)")
    parser.add_argument("--repeats", type=int, help="CPU timing repeats (default 10, --quick 2)")
    parser.add_argument("--rep-ms", type=float, default=500.0, help="CUDA: measuring time per timed case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.device = torch.device("cpu" if args.quick else args.device)
    kind = args.device.type
    args.models = common.parse_list(args.models) if args.models else (["minilm"] if args.quick else
                                                                     list(FULL_MODELS[kind]))
    args.sizes = ([common.parse_shape(s) for s in common.parse_list(args.sizes)] if args.sizes else
                  list(QUICK_SIZES if args.quick else FULL_SIZES[kind]))
    args.modes = common.parse_list(args.modes)
    args.dtype = dtype_from_name(args.dtype or ("fp16" if kind == "cuda" else "fp32"))
    available = CUDA_EXECUTIONS if kind == "cuda" else CPU_EXECUTIONS
    args.executions = common.parse_list(args.executions) if args.executions else list(available)
    args.layers = args.layers if args.layers is not None else (QUICK_LAYERS if args.quick else None)
    args.repeats = args.repeats or (2 if args.quick else 10)
    args.backend = args.backend or ("eager" if args.quick else "inductor")
    for name, chosen, allowed in (("model", args.models, bench_e2e.MODELS), ("mode", args.modes, MODES),
                                  ("execution", args.executions, available)):
        for value in chosen:
            if value not in allowed:
                parser.error(f"unknown {name} {value!r} on {kind}; choose from {allowed}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if common.cuda_missing(device, "bench_compile"):
        return 2
    with common.torch_threads(args.threads):
        environment = {**common.environment_record(device),
                       "compile": f"torch.compile(fullgraph=True, dynamic={args.dynamic}, backend={args.backend!r})",
                       "timing": "cpu median" if device.type == "cpu" else
                       "eager/reduce_overhead/cuda_graph_forward: do_bench; compiled: do_bench_cudagraph"}
        rows = []
        for model_name in args.models:
            rows += run_model(model_name, args.sizes, device, args.dtype, args.modes, args.executions, args.dynamic,
                              args.backend, args.layers, warmup=1 if args.quick else 3, repeats=args.repeats, rep_ms=args.rep_ms,
                              seed=args.seed)
        csv_path = common.write_csv(common.results_path(args.out, "compile_e2e", device, args.quick), rows, COLUMNS,
                                    environment)
        plot_path = plot(rows, common.results_path(args.out, "compile_e2e", device, args.quick, ".png"),
                         f"pruned BERT eager vs torch.compile on {common.device_name(device)}, "
                         f"{DTYPE_NAMES[args.dtype]}, {torch.get_num_threads()} threads")
        print_summary(rows)
        print("\nwrote", csv_path, plot_path, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
