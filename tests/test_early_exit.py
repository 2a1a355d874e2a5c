"""EarlyExitNet and the executor: nothing lost, per-example equivalence, policies, errors."""

import math
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from adaexit import ConfidencePolicy, EarlyExitNet, ExitHead, NeverExitPolicy, PatiencePolicy
from adaexit.kernels import _dispatch
from helpers import cnn_net, dense_scores, first_exit, mlp_net, randn_inputs

CLASSES = 5
mlp = partial(mlp_net, [12, 16, 16, 16], CLASSES)  # 12 features in, three exits
cnn = partial(cnn_net, CLASSES)
SHAPES = {"mlp": 12, "cnn": (1, 8, 8)}


def inputs(kind, n, seed=1):
    return randn_inputs(n, SHAPES[kind], seed, scale=3)


BUILDERS = {"mlp": mlp, "cnn": cnn}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    criterion=st.sampled_from(["maxprob", "margin", "entropy"]),
    quantiles=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2),
    seed=st.integers(0, 10_000),
)
def test_nothing_lost_and_each_row_equals_running_it_alone(kind, n, criterion, quantiles, seed):
    model = BUILDERS[kind]()
    x = inputs(kind, n, seed)
    scores, dense = dense_scores(model, x, criterion)
    # Thresholds at score quantiles so that some rows exit everywhere; skip draws that sit on a tie.
    thresholds = [float(torch.quantile(scores[k], q)) + 1e-4 for k, q in enumerate(quantiles)]
    assume(all((scores[k] - t).abs().min() > 1e-5 for k, t in enumerate(thresholds)))
    model.set_policy(ConfidencePolicy(criterion, thresholds))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        out, info = model(x[perm], return_info=True)
    want = first_exit(scores, thresholds)[perm]
    assert out.shape == (n, CLASSES)
    assert torch.equal(info.exit_index, want)  # exactly one exit per row, the right one
    assert sum(info.exit_counts) == n
    assert info.exit_counts == torch.bincount(want, minlength=3).tolist()
    expect_logits = torch.stack(dense)[want, perm]
    torch.testing.assert_close(out, expect_logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and each row alone through the same policy
        for i in range(min(n, 4)):
            alone, alone_info = model(x[perm][i : i + 1], return_info=True)
            assert alone_info.exit_index.item() == want[i].item()
            torch.testing.assert_close(alone[0], out[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_never_exit_policy_is_the_plain_model(kind):
    model = BUILDERS[kind](NeverExitPolicy())
    x = inputs(kind, 33)
    with torch.no_grad():
        out, info = model(x, return_info=True)
        plain = model.heads[-1](nn.Sequential(*model.stages)(x))
    torch.testing.assert_close(out, plain)
    assert info.exit_counts == [0, 0, 33]
    assert info.rows_run == [33, 33, 33]
    assert info.ideal_speedup == pytest.approx(1.0)


def test_thresholds_above_one_skip_the_heads_entirely():
    model = mlp(ConfidencePolicy("maxprob", [1.5, 2.0]))
    calls = []
    for head in model.heads:
        head.register_forward_pre_hook(lambda *a: calls.append(1))
    model.heads[0].classifier.register_forward_pre_hook(lambda *a: calls.append("linear"))
    before = _dispatch.host_sync_count()
    with torch.no_grad():
        model(inputs("mlp", 8))
    assert _dispatch.host_sync_count() == before  # no decision point, no host sync
    assert "linear" not in calls


def test_all_rows_exit_at_the_first_head():
    model = cnn(ConfidencePolicy("maxprob", [0.0, 0.0]))
    x = inputs("cnn", 17)
    with torch.no_grad():
        out, info = model(x, return_info=True)
        first = model.heads[0](model.stages[0](x))
    assert info.exit_counts == [17, 0, 0]
    assert info.rows_run == [17, 0, 0]
    torch.testing.assert_close(out, first)
    stage_flops, head_flops = model.flops(x)
    assert info.flops == pytest.approx(17 * (stage_flops[0] + head_flops[0]))
    assert info.ideal_speedup > 1


def test_flops_count_only_the_work_that_ran():
    model = mlp(ConfidencePolicy("maxprob", [0.3, 0.3]))
    x = inputs("mlp", 50)
    with torch.no_grad():
        _, info = model(x, return_info=True)
    stage_flops, head_flops = model.flops(x)
    assert stage_flops[0] == 2 * 12 * 16  # a Linear(12, 16) per example
    expected = sum(r * (s + h) for r, s, h in zip(info.rows_run, stage_flops, head_flops))
    assert info.flops == pytest.approx(expected)
    assert info.full_flops == pytest.approx(50 * (sum(stage_flops) + head_flops[-1]))


def test_one_host_sync_per_decision_point():
    model = mlp(ConfidencePolicy("maxprob", [0.3, 0.3]))
    x = inputs("mlp", 64)
    before = _dispatch.host_sync_count()
    with torch.no_grad():
        _, info = model(x, return_info=True)
    decisions = sum(1 for k in range(2) if info.rows_run[k] > 0)  # the last exit needs none
    assert _dispatch.host_sync_count() - before == decisions


def test_empty_batch_gives_empty_output():
    model = cnn(ConfidencePolicy("entropy", [0.5, 0.5]))
    with torch.no_grad():
        out, info = model(torch.empty(0, 1, 8, 8), return_info=True)
    assert out.shape == (0, CLASSES)
    assert info.exit_index.shape == (0,)
    assert info.flops == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_rows_never_exit_early(bad):
    model = mlp(ConfidencePolicy("maxprob", [0.0, 0.0]))  # every finite row exits at once
    x = inputs("mlp", 6)
    x[2] = bad
    with torch.no_grad():
        out, info = model(x, return_info=True)
    assert info.exit_index.tolist() == [0, 0, 2, 0, 0, 0]
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


def test_deterministic():
    model = cnn(ConfidencePolicy("margin", [0.05, 0.05]))
    x = inputs("cnn", 40)
    with torch.no_grad():
        a, ia = model(x, return_info=True)
        b, ib = model(x, return_info=True)
    assert torch.equal(a, b) and torch.equal(ia.exit_index, ib.exit_index)


def test_train_mode_returns_every_exit():
    model = mlp(ConfidencePolicy("maxprob", [0.0, 0.0])).train()
    outs = model(inputs("mlp", 9))
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (9, CLASSES) for o in outs)
    with pytest.raises(ValueError, match="eval"):
        model(inputs("mlp", 9), return_info=True)


def test_wrong_threshold_count_names_the_problem():
    with pytest.raises(ValueError, match="2 thresholds.*3 exits|3 exits"):
        mlp(ConfidencePolicy("maxprob", [0.5]))
    with pytest.raises(ValueError, match="criterion"):
        ConfidencePolicy("confidence", [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        ConfidencePolicy("maxprob", [math.nan, 0.5])


def test_head_stage_mismatch_names_the_stage():
    stages = [nn.Linear(12, 16), nn.Linear(16, 8)]
    heads = [ExitHead(15, CLASSES), ExitHead(8, CLASSES)]  # head 0 expects 15, stage 0 gives 16
    model = EarlyExitNet(stages, heads, ConfidencePolicy("maxprob", [0.5])).eval()
    with pytest.raises(ValueError, match="exit head 0.*stage 0"):
        model(torch.randn(3, 12))
    with pytest.raises(ValueError, match="exit head 0.*stage 0"):
        model.train()(torch.randn(3, 12))


def test_head_count_must_match_stage_count():
    with pytest.raises(ValueError, match="one head per stage"):
        EarlyExitNet([nn.Linear(4, 4)] * 2, [ExitHead(4, 3)])


def test_heads_disagreeing_on_classes_is_an_error():
    stages = [nn.Linear(12, 16), nn.Linear(16, 8)]
    with pytest.raises(ValueError, match="exit head 0 predicts 3 classes but the last head predicts 4"):
        EarlyExitNet(stages, [ExitHead(16, 3), ExitHead(8, 4)])


def test_heads_must_be_modules():
    # Any nn.Module is a head now (issue 10; tests/test_heads.py): only non-modules are refused.
    with pytest.raises(ValueError, match=r"heads\[0\] is a function: an exit head must be an nn.Module"):
        EarlyExitNet([nn.Linear(12, 16), nn.Linear(16, 8)], [lambda h: h, ExitHead(8, 4)])


def test_replacing_a_head_takes_effect_in_eval():
    model = mlp(ConfidencePolicy("maxprob", [0.0, 0.0]))
    model.heads[0] = ExitHead(16, CLASSES)
    x = inputs("mlp", 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.exit_logits(x)[0])


def test_half_precision_model_returns_its_own_dtype():
    model = mlp(NeverExitPolicy()).to(torch.bfloat16)
    x = inputs("mlp", 7).to(torch.bfloat16)
    with torch.no_grad():
        out = model(x)
        plain = model.heads[-1](nn.Sequential(*model.stages)(x))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.argmax(1), plain.argmax(1))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_tracing_sparse_execution_is_refused():
    model = mlp(ConfidencePolicy("maxprob", [0.3, 0.3]))
    with pytest.raises(ValueError, match="cannot be traced"):
        torch.jit.trace(model, inputs("mlp", 4))


def test_saved_policy_settings_are_validated_on_load():
    model = mlp(ConfidencePolicy("maxprob", [0.3, 0.3]))
    state = model.state_dict()
    state["policy._extra_state"] = {"policy": "ConfidencePolicy", "criterion": "maxprob", "thresholds": [0.1]}
    with pytest.raises(ValueError, match="1 thresholds"):
        model.load_state_dict(state)
    state["policy._extra_state"] = {"policy": "ConfidencePolicy", "criterion": "bogus", "thresholds": [0.1, 0.1]}
    with pytest.raises(ValueError, match="bogus"):
        model.load_state_dict(state)


def test_policy_lives_in_state_dict():
    model = mlp(ConfidencePolicy("entropy", [0.2, 0.4]))
    fresh = mlp(ConfidencePolicy("maxprob", [0.9, 0.9]), seed=1)
    fresh.load_state_dict(model.state_dict())
    assert fresh.policy.criterion == "entropy" and fresh.policy.thresholds == [0.2, 0.4]
    x = inputs("mlp", 30)
    with torch.no_grad():
        a, ia = model(x, return_info=True)
        b, ib = fresh(x, return_info=True)
    assert torch.equal(a, b) and torch.equal(ia.exit_index, ib.exit_index)


@pytest.mark.parametrize(
    "policy", [ConfidencePolicy("margin", [0.1, 0.3]), PatiencePolicy(2)], ids=["confidence", "patience"]
)
def test_a_fresh_model_loads_the_saved_policy_class(policy):
    model = mlp(policy)
    fresh = mlp(seed=3)  # default policy: never exit
    fresh.load_state_dict(model.state_dict())
    assert type(fresh.policy) is type(policy)
    x = inputs("mlp", 40)
    with torch.no_grad():
        a, ia = model(x, return_info=True)
        b, ib = fresh(x, return_info=True)
    assert torch.equal(a, b) and torch.equal(ia.exit_index, ib.exit_index)


def test_loading_a_foreign_policy_state_is_a_clear_error():
    model = mlp(ConfidencePolicy("margin", [0.1, 0.3]))
    state = model.state_dict()
    state["policy._extra_state"] = {"policy": "SomethingElse", "x": 1}
    with pytest.raises(ValueError, match="SomethingElse"):
        mlp().load_state_dict(state)
