"""The CPU planner and its calibration (`nn_blocksparse/cpu/{planner,calibrate}.py`).

The planner's invariants are checked on GIVEN profiles, never on this machine's numbers: the choice
is monotone in density (block-sparse up to a threshold, dense above), never predicted slower than
dense beyond the stated margin, and follows the profile of this CPU model, ISA and thread count;
without one it takes the conservative default, without the native kernel never block-sparse. The
profile file is validated field by field; `calibrate` writes one that the planner then reads.
"""

from __future__ import annotations

import json

import pytest
import torch

from nn_blocksparse.cpu import calibrate, planner
from nn_blocksparse.cpu.dense import onednn_available
from nn_blocksparse.cpu.isa import cpu_identity
from nn_blocksparse.cpu.planner import Measurement, Profile
from nn_blocksparse.dtypes import DTYPE_NAMES


def make_profile(speedups: dict[float, float], mode="fp32", block_size=32, isa="avx2", threads=2,
                 model="Test CPU") -> Profile:
    """A profile measuring `speedups` ({density: dense time / block-sparse time}) for one mode and size."""
    return Profile(model, isa, threads, tuple(Measurement(mode, block_size, d, s) for d, s in speedups.items()))


# Shapes seen on real machines and some that are not: AVX-512 kernel against AVX2 MKL (faster even
# dense), AVX2 against AVX2 (about 0.8 efficiency), one whose efficiency collapses at low density,
# and one that never wins.
PROFILES = {
    "fast_everywhere": {0.1: 16.0, 0.3: 6.2, 0.6: 3.3, 1.0: 2.1},
    "avx2_like": {0.1: 7.0, 0.3: 2.7, 0.6: 1.4, 1.0: 0.85},
    "poor_at_low_density": {0.1: 1.5, 0.3: 1.6, 0.6: 1.0, 1.0: 0.6},
    "never": {0.1: 0.9, 0.3: 0.5, 0.6: 0.4, 1.0: 0.3},
}
DENSITIES = [d / 100 for d in range(1, 101)]


@pytest.mark.parametrize("name", list(PROFILES))
def test_choice_is_monotone_and_never_predicted_slower_than_dense(name):
    profile = make_profile(PROFILES[name])
    threshold = planner.threshold_for("fp32", 32, profile)
    chosen = [d for d in DENSITIES if d <= threshold]
    # Monotone: block-sparse exactly for the densities up to the threshold.
    assert chosen == DENSITIES[: len(chosen)]
    for density in chosen:  # each choice predicted at least the margin faster than dense
        assert planner.predicted_speedup(density, "fp32", 32, profile) >= planner.REQUIRED_SPEEDUP
    for density, speedup in PROFILES[name].items():  # a measured point below the margin is never chosen
        if speedup < planner.REQUIRED_SPEEDUP:
            assert density > threshold
    expected = {"fast_everywhere": 1.0, "never": 0.0}
    if name in expected:
        assert threshold == expected[name]
    else:
        assert 0.3 <= threshold < 1.0


def test_predictions_interpolate_efficiency_between_measured_points():
    profile = make_profile({0.2: 4.0, 0.6: 2.0})  # efficiency 0.8 and 1.2
    assert planner.predicted_speedup(0.2, "fp32", 32, profile) == pytest.approx(4.0)
    assert planner.predicted_speedup(0.4, "fp32", 32, profile) == pytest.approx(1.0 / 0.4)  # efficiency 1.0
    assert planner.predicted_speedup(0.1, "fp32", 32, profile) == pytest.approx(4.0)  # the sparsest's speedup
    assert planner.predicted_speedup(1.0, "fp32", 32, profile) == pytest.approx(1.2)  # and above the last
    # Another mode or block size is not measured: the conservative default.
    assert planner.threshold_for("fp32", 16, profile) == planner.threshold_for("fp32", 16, None)


def test_default_without_a_profile_is_conservative():
    for mode, efficiency in planner.DEFAULT_EFFICIENCY.items():
        threshold = planner.threshold_for(mode, 32, None)
        assert threshold == pytest.approx(efficiency / planner.REQUIRED_SPEEDUP, abs=0.011)
        assert threshold < 0.6  # no machine measured so far loses there


