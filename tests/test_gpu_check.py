"""The GPU validation kit (``bench/gpu_check.py``) rehearsed on the CPU, so it cannot rot between the rare
GPU sessions: ``--dry-run`` runs the same code through Triton's interpreter with tiny sizes. No timing value
is asserted; the report's structure, the checks' outcomes and the budget's clean stop are.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"exit_gate", "partition", "gather_rows", "scatter_rows", "compact"}
TIMED = {"exit_gate 2-D", "exit_gate 4-D", "partition", "gather_rows", "scatter_rows", "compact", "compact static"}


def _dry_run(out: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--dry-run", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.interpreter
def test_dry_run_passes_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")  # as conftest set it: the kit need not re-execute itself
    env.pop("ADAEXIT_BACKEND", None)
    proc = _dry_run(tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = _report(tmp_path)
    assert report["dry_run"] and report["correctness_passed"] is True and report["exit_status"] == 0
    assert "-m bench.gpu_check" in report["command"] and "--dry-run" in report["command"]
    assert report["date"] and 0 < report["elapsed_s"] < report["budget_s"]
    env_info = report["environment"]
    for key in ("device_name", "driver_version", "cuda_runtime", "torch", "triton", "adaexit"):
        assert env_info[key], key
    assert env_info["kernel_backend"] == "triton" and env_info["triton_interpreter"] is True

    for name in gpu_check.SECTIONS:
        sec = report["sections"][name]
        assert sec["status"] == "passed", (name, sec.get("reason"), sec.get("traceback"))
        assert sec["results"], name
        failed = [c for c in sec["checks"] if not c["passed"]]
        assert sec["checks"] and not failed, (name, failed)

    correctness = report["sections"]["correctness"]
    assert {r["kernel"] for r in correctness["results"]} == KERNELS
    assert all(r["passed"] > 0 and r["failed"] == 0 and r["skipped"] == 0 for r in correctness["results"])
    assert set(gpu_check.REQUIRED_TAGS) <= set(correctness["coverage"])  # every branch reached

    for row in report["sections"]["host_syncs"]["results"]:
        want = row["decision_points"] if "decision_points" in row else row["expected"]
        assert row["host_syncs"] == want, row

    timing = report["sections"]["kernel_timing"]["results"]
    assert {r["kernel"] for r in timing} == TIMED
    assert {r["N"] for r in timing} == set(gpu_check.TIMING_SIZES["dry"])
    assert all(r["bytes_moved"] > 0 and r["kernel_ms"] > 0 and r["copy_ms"] > 0 and r["torch_ms"] > 0 for r in timing)

    e2e = report["sections"]["end_to_end"]["results"]
    resnet = e2e["resnet"]
    assert resnet["status"] == "ran" and [r["batch"] for r in resnet["rows"]] == list(gpu_check.E2E_BATCHES["dry"])
    for row in resnet["rows"]:
        assert sum(row["exit_counts"]) == row["batch"] and row["exit_agreement"] == 1.0
        assert (
            row["ideal_speedup"] >= 1.0 and row["plain_ms"] > 0 and row["masked_dense_ms"] > 0 and row["adaexit_ms"] > 0
        )
    assert resnet["rows"][-1]["exit_counts"][0] > 0  # the thresholds make rows exit early
    bert = e2e["bert"]
    assert bert["status"] == "ran" or bert["status"].startswith("skipped: "), bert  # never a crash of the run
    if bert["status"] == "ran":  # adaexit.wrap accepts BertForSequenceClassification
        assert [r["batch"] for r in bert["rows"]] == list(gpu_check.E2E_BATCHES["dry"])
        assert all(r["exit_agreement"] == 1.0 and r["adaexit_ms"] > 0 for r in bert["rows"])

    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# adaexit GPU check") and report["command"] in md
    for i, name in enumerate(gpu_check.SECTIONS, 1):
        assert f"## {i}. {gpu_check.TITLES[name]}: PASSED" in md


@pytest.mark.interpreter
def test_tiny_budget_stops_cleanly(tmp_path):
    """The budget counts from process start, so 1 s is spent before any section starts: every section is
    marked skipped and the report is still written. Without TRITON_INTERPRET in the environment the kit
    re-executes itself in interpreter mode (the budget's clock survives the re-exec)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADAEXIT_BACKEND")}
    proc = _dry_run(tmp_path, "--budget-s", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = _report(tmp_path)
    assert report["budget_s"] == 1 and report["correctness_passed"] is None
    assert report["environment"]["triton_interpreter"] is True  # re-executed with TRITON_INTERPRET=1
    for name in gpu_check.SECTIONS:
        sec = report["sections"][name]
        assert sec["status"] == "skipped" and "budget" in sec["reason"], (name, sec)
    md = (tmp_path / "report.md").read_text()
    headers = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(headers) == len(gpu_check.SECTIONS) and all(h.endswith(": SKIPPED") for h in headers)


def _run(tmp_path, budget_s=1000.0, dry_run=True):
    args = argparse.Namespace(out=str(tmp_path), budget_s=budget_s, dry_run=dry_run)
    return gpu_check.Run(args, time.time(), torch.device("cpu"))


@pytest.mark.interpreter
def test_section_out_of_time_skips_the_rest(tmp_path, use_backend):
    """A section past its deadline records every remaining case as skipped and ends "incomplete"."""
    use_backend("triton")
    run = _run(tmp_path)
    sec = gpu_check.Section(run, "correctness", time.time() - 1)
    gpu_check.correctness(sec)
    gpu_check._finish_status(sec)
    rec = sec.record
    assert rec["status"] == "incomplete" and "time budget" in rec["reason"]
    assert rec["skipped_for_budget"]["count"] == rec["cases_planned"] > 0
    assert [c["name"] for c in rec["checks"]] == ["dispatch: the Triton kernels run on cpu tensors"]
    assert rec["coverage_missing"]  # reported, not failed: the cases were skipped


def test_hard_deadline_writes_the_report(tmp_path, monkeypatch):
    """The watchdog marks the running section interrupted and the pending ones skipped, writes, exits."""
    exits = []
    monkeypatch.setattr(gpu_check.os, "_exit", exits.append)
    run = _run(tmp_path)
    run.report["sections"]["correctness"]["status"] = "passed"
    run.current = "kernel_timing"
    run._on_hard_deadline()
    assert exits == [0]
    report = _report(tmp_path)
    assert report["interrupted"] is True
    sections = report["sections"]
    assert sections["correctness"]["status"] == "passed" and sections["host_syncs"]["status"] == "skipped"
    assert sections["kernel_timing"]["status"] == "interrupted" and sections["end_to_end"]["status"] == "skipped"
    assert "interrupted by the hard budget" in (tmp_path / "report.md").read_text()


def test_exit_status_follows_correctness(tmp_path):
    run = _run(tmp_path)
    for status, code in (("passed", 0), ("incomplete", 0), ("failed", 1), ("error", 1)):
        run.report["sections"]["correctness"]["status"] = status
        assert run.exit_status() == code
    run.report["sections"]["correctness"]["status"] = "passed"
    run.report["sections"]["end_to_end"]["status"] = "failed"  # agreement / timing: reported, not the exit status
    assert run.exit_status() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_a_gpu_run_is_refused(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    report = _report(tmp_path)
    assert all(s["status"] == "skipped" and "--dry-run" in s["reason"] for s in report["sections"].values())


def test_bytes_models():
    from adaexit.kernels.ops import partition as partition_mod

    # one block: routes read, order and counts written
    assert gpu_check.partition_bytes(256, 2, 8) == 256 * 8 + 256 * 8 + 2 * 8
    # several blocks: histogram + scan + scatter, each stated in kernels/ops/partition.py
    n, nb = 65536, 65536 // partition_mod._BLOCK
    hist, scan, scatter = n * 8 + 4 * nb * 2, 4 * nb * 2 + 8 * nb * 2 + 16, n * 8 + 8 * nb * 2 + 8 * n
    assert gpu_check.partition_bytes(n, 2, 8) == hist + scan + scatter
    # 1024 fp16 per row fits one column chunk: rows read and written, the index once
    assert gpu_check.rows_bytes(100, 1024, 2) == 2 * 100 * 2048 + 100 * 8
    assert gpu_check.exit_gate_bytes(4, 8, 3, 10, 2, 4, True) == 4 * 8 * 3 * 2 + 10 * 8 * 4 + 40 + 4 * 10 * 4 + 16 + 4
    assert gpu_check.compact_bytes(10, 4, 8, 4, None) < gpu_check.compact_bytes(10, 4, 8, 4, 10)
