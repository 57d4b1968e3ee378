"""CPU residual add + layer norm: the native kernel (`cpu.layer_norm.add_layer_norm_cpu`) against torch's two ops.

    python -m benchmarks.bench_cpu_norm [--out DIR] [--quick] [--threads 2] [--models bert-base,minilm]
        [--sizes 1x128,8x128] [--repeats N] [--warmup N]

Each case is one of an encoder layer's two norms, `layer_norm(x + residual)` over the model's hidden
size (BERT-base 768, MiniLM 384), for x and residual in fp32, in bf16 (a bf16 model), and x in bf16
onto an fp32 residual (a model with bf16 weights on fp32 activations, whose FFN-out hands bf16 to the
norm), with the layer norm's weight and bias (random, seeded) of the sum's dtype:

- `torch`: what the thin layer ran before, and what runs everywhere the native kernel does not:
  `F.layer_norm(x + residual, ...)`, two ops;
- `native`: `add_layer_norm_cpu` on the ISA this process picked;
- `native_<isa>`: the same kernel compiled for each ISA this CPU runs.

Every output is checked against float64 statistics of the same sum first (within one rounding of
the output's dtype); the methods are then timed in turns (`common.time_side_by_side`).
`speedup_vs_torch` is torch's time over the method's in the same run. Writes `cpu_norm_<cpu>[_quick].csv`
and `.png`. `--quick`: BERT-base 1x128, 3 repeats: a check that the script runs (its times mean nothing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nn_blocksparse.cpu.layer_norm import add_layer_norm_cpu
from nn_blocksparse.dtypes import DTYPE_NAMES

from . import common

CPU = torch.device("cpu")
COLUMNS = ["model", "batch", "seq", "width", "x_dtype", "residual_dtype", "method", "time_ms", "speedup_vs_torch",
           "max_abs_diff", "note"]
WIDTHS = {"bert-base": 768, "minilm": 384}
FULL_SIZES, QUICK_SIZES = ((1, 128), (8, 128)), ((1, 128),)
DTYPE_CASES = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32))
# Against float64 statistics of the sum, relative to max(1, max |reference|): fp32 rounding; one bf16 rounding.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7}
EPS = 1e-12  # BERT's


def norm_inputs(batch: int, seq: int, width: int, x_dtype: torch.dtype, residual_dtype: torch.dtype, seed: int = 0):
    """(x, residual, weight, bias): activations of a layer's scale, parameters of the sum's dtype."""
    generator = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(batch, seq, width, generator=generator)).to(x_dtype)
    residual = (torch.randn(batch, seq, width, generator=generator) + 0.5).to(residual_dtype)
    out_dtype = torch.promote_types(x_dtype, residual_dtype)
    weight = (torch.rand(width, generator=generator) + 0.5).to(out_dtype)
    bias = (0.1 * torch.randn(width, generator=generator)).to(out_dtype)
    return x, residual, weight, bias


def float64_norm(x, residual, weight, bias) -> torch.Tensor:
    sums = (x + residual).double()  # the sum in its dtype, as both methods take it
    mean = sums.mean(-1, keepdim=True)
    variance = ((sums - mean) ** 2).mean(-1, keepdim=True)
    return (sums - mean) / torch.sqrt(variance + EPS) * weight.double() + bias.double()


def method_runs(x, residual, weight, bias) -> tuple[dict, dict[str, str]]:
    """(`{method: fn}`, `{method: note}`): torch, the native kernel in use, and one per runnable ISA."""
    from nn_blocksparse.cpu.isa import runnable_isas

    shape = (x.shape[-1],)
    runs, notes = common.native_method_runs(
        lambda library: lambda: add_layer_norm_cpu(x, residual, shape, weight, bias, EPS, library=library),
        runnable_isas())
    return {"torch": lambda: F.layer_norm(x + residual, shape, weight, bias, EPS), **runs}, notes


def method_names() -> tuple[str, ...]:
    from nn_blocksparse.cpu.isa import runnable_isas

    return ("torch", "native", *(f"native_{isa}" for isa in runnable_isas()))


def run_case(model: str, batch: int, seq: int, x_dtype, residual_dtype, warmup: int, repeats: int) -> list[dict]:
    width = WIDTHS[model]
    x, residual, weight, bias = norm_inputs(batch, seq, width, x_dtype, residual_dtype)
    reference = float64_norm(x, residual, weight, bias)
    out_dtype = torch.promote_types(x_dtype, residual_dtype)
    limit = TOLERANCE[out_dtype] * max(1.0, reference.abs().max().item())
    runs, notes = method_runs(x, residual, weight, bias)
    case = f"{model} {batch}x{seq} {DTYPE_NAMES[x_dtype]}+{DTYPE_NAMES[residual_dtype]}"
    diffs, times, errors = common.checked_then_timed(runs, reference, limit, case, CPU, warmup, repeats)
    rows = []
    for name in method_names():
        time_value = times.get(name, math.nan)
        rows.append({"model": model, "batch": batch, "seq": seq, "width": width, "x_dtype": DTYPE_NAMES[x_dtype],
                     "residual_dtype": DTYPE_NAMES[residual_dtype], "method": name, "time_ms": time_value,
                     "speedup_vs_torch": times["torch"] / time_value, "max_abs_diff": diffs.get(name, math.nan),
                     "note": "; ".join(filter(None, (notes.get(name), errors.get(name))))})
    return rows


def parse_args(argv=None):
    parser = common.base_parser("CPU residual add + layer norm: the native kernel against torch", default_threads=2)
    parser.add_argument("--models", default="bert-base,minilm", help=f"subset of {','.join(WIDTHS)}")
    parser.add_argument("--sizes", help="batch x seq list (default 1x128,8x128)")
    parser.add_argument("--repeats", type=int, help="timing repeats (default 50, --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default 5, --quick 1)")
    args = parser.parse_args(argv)
    common.resolve_models_and_sizes(parser, args, WIDTHS, FULL_SIZES, QUICK_SIZES, repeats=50, warmup=5)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--threads and --repeats must be at least 1, --warmup at least 0")
    return args


def plot(rows: list[dict], path, title: str):
    key = ("model", "batch", "seq", "x_dtype", "residual_dtype")
    cases = [tuple(row[field] for field in key) for row in rows if row["method"] == "torch"]
    series = {method: [next(row["speedup_vs_torch"] for row in rows
                            if tuple(row[field] for field in key) == case and row["method"] == method)
                       for case in cases] for method in method_names() if method != "torch"}
    labels = [f"{model}\n{batch}x{seq} {x}+{residual}" for model, batch, seq, x, residual in cases]
    return common.grouped_bars(labels, series, path, title, "speedup vs torch add + layer_norm", {"torch": 1.0},
                               max_width=16.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    with common.torch_threads(args.threads):
        environment = common.cpu_run_record()
        rows = []
        for model in args.models:
            for batch, seq in args.sizes:
                for x_dtype, residual_dtype in DTYPE_CASES:
                    case_rows = run_case(model, batch, seq, x_dtype, residual_dtype, args.warmup, args.repeats)
                    rows.extend(case_rows)
                    print(f"{model} {batch}x{seq} {DTYPE_NAMES[x_dtype]}+{DTYPE_NAMES[residual_dtype]}: " + "  ".join(
                        f"{row['method']} {row['time_ms'] * 1e3:.1f}us ({row['speedup_vs_torch']:.2f}x)"
                        for row in case_rows), flush=True)
        common.write_cpu_table(args, "cpu_norm", rows, COLUMNS, environment, plot,
                               f"residual add + layer norm, {common.cpu_model()}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
