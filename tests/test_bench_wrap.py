"""Smoke test of ``python -m bench.bench_wrap --quick`` at tiny sizes: it runs, its strategies compute the
same thing, and the report holds what it promises. No timing is asserted."""

import json

import pytest
import torch

pytest.importorskip("torchvision", reason="the wrap benchmark builds torchvision models")

from bench import bench_wrap  # noqa: E402


def test_strategies_agree_row_by_row():
    cell = bench_wrap.setup("mobilenet_v3_large", 12, 32, quick=True)
    with torch.inference_mode():
        outs = {name: call() for name, call in cell["calls"].items()}
    exits = cell["info"].exit_index
    torch.testing.assert_close(outs["masked_dense"], outs["adaexit"], rtol=1e-4, atol=1e-5)
    last = exits == 2  # rows answered by the model's own output: the plain model's logits
    torch.testing.assert_close(outs["adaexit"][last], outs["plain"][last], rtol=1e-4, atol=1e-5)
    assert cell["info"].exit_counts[0] > 0 and cell["info"].exit_counts[1] + cell["info"].exit_counts[2] > 0


def test_bench_wrap_report_structure(tmp_path, capsys):
    out = tmp_path / "wrap.json"
    argv = ["--quick", "--models", "mobilenet_v3_large,vit_s_16", "--batches", "8", "--repeats", "1",
            "--threads", "1", "--json", str(out)]
    assert bench_wrap.main(argv) == 0
    text = capsys.readouterr().out
    assert "adaexit x" in text and "FLOPs ideal x" in text and "random weights" in text
    report = json.loads(out.read_text())
    assert report["benchmark"] == "wrap" and report["quick"] and report["px"] == 32
    assert [(r["model"], r["batch"]) for r in report["results"]] == [("mobilenet_v3_large", 8), ("vit_s_16", 8)]
    for row in report["results"]:
        assert len(row["exits"]) == 2 and 0 < row["exit_flops_fractions"][0] < row["exit_flops_fractions"][1] < 1
        assert sum(row["exit_counts"]) == 8 and row["rows_run"][0] == 8
        for key in ("plain_ms", "masked_dense_ms", "adaexit_ms", "flops_ideal"):
            assert row[key] > 0, key
        assert row["adaexit_over_ideal"] == pytest.approx(row["adaexit_speedup"] / row["flops_ideal"])
    assert report["results"][1]["exits"][0].startswith("encoder.layers.encoder_layer_")
    with pytest.raises(SystemExit):
        bench_wrap.main(["--models", "nope"])
    with pytest.raises(SystemExit):
        bench_wrap.main(["--batches", "x"])
