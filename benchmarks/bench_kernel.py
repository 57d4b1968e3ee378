"""Kernel benchmark (issues 5.1, 16.4): `y = x @ W^T` with a block-sparse W, every way side by side.

    python -m benchmarks.bench_kernel [--out DIR] [--quick] [--shapes 768x768,...] [--m 128,...]
        [--densities 1.0,0.5,...] [--block-sizes 16,32,64] [--dtypes fp16,bf16]
        [--layouts random,head_structured,nn_pruning_like] [--methods dense,torch_bsr,resize,ours,...]
        [--device cuda|cpu] [--threads N] [--repeats N] [--rep-ms 100] [--cuda-graph] [--seed 0]

For every (shape N x K, M, block density, block size, dtype, layout), on one seeded block layout
(`nn_blocksparse.layouts`: `random` by default; `head_structured`, heads of 64 features sharing
their columns; `nn_pruning_like`, whole heads removed and random blocks in the rest, so that a
permutation's or a row group's gain shows):

- `dense`:     `F.linear(x, W)` on the full matrix (cuBLAS on GPU), the baseline;
- `torch_bsr`: `F.linear(x, W.to_sparse_bsr((bs, bs)))` (torch's Triton BSR kernels on CUDA, MKL
               on CPU); unsupported cases get time NaN and the error in `note`;
- `resize`:    nn_pruning's "dense" optimisation: all-zero rows and columns of W (and x's matching
               columns) cut out beforehand, only the smaller dense matmul is timed;
- `ours`:      `block_sparse_linear(x, matrix, backend="triton")` on CUDA (`note`: the launch config,
               block_m/group_m/split_k/num_warps/num_stages/rows_per_program); on CPU the CPU path of
               `BlockSparseLinear` (`note`: the native ISA it ran, or why the reference ran);
- `semi_structured`: what else a GPU user could pick at density 0.5: 2:4 sparsity
               (`torch.sparse.to_sparse_semi_structured`: cuSPARSELt where torch has it) on a 2:4
               weight of its own (element density 0.5), at target density 0.5 only;
- `cusparse_bsr`, `cusparse_blocked_ell`: cuSPARSE's block-sparse SpMM (`benchmarks.cusparse_spmm`,
               which says why neither torch nor CuPy reaches it in fp16), where its probe passes.
Methods that cannot run a case get time NaN and the reason in `note`.

CPU only (`bench_cpu` runs them): `dense_onednn`, the dense GEMM through oneDNN instead of MKL (the
faster dense baseline on AMD CPUs), `ours_prepacked` (`ours` with `prepack=True`: fp32 blocks kept
transposed, as the kernel reads them), `ours_<isa>` (the native kernel compiled for one ISA, for
every ISA this CPU runs: `cpu_methods()`), and `reference`, the CPU path's pure-torch reference.

Every method's output is checked once against dense (`max_abs_diff`; 2:4 against its own weight).
`stored_tflops_over_cublas` is TFLOP/s on the blocks a method stores (the whole matrix for dense,
the kept rows and columns for resize, half the elements for 2:4) over dense's TFLOP/s on the whole
matrix: 1.0 means the stored blocks run at cuBLAS speed. Full run: BERT-base
shapes, M 128..8192, densities 1.0..0.05, block sizes 16/32/64, fp16 and bf16 on the GPU.
`--quick`: CPU, fp32, 128x128 and 256x128, M=64, densities 1.0/0.5/0.1, bs 32 (seconds).

Timing on CUDA (see `common.time_ms`): eager by default, each call as a Python caller sees it,
launch overhead included, which dominates problems of a few microseconds; `--cuda-graph` times
CUDA-graph replays instead, the kernels' own GPU time, and names the files `kernel_cudagraph_*`.

Writes `kernel_<device>.csv` (columns `KERNEL_COLUMNS`), `kernel_crossover_<device>.csv`
(largest density at which each method beats dense, per shape/M/bs/dtype) and one PNG per M:
speedup vs density, one panel per shape, one line per method (fp16 and bs 32 when measured).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import product
from typing import Callable

import torch
import torch.nn.functional as F

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name
from nn_blocksparse.layouts import block_layout, random_block_sparse_weight
from nn_blocksparse.timing import synchronize

from . import common

KERNEL_COLUMNS = ["shape", "layout", "n", "k", "m", "target_density", "density", "nnz_blocks", "block_size", "dtype",
                  "method", "time_ms", "tflops", "stored_tflops_over_cublas", "speedup_vs_dense", "ideal_speedup",
                  "max_abs_diff", "note"]
CROSSOVER_COLUMNS = ["shape", "layout", "m", "block_size", "dtype", "crossover_density", "crossover_density_torch_bsr",
                     "crossover_density_resize", "lowest_density", "speedup_at_lowest_density"]
CLASSIC_METHODS = ("dense", "torch_bsr", "resize", "ours")
ALTERNATIVE_METHODS = ("semi_structured", "cusparse_bsr", "cusparse_blocked_ell")  # GPU only (NaN with a reason elsewhere)
METHODS = CLASSIC_METHODS + ALTERNATIVE_METHODS
LAYOUTS = ("random", "head_structured", "nn_pruning_like")
HEAD_FEATURES = 64  # BERT-base's head size: the structured layouts' heads span 64 // block_size block-rows
CPU_METHODS = ("dense_onednn", "ours_prepacked", "reference")  # CPU only, see their prepare_* functions; and ours_<isa>


def ours_isa_methods() -> tuple[str, ...]:
    """One `ours_<isa>` per ISA this CPU runs: the native kernel compiled for that ISA."""
    from nn_blocksparse.cpu.isa import runnable_isas

    return tuple(f"ours_{isa}" for isa in runnable_isas())


def cpu_methods() -> tuple[str, ...]:
    """The CPU-only methods of this machine: `CPU_METHODS` with the `ours_<isa>` ones between them."""
    onednn, prepacked, reference = CPU_METHODS
    return (onednn, prepacked, *ours_isa_methods(), reference)

BERT_BASE_SHAPES = ((768, 768), (2304, 768), (3072, 768), (768, 3072))  # N x K; 2304 = fused QKV
FULL_M = (128, 512, 2048, 8192)
FULL_DENSITIES = (1.0, 0.9, 0.75, 0.5, 0.36, 0.25, 0.1, 0.05)
FULL_BLOCK_SIZES = (16, 32, 64)
FULL_DTYPES = ("fp16", "bf16")

QUICK_SHAPES = ((128, 128), (256, 128))
QUICK_M = (64,)
QUICK_DENSITIES = (1.0, 0.5, 0.1)
QUICK_BLOCK_SIZES = (32,)
QUICK_DTYPES = ("fp32",)


@dataclass(frozen=True)
class KernelCase:
    n: int
    k: int
    m: int
    density: float  # target; the layout keeps round(density * blocks) blocks
    block_size: int
    dtype: torch.dtype
    layout: str = "random"

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"


@dataclass
class Method:
    """A prepared way to compute `x @ W^T`: `run` is what gets timed, `output` is the full `[M, N]` result."""

    run: Callable[[], torch.Tensor] | None
    output: Callable[[], torch.Tensor] | None = None
    note: str = ""
    stored_flop: float | None = None  # FLOPs on what the method stores; None: the nonzero blocks
    reference: torch.Tensor | None = None  # what the output should equal, when not dense x @ W^T


def prepare_dense(x: torch.Tensor, weight: torch.Tensor) -> Method:
    return Method(run=lambda: F.linear(x, weight), stored_flop=2.0 * x.shape[0] * weight.numel())


def prepare_torch_bsr(x: torch.Tensor, weight: torch.Tensor, block_size: int) -> Method:
    try:
        with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            bsr = weight.to_sparse_bsr((block_size, block_size))
        F.linear(x, bsr)  # fails here (not while timing) where torch has no kernel for the case
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
        return Method(run=None, note=common.error_note(error, "unsupported"))
    return Method(run=lambda: F.linear(x, bsr))


def prepare_resize(x: torch.Tensor, weight: torch.Tensor) -> Method:
    """Zero rows (output features) and zero columns (input features) cut out ahead of time."""
    kept_rows = weight.ne(0).any(dim=1).nonzero().flatten()
    kept_cols = weight.ne(0).any(dim=0).nonzero().flatten()
    small_weight = weight[kept_rows][:, kept_cols].contiguous()
    small_x = x[:, kept_cols].contiguous()

    def full_output() -> torch.Tensor:
        y = x.new_zeros(x.shape[0], weight.shape[0])
        y[:, kept_rows] = F.linear(small_x, small_weight)
        return y

    note = f"kept {len(kept_rows)}x{len(kept_cols)} of {weight.shape[0]}x{weight.shape[1]}"
    return Method(run=lambda: F.linear(small_x, small_weight), output=full_output, note=note,
                  stored_flop=2.0 * x.shape[0] * small_weight.numel())


def prepare_semi_structured(x: torch.Tensor, weight: torch.Tensor, density: float, seed: int) -> Method:
    """2:4 sparsity at its one density: a weight of its own (the case's values, every row 2:4-masked)."""
    from nn_blocksparse.layouts import two_to_four_mask

    if density != 0.5:
        return Method(run=None, note="unsupported: 2:4 sparsity is element density 0.5 only")
    n, k = weight.shape
    full = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    masked = (full * two_to_four_mask(n, k, seed=seed)).to(device=x.device, dtype=x.dtype)
    try:
        sparse = torch.sparse.to_sparse_semi_structured(masked)
        F.linear(x, sparse)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
        return Method(run=None, note=common.error_note(error, "unsupported"))
    return Method(run=lambda: F.linear(x, sparse), note=type(sparse).__name__, stored_flop=1.0 * x.shape[0] * n * k,
                  reference=F.linear(x, masked))


def prepare_cusparse(x: torch.Tensor, weight: torch.Tensor, block_size: int, format_name: str) -> Method:
    """cuSPARSE's BSR or Blocked-ELL SpMM, where its child-process probe passed on this machine."""
    from . import cusparse_spmm

    status = cusparse_spmm.probe()[format_name]
    if status != "ok":
        return Method(run=None, note=f"unsupported: cuSPARSE {format_name}: {status}"[:200])
    try:
        product = cusparse_spmm.prepare(format_name, x, weight, block_size)
    except cusparse_spmm.CusparseError as error:
        return Method(run=None, note=common.error_note(error, "unsupported"))
    return Method(run=product.run, note=f"{product.padded_blocks} blocks multiplied")


def prepare_ours(x: torch.Tensor, weight: torch.Tensor, block_size: int, prepack: bool = False) -> Method:
    """Triton kernel on CUDA (`note`: its launch config); on CPU `BlockSparseLinear`'s CPU path (`note`:
    the native ISA it runs, or why the reference runs), `prepack`: with `prepack=True` (CPU only)."""
    if prepack and x.device.type != "cpu":
        return Method(run=None, note="CPU only")
    from nn_blocksparse import BlockSparseLinear, BlockSparseMatrix, block_sparse_linear

    if x.device.type == "cuda":
        from nn_blocksparse.functional import launch_config

        matrix = BlockSparseMatrix.from_dense(weight, block_size)
        config = launch_config(matrix, x.dtype, x.shape[0], x.device)
        # The launch configuration the library picks (tuned or heuristic), for reading the results.
        note = "config=" + "/".join(map(str, config.as_list()))
        return Method(run=lambda: block_sparse_linear(x, matrix, backend="triton"), note=note)
    from nn_blocksparse.cpu import native_isa, native_status

    # Built outside inference mode (where the cases run): an inference tensor's copy is never kept.
    with torch.inference_mode(False):
        module = BlockSparseLinear.from_dense(weight, None, block_size, backend="cpu", prepack=prepack)
    note = f"isa={native_isa()}" if native_isa() else f"reference: {native_status()}"
    if prepack:
        module(x)
        note += ("; blocks kept transposed" if module.prepacked_bytes
                 else "; no transposed blocks kept (not fp32 or no native kernel)")
    return Method(run=lambda: module(x), note=note)


def prepare_dense_onednn(x: torch.Tensor, weight: torch.Tensor) -> Method:
    """CPU: the same dense GEMM through oneDNN (torch's inductor CPU linear op), not MKL, on the weight
    packed once into oneDNN's blocked layout (what `DenseLinear(prepack=True)` keeps).

    torch's fp32 `F.linear` runs MKL, which on AMD CPUs takes its AVX2 code path; oneDNN picks its
    kernels by instruction set and runs AVX-512 there: the strongest dense baseline on such machines.
    """
    if x.device.type != "cpu":
        return Method(run=None, note="CPU only")
    try:
        onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        linear = torch.ops.mkldnn._linear_pointwise
        linear(x, onednn_weight, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        return Method(run=None, note=common.error_note(error, "unsupported"))
    return Method(run=lambda: linear(x, onednn_weight, None, "none", [], ""))


def prepare_ours_isa(x: torch.Tensor, weight: torch.Tensor, block_size: int, isa: str) -> Method:
    """CPU: our native kernel compiled for `isa` (one this CPU runs), whatever ISA the process picked."""
    from nn_blocksparse import BlockSparseMatrix
    from nn_blocksparse.cpu.build import NativeBuildError, library_for
    from nn_blocksparse.cpu.launcher import native_block_sparse_linear

    if x.device.type != "cpu":
        return Method(run=None, note="CPU only")
    try:
        library = library_for(isa)
    except NativeBuildError as error:
        return Method(run=None, note=common.error_note(error, "unsupported"))
    matrix = BlockSparseMatrix.from_dense(weight, block_size)
    return Method(run=lambda: native_block_sparse_linear(library, x, matrix.values, matrix.row_offsets,
                                                         matrix.col_indices, None, None), note=f"isa={isa}")


def prepare_reference(x: torch.Tensor, weight: torch.Tensor, block_size: int) -> Method:
    """CPU: the CPU path's pure-torch reference (what CPUs without a native variant run)."""
    from nn_blocksparse import BlockSparseMatrix
    from nn_blocksparse.cpu.reference import block_sparse_linear_reference

    if x.device.type != "cpu":
        return Method(run=None, note="CPU only")
    matrix = BlockSparseMatrix.from_dense(weight, block_size)
    return Method(run=lambda: block_sparse_linear_reference(x, matrix.values, matrix.row_offsets,
                                                            matrix.col_indices, None, None))


def prepare_method(name: str, x: torch.Tensor, weight: torch.Tensor, block_size: int, density: float = 1.0,
                   seed: int = 0) -> Method:
    if name == "semi_structured":
        return prepare_semi_structured(x, weight, density, seed)
    if name in ("cusparse_bsr", "cusparse_blocked_ell"):
        return prepare_cusparse(x, weight, block_size, name.removeprefix("cusparse_"))
    if name == "dense":
        return prepare_dense(x, weight)
    if name == "dense_onednn":
        return prepare_dense_onednn(x, weight)
    if name == "reference":
        return prepare_reference(x, weight, block_size)
    if name == "ours_prepacked":
        return prepare_ours(x, weight, block_size, prepack=True)
    if name.startswith("ours_"):
        return prepare_ours_isa(x, weight, block_size, name.removeprefix("ours_"))
    if name == "torch_bsr":
        return prepare_torch_bsr(x, weight, block_size)
    if name == "resize":
        return prepare_resize(x, weight)
    if name == "ours":
        return prepare_ours(x, weight, block_size)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS + CPU_METHODS}")


def case_inputs(case: KernelCase, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, W) of one case: a seeded block layout of the case's kind and density, seeded random x."""
    from nn_blocksparse.layouts import block_sparse_weight, make_layout

    if case.layout == "random":  # one generator for layout and values, as every earlier run drew them
        weight = random_block_sparse_weight(case.n, case.k, case.block_size, case.density, seed=seed,
                                            dtype=case.dtype, device=device)
    else:
        bs = case.block_size
        layout = make_layout(case.layout, case.n // bs, case.k // bs, case.density, seed=seed,
                             rows_per_head=max(1, HEAD_FEATURES // bs))
        weight = block_sparse_weight(layout, bs, seed=seed, dtype=case.dtype, device=device)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.m, case.k, generator=generator).to(device=device, dtype=case.dtype)
    return x, weight


def run_case(case: KernelCase, device: torch.device, methods=METHODS, seed: int = 0, warmup: int = 3,
             repeats: int = 20, cuda_rep_ms: float = 100, cuda_graph: bool = False) -> list[dict]:
    """One row per method (dense, the reference and the baseline, first), timed side by side
    (`common.time_side_by_side`: in turns on CPU)."""
    x, weight = case_inputs(case, device, seed)
    nnz_blocks = int(block_layout(weight, case.block_size).sum())
    density = nnz_blocks / ((case.n // case.block_size) * (case.k // case.block_size))
    useful_flop = 2.0 * case.m * nnz_blocks * case.block_size ** 2

    nan = float("nan")
    names = ("dense", *[m for m in methods if m != "dense"])
    notes, diffs, stored_flops, runs = {}, {}, {}, {}
    with torch.inference_mode():
        reference = F.linear(x, weight)
        for name in names:  # every method prepared and checked first, then all timed side by side
            diffs[name], stored_flops[name] = nan, useful_flop
            try:  # a failing method (e.g. a Triton compile error) becomes NaN with the error in `note`
                method = prepare_method(name, x, weight, case.block_size, case.density, seed)
                notes[name] = method.note
                stored_flops[name] = method.stored_flop or useful_flop
                if method.run is not None:
                    output = (method.output or method.run)()
                    synchronize(device)
                    diffs[name] = common.max_abs_diff(output, reference if method.reference is None
                                                      else method.reference)
                    runs[name] = method.run
            except Exception as error:  # noqa: BLE001 - recorded, the other methods still run
                notes[name] = common.error_note(error, "failed")
        times, errors = common.time_side_by_side(runs, device, warmup, repeats, cuda_warmup_ms=cuda_rep_ms / 4,
                                                 cuda_rep_ms=cuda_rep_ms, cuda_graph=cuda_graph)
    notes.update(errors)
    dense_ms = times.get("dense", nan)
    cublas_tflops = 2.0 * case.m * case.n * case.k / (dense_ms * 1e-3) / 1e12
    rows = []
    for name in names:
        time_value = times.get(name, nan)
        rows.append({
            "shape": case.shape, "layout": case.layout, "n": case.n, "k": case.k, "m": case.m,
            "target_density": case.density, "density": density, "nnz_blocks": nnz_blocks,
            "block_size": case.block_size, "dtype": DTYPE_NAMES[case.dtype], "method": name,
            "time_ms": time_value, "tflops": useful_flop / (time_value * 1e-3) / 1e12,
            "stored_tflops_over_cublas": stored_flops[name] / (time_value * 1e-3) / 1e12 / cublas_tflops,
            "speedup_vs_dense": dense_ms / time_value, "ideal_speedup": 1.0 / density, "max_abs_diff": diffs[name],
            "note": notes[name],
        })
    return [row for row in rows if row["method"] in methods]


# ---------------------------------------------------------------------------------- summary
def crossover_rows(rows: list[dict]) -> list[dict]:
    """Per shape/layout/M/bs/dtype: the largest (actual) density at which each method beats dense."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["shape"], row.get("layout", "random"), int(row["m"]), int(row["block_size"]), row["dtype"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (shape, layout, m, block_size, dtype), group in groups.items():
        def crossover(method: str) -> float:
            wins = [float(r["density"]) for r in group if r["method"] == method and float(r["speedup_vs_dense"]) > 1.0]
            return max(wins) if wins else float("nan")

        ours = [r for r in group if r["method"] == "ours"]
        lowest = min(ours, key=lambda r: float(r["density"])) if ours else None
        summary.append({
            "shape": shape, "layout": layout, "m": m, "block_size": block_size, "dtype": dtype,
            "crossover_density": crossover("ours"), "crossover_density_torch_bsr": crossover("torch_bsr"),
            "crossover_density_resize": crossover("resize"),
            "lowest_density": float(lowest["density"]) if lowest else float("nan"),
            "speedup_at_lowest_density": float(lowest["speedup_vs_dense"]) if lowest else float("nan"),
        })
    return summary


def print_crossover(summary: list[dict]) -> None:
    print("\ncrossover density (largest density where ours beats dense; nan: never)")
    print(f"{'shape':>10} {'layout':>15} {'M':>6} {'bs':>3} {'dtype':>5} {'ours':>6} {'bsr':>6} {'resize':>6}  "
          "speedup@lowest")
    for row in summary:
        print(f"{row['shape']:>10} {row.get('layout', 'random'):>15} {row['m']:>6} {row['block_size']:>3} {row['dtype']:>5} "
              f"{row['crossover_density']:>6.2f} {row['crossover_density_torch_bsr']:>6.2f} "
              f"{row['crossover_density_resize']:>6.2f}  {row['speedup_at_lowest_density']:.2f}x "
              f"at {row['lowest_density']:.2f}")


IDEAL_LABEL = "ideal 1/density"


def plot_speedup_vs_density(rows: list[dict], path_for_m: Callable[[int], object], title_prefix: str,
                            layout: str = "random") -> list:
    """One PNG per M for one layout: a panel per shape, a line per method; the plotted dtype/bs prefer fp16 and 32."""
    rows = [r for r in rows if r.get("layout", "random") == layout]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    sizes = list(dict.fromkeys(int(r["block_size"]) for r in rows))
    dtype = "fp16" if "fp16" in dtypes else dtypes[0]
    block_size = 32 if 32 in sizes else sizes[0]
    selected = [r for r in rows if r["dtype"] == dtype and int(r["block_size"]) == block_size]
    paths = []
    for m in sorted({int(r["m"]) for r in selected}):
        panels = {}
        for shape in dict.fromkeys(r["shape"] for r in selected):
            case_rows = sorted((r for r in selected if r["shape"] == shape and int(r["m"]) == m),
                               key=lambda r: float(r["density"]))
            lines = {}
            for method in dict.fromkeys(r["method"] for r in case_rows if r["method"] != "dense"):
                points = [(float(r["density"]), float(r["speedup_vs_dense"])) for r in case_rows
                          if r["method"] == method]
                if points:
                    lines[method] = ([p[0] for p in points], [p[1] for p in points])
            densities = sorted({float(r["density"]) for r in case_rows})
            lines[IDEAL_LABEL] = (densities, [1.0 / d for d in densities])
            panels[f"{shape} (N x K)"] = lines
        paths.append(common.line_panels(
            panels, path_for_m(m), f"{title_prefix}: speedup vs dense F.linear, M={m}, {dtype}, block {block_size}",
            "block density", "speedup vs dense (x)", dashed=[IDEAL_LABEL], log_y=True))
    return paths


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = common.base_parser("block-sparse kernel vs dense, torch BSR and resize")
    parser.add_argument("--shapes", help="N x K list, e.g. 768x768,3072x768 (default: BERT-base shapes)")
    parser.add_argument("--m", help="rows of x, e.g. 128,2048")
    parser.add_argument("--densities", help="block densities, e.g. 1.0,0.5,0.1")
    parser.add_argument("--block-sizes", help="e.g. 16,32,64")
    parser.add_argument("--dtypes", help="e.g. fp16,bf16 (fp32 too)")
    parser.add_argument("--layouts", default="random", help=f"subset of {','.join(LAYOUTS)} (nn_blocksparse.layouts)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"subset of {','.join(METHODS + CPU_METHODS)},ours_<isa> ({', '.join(ALTERNATIVE_METHODS)}: GPU "
                        f"only; {', '.join(CPU_METHODS)}, ours_<isa>: CPU only)")
    parser.add_argument("--device", help="cuda (the default) or cpu (the torch path for ours); --quick: always cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, help="CPU timing repeats (CUDA uses do_bench)")
    common.add_cuda_graph_argument(parser)
    parser.add_argument("--rep-ms", type=float, default=100.0,
                        help="CUDA: do_bench's measuring time per method and case (a quarter of it to warm up)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.shapes = [common.parse_shape(s) for s in common.parse_list(args.shapes)] if args.shapes else \
        list(QUICK_SHAPES if quick else BERT_BASE_SHAPES)
    args.m = common.parse_list(args.m, int) if args.m else list(QUICK_M if quick else FULL_M)
    args.densities = common.parse_list(args.densities, float) if args.densities else \
        list(QUICK_DENSITIES if quick else FULL_DENSITIES)
    args.block_sizes = common.parse_list(args.block_sizes, int) if args.block_sizes else \
        list(QUICK_BLOCK_SIZES if quick else FULL_BLOCK_SIZES)
    args.dtypes = common.parse_list(args.dtypes) if args.dtypes else list(QUICK_DTYPES if quick else FULL_DTYPES)
    args.methods = common.parse_list(args.methods)
    args.layouts = common.parse_list(args.layouts)
    for name in args.layouts:
        if name not in LAYOUTS:
            parser.error(f"unknown layout {name!r}; choose from {LAYOUTS}")
    known = METHODS + cpu_methods()
    for name in args.methods:
        if name not in known:
            parser.error(f"unknown method {name!r}; choose from {known}")
    for name in args.dtypes:
        if name not in DTYPE_NAMES.values():
            parser.error(f"unknown dtype {name!r}; choose from {tuple(DTYPE_NAMES.values())}")
    if "dense" not in args.methods:
        args.methods.insert(0, "dense")
    args.device = torch.device("cpu" if quick else (args.device or "cuda"))
    args.repeats = args.repeats or (10 if quick else 20)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if common.cuda_missing(args.device, "bench_kernel"):
        return 2
    with common.torch_threads(args.threads):
        return run(args)


def run(args) -> int:
    device = args.device
    cases = [KernelCase(n, k, m, density, bs, dtype_from_name(dtype), layout)
             for layout, dtype, bs, (n, k), m, density in product(args.layouts, args.dtypes, args.block_sizes,
                                                                  args.shapes, args.m, args.densities)]
    print(f"bench_kernel on {common.device_name(device)}: {len(cases)} cases x {len(args.methods)} methods")
    rows = []
    environment = {**common.environment_record(device), "timing": common.timing_name(args.cuda_graph)}
    graph = args.cuda_graph

    def path(stem: str, suffix: str = ".csv"):
        return common.results_path(args.out, common.stem_for(stem, graph), device, args.quick, suffix)

    csv_path = path("kernel")
    for index, case in enumerate(cases, 1):
        case_rows = run_case(case, device, args.methods, seed=args.seed, warmup=2 if args.quick else 3,
                             repeats=args.repeats, cuda_rep_ms=args.rep_ms, cuda_graph=graph)
        rows.extend(case_rows)
        timings = "  ".join(f"{r['method']} {r['time_ms']:.4f}ms ({r['speedup_vs_dense']:.2f}x)" for r in case_rows)
        print(f"[{index}/{len(cases)}] {case.shape} {case.layout} M={case.m} d={case_rows[0]['density']:.2f} "
              f"bs={case.block_size} {case_rows[0]['dtype']}: {timings}", flush=True)
        # Rewritten after every case: a run stopped at a time limit keeps what it measured.
        common.write_csv(csv_path, rows, KERNEL_COLUMNS, environment)

    summary = crossover_rows(rows)
    print_crossover(summary)
    summary_path = common.write_csv(path("kernel_crossover"), summary, CROSSOVER_COLUMNS, environment)
    plots = []
    for layout in args.layouts:  # the random layout keeps the plots' historical names
        suffix = "" if layout == "random" else f"_{layout}"
        plots += plot_speedup_vs_density(rows, lambda m: path(f"kernel_speedup_m{m}{suffix}", ".png"),
                                         f"{common.device_name(device)}, {common.timing_name(graph)} timing, "
                                         f"{layout} layout", layout)
    print("\nwrote", csv_path, summary_path, *plots, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
