"""Ahead-of-time compile every kernel configuration the library can launch, without a GPU.

`python -m nn_blocksparse.aot` compiles the block-sparse linear kernel (and its split-K
reduction) for every dtype, block size, epilogue and launch configuration that
`kernels.configs.launchable_configs` lists, for sm80 and sm90, with `triton.compile` and a
`GPUTarget` (no driver needed), then asks the bundled `ptxas -v` for registers, spills and
shared memory. The other kernels a config can name compile too: the swapped Triton kernel for
both architectures, the Gluon kernels (`gluon_*`, with `GluonASTSource`) for sm90 only, where a
report also counts the warpgroup MMAs (`wgmma.mma_async`) in the PTX and fails a Gluon kernel
that has none or whose wgmmas ptxas serialises. Exit status 1 if any configuration spills or
fails to compile.

Must run without `TRITON_INTERPRET=1` (the interpreter replaces the kernels it compiles).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .block_sparse_matrix import SUPPORTED_BLOCK_SIZES
from .kernels.block_sparse_linear import (
    REDUCE_TILE,
    _block_sparse_linear_kernel,
    _split_k_reduce_kernel,
)
from .dtypes import DTYPE_NAMES, dtype_from_name
from .kernels.configs import KERNEL_CHOICES, KernelConfig, launchable_configs

ARCHS = (80, 90)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPILOGUES = ((False, None), (True, None), (True, "gelu"))  # (has_bias, activation)
WIDEST_EPILOGUE = ((True, "gelu"),)  # the most live registers: a quicker check that still bounds spills


@dataclass
class CompileReport:
    arch: int
    kernel: str
    dtype: str
    block_size: int
    has_bias: bool
    activation: str | None
    config: KernelConfig | None
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    error: str = ""
    wgmma: int = -1  # wgmma.mma_async instructions in the PTX (counted for sm90 only)
    hgmma: int = -1  # HGMMA instructions in the SASS (sm90, where Triton bundles cuobjdump)
    needs_wgmma: bool = False  # the Gluon kernels exist to issue wgmma: none is a failure

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_bytes == 0 and (not self.needs_wgmma or (self.wgmma > 0 and self.hgmma != 0))


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (recent wheels bundle a newer one for sm90+)."""
    from triton.backends.nvidia import compiler as nvidia_compiler

    try:
        return nvidia_compiler.get_ptxas(arch).path
    except TypeError:  # older Triton: one ptxas for every architecture
        return nvidia_compiler.get_ptxas().path


# ptxas's advisory when it cannot keep warpgroup MMAs asynchronous (then they run one by one).
WGMMA_SERIALIZED = "wgmma.mma_async instructions are serialized"


def sass_instruction_count(cubin: bytes, arch: int, mnemonic: str) -> int:
    """How often `mnemonic` (e.g. "HGMMA") occurs in the SASS of `cubin`, by the cuobjdump that Triton
    bundles beside ptxas; -1 where there is none."""
    cuobjdump = Path(ptxas_path(arch)).with_name("cuobjdump")
    if not cuobjdump.exists():
        return -1
    with tempfile.TemporaryDirectory() as tmp:
        cubin_file = Path(tmp) / "kernel.cubin"
        cubin_file.write_bytes(cubin)
        result = subprocess.run([str(cuobjdump), "--dump-sass", str(cubin_file)], capture_output=True, text=True)
    if result.returncode != 0:
        return -1
    return len(re.findall(rf"\b{mnemonic}\b", result.stdout))


