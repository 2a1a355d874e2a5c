"""Cascade / network selection: nothing lost, per-example equivalence, skipping, costs, oracle, errors."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaexit
from adaexit import ConfidencePolicy, EarlyExitNet, ExitHead, NeverExitPolicy
from adaexit.cascade import Cascade, NetworkSelectionPolicy
from adaexit.evaluation import cascade_oracle, collect, evaluate_policy, frontier_table, policy_frontier
from adaexit.policies import RoutingPolicy
from adaexit.reports import plot_frontier
from adaexit.simulation import prob_features
from adaexit.calibration import calibrate
from adaexit.simulation import full_cost
from adaexit.calibration.thresholds import ChainSearch, route_options
from adaexit.cost import chain_flops, count_flops
from adaexit.executor import ExecutionTrace
from adaexit.kernels import _dispatch
from adaexit.simulation import budget_losses, simulate_routes
from helpers import RowCounter, dense_scores, easy_hard, first_exit, fit, mlp_net, randn_inputs, round_trip

CLASSES = 5
DIM = 8
HYPO = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------
# models and reference computations
# ---------------------------------------------------------------------------------------------
def mlp(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def een(seed):
    return mlp_net([DIM, 16, 16], CLASSES, seed=seed)  # a 2-exit EarlyExitNet


def build(kind, policy=None):
    """``networks``: 3 whole networks; ``with_een``: net, 2-exit EarlyExitNet, net (4 nodes);
    ``een_first``: 2-exit EarlyExitNet then a net (3 nodes: 0 source, 1 carry, 2 source)."""
    small, medium, large = mlp([DIM, CLASSES], 1), mlp([DIM, 16, CLASSES], 2), mlp([DIM, 32, 32, CLASSES], 3)
    models = {
        "networks": [small, medium, large],
        "with_een": [small, een(4), large],
        "een_first": [een(5), large],
    }[kind]
    # example_input: the class-count probe (one row through every node) runs now, not in a forward
    return Cascade(models, policy, example_input=torch.zeros(1, DIM)).eval()


KINDS = ("networks", "with_een", "een_first")


def inputs(n, seed=0):
    return randn_inputs(n, DIM, seed, scale=3)


class TablePolicy(RoutingPolicy):
    """Routes row ``i`` at node ``k`` to ``table[k][i]``; the row id travels as per-example state."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def init_state(self, n, device):
        return {"row": torch.arange(n, device=device)}

    def decide_route(self, k, head, h, state):
        logits = head(h)
        route = self.table[k][state["row"]] if k < len(self.table) else torch.zeros_like(state["row"])
        return logits, route, state


def follow(table, successors, n):
    """Reference walk of a route table: (exit node per row, bool [K, n] nodes visited)."""
    K = len(successors)
    visited = torch.zeros(K, n, dtype=torch.bool)
    exits = torch.empty(n, dtype=torch.long)
    for i in range(n):
        k = 0
        while True:
            visited[k, i] = True
            r = int(table[k][i]) if successors[k] else 0
            if r == 0:
                exits[i] = k
                break
            k = successors[k][r - 1]
    return exits, visited


# ---------------------------------------------------------------------------------------------
# graph, nothing lost, equivalence
# ---------------------------------------------------------------------------------------------
def test_graph_numbering_and_successors():
    c = build("with_een")
    assert c.num_exits == 4
    assert c.node_members() == [0, 1, 1, 2]
    # next node first (so an exit mask maps to 0/1), then later network entries; never mid-EarlyExitNet
    assert c.successors == [(1, 3), (2, 3), (3,), ()]
    assert "exit 1" in c.node_names[2]
    c2 = build("een_first")
    assert c2.successors == [(1, 2), (2,), ()]


@pytest.mark.parametrize("kind", KINDS)
def test_exit_logits_match_each_network(kind):
    c = build(kind)
    x = inputs(7)
    with torch.no_grad():
        got = c.exit_logits(x)
        expected = []
        for model in c.models:
            expected += model.exit_logits(x) if isinstance(model, EarlyExitNet) else [model(x)]
    assert len(got) == c.num_exits == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_train_mode_returns_every_node():
    c = build("with_een").train()
    x = inputs(6)
    outs = c(x)
    assert isinstance(outs, list) and len(outs) == 4 and all(o.shape == (6, CLASSES) for o in outs)
    outs[-1].sum().backward()  # differentiable end to end
    assert c.models[2][0].weight.grad is not None
    with pytest.raises(ValueError, match="eval"):
        c(x, return_info=True)


