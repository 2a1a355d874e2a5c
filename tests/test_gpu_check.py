"""The GPU validation kit (``bench/gpu_check.py``) rehearsed on the CPU, so it cannot rot between the rare
GPU sessions: ``--dry-run`` runs the same code (the kernel tests by pytest through Triton's interpreter, the
benchmarks once each, tiny models). No timing value is asserted; the report's structure, the checks' outcomes
and the budget's clean stop are.
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
    assert report["dry_run"] and report["kernel_tests_passed"] is True and report["exit_status"] == 0
    assert "-m bench.gpu_check" in report["command"] and "--dry-run" in report["command"]
    assert report["date"] and 0 < report["elapsed_s"] < report["budget_s"]
    env_info = report["environment"]
    for key in ("device_name", "driver_version", "cuda_runtime", "torch", "triton", "adaexit"):
        assert env_info[key], key
    assert env_info["kernel_backend"] == "triton" and env_info["triton_interpreter"] is True

    sections = report["sections"]
    for name in gpu_check.SECTIONS:
        sec = sections[name]
        assert sec["status"] == "passed", (name, sec.get("reason"), sec.get("traceback"), sec.get("failures"))
        assert sec["results"], name
        failed = [c for c in sec["checks"] if not c["passed"]]
        assert sec["checks"] and not failed, (name, failed)

    # the kernel tests ran by pytest on the device (cpu: through the interpreter), every kernel test file
    tests = {row["tests"]: row for row in sections["kernel_tests"]["results"]}
    assert set(tests) == {name.removesuffix(".py") for name in gpu_check.KERNEL_TESTS}
    assert all(row["passed"] > 0 and row["failed"] == 0 for row in tests.values())
    assert "--device=cpu" in sections["kernel_tests"]["commands"][0]

    for row in sections["host_syncs"]["results"]:
        want = row["decision_points"] if "decision_points" in row else row["expected"]
        assert row["host_syncs"] == want, row

    ran = {row["benchmark"]: row["ran"] for row in sections["kernel_timing"]["results"]}
    assert set(ran) == {"bench_exit_gate", "bench_compaction"} and all(ran.values())

    assert sections["cuda_graph"]["results"]["host_syncs"] == 0  # the zero-sync mode, eager on the CPU

    decode = {(row["strategy"], row["batch"]): row for row in sections["decoding"]["results"]}
    assert all(decode[(s, b)]["exact"] for s in ("full", "self_speculative") for b in (1, 3))
    assert all(row["tokens_per_s"] > 0 for row in decode.values())

    (row,) = sections["end_to_end"]["results"]
    assert row["model"] == "resnet50" and sum(row["exit_counts"]) == row["batch"] and row["flops_ideal"] >= 1.0
    assert row["plain_ms"] > 0 and row["adaexit_ms"] > 0

    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# adaexit GPU check") and report["command"] in md
    for i, name in enumerate(gpu_check.SECTIONS, 1):
        assert f"## {i}. {gpu_check.TITLES[name]}: {sections[name]['status'].upper()}" in md


def test_device_option_refuses_cuda_under_the_interpreter():
    """``--device cuda`` is for the compiled kernels: refused, named, where the interpreter is on (or no GPU)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_partition.py", "--device=cuda", "-k", "empty"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and ("TRITON_INTERPRET=0" in proc.stderr or "no CUDA device" in proc.stderr), proc.stderr


@pytest.mark.interpreter
def test_tiny_budget_stops_cleanly(tmp_path):
    """The budget counts from process start, so 1 s is spent before any section starts: every section is
    marked skipped and the report is still written. Without TRITON_INTERPRET in the environment the kit
    re-executes itself in interpreter mode (the budget's clock survives the re-exec)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADAEXIT_BACKEND")}
    proc = _dry_run(tmp_path, "--budget-s", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = _report(tmp_path)
    assert report["budget_s"] == 1 and report["kernel_tests_passed"] is None
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


def test_section_out_of_time_skips_the_rest(tmp_path):
    """A section past its deadline runs nothing more, records what it skipped and ends "incomplete"."""
    run = _run(tmp_path)
    sec = gpu_check.Section(run, "end_to_end", time.time() - 1)
    gpu_check.end_to_end(sec)
    gpu_check._finish_status(sec)
    rec = sec.record
    assert rec["status"] == "incomplete" and "time budget" in rec["reason"]
    assert rec["skipped_for_budget"]["count"] == len(gpu_check.E2E["dry"][1]) and rec["checks"] == []


def test_hard_deadline_writes_the_report(tmp_path, monkeypatch):
    """The watchdog marks the running section interrupted and the pending ones skipped, writes, exits."""
    exits = []
    monkeypatch.setattr(gpu_check.os, "_exit", exits.append)
    run = _run(tmp_path)
    run.report["sections"]["kernel_tests"]["status"] = "passed"
    run.current = "kernel_timing"
    run._on_hard_deadline()
    assert exits == [0]
    report = _report(tmp_path)
    assert report["interrupted"] is True
    sections = report["sections"]
    assert sections["kernel_tests"]["status"] == "passed" and sections["host_syncs"]["status"] == "skipped"
    assert sections["kernel_timing"]["status"] == "interrupted" and sections["end_to_end"]["status"] == "skipped"
    assert "interrupted by the hard budget" in (tmp_path / "report.md").read_text()


def test_exit_status_follows_correctness(tmp_path):
    run = _run(tmp_path)
    for status, code in (("passed", 0), ("incomplete", 0), ("failed", 1), ("error", 1)):
        run.report["sections"]["kernel_tests"]["status"] = status
        assert run.exit_status() == code
    run.report["sections"]["kernel_tests"]["status"] = "passed"
    run.report["sections"]["end_to_end"]["status"] = "failed"  # timing: reported, not the exit status
    assert run.exit_status() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_a_gpu_run_is_refused(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    report = _report(tmp_path)
    assert all(s["status"] == "skipped" and "--dry-run" in s["reason"] for s in report["sections"].values())


def test_targets_apply_to_compaction_and_the_memory_bound_gate():
    names = {
        "test_compact_adaexit[4096]": True,
        "test_compact_adaexit_static_capacity[4096]": True,
        "test_gather_rows_adaexit[4096]": True,
        "test_compact_adaexit[256]": False,
        "test_partition_adaexit[4096]": False,
        "test_compact_baseline_boolean_mask[4096]": False,
        "test_bench_exit_gate[N256_D512_K10-exit_gate]": True,
        "test_bench_exit_gate[N256_D512_K10-torch_unfused]": False,
        "test_bench_exit_gate[N256_D512_K1000-exit_gate]": False,
    }
    assert {name: gpu_check._has_target(name) for name in names} == names
