"""tools/gpu_diagnosis.py keeps working without a GPU: its smoke mode runs every variant under the
interpreter and checks it against float64, and its ncu parsing reads what ncu writes."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import common
from nn_blocksparse.kernels.configs import launchable_configs

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_diagnosis.py"


def load_tool():
    """The script as a module (tools/ is a folder of scripts, not a package)."""
    if "gpu_diagnosis" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_diagnosis", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_diagnosis"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_diagnosis"]


def test_smoke_run_checks_every_variant(tmp_path):
    tool = load_tool()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(TOOL), "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    tag = common.device_tag(torch.device("cpu"))
    environment, rows = common.read_csv(tmp_path / f"gpu_diagnosis_{tag}_quick.csv")
    assert environment["device"] == "cpu" and environment["timing"] == "skipped (smoke)"
    assert list(rows[0]) == tool.COLUMNS
    assert {r["variant"] for r in rows} >= {v.name for v in tool.all_variants()}
    needs_cuda = {"torch_bsr", "semi_structured", "cusparse"}
    for row in rows:
        if row["family"] in needs_cuda:  # no CPU kernel: a row that says why
            assert math.isnan(float(row["time_ms"])) and row["note"], row
        else:  # every Triton variant (ours, dense walk, Triton dense) and F.linear ran, right
            assert float(row["rel_error"]) <= tool.MAX_REL_ERROR, row
            assert row["timing"] == "skipped (smoke)", row
    for stem in ("density1", "alternatives", "ksteps"):
        assert (tmp_path / f"gpu_diagnosis_{stem}_{tag}_quick.png").stat().st_size > 5000
    common.read_csv(tmp_path / f"gpu_diagnosis_dispatch_{tag}_quick.csv")


def test_measured_configs_are_ones_the_aot_check_compiles():
    tool = load_tool()
    launchable = set(launchable_configs(torch.float16, tool.BLOCK_SIZE))
    assert set(tool.ROW_CONFIGS.values()) <= launchable
    assert sorted(tool.PROBLEMS) == sorted((n, k, m) for n, k in tool.BERT_BASE_SHAPES for m in tool.M_VALUES)


def test_the_diagnose_session_fits_eight_minutes():
    """tools/gpu_session.sh diagnose: install, then the background compile beside the GPU tests, the
    diagnosis and the probe, each under its own limit; the diagnosis keeps inside its step's limit."""
    import re

    script = (ROOT / "tools" / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_session.sh")]).returncode == 0
    body = script[script.index("diagnose_part() {"):script.index("\n}\n", script.index("diagnose_part() {"))]
    install = int(re.search(r"install\(\) \{\n\s+step (\d+)", script).group(1))
    background = int(re.search(r"timeout --kill-after=5 (\d+) \"\$PYTHON\" tools/gpu_diagnosis.py", body).group(1))
    steps = [int(n) for n in re.findall(r"\bstep (\d+)", body)]
    diagnosis = int(re.search(r"DIAGNOSIS_LIMIT=(\d+)", script).group(1))
    tests, probe = steps  # the GPU tests, then the probe; the diagnosis's step uses DIAGNOSIS_LIMIT
    assert install + max(background, tests) + diagnosis + probe <= 8 * 60
    budget = int(re.search(r"--budget-s \$\(\(DIAGNOSIS_LIMIT - (\d+)\)\)", body).group(1))
    assert budget > 0


RAW = '''==PROF== Connected to process 1
"ID","Kernel Name","gpu__time_duration.sum","lts__t_bytes.sum","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"
"","","usecond","Gbyte","",""
"0","_block_sparse_linear_kernel","152.3","1,234.5","2.5","0.7"
"1","nvjet_sm90_hsh_256x128","61.0","300","0.1","0.9"
'''


def test_ncu_raw_page_is_read_into_rows_and_a_summary():
    tool = load_tool()
    rows = tool.parse_ncu_raw(RAW)
    ours = {r["metric"]: r for r in rows if r["target"] == "ours"}
    assert ours["lts__t_bytes.sum"]["value"] == 1234.5 and ours["lts__t_bytes.sum"]["unit"] == "Gbyte"
    assert {r["target"] for r in rows} == {"ours", "cublas"}
    summary = "\n".join(tool.ncu_summary(rows))
    assert "gpu__time_duration.sum = 152.3 usecond" in summary
    assert "long_scoreboard 2.5, barrier 0.7" in summary  # stalls, largest first
    assert tool.parse_ncu_raw("==ERROR== nothing profiled") == []


def test_best_triton_row_is_the_fastest_sweep_tile():
    tool = load_tool()
    rows = [{"shape": "768x768", "m": 2048, "variant": f"t{i}", "family": "triton_sweep", "time_ms": t}
            for i, t in enumerate([0.03, 0.01, float("nan"), 0.02])]
    (best,) = tool.best_triton_rows(rows)
    assert best["variant"] == "triton best" and best["time_ms"] == 0.01


def test_gpu_only_parts_say_why_without_a_gpu():
    import pytest

    from benchmarks import cusparse_spmm

    if torch.cuda.is_available():
        pytest.skip("checks the messages on machines without CUDA")
    assert load_tool().main(["--out", "/nonexistent"]) == 2
    assert cusparse_spmm.main([]) == 2
    assert cusparse_spmm.probe() == {name: "needs a CUDA GPU" for name in cusparse_spmm.FORMATS}
    x, w = torch.randn(8, 64).half(), torch.randn(64, 64).half()
    with pytest.raises(cusparse_spmm.CusparseError, match="CUDA"):
        cusparse_spmm.prepare("bsr", x, w, 32)
    with pytest.raises(ValueError, match="format"):
        cusparse_spmm.prepare("coo", x, w, 32)