@HYPO
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 40),
    criterion=st.sampled_from(["maxprob", "margin", "entropy"]),
    data=st.data(),
)
def test_confidence_per_example_equivalence(kind, n, criterion, data):
    """Batch result == each row alone == the dense reference, for random sizes, orders, thresholds."""
    c = build(kind)
    thresholds = data.draw(st.lists(st.floats(0.0, 1.05), min_size=c.num_exits - 1, max_size=c.num_exits - 1))
    c.set_policy(ConfidencePolicy(criterion, thresholds))
    perm_seed = data.draw(st.integers(0, 10_000))
    x = inputs(n, seed=perm_seed)[torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))]
    scores, dense = dense_scores(c, x, criterion)
    expected = first_exit(scores, thresholds)
    t = torch.tensor([th if th <= 1 else math.inf for th in thresholds])[:, None]
    clear = ((scores[:-1] - t).abs() > 1e-4).all(dim=0)  # rows far from every threshold

    with torch.no_grad():
        logits, info = c(x, return_info=True)
        alone = [c(x[i : i + 1], return_info=True) for i in range(n)]

    # nothing lost: exactly one prediction and a valid exit index per row
    assert logits.shape == (n, CLASSES)
    assert sum(info.exit_counts) == n and info.exit_index.shape == (n,)
    assert bool(((info.exit_index >= 0) & (info.exit_index < c.num_exits)).all())
    assert torch.bincount(info.exit_index, minlength=c.num_exits).tolist() == info.exit_counts
    stacked = torch.stack(dense)
    torch.testing.assert_close(logits, stacked[info.exit_index, torch.arange(n)], rtol=1e-5, atol=1e-5)
    for i in torch.nonzero(clear).flatten().tolist():
        assert int(info.exit_index[i]) == int(expected[i]) == int(alone[i][1].exit_index[0])
        torch.testing.assert_close(logits[i], alone[i][0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_routed_past_a_node_never_run_it(kind):
    c = build(kind, ConfidencePolicy("maxprob", [0.6] * (build(kind).num_exits - 1)))
    nodes = c.graph()
    x = inputs(200, seed=3)
    scores, _ = dense_scores(c, x, "maxprob")
    expected = first_exit(scores, [0.6] * (c.num_exits - 1))
    c.exit_costs(x)  # FLOPs are counted (on one row) and cached before the counters start
    counters = [RowCounter(node.module) for node in nodes]
    with torch.no_grad():
        _, info = c(x, return_info=True)
    for k, ctr in enumerate(counters):
        reach = expected >= k
        assert ctr.rows == info.rows_run[k] == int(reach.sum()), f"node {k}"
        if nodes[k].takes == "source" and ctr.rows:
            # exactly the rows that did not exit earlier, in their original order
            torch.testing.assert_close(torch.cat(ctr.inputs), x[reach])
    assert 0 < info.exit_counts[0] < 200  # the test exercises a real split


def test_skip_straight_to_the_last_network():
    c = build("networks")
    x = inputs(33, seed=4)
    c.exit_costs(x)  # FLOPs are counted (on one row) and cached before the counters start
    counters = [RowCounter(m) for m in c.models]
    n = x.shape[0]
    skip = torch.full((n,), 2)  # route 2 at node 0 = successors[0][1] = node 2
    c.set_policy(TablePolicy([skip, torch.ones(n, dtype=torch.long)]))
    with torch.no_grad():
        logits, info = c(x, return_info=True)
        expected = c.models[2](x)
    assert counters[1].rows == 0 and info.rows_run == [n, 0, n]
    assert info.exit_counts == [0, 0, n] and bool((info.exit_index == 2).all())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert info.flops == pytest.approx(n * (count_flops(c.models[0], x[:1]) + count_flops(c.models[2], x[:1])))


def test_skip_past_the_rest_of_an_early_exit_net():
    c = build("een_first")  # node 0 = EEN stage 0 (source), 1 = EEN stage 1 (carry), 2 = net (source)
    x = inputs(20, seed=5)
    c.exit_costs(x)
    with torch.no_grad():
        dense = torch.stack(c.exit_logits(x))
    counters = [RowCounter(node.module) for node in c.graph()]
    route0 = torch.tensor([0, 1, 2] * 6 + [2, 2])
    c.set_policy(TablePolicy([route0, torch.tensor([0, 1] * 10)]))
    with torch.no_grad():
        logits, info = c(x, return_info=True)
    exits, visited = follow([route0, torch.tensor([0, 1] * 10)], c.successors, 20)
    assert torch.equal(info.exit_index, exits)
    assert [ctr.rows for ctr in counters] == visited.sum(1).tolist() == info.rows_run
    torch.testing.assert_close(logits, dense[exits, torch.arange(20)], rtol=1e-5, atol=1e-5)


@HYPO
@given(kind=st.sampled_from(KINDS), n=st.integers(0, 30), seed=st.integers(0, 10_000))
def test_random_multiway_routes(kind, n, seed):
    """Any table of routes (merges included): nothing lost, each row exits where its route says, each
    node runs exactly the rows that visit it, and per-example state travels with its row."""
    c = build(kind)
    g = torch.Generator().manual_seed(seed)
    table = [torch.randint(0, 1 + len(s), (n,), generator=g) for s in c.successors[:-1]]
    c.set_policy(TablePolicy(table))
    x = inputs(n, seed=seed)
    with torch.no_grad():
        dense = torch.stack(c.exit_logits(x)) if n else None
    if n:
        c.exit_costs(x)
    counters = [RowCounter(node.module) for node in c.graph()]
    with torch.no_grad():
        logits, info = c(x, return_info=True)
    exits, visited = follow(table, c.successors, n)
    assert logits.shape == (n, CLASSES)
    assert torch.equal(info.exit_index, exits)
    assert info.rows_run == visited.sum(1).tolist()
    assert [ctr.rows for ctr in counters] == info.rows_run
    if n:
        torch.testing.assert_close(logits, dense[exits, torch.arange(n)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sync", [True, False])
def test_a_router_that_loses_rows_is_named_in_both_modes(sync):
    """Routes outside [0, 1 + successors) lose rows. The syncing mode names the node when it runs; the
    zero-sync mode cannot look, so the lost rows get NaN logits and exit_index -1, and reading the info
    raises: never a plausible wrong answer."""
    c = build("networks")
    n = 8
    table = [torch.tensor([0, 1] * 4), torch.tensor([0, 0, 0, 9] * 2)]  # rows 3 and 7 take route 9 at node 1
    c.set_policy(TablePolicy(table)).set_execution(sync=sync)
    x = inputs(n, seed=3)
    with torch.no_grad():
        if sync:
            with pytest.raises(ValueError, match=r"node 1 \(model 1 .*routes in \[0, 9\], outside \[0, 2\)"):
                c(x)
            # streamed, the partition runs on route x batch: the message still quotes the router's own routes
            with pytest.raises(ValueError, match=r"node 1 \(model 1 .*routes in \[0, 9\], outside \[0, 2\)"):
                list(adaexit.stream(c, [x[:4], x[4:]], batch_size=8))
            return
        logits = c(x)
        assert torch.isnan(logits[[3, 7]]).all() and not torch.isnan(logits[[0, 1, 2, 4, 5, 6]]).any()
        with pytest.raises(ValueError, match=r"lost rows \(2 of 8; their logits are NaN"):
            c(x, return_info=True)
    trace = ExecutionTrace(torch.tensor([0, -1]), counts=torch.tensor([[1], [2], [2]]))
    for _ in range(2):  # every read of a trace that lost rows raises, not just the first
        with pytest.raises(ValueError, match=r"lost rows \(1 of 2"):
            trace.settle()


def test_one_host_sync_per_decision():
    c = build("with_een", ConfidencePolicy("maxprob", [0.6, 0.6, 0.6]))
    x = inputs(64, seed=9)
    with torch.no_grad():
        c(x)  # warm: the first forward of a fresh cascade may probe the class count
        before = _dispatch.host_sync_count()
        _, info = c(x, return_info=True)
    decisions = sum(1 for k in range(c.num_exits - 1) if info.rows_run[k])  # the last node needs none
    assert _dispatch.host_sync_count() - before == decisions


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["networks", "een_first"])
def test_triton_kernels_route_like_the_torch_path(triton_backend, kind):
    """The same sparse execution through the Triton kernels (interpreter): 3-way partition, gather,
    scatter and the fused gate on logits."""
    c = build(kind)
    n = 12
    x = inputs(n, seed=10)
    table = [torch.tensor([0, 1, 2] * 4), torch.tensor([0, 1] * 6)]
    with torch.no_grad():
        dense = torch.stack(c.exit_logits(x))
    for policy in (TablePolicy(table), ConfidencePolicy("maxprob", [0.5] * (c.num_exits - 1))):
        c.set_policy(policy)
        with torch.no_grad():
            logits, info = c(x, return_info=True)
        torch.testing.assert_close(logits, dense[info.exit_index, torch.arange(n)], rtol=1e-5, atol=1e-5)
        if isinstance(policy, TablePolicy):
            exits, visited = follow(table, c.successors, n)
            assert torch.equal(info.exit_index, exits) and info.rows_run == visited.sum(1).tolist()


def test_never_exit_runs_every_network_and_returns_the_last():
    c = build("networks")  # default policy: NeverExitPolicy
    assert isinstance(c.policy, NeverExitPolicy)
    x = inputs(9)
    with torch.no_grad():
        logits, info = c(x, return_info=True)
        torch.testing.assert_close(logits, c.models[2](x))
    assert info.rows_run == [9, 9, 9] and info.exit_counts == [0, 0, 9] and info.rows_decided == [0, 0, 9]


def test_nan_logits_never_exit_early():
    class NaNForFlagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp([DIM, CLASSES], 7)

        def forward(self, x):
            out = self.net(x)
            return torch.where(x[:, :1] > 100, torch.full_like(out, float("nan")), out)

    x = inputs(10)
    x[::3, 0] = 1000.0
    flagged = x[:, 0] > 100
    for policy in (ConfidencePolicy("maxprob", [0.0, 0.0]), NetworkSelectionPolicy()):
        c = Cascade([NaNForFlagged(), mlp([DIM, 16, CLASSES], 2), mlp([DIM, CLASSES], 3)], policy).eval()
        with torch.no_grad():
            logits, info = c(x, return_info=True)
        assert bool((info.exit_index[flagged] > 0).all()), type(policy).__name__
        assert bool(torch.isfinite(logits[flagged]).all())


def test_empty_batch():
    c = build("networks", ConfidencePolicy("maxprob", [0.5, 0.5]))
    with torch.no_grad():
        logits, info = c(torch.zeros(0, DIM), return_info=True)
    assert logits.shape == (0, CLASSES)
    assert info.exit_index.shape == (0,) and info.exit_counts == [0, 0, 0] and info.flops == 0.0


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_mismatched_class_counts_are_named():
    a, b = mlp([DIM, CLASSES], 1), mlp([DIM, 16, 3], 2)
    x = inputs(4)
    with pytest.raises(ValueError, match=r"node 0 .*predicts 5, node 1 .*predicts 3"):
        Cascade([a, b], example_input=x)
    # without example_input: the first eval forward finds it, even when every row would exit at node 0
    c = Cascade([a, b], ConfidencePolicy("maxprob", [0.0])).eval()
    with pytest.raises(ValueError, match=r"node 1 \(model 1"):
        c(x)
    with pytest.raises(ValueError, match="number of classes"):
        c.train()(x)
    # an early-exit net's heads count as nodes too
    bad_een = EarlyExitNet([nn.Sequential(nn.Linear(DIM, 16), nn.ReLU())], [ExitHead(16, 4)])
    with pytest.raises(ValueError, match=r"node 1 \(model 1 \(EarlyExitNet\) exit 0\) predicts 4"):
        Cascade([a, bad_een], example_input=x)


def test_wrong_threshold_count():
    with pytest.raises(ValueError, match="3 thresholds but the model has 3 exits"):
        build("networks", ConfidencePolicy("maxprob", [0.5, 0.5, 0.5]))
    # the flattened early-exit net makes 4 nodes: 3 thresholds needed
    with pytest.raises(ValueError, match="len\\(thresholds\\) == 3"):
        build("with_een", ConfidencePolicy("maxprob", [0.5, 0.5]))
    with pytest.raises(ValueError, match="len\\(thresholds\\) == 2"):
        build("networks").set_policy(ConfidencePolicy("maxprob", [0.5]))


def test_bad_models():
    with pytest.raises(ValueError, match="empty"):
        Cascade([])
    with pytest.raises(ValueError, match=r"models\[1\]"):
        Cascade([nn.Linear(DIM, CLASSES), "resnet"])
    with pytest.raises(ValueError, match="do not nest"):
        Cascade([nn.Linear(DIM, CLASSES), build("networks")])
    with pytest.raises(ValueError, match="logits"):
        Cascade([nn.Linear(DIM, 1)], example_input=inputs(2))


# ---------------------------------------------------------------------------------------------
# costs (the calibration protocol)
# ---------------------------------------------------------------------------------------------
def test_exit_costs_and_info_flops():
    c = build("with_een", ConfidencePolicy("maxprob", [0.6, 0.6, 0.6]))
    x = inputs(64, seed=6)
    stage, head = c.exit_costs(x, "flops")
    een_stage, een_head = chain_flops(c.models[1].stages, c.models[1].heads, x)
    assert stage == [count_flops(c.models[0], x[:1]), *een_stage, count_flops(c.models[2], x[:1])]
    assert head == [0.0, *een_head, 0.0]
    assert c.node_costs(x) == [stage[0], een_stage[0] + een_head[0], sum(een_stage) + een_head[1], stage[3]]
    with torch.no_grad():
        _, info = c(x, return_info=True)
    spent = sum(r * s for r, s in zip(info.rows_run, stage)) + sum(r * h for r, h in zip(info.rows_decided, head))
    assert info.flops == pytest.approx(spent)
    assert info.full_flops == pytest.approx(64 * stage[3])  # the strongest single network alone
    latency_stage, latency_head = c.exit_costs(x, "latency")
    # every node's decision is timed too: a whole network's LogitsHead runs the gate on its logits
    assert len(latency_stage) == 4 and all(t > 0 for t in latency_stage + latency_head)
    with pytest.raises(ValueError, match="cost"):
        c.exit_costs(x, "joules")


# ---------------------------------------------------------------------------------------------
# oracle and frontier helpers
# ---------------------------------------------------------------------------------------------
def one_hot_logits(preds, classes=3):
    return F.one_hot(torch.tensor(preds), classes).float() * 5


def test_oracle_hand_example():
    labels = torch.tensor([0, 1, 2, 0, 1])
    node_logits = [
        one_hot_logits([0, 0, 0, 1, 1]),  # right on rows 0, 4
        one_hot_logits([0, 0, 2, 1, 0]),  # right on rows 0, 2
        one_hot_logits([0, 1, 2, 2, 1]),  # right on rows 0, 1, 2, 4
    ]
    result = cascade_oracle(node_logits, labels, [1.0, 5.0, 10.0])
    assert result.choice.tolist() == [0, 2, 1, 2, 0]  # row 3: nobody is right -> most expensive node
    assert result.accuracy == pytest.approx(4 / 5)
    assert result.mean_cost == pytest.approx((1 + 10 + 5 + 10 + 1) / 5)
    with pytest.raises(ValueError, match="node_costs"):
        cascade_oracle(node_logits, labels, [1.0, 2.0])


@HYPO
@given(n=st.integers(1, 40), k=st.integers(1, 4), seed=st.integers(0, 1000))
def test_oracle_properties(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    logits = [torch.randn(n, 3, generator=g) for _ in range(k)]
    costs = (torch.rand(k, generator=g) * 10 + 0.1).tolist()
    result = cascade_oracle(logits, labels, costs)
    correct = torch.stack([z.argmax(1) == labels for z in logits])
    any_right = correct.any(0)
    assert result.accuracy == pytest.approx(float(any_right.double().mean()))
    assert result.accuracy >= max(float(c.double().mean()) for c in correct) - 1e-12
    for i in range(n):
        j = int(result.choice[i])
        if any_right[i]:
            assert correct[j, i] and costs[j] == min(costs[m] for m in range(k) if correct[m, i])
        else:
            assert costs[j] == max(costs)


def test_frontier_table_and_plot(tmp_path):
    c = build("networks")
    x = inputs(120, seed=8)
    with torch.no_grad():
        y = c.models[2](x).argmax(1)  # labels the big network gets right
    sweep = [(t, ConfidencePolicy("maxprob", [t, t])) for t in (0.3, 0.6, 0.9)]
    points = policy_frontier(c, (x, y), {"confidence": sweep})
    methods = [p.method for p in points]
    assert methods.count("single network") == 3 and methods.count("oracle") == 1 and methods.count("confidence") == 3
    singles = [p for p in points if p.method == "single network"]
    outputs = collect(c, (x, y))
    assert [p.accuracy for p in singles] == pytest.approx(outputs.node_accuracy())
    assert singles[2].accuracy == 1.0
    # each policy point agrees with a direct sparse run
    acc, cost, _ = evaluate_policy(c, (x, y), ConfidencePolicy("maxprob", [0.6, 0.6]))
    point = [p for p in points if p.method == "confidence" and p.setting == "0.6"][0]
    assert (point.accuracy, point.cost) == pytest.approx((acc, cost))
    assert isinstance(c.policy, NeverExitPolicy)  # evaluate_policy restored the cascade's policy
    table = frontier_table(points)
    assert "oracle" in table and table.count("| confidence |") == 3
    path = plot_frontier(points, tmp_path / "frontier.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# a synthetic task with a known easy/hard split (shared by network selection and calibrate)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task():
    """Trained nets: small linear (easy rows only), a costlier *linear* middle net (still easy rows
    only), and an MLP that solves both. The right routing: easy -> exit at 0, hard -> skip to 2."""
    torch.manual_seed(0)
    x, y, hard = easy_hard(1500, 1)
    small = fit(nn.Linear(4, 2), x, y, 150, 2e-2)
    middle = fit(nn.Sequential(nn.Linear(4, 128), nn.Linear(128, 2)), x, y, 150, 1e-2)
    big = fit(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)), x, y, 300, 1e-2)
    test = easy_hard(1000, 2)
    return {"train": (x, y, hard), "test": test, "models": [small, middle, big]}


def test_network_selection_routes_easy_early_and_hard_past_the_middle(task):
    x, y, _ = task["train"]
    xt, yt, hard = task["test"]
    c = Cascade(task["models"]).eval()
    outputs = collect(c, (x, y))
    assert outputs.node_accuracy()[2] > 0.97 > 0.8 > outputs.node_accuracy()[1]  # the task is as designed
    policy = NetworkSelectionPolicy().fit(c, outputs, lam=0.05)
    c.set_policy(policy)
    counter = RowCounter(c.models[1])
    with torch.no_grad():
        logits, info = c(xt, return_info=True)
    e = info.exit_index
    assert float((e[~hard] == 0).float().mean()) >= 0.95  # easy rows exit at the cheap network
    assert float((e[hard] == 2).float().mean()) >= 0.95  # hard rows go to the big one...
    assert counter.rows == info.rows_run[1] <= 0.05 * len(xt)  # ...skipping the useless middle one
    big_acc = float((c.models[2](xt).argmax(1) == yt).float().mean())
    assert float((logits.argmax(1) == yt).float().mean()) >= big_acc - 0.01
    assert info.flops < 0.7 * info.full_flops

    # sweeping lam: a large multiplier buys cost with accuracy
    cheap = NetworkSelectionPolicy().fit(c, outputs, lam=3.0)
    acc_cheap, cost_cheap, exits_cheap = evaluate_policy(c, (xt, yt), cheap)
    acc, cost, _ = evaluate_policy(c, (xt, yt), policy)
    assert cost_cheap < 0.1 * cost and acc_cheap < acc - 0.1 and exits_cheap[0] == len(xt)

    # the fitted policy lives in state_dict
    clone = Cascade(task["models"], NetworkSelectionPolicy()).eval()
    clone.load_state_dict(c.state_dict())
    with torch.no_grad():
        _, info2 = clone(xt, return_info=True)
    assert torch.equal(info2.exit_index, e)


def test_network_selection_bad_arguments(task):
    c = Cascade(task["models"]).eval()
    with pytest.raises(ValueError, match="lam"):
        NetworkSelectionPolicy().fit(c, task["train"][:2], lam=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        NetworkSelectionPolicy(hidden=-1)


def test_calibrate_works_on_a_cascade(task):
    from adaexit import calibration
    x, y, _ = task["train"]
    xt, yt, _ = task["test"]
    c = Cascade(task["models"]).eval()
    result = calibration.calibrate(c, (x, y), max_accuracy_drop=1.0, progress=False, confidence=None)  # the search
    assert c.policy is result.policy
    # the calibration simulation predicts exactly what the sparse cascade does on the same data
    with torch.no_grad():
        logits, info = c(x, return_info=True)
    assert info.exit_counts == result.best.exit_counts
    last_acc = float((c.models[2](x).argmax(1) == y).float().mean())
    acc = float((logits.argmax(1) == y).float().mean())
    assert 100 * (last_acc - acc) <= 1.0 + 1e-9
    assert info.flops / len(x) == pytest.approx(result.best.cost)
    assert info.flops / len(x) < 0.8 * sum(c.exit_costs(x)[0])  # cheaper than running every network
    acc_t, _, _ = evaluate_policy(c, (xt, yt))
    assert acc_t >= float((c.models[2](xt).argmax(1) == yt).float().mean()) - 0.03
    # thresholds on the chain must run the useless middle network for every hard row; network
    # selection skips it, so it is cheaper at the same accuracy -- and calibrate now tries it
    thresholds = min((result.best_by_kind[k] for k in ("uniform", "per_exit")), key=lambda p: p.cost)
    acc_sel, cost_sel, _ = evaluate_policy(c, (x, y), NetworkSelectionPolicy().fit(c, (x, y), lam=0.05))
    assert cost_sel < 0.8 * thresholds.cost and acc_sel >= acc - 0.005
    assert result.best.kind == "selection" and result.best.cost < 0.8 * thresholds.cost
    assert isinstance(c.policy, NetworkSelectionPolicy) and info.rows_run[1] < 0.05 * len(x)


def test_a_fresh_cascade_loads_a_calibrated_threshold_policy():
    torch.manual_seed(0)
    models = [nn.Linear(6, 4), nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))]
    cascade = Cascade(models, ConfidencePolicy("maxprob", [0.4])).eval()
    fresh = Cascade([copy.deepcopy(m) for m in models]).eval()  # default: never exit
    fresh.load_state_dict(cascade.state_dict())
    assert isinstance(fresh.policy, ConfidencePolicy) and fresh.policy.thresholds == [0.4]
    x = torch.randn(64, 6) * 3
    with torch.no_grad():
        a, ia = cascade(x, return_info=True)
        b, ib = fresh(x, return_info=True)
    assert torch.equal(a, b) and torch.equal(ia.exit_index, ib.exit_index)
    assert 0 < ia.exit_counts[0] < 64


# ---------------------------------------------------------------------------------------------
# exact simulation of routing policies (what calibrate's network selection runs on)
# ---------------------------------------------------------------------------------------------
def assert_simulation_is_the_run(c, routes, x, y, decided=None):
    """simulate_routes on dense logits predicts the sparse run row by row: exits, rows, FLOPs."""
    with torch.no_grad():
        dense = torch.stack(c.exit_logits(x))
        logits, info = c(x, return_info=True)
    stage_costs, head_costs = c.exit_costs(x)
    sim = simulate_routes(routes, c.successors, dense.argmax(2) == y, stage_costs, head_costs, decided)
    assert torch.equal(sim.exit_index, info.exit_index)
    assert sim.exit_counts == info.exit_counts
    assert sim.rows_run == info.rows_run and sim.rows_decided == info.rows_decided
    assert sim.total_cost == info.flops  # summed in the same order: exactly equal
    assert sim.accuracy == float((logits.argmax(1) == y).double().mean())
    return sim


@HYPO
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_simulate_routes_follows_any_route_table(kind, n, seed):
    c = build(kind)
    g = torch.Generator().manual_seed(seed)
    routes = torch.stack([torch.randint(0, 1 + len(s), (n,), generator=g) for s in c.successors[:-1]]
                         + [torch.zeros(n, dtype=torch.long)])
    c.set_policy(TablePolicy(list(routes[:-1])))
    x = inputs(n, seed=seed)
    assert_simulation_is_the_run(c, routes, x, torch.randint(0, CLASSES, (n,), generator=g))


def test_simulate_routes_rules_and_errors():
    successors = [(1, 2), (2,), ()]
    correct = torch.tensor([[True, False, False], [False, True, False], [True, True, True]])
    routes = torch.tensor([[0, 1, 2], [0, 0, 0], [0, 0, 0]])
    sim = simulate_routes(routes, successors, correct, [1.0, 2.0, 4.0], [0.5, 0.0, 0.0])
    assert sim.exit_index.tolist() == [0, 1, 2] and sim.rows_run == [3, 1, 1] and sim.rows_decided == [3, 1, 1]
    assert sim.total_cost == 3 * 1.0 + 2.0 + 4.0 + 3 * 0.5 and sim.accuracy == 1.0
    undecided = simulate_routes(routes, successors, correct, [1.0, 2.0, 4.0], [0.5, 0.0, 0.0], [False, True, True])
    assert undecided.exit_index.tolist() == [1, 1, 1] and undecided.rows_decided == [0, 3, 0]  # all go on
    with pytest.raises(ValueError, match="outside"):
        simulate_routes(torch.tensor([[3, 0, 0], [0, 0, 0], [0, 0, 0]]), successors, correct, [1.0] * 3, [0.0] * 3)
    with pytest.raises(ValueError, match="routes must be"):
        simulate_routes(routes[:2], successors, correct, [1.0] * 3, [0.0] * 3)


@pytest.mark.parametrize("kind", ["networks", "with_een"])
def test_a_fitted_network_selection_simulates_exactly(kind):
    """NetworkSelectionPolicy.routes on the dense logits + simulate_routes == the sparse run, row by row
    (skips into an early-exit net and past it included)."""
    c = build(kind)
    x = inputs(600, seed=7)
    with torch.no_grad():
        y = torch.stack(c.exit_logits(x))[-1].argmax(1)  # the last node is right by construction
    y = torch.where(torch.rand(600, generator=torch.Generator().manual_seed(1)) < 0.1, (y + 1) % CLASSES, y)
    outputs = collect(c, (x, y))
    seen = set()
    for lam in (0.01, 0.3, 3.0, 30.0):
        policy = NetworkSelectionPolicy().fit(c, outputs, lam, loss=budget_losses(outputs.correct, "new_errors"))
        c.set_policy(policy)
        sim = assert_simulation_is_the_run(c, policy.routes(outputs.logits), x, y)
        seen.add(tuple(sim.exit_counts))
    assert len(seen) > 1  # the sweep really routes differently


def test_calibrate_tries_network_selection_only_where_rows_can_skip(task):
    x, y, _ = task["train"]
    three = Cascade(task["models"]).eval()
    result = calibrate(three, (x, y), max_accuracy_drop=0.5, progress=False, drop="new_errors")
    assert "selection" in result.best_by_kind
    chosen = result.best_by_kind["selection"]
    assert chosen.kind == "selection" and chosen.cost_weight is not None
    three.set_policy(chosen.policy())
    with torch.no_grad():
        logits, info = three(x, return_info=True)
    assert info.exit_counts == chosen.exit_counts and info.flops / len(x) == pytest.approx(chosen.cost)
    assert 100 * float((logits.argmax(1) == y).double().mean()) == pytest.approx(100 * chosen.accuracy)
    json.dumps(result.to_dict(), allow_nan=False)  # the selection points serialise (without their policy)
    two = Cascade(task["models"][::2]).eval()  # a chain: no row can skip anything
    result = calibrate(two, (x, y), max_accuracy_drop=0.5, progress=False)
    assert not any(p.kind == "selection" for p in result.points)


def test_offsets_move_exactly_the_exit_and_skip_decisions():
    """Zero offsets are the classifiers' argmax (a fitted policy, or one saved before offsets existed);
    an exit offset t moves exactly the rows whose exit margin crosses t, a skip offset u exactly the
    non-exiting rows whose skip margin crosses u (calibrate's exact refinement of selection)."""
    c = build("networks")
    x = inputs(400, seed=3)
    outputs = collect(c, (x, torch.randint(0, CLASSES, (400,), generator=torch.Generator().manual_seed(0))))
    policy = NetworkSelectionPolicy().fit(c, outputs, 0.1)
    routes = policy.routes(outputs.logits)
    with torch.no_grad():
        for k in range(2):
            scores = policy.classifiers[k](prob_features(outputs.logits[k], policy.top_k))
            assert torch.equal(routes[k], scores.argmax(1))
    m = policy.margins(outputs.logits)
    table = [torch.tensor((k,) + s) for k, s in enumerate(c.successors[:-1])]
    assert torch.isfinite(m["skip"][0]).all() and torch.isnan(m["skip"][1]).all()  # node 1 cannot skip
    g = torch.Generator().manual_seed(1)
    for trial in range(4):
        t = (torch.rand(2, generator=g) * 4 - 2).tolist()
        u = [float(torch.randn(1, generator=g)), 0.0]
        if trial == 3:
            t[1], u[0] = math.inf, math.inf
        moved = policy.with_offsets(t, u)
        got = moved.routes(outputs.logits)
        for k in range(2):
            fire = m["exit"][k] >= t[k]
            assert torch.equal(got[k] == 0, fire)
            skip = m["skip"][k] > u[k]
            expected = torch.where(skip, m["skip_to"][k], m["next"][k])
            assert torch.equal(table[k][got[k]][~fire], expected[~fire])
        # saved and loaded with the model; the original is untouched
        clone = Cascade(c.models, NetworkSelectionPolicy()).eval()
        c.set_policy(moved)
        clone.load_state_dict(c.state_dict())
        assert torch.equal(clone.policy.routes(outputs.logits), got)
    assert torch.equal(policy.routes(outputs.logits), routes)
    # a freshly built cascade (default policy) restores the fitted policy from a weights-only checkpoint
    state = round_trip(c.state_dict())
    fresh = Cascade(c.models).eval()
    fresh.load_state_dict(state)
    assert isinstance(fresh.policy, NetworkSelectionPolicy)
    assert torch.equal(fresh.policy.routes(outputs.logits), c.policy.routes(outputs.logits))


@pytest.mark.parametrize("kind", KINDS)
def test_chain_search_follows_skips_exactly(kind):
    """ChainSearch with per-row continuation targets (cont_to) and route_options total exactly what
    simulate_routes gives for the same decisions (the search calibrate runs on network selection)."""
    c = build(kind)
    n = 300
    g = torch.Generator().manual_seed(5)
    K = c.num_exits
    correct = torch.rand(K, n, generator=g) < 0.7
    losses = budget_losses(correct, "new_errors")
    stage, head = (torch.rand(K, generator=g) + 0.1).tolist(), (torch.rand(K, generator=g) * 0.2).tolist()
    full = full_cost(stage, head)
    exit_scores_ = torch.cat([torch.randn(K - 1, n, generator=g), torch.zeros(1, n)])
    skip_scores = torch.randn(K - 1, n, generator=g)
    nxt = torch.stack([torch.full((n,), s[0]) for s in c.successors[:-1]])
    far = torch.stack([torch.full((n,), s[-1]) for s in c.successors[:-1]])  # the last successor

    def simulated(t, u):
        routes = []
        for k, s in enumerate(c.successors[:-1]):
            go = torch.where(skip_scores[k] > u[k], torch.full((n,), len(s)), torch.ones(n, dtype=torch.long))
            routes.append(torch.where(exit_scores_[k] >= t[k], torch.zeros(n, dtype=torch.long), go))
        routes.append(torch.zeros(n, dtype=torch.long))
        sim = simulate_routes(torch.stack(routes), c.successors, correct, stage, head)
        return float(losses[sim.exit_index, torch.arange(n)].sum()), sim.total_cost / full

    for trial in range(3):
        t = (torch.randn(K - 1, generator=g)).tolist()
        u = (torch.randn(K - 1, generator=g)).tolist()
        cont = torch.stack([torch.where(skip_scores[k] > u[k], far[k], nxt[k]) for k in range(K - 1)])
        search = ChainSearch(exit_scores_, losses, stage, head, bounded=False, always_head=[True] * K, cont_to=cont)
        assert search.evaluate(t) == pytest.approx(simulated(t, u), rel=1e-9)
        for k in range(K - 1):
            ts, ls, cs = search.options(k, t)
            for i in range(0, len(ts), max(1, len(ts) // 5)):
                trial_t = list(t)
                trial_t[k] = float(ts[i])
                assert (ls[i], cs[i]) == pytest.approx(simulated(trial_t, u), rel=1e-9)
            if len(c.successors[k]) > 1:
                us, ls, cs = route_options(search, k, t, skip_scores[k], far[k], nxt[k])
                for i in range(0, len(us), max(1, len(us) // 5)):
                    trial_u = list(u)
                    trial_u[k] = float(us[i])
                    assert (ls[i], cs[i]) == pytest.approx(simulated(t, trial_u), rel=1e-9)


def test_a_member_that_prepares_its_own_input_is_refused_by_name():
    """Members read the cascade's input tensor; a wrapped Hugging Face model turns its input into token rows
    (a TokenBatch) of its own, so a cascade refuses it, naming it, instead of feeding it the wrong rows."""
    pytest.importorskip("transformers", reason="the Hugging Face wrappers need transformers (adaexit[hf])")
    from helpers import hf_classifier, hf_layer_names

    from adaexit import wrap

    bert = hf_classifier("bert")
    # (the first member never runs: the refusal comes while the input is prepared)
    c = Cascade([nn.Embedding(100, 4), wrap(bert, exits=hf_layer_names(bert, ks=(1,)))]).eval()
    with pytest.raises(ValueError, match=r"models\[1\] \(TransformerExits\) reads its input as a TokenBatch"):
        c(torch.randint(3, 100, (2, 5)))
