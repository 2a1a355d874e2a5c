"""Guan et al.'s cascade: selection modules trained jointly with the networks by REINFORCE."""

import copy
import math

import pytest
import torch
from torch import nn

from adaexit import ConfidencePolicy, EarlyExitNet, ExitHead, NeverExitPolicy
from adaexit.cascade import Cascade, SelectorPolicy, train_reinforce
from adaexit.evaluation import evaluate_policy
from adaexit.heads import LogitsHead
from helpers import accuracy, easy_hard, fit


def networks(seed=0):
    torch.manual_seed(seed)
    small = nn.Linear(4, 2)
    big = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    return small, big


@pytest.fixture(scope="module")
def data():
    return easy_hard(1200, 1), easy_hard(1000, 2)


@pytest.fixture(scope="module")
def pretrained(data):
    """The two networks trained separately (plain cross-entropy), as a cascade would start from."""
    (x, y, _), _ = data
    small, big = networks()
    return fit(small, x, y, 150, 2e-2), fit(big, x, y, 300, 1e-2)


def test_reinforce_lowers_cost_at_equal_accuracy(data, pretrained):
    (x, y, _), (xt, yt, hard) = data
    c = Cascade(copy.deepcopy(list(pretrained)))
    acc_full, cost_full, _ = evaluate_policy(c, (xt, yt), NeverExitPolicy())  # both networks on every row
    big_alone = c.node_costs(xt)[-1]
    history = train_reinforce(c, SelectorPolicy(), (x, y), cost_weight=0.3, epochs=12, seed=0)
    assert isinstance(c.policy, SelectorPolicy) and not c.training
    assert [h["phase"] for h in history] == ["joint"] * 12
    acc, cost, exits = evaluate_policy(c, (xt, yt))
    assert acc >= acc_full - 0.01  # equal accuracy...
    assert cost < 0.7 * cost_full and cost < 0.75 * big_alone  # ...at a much lower expected cost
    with torch.no_grad():
        _, info = c(xt, return_info=True)
    e = info.exit_index
    assert float((e[~hard] == 0).float().mean()) >= 0.9  # easy rows leave after the small network
    assert float((e[hard] == 1).float().mean()) >= 0.9  # hard rows reach the big one

    # a larger cost multiplier trades accuracy for cost
    c2 = Cascade(copy.deepcopy(list(pretrained)))
    train_reinforce(c2, SelectorPolicy(), (x, y), cost_weight=3.0, epochs=6, seed=0)
    acc2, cost2, _ = evaluate_policy(c2, (xt, yt))
    assert cost2 < 0.5 * cost and acc2 < acc - 0.1


def test_joint_training_from_scratch_with_warmup(data):
    """Untrained networks: a warm-up of plain cross-entropy, then joint REINFORCE training."""
    (x, y, _), (xt, yt, _) = data
    c = Cascade(networks(seed=1))
    history = train_reinforce(
        c, SelectorPolicy(), (x, y), cost_weight=0.3, epochs=10, warmup_epochs=10, lr=1e-2, seed=0
    )
    assert [h["phase"] for h in history] == ["warmup"] * 10 + ["joint"] * 10
    assert history[0]["reward"] is None and history[-1]["reward"] is not None
    assert history[-1]["loss"] < history[0]["loss"]
    acc, cost, _ = evaluate_policy(c, (xt, yt))
    acc_big = accuracy(c.models[1](xt), yt)
    assert acc_big > 0.95 and acc >= acc_big - 0.01
    assert cost < 0.75 * c.node_costs(xt)[-1]


