"""D2NN: controllers route rows on the executor; each branch sees only its rows; training lowers cost.

The reference for routing is a dense evaluation written here (every node on every row, routes from
the controllers' argmax), independent of the executor.
"""

import pytest
import torch
from torch import nn

from adaexit.executor import SOURCE, Node
from adaexit.heads import ExitHead
from adaexit.kernels import _dispatch
from adaexit.routing import (
    D2NN,
    Controller,
    D2NNTrainer,
    cascade_d2nn,
    chain_d2nn,
    hierarchy_d2nn,
    high_low_d2nn,
)
from helpers import RowCounter

IN, CLASSES = 8, 3
BUILDERS = {
    "high_low": lambda: high_low_d2nn(IN, CLASSES, width=8, high_width=16),
    "cascade": lambda: cascade_d2nn(IN, CLASSES, widths=(6, 12, 24)),
    "chain": lambda: chain_d2nn(IN, CLASSES, width=12, depth=3),
    "hierarchy": lambda: hierarchy_d2nn(IN, CLASSES, width=10, branching=(3, 2)),
}


def spread_controllers(model, seed=0):
    """Random controller weights large enough that every action is taken by some rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in model.controllers.values():
            c.out.weight.copy_(torch.randn(c.out.weight.shape, generator=g) * 3)
            c.out.bias.zero_()
    return model.eval()


@torch.no_grad()
def dense_reference(model, x):
    """Every node on every row; each row follows its controllers' argmax. Returns logits, exit node,
    the rows reaching each node (bool [N] per node)."""
    n = x.shape[0]
    reach = {0: torch.ones(n, dtype=torch.bool)}
    carried = {}
    out = torch.zeros(n, CLASSES)
    exit_index = torch.full((n,), -1)
    for i, node in enumerate(model.nodes):
        r = reach.get(i, torch.zeros(n, dtype=torch.bool))
        reach[i] = r
        h = node.module(x if node.takes == SOURCE else carried[i])
        routes = model.routes(i)
        if routes:
            route = torch.tensor(routes)[model.controllers[str(i)](h).argmax(1)]
        else:
            route = torch.full((n,), 0 if not node.successors else 1)
        exits = r & (route == 0)
        if node.head is not None:
            out[exits] = node.head(h)[exits].float()
        exit_index[exits] = i
        for j, s in enumerate(node.successors):
            m = r & (route == j + 1)
            reach[s] = reach.get(s, torch.zeros(n, dtype=torch.bool)) | m
            mask = m.view(-1, *([1] * (h.dim() - 1)))
            carried[s] = torch.where(mask, h, carried.get(s, torch.zeros_like(h)))
    return out, exit_index, reach


@pytest.mark.parametrize("topology", sorted(BUILDERS))
def test_d2nn_routing_matches_dense_reference_and_loses_nothing(topology):
    model = spread_controllers(BUILDERS[topology]())
    x = torch.randn(50, IN)
    logits, info = model(x, return_info=True)
    ref_logits, ref_exit, reach = dense_reference(model, x)
    assert (info.exit_index >= 0).all()  # every row exactly one prediction
    assert torch.equal(info.exit_index, ref_exit)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert info.rows_run == [int(reach[i].sum()) for i in range(len(model.nodes))]
    assert sum(info.exit_counts) == 50
    # routing is per example: a shuffled batch gives the shuffled answers
    perm = torch.randperm(50)
    shuffled, info_p = model(x[perm], return_info=True)
    torch.testing.assert_close(shuffled, logits[perm])
    assert torch.equal(info_p.exit_index, info.exit_index[perm])


def test_d2nn_routing_each_branch_runs_only_on_its_rows():
    model = high_low_d2nn(IN, CLASSES, width=8, high_width=16)
    high_rows = RowCounter(model.nodes[1].module)  # high branch
    low_rows = RowCounter(model.nodes[2].module)  # low branch
    spread_controllers(model)
    x = torch.randn(40, IN)
    with torch.no_grad():
        choice = model.controllers["0"](x).argmax(1)  # stem is the identity: the controller reads x
    assert 0 < int((choice == 0).sum()) < 40  # both branches get rows
    model.node_flops(x)  # FLOPs are traced on one example: done before recording
    high_rows.clear()
    low_rows.clear()
    model(x)
    high, low = high_rows.inputs, low_rows.inputs
    assert len(high) == len(low) == 1
    assert torch.equal(high[0], x[choice == 0])  # exactly its rows, in their original order
    assert torch.equal(low[0], x[choice == 1])


def test_d2nn_routing_hierarchy_branches_see_only_their_rows():
    model = spread_controllers(hierarchy_d2nn(IN, CLASSES, width=10, branching=(3, 2)), seed=1)
    counters = [RowCounter(node.module) for node in model.nodes]
    x = torch.randn(60, IN)
    model.node_flops(x)
    _, _, reach = dense_reference(model, x)
    for counter in counters:  # reset: FLOP tracing and the reference ran every module
        counter.clear()
    model(x)
    for i, counter in enumerate(counters):
        rows = int(reach[i].sum())
        assert sum(t.shape[0] for t in counter.inputs) == rows, f"node {i}"
    leaves = [i for i, node in enumerate(model.nodes) if not node.successors]
    assert sum(int(reach[i].sum()) for i in leaves) == 60  # each row reaches exactly one leaf
    assert sum(1 for i in leaves if reach[i].any()) >= 2


def test_d2nn_routing_one_host_sync_per_controller_decision():
    model = spread_controllers(chain_d2nn(IN, CLASSES, width=12, depth=3))
    x = torch.randn(30, IN)
    model.node_flops(x)
    before = _dispatch.host_sync_count()
    _, info = model(x, return_info=True)
    decided = sum(1 for i in range(len(model.nodes)) if model.routes(i) and info.rows_run[i])
    assert _dispatch.host_sync_count() - before == decided


def test_d2nn_routing_cost_accounting():
    model = spread_controllers(high_low_d2nn(IN, CLASSES, width=8, high_width=16))
    x = torch.randn(32, IN)
    flops = model.node_flops(x)
    full = model.max_path_flops(x)
    assert full == flops[0] + max(flops[1], flops[2]) + flops[3]
    info = model.rollout(x)  # an eval-mode rollout: every row's cost, the most expensive path
    took_high = torch.tensor([1 if float(c) > 0.99 else 0 for c in info.cost])
    with torch.no_grad():
        choice = model.controllers["0"](x).argmax(1)
    assert torch.equal(took_high, (choice == 0).long())
    per_row = torch.where(choice == 0, full, flops[0] + flops[2] + flops[3]).double()
    torch.testing.assert_close(info.cost.double() * full, per_row)
    assert info.flops == pytest.approx(float(info.cost.double().sum()) * full)
    assert info.flops <= info.max_flops
    _, exit_info = model(x, return_info=True)  # the one info type: the same FLOPs, per row too
    assert exit_info.flops == info.flops and exit_info.full_flops == info.max_flops
    torch.testing.assert_close(exit_info.flops_per_row, per_row)


def test_d2nn_routing_training_rollout_is_sparse_and_differentiable():
    model = spread_controllers(high_low_d2nn(IN, CLASSES, width=8, high_width=16)).train()
    x = torch.randn(48, IN)
    torch.manual_seed(3)
    out = model(x)
    assert out.log_prob.requires_grad and out.logits.requires_grad
    (out.logits.sum() + out.log_prob.sum()).backward()
    ctrl = model.controllers["0"].out.weight.grad
    assert ctrl is not None and ctrl.abs().sum() > 0
    # the branch that got no rows gets no gradient; both got rows here, so both have one
    assert out.rows_run[1] + out.rows_run[2] == 48
    for i in (1, 2):
        grads = [p.grad for p in model.nodes[i].module.parameters()]
        assert all((g is not None) == (out.rows_run[i] > 0) for g in grads)


def test_d2nn_routing_empty_batch():
    for build in BUILDERS.values():
        model = spread_controllers(build())
        logits, info = model(torch.zeros(0, IN), return_info=True)
        assert logits.shape == (0, CLASSES)
        assert info.exit_index.shape == (0,) and info.flops == 0.0


def test_d2nn_bad_graphs_raise_value_error_naming_the_node():
    lin = lambda: nn.Linear(4, 4)  # noqa: E731
    head = lambda: ExitHead(4, 2)  # noqa: E731
    two_ways = [Node("a", lin(), None, (1, 2), SOURCE), Node("b", lin(), head()), Node("c", lin(), head())]
    with pytest.raises(ValueError, match=r"node 0 \(a\).*no controller"):
        D2NN(two_ways)
    one_way = [Node("a", lin(), None, (1,), SOURCE), Node("b", lin(), head())]
    with pytest.raises(ValueError, match=r"node 0 \(a\).*only one way"):
        D2NN(one_way, {0: Controller(4, 2)})
    with pytest.raises(ValueError, match=r"node 1 \(b\) is a leaf"):
        D2NN(one_way, {1: Controller(4, 2)})
    with pytest.raises(ValueError, match=r"node 0 \(a\).*3 actions"):
        D2NN(two_ways, {0: Controller(4, 3)})
    with pytest.raises(ValueError, match="controllers"):
        D2NN(two_ways, {5: Controller(4, 2)})
    unreachable = [Node("a", lin(), None, (2,), SOURCE), Node("b", lin(), head()), Node("c", lin(), head())]
    with pytest.raises(ValueError, match=r"node 1 \(b\) is unreachable"):
        D2NN(unreachable)
    with pytest.raises(ValueError, match="num_actions"):
        Controller(4, 1)

    class Wrong(nn.Module):  # a controller with no declared action count that returns 3 scores
        def forward(self, h):
            return h[:, :3]

    model = D2NN(two_ways, {0: Wrong()}).eval()
    with pytest.raises(ValueError, match=r"node 0 \(a\): its controller returned shape"):
        model(torch.randn(5, 4))


def easy_hard_task(n, seed):
    """Half the rows are easy (flag +2; label = sign of x1: linear) and half hard (flag -2; label =
    sign of x1 * x2: needs the high-capacity branch). The controller can see the flag."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    easy = torch.rand(n, generator=g) < 0.5
    x[:, 0] = torch.where(easy, 2.0, -2.0)
    y = torch.where(easy, (x[:, 1] > 0).long(), (x[:, 1] * x[:, 2] > 0).long())
    return x, y, easy


