"""The benchmark harness: the baselines run the same policy as adaexit, and the scripts' plumbing works.

No timing is asserted anywhere: the benchmarks report speed, these tests only check that what they
compare is the same computation and that their reports have the promised structure.
"""


import argparse

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn


from adaexit import ConfidencePolicy, NeverExitPolicy, PatiencePolicy  # noqa: E402
from adaexit.cascade import Cascade  # noqa: E402

import bench  # noqa: E402
from bench import baselines  # noqa: E402
from helpers import mlp_net, randn_inputs  # noqa: E402


def _mlp_net(seed=0, width=16, classes=5, exits=3):
    return mlp_net([8] + [width] * exits, classes, seed=seed)  # 8 features in


def _cnn_net(seed=0):
    return bench.cnn_early_exit((4, 8, 8), seed=seed)


def _cascade(seed=0):
    torch.manual_seed(seed)
    nets = [bench.cnn_classifier((4,)), bench.cnn_classifier((4, 8)), bench.cnn_classifier((8, 8))]
    return Cascade([n.eval() for n in nets], example_input=torch.zeros(1, 1, 8, 8)).eval()


def _inputs(model, n, seed=0):
    """Rows for ``model``: 8 features for the MLP, 1x8x8 images for the CNNs."""
    mlp = isinstance(model.stages[0][0], nn.Linear)
    return randn_inputs(n, 8 if mlp else (1, 8, 8), seed)


def _agree(model, x, via="auto"):
    """masked dense (graph or exit_logits) and the batch-1 loop give adaexit's exits and predictions."""
    ref_logits, ref_exit = baselines.adaexit(model)(x, return_exit_index=True)
    assert ref_logits.shape[0] == x.shape[0] and bool((ref_exit >= 0).all())
    runs = {"masked_dense": baselines.masked_dense(model, via=via), "batch1_loop": baselines.batch1_loop(model)}
    for name, run in runs.items():
        logits, exit_index = run(x, return_exit_index=True)
        assert torch.equal(exit_index, ref_exit), name
        assert torch.equal(logits.argmax(1), ref_logits.argmax(1)), name
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5, msg=name)
    return ref_exit


@pytest.mark.parametrize("make", [_mlp_net, _cnn_net], ids=["mlp", "cnn"])
@pytest.mark.parametrize("via", ["graph", "exit_logits"])
@pytest.mark.parametrize("criterion", ["maxprob", "margin", "entropy"])
def test_baselines_match_adaexit_early_exit(make, via, criterion):
    model = make()
    x = _inputs(model, 48)
    model.set_policy(bench.policy_for_fractions(model, x, [0.4, 0.3], criterion=criterion))
    exits = _agree(model, x, via)
    # the fixture is not degenerate: every exit is used
    assert torch.bincount(exits, minlength=3).min() > 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    f0=st.floats(0.0, 1.0),
    f1=st.floats(0.0, 1.0),
    criterion=st.sampled_from(["maxprob", "margin", "entropy"]),
    seed=st.integers(0, 3),
)
def test_baselines_match_adaexit_random_patterns(n, f0, f1, criterion, seed):
    model = _mlp_net(seed)
    x = _inputs(model, n, seed)
    fractions = [f0, (1 - f0) * f1]  # sums to at most 1
    model.set_policy(bench.policy_for_fractions(model, x, fractions, criterion=criterion))
    _agree(model, x)


def test_baselines_match_adaexit_patience():
    """A stateful policy: the patience counter must follow the rows in the dense simulation too."""
    model = _mlp_net(1, exits=4)
    model.set_policy(PatiencePolicy(2))
    exits = _agree(model, _inputs(model, 64))
    assert exits.min() >= 1  # patience 2 needs two exits to agree


def test_baselines_match_adaexit_cascade():
    cascade = _cascade()
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    cascade.set_policy(bench.policy_for_fractions(cascade, x, [0.5, 0.25]))
    exits = _agree(cascade, x, via="graph")
    assert torch.bincount(exits, minlength=3).min() > 0


