"""Fuzzing the layer file and state-dict formats: every mutation refused by name, or exact.

The cases run in `fuzz_worker.py` subprocesses (one per path: the CPU path and the Triton
kernel under the interpreter), so that a crash or an out-of-bounds read that kills the process
fails this test instead of the suite. See the worker's docstring for what is mutated and how a
case is judged.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")
ROOT = WORKER.parent.parent
# (path, seed, cases): seeded, so a failure is reproduced with `python tests/fuzz_worker.py PATH SEED CASES`.
RUNS = (("cpu", 20260, 240), ("triton", 20261, 90))


@pytest.fixture(scope="module")
def fuzz_results():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    interpreted = {**env, "TRITON_INTERPRET": "1"}
    processes = {
        path: subprocess.Popen([sys.executable, str(WORKER), path, str(seed), str(cases)],
                               env=interpreted if path == "triton" else env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for path, seed, cases in RUNS
    }
    results = {}
    for path, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[path] = (process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("path", [run[0] for run in RUNS])
def test_every_mutation_is_refused_by_name_or_exact(fuzz_results, path):
    returncode, stdout, stderr = fuzz_results[path]
    assert returncode == 0, f"the {path} fuzz worker died (rc {returncode}):\n{stderr[-3000:]}"
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["failures"] == [], "\n".join(report["failures"][:20])
    counts = report["counts"]
    # Both outcomes and every kind of target really were exercised.
    assert counts["refused"] >= 0.4 * sum(n for k, n in counts.items() if k in ("refused", "accepted"))
    assert counts["accepted"] >= 20
    for target in ("values", "row_offsets", "col_indices", "row_order", "metadata", "header", "state"):
        assert counts.get(target, 0) >= 3, (target, counts)
