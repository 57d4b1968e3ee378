"""CPU self-attention: the native kernel (`cpu.attention.self_attention_cpu`) against SDPA, side by side.

    python -m benchmarks.bench_cpu_attention [--out DIR] [--quick] [--threads 2] [--models bert-base,minilm]
        [--sizes 1x128,8x128,1x384] [--heads 12] [--dtype fp32|bf16] [--repeats N] [--warmup N]

Each case is one layer's attention as `FusedSelfAttention` computes it from the fused projection
`qkv [B, S, 3 * H * D]` (random, seeded) to the context `[B, S, H * D]` the output projection reads:

- `sdpa`: what `FusedSelfAttention` runs where the native kernel does not: the heads split by a view
  and a permute, `F.scaled_dot_product_attention`, and the heads merged by transpose and reshape;
- `native`: `self_attention_cpu`, on the ISA this process picked;
- `native_<isa>`: the same kernel compiled for each ISA this CPU runs (e.g. `native_avx2` beside
  `native_avx512` on an AVX-512 machine).

`--dtype bf16`: qkv rounded to bf16, against SDPA in bf16 (the mask in bf16, as `FusedSelfAttention`
gives it); the native methods are the builds that run bf16 attention (`native_amx_bf16`, on AMX
tiles), and `native` has no time where the process's build does not (the note says so).

Models fix the head size (BERT-base 64, MiniLM 32); `--heads` (default 12) is the head count of
the unpruned layer. Each case runs with no mask (`mask=none`) and with a key-padding mask
(`mask=padding`: additive `[B, 1, 1, S]`, the second half of batch 0's keys masked, as transformers
builds it). Every output is checked against the same attention in float64 before anything is
timed; the methods are then timed in turns (`common.time_side_by_side`). Columns: `gflops` counts
QK^T and PV (4 B H S^2 D), `speedup_vs_sdpa` is SDPA's time over the method's in the same run,
`max_abs_diff` is against float64 (of the bf16 inputs, in bf16). Writes
`cpu_attention[_bf16]_<cpu>[_quick].csv` and `.png`.
`--quick`: BERT-base 1x64, 3 repeats: a check that the script runs (its times mean nothing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nn_blocksparse.cpu.attention import BF16_ISAS, self_attention_cpu
from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name

from . import common

CPU = torch.device("cpu")
COLUMNS = ["model", "batch", "seq", "heads", "head_dim", "mask", "dtype", "method", "time_ms", "gflops",
           "speedup_vs_sdpa", "max_abs_diff", "note"]
HEAD_DIMS = {"bert-base": 64, "minilm": 32}
FULL_SIZES, QUICK_SIZES = ((1, 128), (8, 128), (1, 384)), ((1, 64),)
MASKS = ("none", "padding")
# Against float64, over max(1, max |reference|): fp32 softmax and sums; bf16 outputs and probabilities.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def attention_inputs(batch: int, seq: int, heads: int, head_dim: int, mask: str, seed: int = 0,
                     dtype: torch.dtype = torch.float32):
    """(qkv `[B, S, 3 H D]` in `dtype`, the additive fp32 key mask `[B, 1, 1, S]` or None)."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, generator=generator).to(dtype)
    if mask == "none":
        return qkv, None
    padding = torch.zeros(batch, 1, 1, seq)
    padding[0, ..., (seq + 1) // 2:] = torch.finfo(torch.float32).min
    return qkv, padding


def sdpa_attention(qkv: torch.Tensor, heads: int, head_dim: int, mask: torch.Tensor | None) -> torch.Tensor:
    """`FusedSelfAttention`'s SDPA path: split the heads, SDPA, merge them."""
    batch, seq, _ = qkv.shape
    query, key, value = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=None if mask is None else mask.to(qkv.dtype))
    return context.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def float64_attention(qkv: torch.Tensor, heads: int, head_dim: int, mask: torch.Tensor | None) -> torch.Tensor:
    batch, seq, _ = qkv.shape
    query, key, value = qkv.double().view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores + mask.double()
    return (torch.softmax(scores, -1) @ value).transpose(1, 2).reshape(batch, seq, heads * head_dim)


def method_runs(qkv, heads: int, head_dim: int, mask) -> tuple[dict, dict[str, str]]:
    """(`{method: fn}`, `{method: note}`): SDPA, the native kernel in use, and one per runnable ISA
    that takes qkv's dtype."""
    from nn_blocksparse.cpu.build import native_isa

    refused = ("no bf16 attention in this build (SDPA runs it)"
               if qkv.dtype == torch.bfloat16 and native_isa() not in BF16_ISAS else None)
    runs, notes = common.native_method_runs(
        lambda library: lambda: self_attention_cpu(qkv, heads, head_dim, mask, library=library),
        method_isas(qkv.dtype), refused)
    return {"sdpa": lambda: sdpa_attention(qkv, heads, head_dim, mask), **runs}, notes