def test_d2nn_controller_training_lowers_cost_at_equal_accuracy():
    torch.manual_seed(0)
    x, y, _ = easy_hard_task(2048, seed=1)
    x_test, y_test, easy_test = easy_hard_task(1024, seed=2)
    model = high_low_d2nn(IN, 2, width=16, high_width=64)
    assert model.actions(0) == ["node 1", "node 2"]  # high, low
    trainer = D2NNTrainer(model, lam=0.3, lr=1e-2, controller_lr=5e-2)
    trainer.fit((x, y), epochs=0, warmup_epochs=8)  # modules learn on uniformly random routes
    with torch.no_grad():  # start from a controller that sends everything to the expensive branch
        model.controllers["0"].out.weight.zero_()
        model.controllers["0"].out.bias.copy_(torch.tensor([1.5, -1.5]))
    model.eval()
    logits, before = model(x_test), model.rollout(x_test)
    acc_before = float((logits.argmax(1) == y_test).float().mean())
    assert before.mean_cost == pytest.approx(1.0)  # everyone on the most expensive path

    history = trainer.fit((x, y), epochs=6)
    assert not any(h["warmup"] for h in history)
    model.eval()
    logits, after = model(x_test), model.rollout(x_test)
    acc_after = float((logits.argmax(1) == y_test).float().mean())
    assert after.mean_cost < 0.7 * before.mean_cost
    assert acc_after >= acc_before - 0.02
    low = after.cost < 0.5  # rows that took the cheap branch
    assert float(low[easy_test].float().mean()) > 0.8  # the controller learned the easy/hard split
    assert float(low[~easy_test].float().mean()) < 0.2
