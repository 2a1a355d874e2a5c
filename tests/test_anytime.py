"""Anytime prediction: FLOPs budgets (batch and per example), deadlines, EANN, curves, anytime training.

Every expected value is computed independently of the runner: exits and spends from the per-stage
FLOPs, predictions from the dense ``exit_logits``. Deadline tests use stages that sleep, sized so
that the expected number of stages is far from the decision boundary (no tight timing asserts).
"""

import math
import time
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adaexit import ConfidencePolicy, EarlyExitNet, ExitHead
from adaexit.anytime import (
    EANN,
    STOP_REASONS,
    AnytimeRunner,
    anytime_curve,
    anytime_loss,
    anytime_predict,
    exponential_mlp_networks,
    plot_anytime_curve,
    train_anytime,
)
from adaexit.kernels import _dispatch
from adaexit.training import AdaLossWeighting, OscillatingWeighting
from helpers import cnn_net, mlp_net, randn_inputs

CLASSES = 4
WIDTHS = [10, 16, 24, 24, 32]
BATCH = 1, 4, 6


mlp = partial(mlp_net, WIDTHS, CLASSES)
cnn = partial(cnn_net, CLASSES)


def inputs(n, seed=1, kind="mlp"):
    return randn_inputs(n, WIDTHS[0] if kind == "mlp" else (1, 8, 8), seed, scale=2)


def dense_at(model, x, exit_index):
    """Row i of the dense logits of exit ``exit_index[i]``: the prediction the row should return."""
    with torch.no_grad():
        dense = torch.stack(model.exit_logits(x))  # [K, N, C]
    return dense[exit_index, torch.arange(x.shape[0])]


def reach_cost(stage, head, k):
    """FLOPs of reaching exit k with no head before it evaluated (a never-exit policy), plus head k."""
    return sum(stage[: k + 1]) + head[k]


# -- FLOPs budgets --------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(fraction=st.floats(0.0, 1.2), confident=st.booleans())
def test_anytime_batch_budget_never_exceeded(fraction, confident):
    policy = ConfidencePolicy("maxprob", [0.5, 0.6, 0.7]) if confident else None
    model = mlp(policy)
    x = inputs(24)
    runner = AnytimeRunner(model)
    stage, head = runner.costs(x)
    n = x.shape[0]
    lo, hi = n * (stage[0] + head[0]), n * runner.exit_flops(x)[-1]
    budget = lo + fraction * (hi - lo)
    logits, info = runner(x, budget_flops=budget)
    assert info.flops <= budget
    assert info.flops == pytest.approx(float(info.flops_per_row.sum()))
    torch.testing.assert_close(logits, dense_at(model, x, info.exit_index), atol=1e-5, rtol=1e-5)
    stopped = info.stop_reason == STOP_REASONS.index("batch_budget")
    if stopped.any():
        # the batch stopped at one exit k: one more stage (and its head) for those rows was unaffordable
        k = int(info.exit_index[stopped][0])
        assert (info.exit_index[stopped] == k).all()
        assert k < model.num_exits - 1
        rows_going_on = int(stopped.sum())
        assert info.flops + rows_going_on * (stage[k + 1] + head[k + 1]) > budget


def test_anytime_batch_budget_stops_at_expected_exit():
    model = mlp()  # never-exit policy: only the budget stops
    x = inputs(6)
    runner = AnytimeRunner(model)
    stage, head = runner.costs(x)
    n = x.shape[0]
    for k in range(model.num_exits):
        budget = n * reach_cost(stage, head, k)
        logits, info = runner(x, budget_flops=budget)
        assert info.exit_index.tolist() == [k] * n
        assert info.flops == budget  # exactly the stages up to k plus head k, nothing more
        torch.testing.assert_close(logits, dense_at(model, x, info.exit_index), atol=1e-5, rtol=1e-5)
        if k + 1 < model.num_exits:  # a budget one FLOP short of the next exit stays at k
            _, info = runner(x, budget_flops=n * reach_cost(stage, head, k + 1) - 1)
            assert info.exit_index.tolist() == [k] * n


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_anytime_per_example_budget_each_row_stops_at_last_affordable_exit(kind):
    model = mlp() if kind == "mlp" else cnn()
    x = inputs(13, kind=kind)
    runner = AnytimeRunner(model)
    stage, head = runner.costs(x)
    reach = [reach_cost(stage, head, k) for k in range(model.num_exits)]
    g = torch.Generator().manual_seed(3)
    budget = reach[0] + torch.rand(x.shape[0], generator=g, dtype=torch.float64) * (reach[-1] * 1.1 - reach[0])
    budget[0] = reach[0]  # exactly the first exit
    budget[1] = math.inf  # unlimited
    logits, info = runner(x, per_example_budget=budget)

    expected = torch.tensor([max(k for k in range(len(reach)) if reach[k] <= b) for b in budget.tolist()])
    assert torch.equal(info.exit_index, expected)
    assert (info.flops_per_row <= budget).all()
    assert info.flops_per_row.tolist() == [reach[k] for k in expected.tolist()]
    assert info.flops == pytest.approx(float(info.flops_per_row.sum()))
    torch.testing.assert_close(logits, dense_at(model, x, info.exit_index), atol=1e-5, rtol=1e-5)
    reasons = [STOP_REASONS[r] for r in info.stop_reason.tolist()]
    for k, reason in zip(expected.tolist(), reasons):
        assert reason == ("policy" if k == model.num_exits - 1 else "example_budget")


