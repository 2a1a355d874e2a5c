"""Every kernel compiles ahead of time for sm_80 and sm_90 with zero register spills.

Runs ``python -m bench.compile_report`` in a subprocess with the interpreter off: under
``TRITON_INTERPRET=1`` (set for the rest of the suite) ``@triton.jit`` yields interpreted functions that
``triton.compile`` cannot take.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="ahead-of-time compilation needs triton")

pytestmark = pytest.mark.compile
ROOT = Path(__file__).resolve().parents[1]


def test_compile_report_covers_every_kernel_and_reports_no_spills(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_report", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    # exit gate, partition (two passes), gather, scatter: compact is partition + gather
    assert len(kernels) >= 4, kernels
    for kernel in kernels:
        assert {r["arch"] for r in rows if r["kernel"] == kernel} == {80, 90}, kernel
    assert all(r["registers"] > 0 for r in rows)
    assert [r for r in rows if r["spills"]] == []
    assert "sm_90" in proc.stdout and "0 with spills" in proc.stdout
