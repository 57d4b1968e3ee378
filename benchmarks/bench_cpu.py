"""CPU benchmark: our CPU block-sparse path against dense and torch BSR, then pruned models.

    python -m benchmarks.bench_cpu [--out DIR] [--quick] [--threads N] [--shapes 768x768,...] [--m 128,512]
        [--densities 1.0,0.75,0.5,0.36,0.1] [--repeats N] [--skip-kernel] [--skip-e2e] [--dtype fp32|bf16|fp16]

Runs on CPU only, fp32 (or `--dtype`; file names then end in `_<dtype>`), `torch.set_num_threads(--threads)` (default: every core this process may use;
restored on exit).

1. Kernel: `y = x @ W^T` at BERT-base shapes (768x768, 3072x768, 768x3072, 2304x768), M 128 and 512,
   block density 1.0/0.75/0.5/0.36/0.1 (random seeded layouts), 32x32 blocks: `dense` (`F.linear`, MKL),
   `dense_onednn` (the same GEMM through oneDNN, which runs AVX-512 where MKL does not),
   `torch_bsr` (`F.linear` on `W.to_sparse_bsr`), `ours` (`BlockSparseLinear`'s CPU path: the
   native kernel of the ISA this process picked, `note`), `ours_prepacked` (the same with
   `prepack=True`: fp32 blocks kept transposed, the kernel's layout), `ours_<isa>` (the native kernel compiled
   for each ISA this CPU runs, e.g. `ours_avx2` beside `ours_avx512` on an AVX-512 machine) and
   `reference` (the CPU path's pure-torch reference, what CPUs without a native variant run).
   Same rows and columns as `bench_kernel` (`KERNEL_COLUMNS`); speedups are against `dense`. The
   CSV header records the CPU model, the native ISA and the threads.
2. End to end: pruned MiniLM at batch x seq 1x128 and 8x128, pruned BERT-base at 1x128: dense vs
   resize vs hybrid (`E2E_COLUMNS` of `bench_e2e`).

`--quick`: 768x768 and 3072x768, M=64, densities 1.0/0.36, 3 repeats, MiniLM 1x128 only (< 60 s).
Writes `cpu_kernel_<cpu>.csv`, `cpu_kernel_crossover_<cpu>.csv`, `cpu_kernel_speedup_m<M>_<cpu>.png`,
`cpu_e2e_<cpu>.csv` and `cpu_e2e_<cpu>.png` (`_quick` added to the names with --quick).
"""

from __future__ import annotations

from itertools import product

import torch

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name

from . import bench_e2e, bench_kernel, common

CPU = torch.device("cpu")
def kernel_methods() -> tuple[str, ...]:
    """The kernel part's methods on this machine (one `ours_<isa>` per ISA the CPU runs)."""
    onednn, prepacked, reference = bench_kernel.CPU_METHODS
    return ("dense", onednn, "torch_bsr", "ours", prepacked, *bench_kernel.ours_isa_methods(), reference)
E2E_MODES = ("resize", "hybrid")

FULL_SHAPES = ((768, 768), (3072, 768), (768, 3072), (2304, 768))
FULL_M = (128, 512)
FULL_DENSITIES = (1.0, 0.75, 0.5, 0.36, 0.1)  # the GPU grid's, so the devices compare
FULL_E2E = (("minilm", ((1, 128), (8, 128))), ("bert-base", ((1, 128),)))

QUICK_SHAPES = ((768, 768), (3072, 768))
QUICK_M = (64,)
QUICK_DENSITIES = (1.0, 0.36)
QUICK_E2E = (("minilm", ((1, 128),)),)

BLOCK_SIZE = 32