def method_isas(dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The runnable ISAs whose attention takes `dtype`."""
    from nn_blocksparse.cpu.isa import runnable_isas

    return tuple(isa for isa in runnable_isas() if dtype == torch.float32 or isa in BF16_ISAS)


def method_names(dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    return ("sdpa", "native", *(f"native_{isa}" for isa in method_isas(dtype)))


def run_case(model: str, batch: int, seq: int, heads: int, mask: str, warmup: int, repeats: int,
             dtype: torch.dtype = torch.float32) -> list[dict]:
    head_dim = HEAD_DIMS[model]
    qkv, mask_tensor = attention_inputs(batch, seq, heads, head_dim, mask, dtype=dtype)
    reference = float64_attention(qkv, heads, head_dim, mask_tensor)
    limit = TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
    runs, notes = method_runs(qkv, heads, head_dim, mask_tensor)
    diffs, times, errors = common.checked_then_timed(runs, reference, limit, f"{model} {batch}x{seq} mask={mask}", CPU,
                                                     warmup, repeats)
    flops = 4 * batch * heads * seq * seq * head_dim
    rows = []
    for name in method_names(dtype):
        time_value = times.get(name, math.nan)
        note = "; ".join(filter(None, (notes.get(name), errors.get(name))))
        rows.append({"model": model, "batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim, "mask": mask,
                     "dtype": DTYPE_NAMES[dtype], "method": name, "time_ms": time_value, "gflops": flops / (time_value * 1e6),
                     "speedup_vs_sdpa": times["sdpa"] / time_value, "max_abs_diff": diffs.get(name, math.nan),
                     "note": note})
    return rows


def parse_args(argv=None):
    parser = common.base_parser("CPU self-attention: the native kernel against SDPA", default_threads=2)
    parser.add_argument("--models", default="bert-base,minilm", help=f"subset of {','.join(HEAD_DIMS)}")
    parser.add_argument("--sizes", help="batch x seq list (default 1x128,8x128,1x384)")
    parser.add_argument("--heads", type=int, default=12, help="heads per layer (default 12)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="qkv's dtype (default fp32)")
    parser.add_argument("--repeats", type=int, help="timing repeats (default 30, --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default 3, --quick 1)")
    args = parser.parse_args(argv)
    common.resolve_models_and_sizes(parser, args, HEAD_DIMS, FULL_SIZES, QUICK_SIZES, repeats=30, warmup=3)
    args.dtype = dtype_from_name(args.dtype)
    if args.threads < 1 or args.heads < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--threads, --heads and --repeats must be at least 1, --warmup at least 0")
    return args


def plot(rows: list[dict], path, title: str, dtype: torch.dtype = torch.float32):
    cases = [(row["model"], row["batch"], row["seq"], row["mask"]) for row in rows if row["method"] == "sdpa"]
    series = {method: [next(row["speedup_vs_sdpa"] for row in rows
                            if (row["model"], row["batch"], row["seq"], row["mask"]) == case and row["method"] == method)
                       for case in cases] for method in method_names(dtype) if method != "sdpa"}
    labels = [f"{model}\n{batch}x{seq} {mask}" for model, batch, seq, mask in cases]
    return common.grouped_bars(labels, series, path, title, "speedup vs SDPA", {"SDPA": 1.0}, max_width=16.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    with common.torch_threads(args.threads):
        environment = common.cpu_run_record()
        rows = []
        for model in args.models:
            for batch, seq in args.sizes:
                for mask in MASKS:
                    case_rows = run_case(model, batch, seq, args.heads, mask, args.warmup, args.repeats, args.dtype)
                    rows.extend(case_rows)
                    print(f"{model} {batch}x{seq} mask={mask}: " + "  ".join(
                        f"{row['method']} {row['time_ms']:.3f}ms ({row['speedup_vs_sdpa']:.2f}x)" for row in case_rows),
                        flush=True)
        stem = "cpu_attention" if args.dtype == torch.float32 else f"cpu_attention_{DTYPE_NAMES[args.dtype]}"
        common.write_cpu_table(args, stem, rows, COLUMNS, environment,
                               lambda rows, path, title: plot(rows, path, title, args.dtype),
                               f"self-attention ({DTYPE_NAMES[args.dtype]}), {args.heads} heads, "
                               f"{common.cpu_model()}, {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
