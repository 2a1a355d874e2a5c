"""``python -m bench.profile`` on the CPU: the same code path as on a GPU, timed with host timers.

Checks the report's structure and the executor's sync promise: one host sync per decision point
that ran, none elsewhere. No timing value is asserted.
"""

import json
from collections import defaultdict

import pytest
import torch


import adaexit.executor as executor  # noqa: E402
import adaexit.heads as heads  # noqa: E402
from adaexit import ConfidencePolicy, NeverExitPolicy  # noqa: E402

from bench import profile  # noqa: E402

KERNELS = {"exit_gate", "partition", "gather_rows", "scatter_rows"}


def _tiny(batch=32):
    return profile.build_system("early_exit", batch, tiny=True)


def _region(report, name):
    return next(r for r in report["regions"] if r["name"] == name)


def test_report_structure_and_syncs():
    model, x = _tiny()
    report = profile.profile_model(model, x, repeats=3, compaction_repeats=2)
    assert report["timer"] == "host perf_counter" and report["machine"]["device"] == "cpu"
    assert report["batch"] == 32 and sum(report["exit_counts"]) == 32
    # the tiny model's thresholds send rows to all three exits: two decisions run, two syncs
    assert report["decision_points"] == 2
    assert report["host_syncs_per_forward"] == 2 and report["syncs_equal_decision_points"]
    assert report["partition_calls_per_forward"] == 2
    names = {r["name"] for r in report["regions"]}
    assert KERNELS <= names and {"forward", "stage 0", "stage 1", "stage 2", "host_sync"} <= names
    assert _region(report, "exit_gate")["calls_per_forward"] == 3  # one gate per exit reached
    assert _region(report, "stage 2")["calls_per_forward"] == 1
    assert all(r["ms_per_forward"] >= 0 for r in report["regions"])
    c = report["compaction"]
    assert c["rows"] == 32 and c["kept"] == report["rows_run"][1]
    assert c["row_bytes"] == 4 * 4 * 4 * 4  # stage 0's output: 4 channels at 4x4, fp32
    assert c["bytes_moved"] > 2 * c["kept"] * c["row_bytes"]  # the rows, plus partition's and the index's bytes
    assert {"compact_GBps", "compact_static_GBps", "copy_GBps", "compact_over_copy"} <= set(c)
    text = profile.format_report(report)
    assert "host syncs per forward: 2" in text and "dst.copy_(src)" in text


@pytest.mark.parametrize(
    "thresholds, decisions",
    [
        ([2.0, 0.0], 1),  # exit 0 disabled (no head, no decision): only exit 1 decides
        ([-1.0, 0.0], 1),  # everyone exits at exit 0: stages 1 and 2 never run
        ([2.0, 2.0], 0),  # both disabled: a plain forward, no sync at all
    ],
)
def test_syncs_equal_decision_points(thresholds, decisions):
    model, x = _tiny(16)
    model.set_policy(ConfidencePolicy("maxprob", thresholds))
    report = profile.profile_model(model, x, repeats=2, compaction_repeats=1)
    assert report["decision_points"] == decisions
    assert report["host_syncs_per_forward"] == decisions
    assert report["partition_calls_per_forward"] == decisions


def test_never_exit_has_no_sync_and_no_compaction():
    model, x = _tiny(8)
    model.set_policy(NeverExitPolicy())
    report = profile.profile_model(model, x, repeats=2)
    assert report["host_syncs_per_forward"] == 0 and "compaction" not in report
    assert _region(report, "exit_gate")["calls_per_forward"] == 1  # the last head only


def test_cascade_profile():
    model, x = profile.build_system("cascade", 24, tiny=True)
    report = profile.profile_model(model, x, repeats=2, compaction_repeats=1)
    assert report["model"] == "Cascade" and report["syncs_equal_decision_points"]
    # a cascade's survivors are input rows (the next network reads the input)
    assert report["compaction"]["row_shape"] == [1, 8, 8]


def test_instrumentation_is_transparent():
    """Profiling changes no result, replaces nothing of the library (the kernels come from the profiler
    trace, as ``adaexit::<op>``) and removes its hooks."""
    model, x = _tiny(16)
    originals = (executor.partition, executor.gather_rows, executor.scatter_rows, executor.to_host, heads.exit_gate)
    with torch.inference_mode():
        expected = model(x)
    timer = profile.HostTimer()
    counts = defaultdict(int)
    with profile.instrument(model, timer, counts) as op_ms, torch.inference_mode():
        got = model(x)
    assert torch.equal(got, expected)
    assert counts["partition"] == 2 and counts["stage 0"] == 1 and counts["exit_gate"] == 3
    assert counts["host_sync"] == 2 and set(op_ms) >= {"partition", "exit_gate", "host_sync"}
    assert (executor.partition, executor.gather_rows, executor.scatter_rows, executor.to_host, heads.exit_gate) == originals
    assert not model.graph()[0].module._forward_hooks and not model.graph()[0].module._forward_pre_hooks


def test_timers():
    timer = profile.make_timer("cpu")
    assert isinstance(timer, profile.HostTimer)
    with timer.region("a"):
        pass
    timer.start("b")
    timer.stop("b")
    with timer.region("a"):
        pass
    times = timer.collect()
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 1}
    assert timer.collect() == {}  # collected regions are forgotten
    with pytest.raises(ValueError, match="without a matching start"):
        timer.stop("c")


def test_cli_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile.main(["--device", "cpu", "--tiny", "--batch", "16", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["system"] == "early_exit" and report["syncs_equal_decision_points"] is True
    assert "timer: host perf_counter" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile.main(["--batch", "0"])