def test_this_machines_profile_is_found_by_model_isa_and_threads(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    monkeypatch.setenv(planner.PROFILE_ENV, str(path))
    monkeypatch.setattr(planner, "cpu_identity", lambda: "Test CPU")
    monkeypatch.setattr(planner, "native_isa", lambda: "avx2")
    assert planner.current_profile() is None
    assert planner.density_threshold(torch.float32) == planner.threshold_for("fp32", 32, None)
    planner.write_profile(make_profile(PROFILES["fast_everywhere"], threads=4), path)
    planner.write_profile(make_profile(PROFILES["never"], threads=1), path)
    planner.write_profile(make_profile(PROFILES["never"], isa="avx512", threads=2), path)
    planner.write_profile(make_profile(PROFILES["never"], model="Other CPU", threads=2), path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # nearest calibrated thread count: 4
        assert planner.current_profile().threads == 4
        assert planner.density_threshold(torch.float32) == 1.0
        assert planner.use_block_sparse(1.0) and planner.use_block_sparse(0.2)
        torch.set_num_threads(1)
        assert planner.density_threshold(torch.float32) == 0.0 and not planner.use_block_sparse(0.05)
        # Rewriting one entry replaces it and keeps the others.
        planner.write_profile(make_profile(PROFILES["avx2_like"], threads=1), path)
        assert len(planner.read_profiles(path)) == 4
        assert 0.3 <= planner.density_threshold(torch.float32) < 1.0
    finally:
        torch.set_num_threads(threads)
    # bf16 weights with fp32 activations are their own mode; fp16 never runs the native kernel.
    assert planner.compute_mode(torch.float32, torch.bfloat16) == "bf16_weights"
    assert planner.density_threshold(torch.float16) == 0.0
    monkeypatch.setattr(planner, "native_isa", lambda: None)  # the reference never beats dense
    assert planner.density_threshold(torch.float32) == 0.0 and not planner.use_block_sparse(0.0)


@pytest.mark.parametrize("break_it, field", [
    (lambda d: d.update(format="other/9"), "format"),
    (lambda d: d.update(profiles={}), "profiles"),
    (lambda d: d["profiles"][0].update(isa="avx9"), "isa"),
    (lambda d: d["profiles"][0].update(threads=0), "threads"),
    (lambda d: d["profiles"][0].update(measurements=[]), "measurements"),
    (lambda d: d["profiles"][0]["measurements"][0].update(mode="fp8"), "mode"),
    (lambda d: d["profiles"][0]["measurements"][0].update(block_size=48), "block_size"),
    (lambda d: d["profiles"][0]["measurements"][0].update(density=1.5), "density"),
    (lambda d: d["profiles"][0]["measurements"][0].update(speedup=float("nan")), "speedup"),
    (lambda d: d["profiles"][0]["measurements"][0].update(speedup="fast"), "speedup"),
    (lambda d: d["profiles"][0].update(gelu_fusion={"fp16": 1.2}), "gelu_fusion"),
    (lambda d: d["profiles"][0].update(gelu_fusion={"fp32": -1.0}), "gelu_fusion"),
    (lambda d: d["profiles"][0].update(gelu_fusion=[1.2]), "gelu_fusion"),
])
def test_a_bad_profile_file_is_refused_naming_the_field(tmp_path, monkeypatch, break_it, field):
    path = tmp_path / "profile.json"
    planner.write_profile(make_profile(PROFILES["avx2_like"]), path)
    document = json.loads(path.read_text())
    break_it(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=field):
        planner.read_profiles(path)
    # Looked up automatically, a bad file is ignored with a warning: the default decides.
    monkeypatch.setenv(planner.PROFILE_ENV, str(path))
    with pytest.warns(RuntimeWarning, match="ignoring the CPU profile"):
        assert planner.current_profile() is None
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        planner.read_profiles(path)


def test_dense_gelu_is_fused_only_where_the_profile_measured_it_faster(tmp_path, monkeypatch):
    fp32_faster_fused = Profile("Test CPU", "avx2", 2, make_profile(PROFILES["avx2_like"]).measurements,
                                gelu_fusion={"fp32": 1.3, "bf16": 0.7})
    assert planner.fuse_dense_gelu(torch.float32, fp32_faster_fused)
    assert not planner.fuse_dense_gelu(torch.bfloat16, fp32_faster_fused)
    assert not planner.fuse_dense_gelu(torch.float16, fp32_faster_fused)  # not measured: apart
    assert not planner.fuse_dense_gelu(torch.float32, make_profile(PROFILES["avx2_like"]))  # older profiles
    assert not planner.fuse_dense_gelu(torch.float32, None)  # no profile: apart, the bounded cost
    # The field survives the file, and this machine's answer follows a profile written for it.
    path = tmp_path / "profile.json"
    monkeypatch.setenv(planner.PROFILE_ENV, str(path))
    here = Profile(cpu_identity(), planner.native_isa() or "avx2", torch.get_num_threads(),
                   fp32_faster_fused.measurements, gelu_fusion={"fp32": 1.3})
    planner.write_profile(here, path)
    (read,) = planner.read_profiles(path)
    assert read.gelu_fusion == {"fp32": 1.3}
    assert planner.fuse_dense_gelu(torch.float32) == (planner.native_isa() is not None)
    planner.write_profile(Profile(here.cpu_model, here.isa, here.threads, here.measurements,
                                  gelu_fusion={"fp32": 0.8}), path)
    assert not planner.fuse_dense_gelu(torch.float32)  # written again: the kept answer is forgotten


def test_calibrate_times_every_mode_and_writes_a_profile_the_planner_reads(tmp_path, monkeypatch):
    if planner.native_isa() is None:
        pytest.skip("no native kernel here: calibrate refuses (tested below)")
    calls = []

    def scripted(fns):  # native is twice as fast per call, fused GELU 1.5x the separate one
        calls.append(sorted(fns))
        for fn in fns.values():
            fn()
        return {"dense": 2.0, "native": 1.0, "fused": 1.0, "separate": 1.5}

    profile = calibrate.calibrate(rows=8, shapes=((64, 128),), densities=(0.5, 1.0), block_sizes=(16, 32),
                                  timer=scripted, log=lambda *_: None)
    assert {(m.mode, m.block_size, m.density) for m in profile.measurements} == {
        (mode, bs, d) for mode in planner.MODES for bs in (16, 32) for d in (0.5, 1.0)}
    assert all(m.speedup == 2.0 for m in profile.measurements)
    gelu_dtypes = [DTYPE_NAMES[dtype] for dtype in planner.GELU_DTYPES if onednn_available(dtype)]
    assert len(profile.details["timings"]) == len(profile.measurements) + len(gelu_dtypes)
    # each pair timed together, in turns
    assert calls == [["dense", "native"]] * len(profile.measurements) + [["fused", "separate"]] * len(gelu_dtypes)
    assert profile.gelu_fusion == ({name: 1.5 for name in gelu_dtypes} or None)
    # The real thing, quick, through the command line: a file the planner reads back.
    path = tmp_path / "profile.json"
    assert calibrate.main(["--quick", "--out", str(path), "--rows", "32", "--repeats", "1"]) == 0
    (written,) = planner.read_profiles(path)
    assert written.isa == planner.native_isa() and written.threads == torch.get_num_threads()
    assert {m.density for m in written.measurements} == {0.3, 1.0}
    monkeypatch.setenv(planner.PROFILE_ENV, str(path))
    assert planner.current_profile() == written


def test_calibrate_without_a_native_kernel_says_why():
    from helpers import run_python

    result = run_python("from nn_blocksparse.cpu.calibrate import main; raise SystemExit(main(['--quick']))",
                        NN_BLOCKSPARSE_NATIVE="0")
    assert result.returncode == 1 and "no native CPU kernel here (disabled by NN_BLOCKSPARSE_NATIVE=0)" in result.stderr