def _resource_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of the single kernel in `ptx`, from `ptxas -v`.

    Raises RuntimeError when ptxas reports serialised wgmmas: a kernel built around asynchronous
    MMAs that lost them is a defect to fix, not a result to report."""
    suffix = "a" if arch == 90 else ""  # Triton targets sm_90a on Hopper
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = Path(tmp) / "kernel.ptx"
        ptx_file.write_text(ptx)
        result = subprocess.run(
            [ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}{suffix}", str(ptx_file), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = result.stderr + result.stdout
    if WGMMA_SERIALIZED in log:
        advisory = next(line for line in log.splitlines() if WGMMA_SERIALIZED in line)
        raise RuntimeError(f"ptxas: {advisory.strip()}")
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    spill = (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0)
    return registers, spill


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int, gluon: bool = False,
             extra_options: dict | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name in constexprs:
        signature[name] = "constexpr"
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs)
    else:
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **(extra_options or {})})


def input_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """fp32 launches with "ieee" or "tf32" depending on torch's TF32 switch: both are launchable."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def compile_main_kernel(arch: int, dtype: torch.dtype, block_size: int, has_bias: bool, activation: str | None,
                        config: KernelConfig, input_precision: str, dense_walk: bool = False) -> CompileReport:
    """`dense_walk`: the measurement variant that takes block-columns from the step (see the kernel)."""
    name = ("block_sparse_linear" + ("(tf32)" if dtype == torch.float32 and input_precision == "tf32" else "")
            + ("(dense walk)" if dense_walk else ""))
    report = CompileReport(arch, name, DTYPE_NAMES[dtype], block_size, has_bias, activation, config)
    t = DTYPE_NAMES[dtype]  # Triton's signature names are ours
    out_type = t if config.split_k == 1 else "fp32"
    signature = {
        "x_ptr": f"*{t}", "values_ptr": f"*{t}", "step_offsets_ptr": "*i32", "step_cols_ptr": "*i32",
        "step_blocks_ptr": "*i32", "group_rows_ptr": "*i32", "group_order_ptr": "*i32",
        "bias_ptr": f"*{t}", "out_ptr": f"*{out_type}",
        "M": "i32", "n_groups": "i32", "stride_xm": "i32", "stride_xk": "i32",
        "stride_om": "i32", "stride_on": "i32", "stride_split": "i32",
    }
    constexprs = {
        # The launcher always passes unit inner strides, and Triton specialises a 1 at run time.
        "stride_xk": 1, "stride_on": 1,
        "HAS_BIAS": has_bias, "ACTIVATION": 1 if activation == "gelu" else 0,
        "INPUT_PRECISION": input_precision, "BLOCK_SIZE": block_size, "ROWS_PER_PROGRAM": config.rows_per_program,
        "BLOCK_M": config.block_m, "GROUP_M": config.group_m, "SPLIT_K": config.split_k,
        "K_BLOCKS": config.k_blocks, "UPCAST_OPERANDS": False, "DENSE_WALK": dense_walk,
    }
    return _finish(report, _block_sparse_linear_kernel, signature, constexprs, arch,
                   config.num_warps, config.num_stages)


def compile_reduce_kernel(arch: int, dtype: torch.dtype, has_bias: bool, activation: str | None,
                          split_k: int) -> CompileReport:
    report = CompileReport(arch, f"split_k_reduce(x{split_k})", DTYPE_NAMES[dtype], 0, has_bias, activation, None)
    t = DTYPE_NAMES[dtype]  # Triton's signature names are ours
    signature = {"partial_ptr": "*fp32", "bias_ptr": f"*{t}", "out_ptr": f"*{t}", "M": "i32", "N": "i32",
                 "stride_split": "i32", "stride_pm": "i32", "stride_om": "i32"}
    constexprs = {"HAS_BIAS": has_bias, "ACTIVATION": 1 if activation == "gelu" else 0, "SPLIT_K": split_k,
                  "BLOCK_M": REDUCE_TILE[0], "BLOCK_N": REDUCE_TILE[1]}
    return _finish(report, _split_k_reduce_kernel, signature, constexprs, arch, 4, 1)


def compile_variant_kernel(arch: int, dtype: torch.dtype, block_size: int, has_bias: bool, activation: str | None,
                           config: KernelConfig) -> CompileReport:
    """One of the other kernels a config can name (`config.kernel`): swapped Triton, or Gluon (sm90)."""
    report = CompileReport(arch, config.kernel, DTYPE_NAMES[dtype], block_size, has_bias, activation, config,
                           needs_wgmma=config.is_gluon)
    t = DTYPE_NAMES[dtype]  # Triton's signature names are ours
    tables = {"step_offsets_ptr": "*i32", "step_cols_ptr": "*i32", "step_blocks_ptr": "*i32", "group_rows_ptr": "*i32",
              "group_order_ptr": "*i32"}
    epilogue = {"HAS_BIAS": has_bias, "ACTIVATION": 1 if activation == "gelu" else 0,
                "ROWS_PER_PROGRAM" if config.kernel == "triton_swapped" else "ROWS": config.rows_per_program,
                "GROUP_M": config.group_m}
    if config.kernel == "triton_swapped":
        from .kernels.block_sparse_linear_swapped import _swapped_kernel as fn

        signature = {"x_ptr": f"*{t}", "values_ptr": f"*{t}", **tables, "bias_ptr": f"*{t}", "out_ptr": f"*{t}",
                     "M": "i32", "n_groups": "i32", "stride_xm": "i32", "stride_om": "i32"}
        constexprs = {**epilogue, "INPUT_PRECISION": "tf32", "BLOCK_SIZE": block_size, "BLOCK_T": config.block_m,
                      "UPCAST_OPERANDS": False}
        return _finish(report, fn, signature, constexprs, arch, config.num_warps, config.num_stages)
    from .kernels.gluon_common import descriptor_signature, launch_options

    x_tile, block = descriptor_signature(dtype, (config.block_m, block_size)), descriptor_signature(
        dtype, (block_size, block_size))
    constexprs = {**epilogue, "NUM_STAGES": config.num_stages, "WARP_SPECIALIZE": config.kernel.endswith("_ws")}
    if config.kernel.startswith("gluon_member"):
        from .kernels.gluon_member_mma import _member_mma_kernel as fn

        signature = {"x_desc": x_tile, "w_desc": block, "out_desc": x_tile, **tables, "bias_ptr": f"*{t}",
                     "M": "i32", "n_groups": "i32"}
    else:
        from .kernels.gluon_wide_mma import _wide_mma_kernel as fn

        signature = {"x_desc": x_tile, "w_desc": block, "out_ptr": f"*{t}", **tables, "bias_ptr": f"*{t}",
                     "M": "i32", "n_groups": "i32", "stride_om": "i32", "absent_row": "i32"}
    return _finish(report, fn, signature, constexprs, arch, config.num_warps, config.num_stages, gluon=True,
                   extra_options=launch_options(config, block_size))