def test_baselines_match_adaexit_mixed_cascade():
    """A cascade whose last member is an early-exit net: carry nodes inside a cascade."""
    torch.manual_seed(3)
    cascade = Cascade([bench.cnn_classifier((4,)).eval(), _cnn_net(4)], example_input=torch.zeros(1, 1, 8, 8)).eval()
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    cascade.set_policy(bench.policy_for_fractions(cascade, x, [0.3, 0.2, 0.2]))
    exits = _agree(cascade, x, via="graph")
    assert torch.bincount(exits, minlength=4).min() > 0
    # plain is the early-exit member's backbone (all stages, last head), not its own policy
    with torch.no_grad():
        h = x
        for stage in cascade.models[-1].stages:
            h = stage(h)
        expected = cascade.models[-1].heads[-1](h)
    torch.testing.assert_close(baselines.plain(cascade)(x), expected)


def test_plain_equals_never_exit_model():
    model = _cnn_net()
    x = _inputs(model, 20)
    model.set_policy(NeverExitPolicy())
    expected = model(x)
    logits, exit_index = baselines.plain(model)(x, return_exit_index=True)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert bool((exit_index == 2).all())
    # with an early-exit policy the plain strategy still ignores the exits
    model.set_policy(ConfidencePolicy("maxprob", [0.0, 0.0]))
    torch.testing.assert_close(baselines.plain(model)(x), expected, rtol=1e-5, atol=1e-6)


