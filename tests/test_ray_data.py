"""adaexit.ray_data: the map_batches predictor gives, row by row and in input order, what the
single-process model gives; it loads weights (and the calibrated policy) once per actor; adaexit imports
without Ray. The Ray test starts a local Ray instance with 2 CPUs once per session (marked slow)."""

import functools
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adaexit import ConfidencePolicy
from adaexit.ray_data import AdaptivePredictor
from helpers import small_combination

DIM, CLASSES = 12, 4
TESTS = os.path.dirname(os.path.abspath(__file__))
BUILD = functools.partial(small_combination, DIM, CLASSES)  # picklable: a module-level function


def trained():
    """The model as a user would ship it: weights changed after building, a calibrated policy."""
    model = BUILD()
    model.set_policy(ConfidencePolicy("margin", [0.3, 0.2, 0.3, 0.1]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return model, buffer.getvalue()


def rows(n, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, DIM)) * 3).astype(np.float32)


def reference(model, x):
    with torch.no_grad():
        logits, info = model(torch.from_numpy(x), return_info=True)
    return logits.numpy(), info.exit_index.numpy()


def check(out, model, x, ids, spread=True):
    logits, exits = reference(model, x)
    np.testing.assert_array_equal(out["id"], ids)
    np.testing.assert_array_equal(out["exit_index"], exits)
    np.testing.assert_array_equal(out["prediction"], logits.argmax(1))
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
    assert not spread or len(np.unique(exits)) >= 3  # the policy really exits at several nodes


# ---------------------------------------------------------------------------------------------
# The predictor, without Ray
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 1, 16, 1000])
@pytest.mark.parametrize("weights_as", ["bytes", "path"])
def test_predictor_equals_the_model(batch_size, weights_as, tmp_path):
    model, weights = trained()
    if weights_as == "path":
        (tmp_path / "w.pt").write_bytes(weights)
        weights = str(tmp_path / "w.pt")
    predictor = AdaptivePredictor(BUILD, weights=weights, batch_size=batch_size)
    assert repr(predictor.model.policy) == repr(model.policy)  # the calibrated policy came with the weights
    x, ids = rows(77), np.arange(77) * 10
    x_view = x.copy()
    x_view.setflags(write=False)  # Ray hands read-only zero-copy views
    out = predictor({"id": ids, "x": x_view})
    assert set(out) == {"id", "logits", "prediction", "exit_index"}
    assert out["logits"].dtype == np.float32 and out["exit_index"].dtype == np.int64
    check(out, model, x, ids)
    empty = predictor({"id": ids[:0], "x": x[:0]})
    assert empty["logits"].shape == (0, CLASSES) and empty["exit_index"].shape == (0,)


def test_predictor_without_weights_is_the_built_model():
    predictor = AdaptivePredictor(BUILD, input_column="features")
    x = rows(10)
    check(predictor({"id": np.arange(10), "features": x}), BUILD(), x, np.arange(10), spread=False)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="build"):
        AdaptivePredictor("not callable")
    with pytest.raises(ValueError, match="build\\(\\) must return an adaexit AdaptiveModel"):
        AdaptivePredictor(lambda: torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch_size"):
        AdaptivePredictor(BUILD, batch_size=0)
    with pytest.raises(ValueError, match="input_column"):
        AdaptivePredictor(BUILD, input_column="")
    with pytest.raises(ValueError, match="weights .*missing.pt"):
        AdaptivePredictor(BUILD, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="weights \\(bytes\\)"):
        AdaptivePredictor(BUILD, weights=b"garbage")
    predictor = AdaptivePredictor(BUILD)
    with pytest.raises(ValueError, match="input_column 'x'.*\\['image'\\]"):
        predictor({"image": rows(2)})
    with pytest.raises(ValueError, match="logits"):
        predictor({"x": rows(2), "logits": np.zeros(2)})


def test_adaexit_imports_without_ray():
    """``import adaexit`` and ``adaexit.ray_data`` never import ray (an absent package cannot break them)."""
    code = "import sys; sys.modules['ray'] = None; import adaexit, adaexit.ray_data; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------------------------
# On a local Ray instance
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats prompt or upload
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60: no token written to ~/.ray for a throwaway cluster
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pandas")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),  # short: Ray's AF_UNIX socket paths are capped at 107 bytes
        log_to_driver=False,
        logging_level="warning",
        # the workers import the model builder from tests/helpers.py, as a user's workers import theirs
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))}},
    )
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # output rows in input order
    context.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_map_batches_equals_the_single_process_run(ray_local):
    import pandas as pd

    ray = ray_local
    model, weights = trained()
    n = 600
    x, ids = rows(n, seed=1), np.arange(n, dtype=np.int64)
    blocks = np.array_split(ids, 6)  # several blocks, so both actors can get work
    ds = ray.data.from_pandas([pd.DataFrame({"id": ids[b], "x": list(x[b])}) for b in blocks])
    out = ds.map_batches(
        AdaptivePredictor,
        fn_constructor_kwargs={"build": BUILD, "weights": weights, "batch_size": 16, "num_threads": 1},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=64,
        batch_format="numpy",
        num_cpus=1,
    )
    batches = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    got = {k: np.concatenate([b[k] for b in batches]) for k in ("id", "logits", "prediction", "exit_index")}
    assert got["logits"].shape == (n, CLASSES)
    check(got, model, x, ids)  # ids in input order: preserve_order
