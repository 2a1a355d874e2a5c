"""Smoke tests of the streaming and serving benchmarks at tiny sizes: they run, compare the same
computation, and report what they promise. No timing is asserted."""

import json

import pytest
import torch

import bench
from adaexit import Cascade
from bench import bench_serving, bench_stream
from helpers import mlp_net, randn_inputs


def test_node_work_runs_each_node_on_its_rows():
    model = bench_stream.chain(width=16)
    x = torch.randn(32, 16)
    model.set_policy(bench.policy_for_fractions(model, x, bench_stream.CHAIN_FRACTIONS))
    calls = bench.node_work(model, x, [32, 16, 0, 4])
    assert calls[2] is None
    with torch.inference_mode():
        logits, route, _ = calls[1]()
    assert logits.shape == (16, 10) and route.shape == (16,)
    with torch.inference_mode():
        logits, route, _ = calls[3]()  # the last node: everyone exits
    assert logits.shape == (4, 10)
    with pytest.raises(ValueError, match="node 0 needs 33 rows"):
        bench.node_work(model, x, [33, 0, 0, 0])


def test_node_inputs_of_a_cascade_read_the_input_or_the_predecessor():
    torch.manual_seed(0)
    cascade = Cascade([torch.nn.Linear(8, 3), mlp_net([8, 6, 6], 3)], example_input=torch.zeros(1, 8)).eval()
    x = randn_inputs(5, 8)
    inputs = bench.node_inputs(cascade, x)
    assert inputs[0] is x and inputs[1] is x  # two networks' first nodes read the input
    assert inputs[2].shape == (5, 6)  # a carried stage reads its predecessor's output


def test_rows_for():
    assert bench_stream.rows_for(1, 4096, 512, 16) == 512
    assert bench_stream.rows_for(64, 4096, 512, 16) == 1024
    assert bench_stream.rows_for(256, 4096, 512, 16) == 4096
    assert bench_stream.rows_for(300, 100, 10, 2) == 300  # at least one request batch


def test_bench_stream_report_structure(tmp_path, capsys):
    out = tmp_path / "stream.json"
    argv = ["--quick", "--systems", "chain,cascade", "--source", "fresh", "--batch-sizes", "4,1", "--rows", "16",
            "--min-rows", "8", "--batches", "2", "--cell-seconds", "0", "--chain-width", "16", "--json", str(out)]
    assert bench_stream.main(argv) == 0
    text = capsys.readouterr().out
    assert "stream/work" in text and "chain:" in text and "cascade:" in text
    report = json.loads(out.read_text())
    assert report["benchmark"] == "stream" and set(report["systems"]) == {"chain", "cascade"}
    assert "UNTRAINED" in report["systems"]["cascade"]["model"]
    for system in report["systems"].values():
        assert [row["batch"] for row in system["results"]] == [1, 4]
        for row in system["results"]:
            assert sum(row["exit_counts"]) == row["rows"] and row["reach"][0] == 1.0
            for key in ("plain_ms", "per_batch_ms", "stream_ms", "work_ms", "work_ideal", "flops_ideal"):
                assert row[key] > 0, key
            assert row["stream_over_work_ideal"] == pytest.approx(row["stream_speedup"] / row["work_ideal"])
    chain = report["systems"]["chain"]
    assert any("FLOPs-ideal" in key for key in chain["targets"]) is False  # no batch 64 here
    with pytest.raises(SystemExit):
        bench_stream.main(["--batch-sizes", "0"])
    with pytest.raises(SystemExit):
        bench_stream.main(["--systems", "nope"])


def test_plain_module_is_the_strongest_network():
    model = bench_stream.chain(width=16)
    x = torch.randn(6, 16)
    from bench.baselines import plain

    with torch.inference_mode():
        torch.testing.assert_close(bench_serving.plain_module(model)(x), plain(model)(x))
        one_node = Cascade([bench_serving.plain_module(model)], example_input=x[:1]).eval()
        torch.testing.assert_close(one_node(x), plain(model)(x), rtol=1e-5, atol=1e-6)


def test_bench_serving_report_structure(tmp_path, capsys):
    out = tmp_path / "serving.json"
    argv = ["--system", "chain", "--chain-width", "16", "--rows", "32", "--seconds", "0.2", "--clients", "2",
            "--rates", "200,400", "--batch-size", "8", "--max-wait-ms", "2", "--json", str(out)]
    assert bench_serving.main(argv) == 0
    assert "adaptive req/s" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serving" and len(report["results"]) == 2
    for row in report["results"]:
        for name in ("adaptive", "plain"):
            assert row[f"{name}_failed"] == 0
            assert row[f"{name}_completed"] == row[f"{name}_requests"] > 0
            assert row[f"{name}_p50_ms"] <= row[f"{name}_p99_ms"]
    with pytest.raises(SystemExit):
        bench_serving.main(["--system", "chain", "--rates", "-1"])
