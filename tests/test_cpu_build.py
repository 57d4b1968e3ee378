"""The native CPU kernel's build, ISA choice and fallbacks (`nn_blocksparse/cpu/{build,isa}.py`).

- every x86-64 variant compiles here, runnable or not (AVX-512 ones on an AVX2 machine); the ARM
  variants are cross-compiled and their C++ harness (`kernel_harness.cpp`, the kernel against a
  double reference) runs under qemu-aarch64 where those tools are installed;
- the ISA comes from the CPU's features; `NN_BLOCKSPARSE_ISA` forces a lower one, and asking for one
  the CPU lacks warns and runs what it has (never an illegal instruction);
- the build cache: built once; a corrupt, foreign or older library under the cache's name is rebuilt,
  never loaded; processes building at once do not corrupt it; a cache others may write is refused;
- fallbacks (disabled, failed build) run the pure-torch reference, in fresh processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, run_python
from nn_blocksparse.cpu import build, isa

X86_ISAS = ("amx_bf16", "avx512_bf16", "avx512", "avx2")
ARM_ISAS = ("neon_bf16", "neon")
LINUX = sys.platform.startswith("linux")

# Computes with the CPU path in a fresh process and prints what ran.
_CHECK = """
    import warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from nn_blocksparse import BlockSparseMatrix
        from nn_blocksparse.cpu import block_sparse_linear_cpu, native_isa, native_status
        matrix = BlockSparseMatrix.from_dense(torch.randn(96, 64) * (torch.rand(96, 64) < 0.5), 32)
        x = torch.randn(7, 64)
        y = block_sparse_linear_cpu(x, matrix.values, matrix.row_offsets, matrix.col_indices, None, "gelu")
    torch.testing.assert_close(y.double(), torch.nn.functional.gelu(x.double() @ matrix.to_dense().double().T),
                               atol=1e-4, rtol=1e-4)
    print("ISA", native_isa())
    print("STATUS", native_status())
    for warning in caught:
        print("WARNING", warning.message)