def test_plain_cascade_is_its_strongest_network():
    cascade = _cascade()
    x = torch.randn(10, 1, 8, 8)
    cascade.set_policy(NeverExitPolicy())
    with torch.no_grad():
        expected = cascade.models[-1](x)
    torch.testing.assert_close(baselines.plain(cascade)(x), expected)
    torch.testing.assert_close(cascade(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", baselines.STRATEGY_NAMES)
def test_empty_batch(name):
    model = _cnn_net()
    model.set_policy(ConfidencePolicy("maxprob", [0.5, 0.5]))
    logits, exit_index = baselines.STRATEGIES[name](model)(torch.zeros(0, 1, 8, 8), return_exit_index=True)
    assert logits.shape[0] == 0 and exit_index.shape == (0,)


def test_bad_arguments():
    model = _cnn_net()
    with pytest.raises(ValueError, match="via"):
        baselines.masked_dense(model, via="sparse")
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        baselines.strategies(model, ["plain", "fast"])
    with pytest.raises(ValueError, match="AdaptiveModel, got Linear"):
        baselines.plain(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fractions"):
        bench.policy_for_fractions(model, torch.randn(4, 1, 8, 8), [0.5])
    with pytest.raises(ValueError, match="fractions"):
        bench.policy_for_fractions(model, torch.randn(4, 1, 8, 8), [0.8, 0.5])


@pytest.mark.parametrize("fractions", [(0.5, 0.25), (0.0, 0.5), (1.0, 0.0), (0.2, 0.8)])
def test_policy_for_fractions_hits_the_pattern(fractions):
    model = _cnn_net()
    x = _inputs(model, 100)
    model.set_policy(bench.policy_for_fractions(model, x, fractions, slack=0.02))
    _, info = model(x, return_info=True)
    expected = [round(100 * f) for f in fractions]
    for got, want in zip(info.exit_counts[:2], expected):
        assert abs(got - want) <= 2, (info.exit_counts, expected)
    assert sum(info.exit_counts) == 100


def test_interleaved_times_interleaves():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    times = bench.interleaved_times(fns, repeats=3, warmup=1)
    assert calls == list("ABC") * 4  # one warm-up round, then three rounds in order
    assert {k: len(v) for k, v in times.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_format_table():
    text = bench.format_table(
        [{"name": "a", "ms": 1.234}, {"name": "bb", "ms": None}], [("name", "name", ""), ("ms", "ms", ".1f")]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["name", "ms"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["a", "1.2"] and lines[3].split() == ["bb", "-"]


def test_common_arguments_and_finish(tmp_path, capsys):
    """The scripts' shared command line and ending: --json / --threads, a bad thread count is a usage
    error, the report is printed and written as JSON."""
    import json

    parser = bench.common_arguments(argparse.ArgumentParser(prog="x"), json_help="J", threads_help="T")
    assert parser.parse_args([]).json is None and parser.parse_args([]).threads is None
    args = parser.parse_args(["--json", str(tmp_path / "r.json"), "--threads", "1"])
    bench.apply_threads(parser, args)
    assert torch.get_num_threads() == 1
    with pytest.raises(SystemExit):
        bench.apply_threads(parser, parser.parse_args(["--threads", "0"]))
    assert "threads must be >= 1" in capsys.readouterr().err
    report = {"benchmark": "x", "values": [1.5, 2]}
    assert bench.finish(report, args, lambda r: f"report {r['benchmark']}") == 0
    assert capsys.readouterr().out == "report x\n"
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert bench.finish(report, parser.parse_args([]), str) == 0  # no --json: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_bench_early_exit_report_structure():
    from bench import bench_early_exit

    report = bench_early_exit.run_benchmark(repeats=1, breakdown=True, batch=32, model="tiny")
    names = [row["strategy"] for row in report["strategies"]]
    assert names == ["plain", "masked_dense", "batch1_loop", "adaexit", "never_exit", "never_exit_stream",
                     "never_exit_zero_sync"]
    assert sum(report["exit_counts"]) == 32 and report["rows_run"][0] == 32
    assert report["ideal_speedup"] > 1.0
    assert set(report["targets"]) == {"adaexit_over_ideal>=0.9", "never_exit_overhead<=3%",
                                      "never_exit_stream_overhead<=3%", "never_exit_zero_sync_overhead<=3%"}
    assert set(report["never_exit_overhead_paired"]) == set(bench_early_exit.NEVER_EXIT_MODES)
    assert "executor_overhead_ms" in report and "ideal_speedup_latency" in report
    text = bench_early_exit.format_report(report)
    assert "masked_dense" in text and "never-exit overhead" in text and "zero_sync" in text and "targets:" in text


def test_end_to_end_report_structure(tmp_path, capsys):
    import json

    from bench import end_to_end

    out = tmp_path / "e2e.json"
    argv = ["--batch-sizes", "3,1", "--source", "fresh", "--loop-rows", "2", "--cell-seconds", "0",
            "--calibration-rows", "64", "--json", str(out)]
    assert end_to_end.main(argv) == 0
    assert "adaexit/ideal" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"early_exit", "cascade"}
    for system in report["systems"].values():
        assert "UNTRAINED" in system["model"]  # a fresh model says so
        assert [row["batch"] for row in system["results"]] == [1, 3]
        for row in system["results"]:
            assert sum(row["exit_counts"]) == row["batch"]
            for name in ("plain", "masked_dense", "batch1_loop", "adaexit"):
                assert row[f"{name}_ms"] > 0
    with pytest.raises(SystemExit):
        end_to_end.main(["--batch-sizes", "0"])


def test_end_to_end_reads_the_demo_cache(tmp_path):
    """The demo's checkpoints (here: untrained networks saved under the demo's names) are loaded and
    calibrated; with nothing cached the reader says so by returning None."""
    from adaexit.apps.fashion_mnist import demo, recipe
    from adaexit.data import load_fashion_mnist, train_val_split

    from bench import end_to_end

    try:
        x_all, y_all = load_fashion_mnist("train")
    except (FileNotFoundError, ValueError, OSError):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    val_size, seed = 64, 0
    assert end_to_end.demo_systems(tmp_path, seed=seed, val_size=val_size) is None  # empty cache
    x_train, y_train, _, _ = train_val_split(x_all, y_all, val_size, seed=seed)
    defaults = demo.add_arguments(argparse.ArgumentParser()).parse_args([])  # the reader's defaults
    configs = recipe.net_configs(defaults.epochs, False, defaults.train_batch_size)
    paths = recipe.checkpoint_paths(configs, tmp_path, x_train, y_train, seed)
    for cfg in configs:
        torch.save({"state_dict": recipe.build(cfg).state_dict(), "record": {}}, paths[cfg.name])
    systems = end_to_end.demo_systems(tmp_path, seed=seed, val_size=val_size)
    assert systems is not None and set(systems) == {"early_exit", "cascade", "combination"}
    for model, note in systems.values():
        assert "trained by the demo" in note and model.policy.num_exits == model.num_exits
