"""Every kernel compiles ahead of time for sm_80 and sm_90 with zero register spills."""

import pytest

pytest.importorskip("triton", reason="ahead-of-time compilation needs triton")

from adaexit.kernels._compile import TARGETS, all_specs  # noqa: E402

pytestmark = pytest.mark.compile


def test_compile_report_covers_every_kernel_and_reports_no_spills(capsys):
    from bench.compile_report import main, report

    kernels = {spec.fn.__name__ for spec in all_specs()}
    # one Triton kernel per op file (compact is built from partition + gather_rows)
    assert len(kernels) >= 4, kernels
    rows = report()
    assert len(rows) == len(all_specs()) * len(TARGETS)
    assert {r["arch"] for r in rows} == set(TARGETS)
    assert all(r["registers"] > 0 for r in rows)
    assert [r for r in rows if r["spills"]] == []
    assert main([]) == 0
    assert "sm_90" in capsys.readouterr().out