def _finish(report: CompileReport, fn, signature, constexprs, arch, num_warps, num_stages,
            gluon: bool = False, extra_options: dict | None = None) -> CompileReport:
    try:
        compiled = _compile(fn, signature, constexprs, arch, num_warps, num_stages, gluon, extra_options)
        report.shared_bytes = int(compiled.metadata.shared)
        ptx = compiled.asm["ptx"]
        if arch >= 90:
            report.wgmma = ptx.count("wgmma.mma_async")
            if report.needs_wgmma:
                report.hgmma = sass_instruction_count(compiled.asm["cubin"], arch, "HGMMA")
        report.registers, report.spill_bytes = _resource_usage(ptx, arch)
    except Exception as exc:  # a failed compile is a result to report, not a crash
        report.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return report


def all_jobs(archs=ARCHS, dtypes=DTYPES, block_sizes=SUPPORTED_BLOCK_SIZES, epilogues=EPILOGUES,
             kernels=KERNEL_CHOICES):
    """(function, args) for every kernel variant the library can launch (of the named `kernels`)."""
    jobs = []
    for arch, dtype in itertools.product(archs, dtypes):
        split_ks = set()
        for block_size in block_sizes:
            for config in launchable_configs(dtype, block_size, arch=f"sm{arch}"):
                if config.kernel not in kernels:
                    continue
                if config.kernel != "triton":
                    jobs += [(compile_variant_kernel, (arch, dtype, block_size, has_bias, activation, config))
                             for has_bias, activation in epilogues]
                    continue
                split_ks.add(config.split_k)
                for (has_bias, activation), precision in itertools.product(epilogues, input_precisions(dtype)):
                    jobs.append((compile_main_kernel,
                                 (arch, dtype, block_size, has_bias, activation, config, precision)))
        for split_k in sorted(split_ks - {1}):
            for has_bias, activation in epilogues:
                jobs.append((compile_reduce_kernel, (arch, dtype, has_bias, activation, split_k)))
    return jobs


def _run(job):
    fn, args = job
    return fn(*args)


def run_jobs(jobs, workers: int) -> list[CompileReport]:
    if workers <= 1:
        return [_run(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run, jobs, chunksize=4))


def format_report(report: CompileReport) -> str:
    config = "-" if report.config is None else (
        f"BM={report.config.block_m:<3} R={report.config.rows_per_program} G={report.config.group_m} "
        f"SK={report.config.split_k} KB={report.config.k_blocks} W={report.config.num_warps} "
        f"S={report.config.num_stages}")
    if report.wgmma >= 0:
        config += f" wgmma={report.wgmma}"
    if report.hgmma >= 0:
        config += f" HGMMA={report.hgmma}"
    epilogue = ("bias" if report.has_bias else "-") + ("+gelu" if report.activation else "")
    if report.ok:
        status = "ok"
    elif report.error:
        status = f"FAILED {report.error}"
    else:
        status = "SPILLS" if report.spill_bytes else "NO WGMMA"
    return (f"sm{report.arch}  {report.kernel:<24} {report.dtype:<5} bs={report.block_size:<3} "
            f"{epilogue:<10} {config:<36} regs={report.registers:<4} spill={report.spill_bytes:<5} "
            f"smem={report.shared_bytes:<6} {status}")


def main(argv=None) -> int:
    from .kernels.block_sparse_linear import interpreter_enabled

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="+", default=[DTYPE_NAMES[d] for d in DTYPES], choices=[DTYPE_NAMES[d] for d in DTYPES])
    parser.add_argument("--block-size", type=int, nargs="+", default=list(SUPPORTED_BLOCK_SIZES),
                        choices=SUPPORTED_BLOCK_SIZES)
    parser.add_argument("--epilogues", choices=["all", "widest"], default="all",
                        help="'widest' compiles only bias+GELU, the epilogue with the most live registers")
    parser.add_argument("--kernels", nargs="+", default=list(KERNEL_CHOICES), choices=KERNEL_CHOICES,
                        help="only these kernels (default: all; the Gluon ones compile for sm90 only)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if interpreter_enabled():
        print("TRITON_INTERPRET=1 is set: unset it, the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    epilogues = EPILOGUES if args.epilogues == "all" else WIDEST_EPILOGUE
    jobs = all_jobs(args.arch, [dtype_from_name(d) for d in args.dtype], args.block_size, epilogues, args.kernels)
    reports = run_jobs(jobs, args.workers)
    for report in reports:
        print(format_report(report))
    bad = [r for r in reports if not r.ok]
    print(f"{len(reports)} kernel variants compiled, {len(bad)} failed or spilled")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