def run_kernels(shapes, ms, densities, repeats: int, warmup: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    cases = [bench_kernel.KernelCase(n, k, m, density, BLOCK_SIZE, dtype)
             for (n, k), m, density in product(shapes, ms, densities)]
    rows = []
    for index, case in enumerate(cases, 1):
        case_rows = bench_kernel.run_case(case, CPU, kernel_methods(), warmup=warmup, repeats=repeats)
        rows.extend(case_rows)
        timings = "  ".join(f"{r['method']} {r['time_ms']:.3f}ms ({r['speedup_vs_dense']:.2f}x)" for r in case_rows)
        print(f"[{index}/{len(cases)}] {case.shape} M={case.m} d={case_rows[0]['density']:.2f}: {timings}  "
              f"{case_rows[-1]['note']}", flush=True)
    return rows


def run_e2e(plan, repeats: int, warmup: int, dtype: torch.dtype = torch.float32) -> list[dict]:
    rows = []
    for model_name, sizes in plan:
        rows.extend(bench_e2e.run_model(model_name, sizes, CPU, dtype, E2E_MODES, BLOCK_SIZE,
                                        warmup=warmup, repeats=repeats))
    return rows


def parse_args(argv=None):
    parser = common.base_parser("CPU: the block-sparse CPU path vs dense and torch BSR; pruned models end to end",
                                default_threads=common.available_cores())
    parser.add_argument("--shapes", help="N x K list (default: BERT-base shapes)")
    parser.add_argument("--m", help="rows of x, e.g. 128,512")
    parser.add_argument("--densities", help="block densities, e.g. 1.0,0.36")
    parser.add_argument("--repeats", type=int, help="timing repeats (default 20, --quick 3)")
    parser.add_argument("--skip-kernel", action="store_true", help="only the end-to-end part")
    parser.add_argument("--skip-e2e", action="store_true", help="only the kernel part")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="dtype of x and weights (default fp32; others add _<dtype> to the file names)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.shapes = [common.parse_shape(s) for s in common.parse_list(args.shapes)] if args.shapes else \
        list(QUICK_SHAPES if quick else FULL_SHAPES)
    args.m = common.parse_list(args.m, int) if args.m else list(QUICK_M if quick else FULL_M)
    args.densities = common.parse_list(args.densities, float) if args.densities else \
        list(QUICK_DENSITIES if quick else FULL_DENSITIES)
    args.repeats = args.repeats or (3 if quick else 20)
    args.dtype = dtype_from_name(args.dtype)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with common.torch_threads(args.threads):
        environment = common.environment_record(CPU)  # after set_num_threads: records the threads used
        warmup = 1 if args.quick else 3
        print(f"bench_cpu on {common.cpu_model()}, native ISA {environment['cpu_native_isa']}, "
              f"{torch.get_num_threads()} threads", flush=True)
        written = []
        suffix = "" if args.dtype == torch.float32 else "_" + DTYPE_NAMES[args.dtype]
        if not args.skip_kernel:
            rows = run_kernels(args.shapes, args.m, args.densities, args.repeats, warmup, args.dtype)
            written.append(common.write_csv(common.results_path(args.out, "cpu_kernel" + suffix, CPU, args.quick), rows,
                                            bench_kernel.KERNEL_COLUMNS, environment))
            summary = bench_kernel.crossover_rows(rows)
            bench_kernel.print_crossover(summary)
            written.append(common.write_csv(common.results_path(args.out, "cpu_kernel_crossover" + suffix, CPU, args.quick),
                                            summary, bench_kernel.CROSSOVER_COLUMNS, environment))
            written += bench_kernel.plot_speedup_vs_density(
                rows, lambda m: common.results_path(args.out, f"cpu_kernel_speedup_m{m}{suffix}", CPU, args.quick, ".png"),
                f"{common.cpu_model()}, {torch.get_num_threads()} threads")
        if not args.skip_e2e:
            rows = run_e2e(QUICK_E2E if args.quick else FULL_E2E, args.repeats, warmup, args.dtype)
            written.append(common.write_csv(common.results_path(args.out, "cpu_e2e" + suffix, CPU, args.quick), rows,
                                            bench_e2e.E2E_COLUMNS, environment))
            written.append(bench_e2e.plot_e2e(
                rows, common.results_path(args.out, "cpu_e2e" + suffix, CPU, args.quick, ".png"),
                f"pruned models on {common.cpu_model()}, {torch.get_num_threads()} threads, "
                f"{DTYPE_NAMES[args.dtype]}"))
        print("\nwrote", *written, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
