"""Calibrate the CPU planner: time the native kernel against the dense linear here, write the profile.

    python -m nn_blocksparse.cpu.calibrate [--out PATH] [--threads N] [--rows 256] [--repeats 5] [--quick]

For the native ISA in use (`NN_BLOCKSPARSE_ISA` to calibrate another) and torch's thread count
(`--threads`), each compute mode ("fp32", "bf16", "bf16_weights"), block size (16/32/64) and block
density (0.1/0.3/0.6/1.0) is timed on random layouts at both BERT FFN shapes (768x3072 and
3072x768, `--rows` rows of x), against the dense linear hybrid runs beside it
(`dense.dense_linear_cpu`: oneDNN where torch has it, on its packed weight, the faster of the
two forms a `DenseLinear` runs) on the same inputs (fp32 for the modes
with fp32 activations, bf16 for "bf16"; the dense weights in the mode's weight dtype, as hybrid
keeps them); the profile keeps the lower of the two shapes' speedups.
About ten seconds on two cores; `--quick` (block size 32, densities 0.3 and 1.0, one shape) about
one. Writes into the profile file (`planner.profile_path()`, or `--out`), replacing the entry of
the same CPU (`isa.cpu_identity()`), ISA and thread count. It also times the dense linear's GELU at
the FFN-in shape (3072x768), fused into oneDNN's epilogue against `F.gelu` after it, per activation
dtype oneDNN runs (the profile's `gelu_fusion`, read by `planner.fuse_dense_gelu`). Run it on a
quiet machine: its numbers decide which matrices `patch_bert(mode="hybrid")` makes block-sparse,
and whether the dense ones fuse GELU.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from ..block_sparse_matrix import BlockSparseMatrix
from ..dtypes import DTYPE_NAMES
from ..layouts import random_block_sparse_weight
from ..timing import interleaved_median_ms
from .build import native_isa, native_status
from .dense import PackedWeight, dense_linear_cpu, onednn_available
from .isa import cpu_identity
from .launcher import MODE_DTYPES, block_sparse_linear_cpu
from .planner import (BLOCK_SIZES, GELU_DTYPES, MODES, Measurement, Profile, profile_path, threshold_for,
                      write_profile)

SHAPES = ((768, 3072), (3072, 768))  # N x K
GELU_SHAPE = (3072, 768)  # the FFN-in, where hybrid's dense linears apply GELU
DENSITIES = (0.1, 0.3, 0.6, 1.0)
ROWS = 256
CPU = torch.device("cpu")


def calibrate(rows: int = ROWS, shapes=SHAPES, densities=DENSITIES, block_sizes=BLOCK_SIZES, modes=MODES,
              repeats: int = 5, timer=None, log=print) -> Profile:
    """Measure this machine and return its `Profile` (not written; see `main`).

    `timer({"dense": fn, "native": fn}) -> {name: milliseconds}` (and `{"fused": fn, "separate": fn}`
    for GELU) replaces their medians over `repeats` calls timed in turns (tests).
    """
    isa = native_isa()
    if isa is None:
        raise RuntimeError(f"no native CPU kernel to calibrate: {native_status()}")
    # Dense and native timed in turns: a drift of the machine's speed then stays out of their ratio.
    timer = timer or (lambda fns: interleaved_median_ms(fns, warmup=1, repeats=repeats))
    measurements, details = [], []
    with torch.inference_mode():
        for mode in modes:
            activation_dtype, weight_dtype = MODE_DTYPES[mode]
            for block_size in block_sizes:
                for density in densities:
                    speedups = []
                    for n, k in shapes:
                        matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(
                            n, k, block_size, density, seed=n + k + block_size, dtype=weight_dtype), block_size)
                        with torch.inference_mode(False):  # a tensor with a version counter: packable
                            dense_weight = matrix.to_dense()  # in the weights' dtype, as hybrid's dense layers
                        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(activation_dtype)
                        packed = PackedWeight()
                        times = timer({"dense": lambda: dense_linear_cpu(x, dense_weight, packed=packed),
                                       "native": lambda: block_sparse_linear_cpu(
                                           x, matrix.values, matrix.row_offsets, matrix.col_indices, None, None)})
                        dense_ms, native_ms = times["dense"], times["native"]
                        speedups.append(dense_ms / native_ms)
                        details.append({"mode": mode, "block_size": block_size, "density": round(matrix.density, 4),
                                        "n": n, "k": k, "rows": rows, "dense_ms": round(dense_ms, 4),
                                        "native_ms": round(native_ms, 4)})
                    measurements.append(Measurement(mode, block_size, density, min(speedups)))
                    log(f"  {mode:>12} bs={block_size:<2} density {density:.2f}: {min(speedups):.2f}x dense")
        gelu_fusion = {}
        for dtype in GELU_DTYPES:
            if not onednn_available(dtype):
                continue
            name = DTYPE_NAMES[dtype]
            generator = torch.Generator().manual_seed(2)
            n, k = GELU_SHAPE
            with torch.inference_mode(False):
                weight = torch.randn(n, k, generator=generator).to(dtype)
            bias = torch.randn(n, generator=generator).to(dtype)
            x = torch.randn(rows, k, generator=generator).to(dtype)
            packed = PackedWeight()
            times = timer({fused: lambda fuse=fuse: dense_linear_cpu(x, weight, bias, "gelu", packed, fuse_gelu=fuse)
                           for fused, fuse in (("fused", True), ("separate", False))})
            gelu_fusion[name] = times["separate"] / times["fused"]
            details.append({"gelu": name, "n": n, "k": k, "rows": rows, "fused_ms": round(times["fused"], 4),
                            "separate_ms": round(times["separate"], 4)})
            log(f"  dense GELU {name}: fused {gelu_fusion[name]:.2f}x F.gelu after the linear")
    return Profile(cpu_identity(), isa, torch.get_num_threads(), tuple(measurements),
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   details={"torch": torch.__version__, "timings": details}, gelu_fusion=gelu_fusion or None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nn_blocksparse.cpu.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help=f"profile file (default {profile_path()})")
    parser.add_argument("--threads", type=int, help="torch threads to calibrate for (default: torch's)")
    parser.add_argument("--rows", type=int, default=ROWS, help=f"rows of x per call (default {ROWS})")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="block size 32, densities 0.3 and 1.0, one shape")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.rows < 1 or args.repeats < 1:
        parser.error("--rows and --repeats must be at least 1")
    if native_isa() is None:
        print(f"no native CPU kernel here ({native_status()}): nothing to calibrate", file=sys.stderr)
        return 1
    print(f"calibrating {native_isa()} on {cpu_identity()}, {torch.get_num_threads()} threads", flush=True)
    quick = dict(shapes=SHAPES[:1], densities=(0.3, 1.0), block_sizes=(32,)) if args.quick else {}
    profile = calibrate(rows=args.rows, repeats=args.repeats, **quick)
    path = write_profile(profile, args.out)
    for mode in MODES:
        thresholds = ", ".join(f"bs {bs}: {threshold_for(mode, bs, profile):.2f}"
                               for bs in sorted({m.block_size for m in profile.measurements}))
        print(f"block-sparse up to density ({mode}): {thresholds}")
    for name, ratio in (profile.gelu_fusion or {}).items():
        print(f"dense GELU ({name}): {'fused' if ratio > 1.0 else 'after the linear'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
