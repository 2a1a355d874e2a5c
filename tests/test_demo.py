"""The demo end to end (``--smoke``: tiny networks, a few steps, small subsets) and its pieces."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from adaexit.apps.fashion_mnist import demo, recipe
from adaexit.data import DEFAULT_DIR

REAL = DEFAULT_DIR / "train-images-idx3-ubyte.gz"
needs_data = pytest.mark.skipif(
    not REAL.is_file(),
    reason=f"Fashion-MNIST not installed at {DEFAULT_DIR} (apt-get install dataset-fashion-mnist)",
)


def parse(*argv):
    return demo.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@needs_data
def test_smoke_run_writes_results_and_plots(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = parse("--smoke", "--out", str(out), "--cache", str(cache), "--repeats", "1", "--no-progress")
    assert demo.run(args) == 0
    results = json.loads((out / "results.json").read_text())
    best = results["best"]
    assert {"accuracy_drop_pp", "speedup", "system", "reference"} <= set(best)
    assert best["speedup"] > 0 and abs(best["accuracy_drop_pp"]) <= 100
    assert best["system"] in ("early_exit", "cascade", "combination")
    for name in ("early_exit", "cascade", "combination"):
        r = results["results"][name]
        # every test image got exactly one exit
        assert sum(r["exit_counts"]) == results["data"]["test"]
        assert len(r["exit_counts"]) == len(r["exit_names"])
        assert r["time_s"] > 0 and r["flops_per_example"] > 0
        assert r["accuracy_drop_pp"] == pytest.approx(r["new_errors_pp"] - r["fixed_pp"])
        streamed = results["results"][f"{name} (stream)"]  # the streaming mode, same policy, timed beside
        assert (r["mode"], streamed["mode"]) == ("per-batch", "stream") and streamed["time_s"] > 0
        assert streamed["same_predictions_as_per_batch"] > 0.99
    assert best["mode"] in ("per-batch", "stream")
    # the reported system and mode are the fastest on the validation images, every one of the six timed there
    val = best["validation_seconds"]
    assert set(val) == {f"{n}{m}" for n in ("early_exit", "cascade", "combination") for m in ("", " (stream)")}
    fastest = min(val, key=val.get)
    assert (best["system"], best["mode"]) == (fastest.removesuffix(" (stream)"),
                                              "stream" if fastest.endswith(" (stream)") else "per-batch")
    assert best["speedup"] == results["results"][fastest]["speedup"]
    ref = results["results"][results["reference"]]
    assert ref["speedup"] == pytest.approx(1.0) and ref["accuracy_drop_pp"] == pytest.approx(0.0)
    try:
        import matplotlib  # noqa: F401  (optional: without it the demo writes results.json only)
    except ImportError:
        assert results["plots"] == {}
    else:
        assert set(results["plots"].values()) == {"frontier.png", "exits.png"}
        for plot in ("frontier.png", "exits.png"):
            assert (out / plot).stat().st_size > 1000
            assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best (chosen on validation)" in capsys.readouterr().out
    assert len(list(cache.glob("*.pt"))) == 3  # one checkpoint per network


def test_missing_data_exits_with_a_clear_message(tmp_path, capsys):
    args = parse("--smoke", "--data", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "cache"))
    assert demo.run(args) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "--data" in err


@pytest.mark.parametrize("option", ["--epochs", "--repeats", "--batch-size"])
def test_bad_options_are_value_errors(tmp_path, option):
    with pytest.raises(ValueError, match=option):
        demo.run(parse("--smoke", option, "0", "--cache", str(tmp_path)))


def _configs(epochs=1):
    return [
        recipe.NetConfig("wide_cnn", "wide_cnn", 4, epochs, 1e-3, multi_exit=True, batch_size=32, max_steps=2),
        recipe.NetConfig("mlp", "mlp", 8, 1, 1e-3, distill=0.7, teacher="wide_cnn", batch_size=32, max_steps=2),
    ]


def test_checkpoints_are_cached_reloaded_and_distilled(tmp_path):
    x, y = torch.randn(64, 1, 28, 28), torch.randint(10, (64,))
    first, rec1 = recipe.train_all(_configs(), (x, y), tmp_path, 0, retrain=False, progress=False)
    second, rec2 = recipe.train_all(_configs(), (x, y), tmp_path, 0, retrain=False, progress=False)
    assert not any(r["cached"] for r in rec1.values()) and all(r["cached"] for r in rec2.values())
    for name in first:
        weights = recipe.network_weights(second[name])
        for k, a in recipe.network_weights(first[name]).items():
            assert torch.equal(a, weights[k]), (name, k)
    assert rec2["mlp"]["config"]["teacher"] == "wide_cnn"
    _, rec3 = recipe.train_all(_configs(), (x, y), tmp_path, 0, retrain=True, progress=False)
    assert not any(r["cached"] for r in rec3.values())
    with pytest.raises(ValueError, match="teacher"):  # a student needs its teacher trained first
        recipe.checkpoint_paths(_configs()[1:], tmp_path, x, y, 0)


def test_cache_key_covers_recipe_seed_data_and_teacher(tmp_path):
    x, y = torch.randn(16, 1, 28, 28), torch.randint(10, (16,))
    base = recipe.checkpoint_paths(_configs(), tmp_path, x, y, 0)
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 10
    changed_lr = _configs()
    changed_lr[1].lr = 2e-3
    variants = {
        "seed": recipe.checkpoint_paths(_configs(), tmp_path, x, y, 1),
        "data": recipe.checkpoint_paths(_configs(), tmp_path, x, y2, 0),
        "recipe": recipe.checkpoint_paths(changed_lr, tmp_path, x, y, 0),
        "teacher": recipe.checkpoint_paths(_configs(epochs=2), tmp_path, x, y, 0),
    }
    assert recipe.checkpoint_paths(_configs(), tmp_path, x, y, 0) == base  # deterministic
    assert variants["seed"]["mlp"] != base["mlp"] and variants["data"]["wide_cnn"] != base["wide_cnn"]
    assert variants["recipe"]["wide_cnn"] == base["wide_cnn"] and variants["recipe"]["mlp"] != base["mlp"]
    # a change of the teacher's recipe retrains the teacher and its students
    assert variants["teacher"]["wide_cnn"] != base["wide_cnn"] and variants["teacher"]["mlp"] != base["mlp"]


@pytest.mark.parametrize("module", ["adaexit.apps.fashion_mnist.models", "adaexit.early_exit", "adaexit.heads",
                                    "adaexit.training", "adaexit.data"])
def test_cache_key_covers_the_code_that_builds_and_trains(tmp_path, monkeypatch, module):
    """Editing the source of a module that defines the network or its training changes the key."""
    import importlib

    x, y = torch.randn(16, 1, 28, 28), torch.randint(10, (16,))
    base = recipe.checkpoint_paths(_configs(), tmp_path, x, y, 0)
    mod = importlib.import_module(module)
    edited = tmp_path / "edited.py"
    edited.write_text(Path(mod.__file__).read_text() + "\n# an edit\n")
    monkeypatch.setattr(mod, "__file__", str(edited))
    after = recipe.checkpoint_paths(_configs(), tmp_path, x, y, 0)
    assert after["wide_cnn"] != base["wide_cnn"] and after["mlp"] != base["mlp"]


def test_time_passes_reports_the_median_of_interleaved_repeats():
    calls = []
    fns = {"a": lambda xb: calls.append(("a", xb)), "b": lambda xb: calls.append(("b", xb))}
    out = demo.time_passes({name: demo.per_batch(fn, [1, 2]) for name, fn in fns.items()}, repeats=3, warmup=1)
    assert len(calls) == 2 * 2 * 4  # 2 functions x 2 batches x (1 warmup + 3 repeats)
    assert calls[0][0] == "a" and calls[4][0] == "b"  # the order rotates between rounds
    for name in fns:
        ts = out[name]["all_s"]
        assert len(ts) == 3 and out[name]["median_s"] == sorted(ts)[1]


def test_zoo_costs_increase_and_the_plain_network_is_the_last_exit():
    from adaexit.cost import count_flops
    from adaexit.apps.fashion_mnist.models import mlp, plain_network, small_cnn, wide_cnn

    x = torch.randn(5, 1, 28, 28)
    nets = [mlp().eval(), small_cnn().eval(), wide_cnn().eval()]
    flops = [count_flops(n, x[:1]) for n in nets[:2]] + [count_flops(plain_network(nets[2]), x[:1])]
    assert flops[0] < flops[1] < flops[2] and flops[2] > 10 * flops[1]  # a genuinely expensive reference
    for net in nets:
        assert net(x).shape == (5, 10)
    wide = nets[2]
    # never-exit early-exit forward == the plain network == the dense last exit
    with torch.no_grad():
        torch.testing.assert_close(wide(x), plain_network(wide)(x))
        torch.testing.assert_close(wide.exit_logits(x)[-1], plain_network(wide)(x))
    for bad in (lambda: mlp(0), lambda: small_cnn(0), lambda: wide_cnn(1), lambda: plain_network(nets[0])):
        with pytest.raises(ValueError):
            bad()