def test_network_loss_modes_train_or_freeze_the_networks(data, pretrained):
    (x, y, _), _ = data
    frozen = Cascade(copy.deepcopy(list(pretrained)))
    before = copy.deepcopy(frozen.state_dict())
    selectors = SelectorPolicy()
    train_reinforce(frozen, selectors, (x[:256], y[:256]), cost_weight=0.3, epochs=1, network_loss="none", seed=0)
    after = frozen.state_dict()
    for key, value in before.items():
        if key.startswith("models."):
            assert torch.equal(value, after[key]), key
    assert any(not torch.equal(before.get(k, torch.empty(0)), v) for k, v in after.items() if "selectors" in k)

    joint = Cascade(copy.deepcopy(list(pretrained)))
    train_reinforce(joint, SelectorPolicy(), (x[:256], y[:256]), cost_weight=0.3, epochs=1, seed=0)
    assert not torch.equal(joint.models[1][0].weight, pretrained[1][0].weight)


def test_reinforce_is_deterministic_with_a_seed(data, pretrained):
    (x, y, _), _ = data
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # the selectors' initialisation
        c = Cascade(copy.deepcopy(list(pretrained)))
        history = train_reinforce(c, SelectorPolicy(), (x[:300], y[:300]), cost_weight=0.3, epochs=2, seed=7)
        runs.append((history, c.state_dict()))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        other = runs[1][1][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_selector_policy_decisions():
    policy = SelectorPolicy(hidden=0, top_k=2, threshold=0.5).bind(3)
    assert len(policy.selectors) == 2
    head = LogitsHead(3)
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0], [float("nan"), 0.0, 0.0]])
    with torch.no_grad():
        lin = policy.selectors[0][-1]
        lin.weight.zero_()
        lin.weight[0, 0] = 10.0  # P(exit) rises with the top-1 probability
        lin.bias.zero_()
        policy.selectors[0][0].mean.fill_(0.6)
        p = policy.exit_probability(0, logits)
        out, exit_mask, _ = policy.decide(0, head, logits, {})
    assert p[0] > 0.5 > p[1] and math.isnan(float(p[2]))
    assert exit_mask.tolist() == [True, False, False]  # NaN never exits early
    torch.testing.assert_close(out, logits, equal_nan=True)
    _, last_mask, _ = policy.decide(2, head, logits, {})
    assert last_mask.all()  # the last node always exits
    policy.threshold = 0.0
    _, mask0, _ = policy.decide(0, head, logits, {})
    assert mask0.tolist() == [True, True, False]


def test_selector_policy_on_an_early_exit_net_and_state_dict():
    """A SelectorPolicy is an ordinary exit policy: it also drives an EarlyExitNet, and saves."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
    net = EarlyExitNet(stages, [ExitHead(8, 3), ExitHead(8, 3)], SelectorPolicy(threshold=0.4)).eval()
    x = torch.randn(50, 4) * 3
    with torch.no_grad():
        logits, info = net(x, return_info=True)
    assert logits.shape == (50, 3) and sum(info.exit_counts) == 50
    clone = EarlyExitNet(stages, [ExitHead(8, 3), ExitHead(8, 3)]).eval()  # default policy: restored on load
    clone.load_state_dict(net.state_dict())
    assert isinstance(clone.policy, SelectorPolicy) and clone.policy.threshold == 0.4
    with torch.no_grad():
        assert torch.equal(clone(x, return_info=True)[1].exit_index, info.exit_index)


def test_train_reinforce_bad_arguments(data, pretrained):
    (x, y, _), _ = data
    c = Cascade(copy.deepcopy(list(pretrained)))
    small = (x[:64], y[:64])
    with pytest.raises(ValueError, match="cost_weight"):
        train_reinforce(c, SelectorPolicy(), small, cost_weight=-1.0)
    with pytest.raises(ValueError, match="baseline"):
        train_reinforce(c, SelectorPolicy(), small, cost_weight=0.1, baseline="median")
    with pytest.raises(ValueError, match="network_loss"):
        train_reinforce(c, SelectorPolicy(), small, cost_weight=0.1, network_loss="all")
    with pytest.raises(ValueError, match="SelectorPolicy"):
        train_reinforce(c, ConfidencePolicy("maxprob", [0.5]), small, cost_weight=0.1)
    with pytest.raises(ValueError, match="rows"):
        train_reinforce(c, SelectorPolicy(), (x[:64], y[:63]), cost_weight=0.1)