"""


def _lines(result: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [line.removeprefix(prefix + " ") for line in result.stdout.splitlines() if line.startswith(prefix + " ")]


def test_native_kernel_runs_where_it_should():
    # Linux on AVX2 or NEON with a compiler must run the native kernel (else every native test would
    # drop out of the suite unnoticed), and its best variant unless the environment asks otherwise.
    if not (LINUX and isa.runnable_isas() and build.compiler_for(isa.runnable_isas()[0])):
        pytest.skip("not Linux on an AVX2/NEON CPU with a C++ compiler")
    if os.environ.get(isa.NATIVE_ENV) == "0" or os.environ.get(isa.ISA_ENV):
        pytest.skip("the environment chooses the native kernel")
    assert build.native_status() == "ok"
    assert build.native_isa() == isa.runnable_isas()[0]


@pytest.mark.skipif(isa.machine() != "x86_64" or build.compiler_for("avx2") is None,
                    reason="needs an x86-64 C++ compiler")
@pytest.mark.parametrize("variant", X86_ISAS)
def test_every_x86_variant_compiles(variant):
    # Built (not loaded) whether or not this CPU runs it: the AVX-512 variants of the source the AVX2
    # tests just ran are at least valid code for GCC here. It exports its C entry points and nothing
    # else: builds of several ISAs share a process, and must not share code or scratch buffers.
    library = build.build_library(variant)
    assert library.is_file() and build._is_intact(library, library.stem.rsplit("_", 1)[-1], variant)
    if shutil.which("nm"):
        listing = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                                 check=True).stdout
        exported = {line.split()[-1] for line in listing.splitlines() if line.strip()}
        assert {"nnbs_block_sparse_linear", "nnbs_attention", "nnbs_attention_bf16", "nnbs_add_layer_norm"} <= exported
        assert all(name.startswith("nnbs_") for name in exported), sorted(exported)


def _qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


@pytest.mark.parametrize("variant", ARM_ISAS)
def test_arm_variants_pass_their_harness(variant, tmp_path):
    """Cross-compiled and run under qemu (`-cpu max` has BFDOT); natively on an aarch64 host."""
    native = isa.machine() == "aarch64"
    if native and variant not in isa.runnable_isas():
        pytest.skip(f"this ARM CPU lacks {variant}")
    if not native and (build.compiler_for(variant) is None or _qemu() is None):
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (Debian packages) to cross-test the ARM kernel")
    program = build.build_harness(variant, tmp_path / f"harness_{variant}")
    command = [str(program)] if native else [_qemu(), "-cpu", "max", str(program)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("ok"), result.stdout + result.stderr
    assert f"bf16 dot {1 if variant == 'neon_bf16' else 0}" in result.stdout


def test_isa_choice_follows_cpu_features_and_environment(monkeypatch):
    monkeypatch.setattr(isa, "cpu_features", lambda: frozenset({"avx2", "fma", "avx512f", "avx512vl"}))
    monkeypatch.setattr(isa, "machine", lambda: "x86_64")
    monkeypatch.setattr(isa.sys, "platform", "linux")
    monkeypatch.delenv(isa.NATIVE_ENV, raising=False)
    monkeypatch.delenv(isa.ISA_ENV, raising=False)
    assert isa.runnable_isas() == ("avx512", "avx2")
    assert isa.choose_isa()[0] == "avx512"
    monkeypatch.setenv(isa.ISA_ENV, "avx2")
    assert isa.choose_isa() == ("avx2", f"forced by {isa.ISA_ENV}")
    monkeypatch.setenv(isa.ISA_ENV, "none")
    assert isa.choose_isa()[0] is None
    for lacking, missing in (("avx512_bf16", "avx512_bf16"), ("neon", "aarch64")):
        monkeypatch.setenv(isa.ISA_ENV, lacking)
        with pytest.warns(RuntimeWarning, match=f"{isa.ISA_ENV}={lacking} needs .*{missing}.*using avx512 instead"):
            assert isa.choose_isa()[0] == "avx512"
    # AMX needs the OS's grant of tile state as well as the CPU's features.
    amx = isa.REQUIRED_FEATURES["amx_bf16"]
    monkeypatch.setattr(isa, "cpu_features", lambda: amx | {"avx2"})
    for granted, best in ((True, "amx_bf16"), (False, "avx512_bf16")):
        monkeypatch.setattr(isa, "os_grants_tiles", lambda granted=granted: granted)
        monkeypatch.setenv(isa.ISA_ENV, "amx_bf16")
        if granted:
            assert isa.choose_isa() == ("amx_bf16", f"forced by {isa.ISA_ENV}")
        else:
            with pytest.warns(RuntimeWarning, match="amx_bf16 needs .*grant of AMX tile state.*using avx512_bf16"):
                assert isa.choose_isa()[0] == "avx512_bf16"
        monkeypatch.delenv(isa.ISA_ENV)
        assert isa.runnable_isas()[0] == best
    # Turned off, or forced to a variant without tiles, the process never asks for the tile state.
    def refuse():
        raise AssertionError("asked Linux for AMX tile state")

    monkeypatch.setattr(isa, "os_grants_tiles", refuse)
    monkeypatch.setenv(isa.ISA_ENV, "avx2")
    assert isa.choose_isa() == ("avx2", f"forced by {isa.ISA_ENV}")
    monkeypatch.setenv(isa.NATIVE_ENV, "0")
    assert isa.choose_isa()[0] is None
    monkeypatch.delenv(isa.NATIVE_ENV)
    monkeypatch.setattr(isa, "cpu_features", lambda: frozenset({"avx2", "fma", "avx512f", "avx512vl"}))
    monkeypatch.setenv(isa.ISA_ENV, "sse9")
    with pytest.warns(RuntimeWarning, match="not one of"):
        assert isa.choose_isa()[0] == "avx512"
    monkeypatch.setenv(isa.NATIVE_ENV, "0")
    assert isa.choose_isa() == (None, f"disabled by {isa.NATIVE_ENV}=0")
    monkeypatch.setattr(isa, "cpu_features", lambda: frozenset({"sse2"}))
    monkeypatch.delenv(isa.NATIVE_ENV)
    monkeypatch.delenv(isa.ISA_ENV)
    assert isa.choose_isa()[0] is None  # no AVX2: the reference


def test_cpu_identity_tells_apart_generations_that_share_a_model_name(monkeypatch):
    zen1 = (("processor", "0"), ("cpu family", "23"), ("model", "1"), ("model name", "AMD EPYC"))
    zen4 = (("processor", "0"), ("cpu family", "25"), ("model", "17"), ("model name", "AMD EPYC"))
    identities = []
    for fields in (zen1, zen4):
        monkeypatch.setattr(isa, "_cpuinfo", lambda fields=fields: fields)
        assert isa.cpu_model() == "AMD EPYC"
        identities.append(isa.cpu_identity())
    assert identities == ["AMD EPYC (family 23 model 1)", "AMD EPYC (family 25 model 17)"]
    arm = (("processor", "0"), ("cpu implementer", "0x41"), ("cpu part", "0xd0c"))
    monkeypatch.setattr(isa, "_cpuinfo", lambda: arm)
    assert isa.cpu_identity() == isa.cpu_model() == "arm 0x41 part 0xd0c"


def _native_here() -> bool:
    return LINUX and bool(isa.runnable_isas()) and build.compiler_for(isa.runnable_isas()[0]) is not None


needs_native = pytest.mark.skipif(not _native_here(), reason="no native variant builds on this machine")


@needs_native
def test_forcing_a_variant_in_a_fresh_process():
    lowest = isa.runnable_isas()[-1]  # avx2 on every x86-64 machine with the kernel, neon on ARM
    result = run_python(_CHECK, NN_BLOCKSPARSE_ISA=lowest)
    assert result.returncode == 0, result.stderr
    assert _lines(result, "ISA") == [lowest] and not _lines(result, "WARNING")
    lacking = next((v for v in isa.ISAS if v not in isa.runnable_isas()), None)
    if lacking is not None:  # warns, runs the best it has, never an illegal instruction
        result = run_python(_CHECK, NN_BLOCKSPARSE_ISA=lacking)
        assert result.returncode == 0, result.stderr
        assert _lines(result, "ISA") == [isa.runnable_isas()[0]]
        assert any(f"{isa.ISA_ENV}={lacking}" in w for w in _lines(result, "WARNING"))


def test_disabled_by_environment_runs_the_reference():
    result = run_python(_CHECK, NN_BLOCKSPARSE_NATIVE="0")
    assert result.returncode == 0, result.stderr
    assert _lines(result, "ISA") == ["None"] and _lines(result, "STATUS") == ["disabled by NN_BLOCKSPARSE_NATIVE=0"]
    assert not _lines(result, "WARNING")  # asked for: no warning


@needs_native
def test_failed_build_warns_and_runs_the_reference(tmp_path):
    result = run_python(_CHECK, CXX=shutil.which("false") or "false", NN_BLOCKSPARSE_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert _lines(result, "ISA") == ["None"]
    assert _lines(result, "STATUS")[0].startswith("could not build or load the native kernel")
    assert any("slow pure-torch reference" in w for w in _lines(result, "WARNING"))


@needs_native
def test_a_variant_that_fails_to_build_gives_way_to_the_next(tmp_path):
    # A compiler without the best variant's instructions (an older GCC and AMX, say): the next
    # variant this CPU runs takes over, with a warning.
    if len(isa.runnable_isas()) < 2:
        pytest.skip("this CPU runs one native variant")
    best, runner_up = isa.runnable_isas()[:2]
    compiler = tmp_path / "cxx"
    compiler.write_text(f"#!/bin/sh\ncase \"$*\" in *'NNBS_ISA=\"{best}\"'*) exit 1;; esac\n"
                        f"exec {build.compiler_for(best)} \"$@\"\n")
    compiler.chmod(0o755)
    result = run_python(_CHECK, CXX=str(compiler), NN_BLOCKSPARSE_CACHE_DIR=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert _lines(result, "ISA") == [runner_up] and _lines(result, "STATUS") == ["ok"]
    assert any(f"({best})" in w and f"using {runner_up}" in w for w in _lines(result, "WARNING")), result.stdout


@needs_native
def test_cache_is_built_once_and_damaged_libraries_are_rebuilt_not_loaded(tmp_path):
    env = {"NN_BLOCKSPARSE_CACHE_DIR": str(tmp_path)}
    first = run_python(_CHECK, **env)
    assert first.returncode == 0 and _lines(first, "STATUS") == ["ok"], first.stderr
    (library,) = (tmp_path / "native").glob("*.so")
    (record,) = (tmp_path / "native").glob("*.json")
    variant = _lines(first, "ISA")[0]
    built, built_at = library.read_bytes(), library.stat().st_mtime_ns
    assert oct(library.parent.stat().st_mode & 0o777) == "0o700"
    assert build.build_library(variant, directory=library.parent) == library
    assert library.stat().st_mtime_ns == built_at  # found in the cache, not rebuilt

    # Truncated, in a fresh process: loading it would fail; it is rebuilt (with a warning) and runs.
    library.write_bytes(built[: len(built) // 3])
    result = run_python(_CHECK, **env)
    assert result.returncode == 0 and _lines(result, "STATUS") == ["ok"], result.stdout + result.stderr
    assert any("rebuilding" in w for w in _lines(result, "WARNING")), result.stdout
    assert library.read_bytes() == built

    def rebuilt_after(damage) -> None:
        damage()
        with pytest.warns(RuntimeWarning, match="rebuilding"):
            assert build.build_library(variant, directory=library.parent) == library
        assert library.read_bytes() == built
        assert sorted(p.name for p in library.parent.iterdir()) == sorted([library.name, record.name])

    other = next(v for v in (*X86_ISAS, *ARM_ISAS) if v != variant and isa.ARCHITECTURE[v] == isa.machine())
    foreign = build.build_library(other)  # another ISA's build (from the user's cache) under this name
    rebuilt_after(lambda: shutil.copyfile(foreign, library))
    stale = json.loads(record.read_text()) | {"key": "0" * 16}  # the record of another build (older ABI)
    rebuilt_after(lambda: record.write_text(json.dumps(stale)))


@needs_native
def test_processes_building_at_once_do_not_corrupt_the_cache(tmp_path):
    code = textwrap.dedent(f"""
        from nn_blocksparse.cpu import build
        library = build.build_library({isa.runnable_isas()[0]!r})
        print("BUILT", library.name)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "NN_BLOCKSPARSE_CACHE_DIR": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    names = set()
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        names.add(stdout.split()[-1])
    (library,) = names
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == sorted([library, library[:-3] + ".json"])
    result = run_python(_CHECK, NN_BLOCKSPARSE_CACHE_DIR=str(tmp_path))  # loads what they left, unchanged
    assert _lines(result, "STATUS") == ["ok"] and not _lines(result, "WARNING"), result.stdout + result.stderr


@needs_native
def test_a_cache_others_can_write_is_refused(tmp_path):
    cache = tmp_path / "shared"
    (cache / "native").mkdir(parents=True)
    os.chmod(cache / "native", 0o777)
    result = run_python(_CHECK, NN_BLOCKSPARSE_CACHE_DIR=str(cache))
    assert result.returncode == 0, result.stderr
    assert _lines(result, "ISA") == ["None"] and "is not private" in _lines(result, "STATUS")[0]
    assert not list((cache / "native").glob("*.so"))