def test_anytime_per_example_budget_with_confidence_policy():
    """The budget is one more reason to stop: never later than the policy alone, same logits."""
    policy = ConfidencePolicy("maxprob", [0.45, 0.5, 0.55])
    model = mlp(policy)
    x = inputs(40)
    with torch.no_grad():
        _, alone = model(x, return_info=True)
    runner = AnytimeRunner(model)
    exit_flops = runner.exit_flops(x)  # every head on the way evaluated: what the policy spends
    budget = torch.tensor(exit_flops, dtype=torch.float64)[torch.arange(x.shape[0]) % model.num_exits]
    logits, info = runner(x, per_example_budget=budget)
    assert (info.flops_per_row <= budget).all()
    assert (info.exit_index <= alone.exit_index).all()
    by_policy = info.stop_reason == 0
    assert torch.equal(info.exit_index[by_policy], alone.exit_index[by_policy])
    # with every head evaluated, a budget of exit_flops[k] reaches exactly min(k, policy's exit)
    assert torch.equal(info.exit_index, torch.minimum(torch.arange(x.shape[0]) % model.num_exits, alone.exit_index))
    torch.testing.assert_close(logits, dense_at(model, x, info.exit_index), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", BATCH)
def test_anytime_per_example_budget_independent_of_the_batch(n):
    """Nothing lost: a row's prediction and exit under its own budget do not depend on its batch."""
    model = mlp(ConfidencePolicy("margin", [0.3, 0.3, 0.3]))
    x = inputs(n, seed=n)
    runner = AnytimeRunner(model)
    reach = runner.exit_flops(x)
    budget = torch.tensor([reach[i % len(reach)] + 1.0 for i in range(n)], dtype=torch.float64)
    logits, info = runner(x, per_example_budget=budget)
    perm = torch.randperm(n)
    logits_p, info_p = runner(x[perm], per_example_budget=budget[perm])
    torch.testing.assert_close(logits_p, logits[perm])
    assert torch.equal(info_p.exit_index, info.exit_index[perm])
    for i in range(n):
        one, one_info = runner(x[i : i + 1], per_example_budget=budget[i : i + 1])
        torch.testing.assert_close(one[0], logits[i], atol=1e-5, rtol=1e-5)
        assert int(one_info.exit_index) == int(info.exit_index[i])


def test_anytime_generous_batch_budget_adds_no_host_sync():
    """A budget that cannot bind is checked on the host: no decisions, no partitions, no syncs."""
    model = mlp()
    x = inputs(8)
    runner = AnytimeRunner(model)
    runner.costs(x)  # FLOPs counted (and cached) before counting syncs
    before = _dispatch.host_sync_count()
    logits, info = runner(x, budget_flops=1e12)
    assert _dispatch.host_sync_count() - before == 0
    assert info.exit_index.tolist() == [model.num_exits - 1] * 8
    torch.testing.assert_close(logits, model(x))


# -- deadlines ------------------------------------------------------------------------------------
class Sleep(nn.Module):
    """A stage that sleeps ``ms`` (when not counting FLOPs) and applies a small linear layer."""

    def __init__(self, ms, width=6):
        super().__init__()
        self.ms = ms
        self.linear = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.ms:
            time.sleep(self.ms / 1e3)
        return self.linear(x)


def sleepy_net(ms):
    torch.manual_seed(0)
    return EarlyExitNet([Sleep(t) for t in ms], [ExitHead(6, CLASSES) for _ in ms]).eval()


def test_anytime_deadline_stops_before_a_stage_that_would_miss_it():
    # Two instant stages, then one of 250 ms; deadline 150 ms. After stage 1 the elapsed time is a few
    # ms and the profiled next stage takes >= 250 ms, so exactly two stages run whatever the load.
    model = sleepy_net([0, 0, 250])
    x = torch.randn(5, 6)
    runner = AnytimeRunner(model)
    runner.costs(x)
    profile = runner.profile(x, repeats=1)
    assert profile[2] >= 250
    calls = model.stages[2].calls
    logits, info = runner(x, deadline_ms=150)
    assert model.stages[2].calls == calls  # the slow stage never ran
    assert info.exit_index.tolist() == [1] * 5
    assert info.stop_counts["deadline"] == 5
    assert info.deadline_met
    torch.testing.assert_close(logits, dense_at(model, x, info.exit_index), atol=1e-5, rtol=1e-5)


def test_anytime_deadline_learns_stage_times_from_earlier_calls():
    """anytime_predict keeps one runner per model, so a deadline call learns from the previous ones."""
    model = sleepy_net([0, 0, 250])
    x = torch.randn(3, 6)
    model.exit_costs(x)  # FLOPs counted (one slow call) before the timed calls
    _, first = anytime_predict(model, x, deadline_ms=1e6)  # no estimates yet: all runs, all measured
    assert first.exit_index.tolist() == [2] * 3
    _, second = anytime_predict(model, x, deadline_ms=150)
    assert second.exit_index.tolist() == [1] * 3
    assert second.deadline_met


def test_anytime_deadline_shorter_than_first_exit_still_predicts():
    model = sleepy_net([60, 0])
    x = torch.randn(4, 6)
    runner = AnytimeRunner(model)
    runner.costs(x)
    logits, info = runner(x, deadline_ms=20)
    assert info.exit_index.tolist() == [0] * 4  # the first exit always runs
    assert not info.deadline_met
    assert info.stop_counts["deadline"] == 4
    assert torch.isfinite(logits).all() and logits.shape == (4, CLASSES)


def test_anytime_deadline_and_budget_together():
    model = sleepy_net([0, 0, 0])
    x = torch.randn(4, 6)
    runner = AnytimeRunner(model)
    stage, head = runner.costs(x)
    budget = 4 * reach_cost(stage, head, 1)
    _, info = runner(x, budget_flops=budget, deadline_ms=1e6)
    assert info.exit_index.tolist() == [1] * 4
    assert info.stop_counts["batch_budget"] == 4 and info.flops <= budget


# -- errors and edge cases ------------------------------------------------------------------------
def test_anytime_bad_budgets_raise_value_error_naming_the_argument():
    model = mlp()
    x = inputs(4)
    runner = AnytimeRunner(model)
    first = runner.min_budget(x)
    for bad in (float("nan"), -1.0, 4 * first - 1, "lots", True):
        with pytest.raises(ValueError, match="budget_flops"):
            runner(x, budget_flops=bad)
    for bad in ([first] * 3, [[first] * 4], [first, first, float("nan"), first], [first, first - 1, first, first]):
        with pytest.raises(ValueError, match="per_example_budget"):
            runner(x, per_example_budget=bad)
    for bad in (0, -5.0, float("nan")):
        with pytest.raises(ValueError, match="deadline_ms"):
            runner(x, deadline_ms=bad)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        runner(x)
    with pytest.raises(ValueError, match="EarlyExitNet"):
        AnytimeRunner(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="budgets"):
        anytime_curve(mlp(), (x, torch.zeros(4, dtype=torch.long)), [first / 2])


def test_anytime_empty_batch():
    model = mlp()
    x = inputs(0)
    logits, info = anytime_predict(model, x, budget_flops=0.0, per_example_budget=torch.zeros(0), deadline_ms=10)
    assert logits.shape == (0, CLASSES)
    assert info.exit_index.shape == (0,) and info.flops == 0.0 and info.flops_per_row.shape == (0,)


def test_anytime_policy_still_exits_early_under_a_budget():
    model = mlp(ConfidencePolicy("maxprob", [0.0, 0.0, 0.0]))  # everyone exits at the first exit
    x = inputs(5)
    runner = AnytimeRunner(model)
    _, info = runner(x, budget_flops=1e9, per_example_budget=torch.full((5,), 1e9))
    assert info.exit_index.tolist() == [0] * 5
    assert info.stop_counts["policy"] == 5


# -- curves -----------------------------------------------------------------------------------------
def test_anytime_curve_accuracy_against_budget_and_plot(tmp_path):
    model = mlp()
    x = inputs(64, seed=5)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = the full model's prediction: full budget -> accuracy 1
        y[::4] = (y[::4] + 1) % CLASSES  # ... except every fourth row
    runner = AnytimeRunner(model)
    stage, head = runner.costs(x)
    budgets = [reach_cost(stage, head, k) for k in range(model.num_exits)]
    curve = anytime_curve(model, (x, y), budgets, batch_size=20)
    assert [p["budget"] for p in curve] == budgets
    assert [p["exit_counts"] for p in curve] == [[64 if j == k else 0 for j in range(4)] for k in range(4)]
    assert curve[-1]["accuracy"] == pytest.approx(0.75)
    for k, p in enumerate(curve):
        dense = model.exit_logits(x)[k].argmax(1)
        assert p["accuracy"] == pytest.approx(float((dense == y).float().mean()))
        assert p["flops_per_example"] == pytest.approx(budgets[k])
    batch_curve = anytime_curve(model, (x, y), budgets, per_example=False, batch_size=16)
    assert [p["exit_counts"] for p in batch_curve] == [p["exit_counts"] for p in curve]
    path = plot_anytime_curve({"mlp": curve, "batch budget": batch_curve}, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- EANN ---------------------------------------------------------------------------------------------
def eann(depths=(1, 2, 4)):
    torch.manual_seed(0)
    return EANN(exponential_mlp_networks(WIDTHS[0], CLASSES, depths, width=12)).eval()


def test_anytime_eann_budget_returns_latest_exit_across_networks():
    model = eann()
    assert model.num_exits == 7
    assert [model.exit_owner(k) for k in range(7)] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    x = inputs(9)
    runner = AnytimeRunner(model)
    stage, head = runner.costs(x)
    # stage costs: each network's first block reads the input (10 -> 12), later blocks 12 -> 12
    assert stage[0] == stage[1] == stage[3] and stage[2] == stage[4]
    reach = [reach_cost(stage, head, k) for k in range(7)]
    budget = torch.tensor([reach[i % 7] for i in range(9)], dtype=torch.float64)
    logits, info = runner(x, per_example_budget=budget)
    assert info.exit_index.tolist() == [i % 7 for i in range(9)]
    assert (info.flops_per_row <= budget).all()
    torch.testing.assert_close(logits, dense_at(model, x, info.exit_index), atol=1e-5, rtol=1e-5)
    # each stage ran only on the rows that reached it (the rows whose exit is at or after it)
    assert info.rows_run == [int((info.exit_index >= k).sum()) for k in range(7)]
    _, batch = runner(x, budget_flops=9 * reach[3])
    assert batch.exit_index.tolist() == [3] * 9 and batch.flops <= 9 * reach[3]


def test_anytime_eann_without_budget_is_the_deepest_network():
    model = eann()
    x = inputs(5)
    with torch.no_grad():
        logits = model(x)
        expected = model.networks[-1].exit_logits(x)[-1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    model.set_policy(ConfidencePolicy("maxprob", [0.0] + [2.0] * 5))  # everyone exits at exit 0
    _, info = model(x, return_info=True)
    assert info.exit_index.tolist() == [0] * 5


def test_anytime_eann_rejects_bad_networks():
    with pytest.raises(ValueError, match="networks"):
        EANN([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        EANN([])
    with pytest.raises(ValueError, match="depths"):
        exponential_mlp_networks(4, 2, depths=(1, 0))


@pytest.mark.parametrize("weighting", ["adaloss", "oscillating"])
def test_anytime_training_uses_the_shared_weightings(weighting):
    model = eann(depths=(1, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, WIDTHS[0], generator=g)
    y = (x[:, 0] > 0).long()
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    before = [p.detach().clone() for p in model.parameters()]
    history = train_anytime(model, loader, epochs=2, lr=1e-2, weighting=weighting, progress=False)
    assert len(history) == 2 and all(h["steps"] == 8 for h in history)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    loss = anytime_loss(3, weighting)
    assert isinstance(loss.weighting, AdaLossWeighting if weighting == "adaloss" else OscillatingWeighting)
    out = [torch.randn(4, CLASSES, requires_grad=True) for _ in range(3)]
    value = loss(out, torch.zeros(4, dtype=torch.long))
    assert value.requires_grad and loss.last["weights"].mean() == pytest.approx(1.0)


def test_anytime_predict_does_not_keep_its_model_alive():
    """The shared runner lives with its model: a model used once by ``anytime_predict`` is freed with it."""
    import gc
    import weakref

    model = sleepy_net([0, 0])
    anytime_predict(model, torch.randn(3, 6))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
