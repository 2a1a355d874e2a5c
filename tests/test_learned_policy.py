"""LearnedPolicy (Bolukbasi et al. 2017): bottom-up gate fitting, the cost multiplier, gates that never
or always fire, the fused-kernel evaluation, save/load and errors."""

import math

import pytest
import torch

from adaexit import ConfidencePolicy
from adaexit.policies.learned import ALWAYS_FIRE, fit_learned_gates
from adaexit.simulation import exit_statistics, learned_scores, learned_thresholds, simulate
from adaexit.policies import LearnedPolicy
from adaexit.policies.learned import learned_simulation
from helpers import mlp_net

CLASSES = 4


def confident(labels, strength, generator, wrong=False):
    """Logits whose argmax is ``labels`` (or a wrong class) with softmax confidence set by ``strength``."""
    n = labels.shape[0]
    target = (labels + torch.randint(1, CLASSES, (n,), generator=generator)) % CLASSES if wrong else labels
    logits = 0.3 * torch.randn(n, CLASSES, generator=generator)
    logits[torch.arange(n), target] += strength
    return logits


def three_groups(n=3000, seed=0):
    """Exit logits of a 3-exit model with three kinds of examples.

    * easy (40%): every exit right and confident;
    * medium (40%): exit 0 wrong and unsure, exits 1 and 2 right and confident;
    * hard (20%): exits 0 and 1 wrong and unsure, exit 2 right.
    At exit 0, medium and hard look alike (unsure); only exit 1 tells them apart.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    group = torch.randint(0, 5, (n,), generator=g)  # 0,1 easy; 2,3 medium; 4 hard
    easy, medium, hard = group <= 1, (group == 2) | (group == 3), group == 4
    logits = []
    for k in range(3):
        sure = confident(labels, 5.0, g)
        unsure = confident(labels, 0.6, g, wrong=True)
        bad = (medium | hard) if k == 0 else (hard if k == 1 else torch.zeros(n, dtype=torch.bool))
        logits.append(torch.where(bad[:, None], unsure, sure))
    return logits, labels, easy, medium, hard


STAGES, HEADS = [1.0, 1.0, 10.0], [0.0, 0.0, 0.0]  # the last stage is the expensive one


def run_gates(logits, labels, gates, stage_costs=STAGES, head_costs=HEADS):
    correct = torch.stack([z.argmax(1) == labels for z in logits])
    return simulate(learned_scores(logits, gates), learned_thresholds(gates), correct, stage_costs, head_costs)


def test_gates_are_fitted_bottom_up_against_the_downstream_policy():
    """With mu = 3 (running the whole model is worth 3 errors), exiting at exit 1 is right for every
    example: medium ones are correct there, hard ones would cost 2.5 to fix. So at exit 0 a medium
    example is better off continuing (cost 0.25) than exiting wrongly (loss 1) -- but only because the
    already-fitted downstream gate stops it at exit 1. A myopic gate, comparing with running to the end
    (cost 2.75), would exit it at exit 0."""
    logits, labels, easy, medium, hard = three_groups()
    gates = fit_learned_gates(logits, labels, STAGES, HEADS, cost_weight=3.0)
    sim = run_gates(logits, labels, gates)
    assert (sim.exit_index[easy] == 0).double().mean() > 0.95
    assert (sim.exit_index[medium] == 1).double().mean() > 0.95
    assert (sim.exit_index[hard] == 1).double().mean() > 0.95
    # the downstream gate fires on everyone (exit 1 beats paying for stage 2 for all examples)
    assert tuple(gates[1]) == ALWAYS_FIRE

    # The myopic alternative, for contrast: with the exit-1 gate disabled, exit 0's continuation is
    # the expensive last stage and the refitted exit-0 gate sends medium examples out at exit 0.
    myopic = fit_learned_gates(logits[0::2], labels, [1.0, 11.0], [0.0, 0.0], cost_weight=3.0)
    sim_myopic = run_gates(logits[0::2], labels, myopic, [1.0, 11.0], [0.0, 0.0])
    assert (sim_myopic.exit_index[medium] == 0).double().mean() > 0.95
    assert sim.accuracy > sim_myopic.accuracy + 0.3


def difficulty_problem(n=4000, seed=1):
    """Continuous difficulty: each exit is right with a probability that falls with difficulty and
    rises with depth, and its confidence tracks how easy the example is."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)
    logits = []
    for k in range(3):
        p_right = (1.2 - difficulty + 0.25 * k).clamp(0, 1)
        right = torch.rand(n, generator=g) < p_right
        wrong = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
        z = 0.3 * torch.randn(n, CLASSES, generator=g)
        z[torch.arange(n), torch.where(right, labels, wrong)] += 0.5 + 5.0 * (1 - difficulty) + k
        logits.append(z)
    return logits, labels, difficulty


def test_raising_the_multiplier_lowers_cost_monotonically():
    logits, labels, difficulty = difficulty_problem()
    stage_costs, head_costs = [1.0, 2.0, 4.0], [0.1, 0.1, 0.1]
    costs, accuracies, sims = [], [], []
    for mu in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0):
        gates = fit_learned_gates(logits, labels, stage_costs, head_costs, mu)
        sim = run_gates(logits, labels, gates, stage_costs, head_costs)
        costs.append(sim.cost)
        accuracies.append(sim.accuracy)
        sims.append(sim)
    assert all(a >= b - 1e-12 for a, b in zip(costs, costs[1:])), costs
    assert costs[-1] < 0.5 * costs[0]
    # the easy examples are the ones that leave early
    early = sims[3].exit_index == 0
    assert 0 < int(early.sum()) < early.numel()
    assert difficulty[early].mean() < difficulty[~early].mean() - 0.2


def test_gate_separates_easy_from_hard_by_maxprob():
    """One early exit, right exactly on its confident rows: the fitted gate is a maxprob threshold."""
    g = torch.Generator().manual_seed(2)
    n = 2000
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    easy = torch.rand(n, generator=g) < 0.5
    first = torch.where(easy[:, None], confident(labels, 4.0, g), confident(labels, 0.5, g, wrong=True))
    last = confident(labels, 4.0, g)
    gates = fit_learned_gates([first, last], labels, [1.0, 1.0], [0.0, 0.0], cost_weight=1.0)
    assert gates[0] is not None
    fire = learned_scores([first, last], gates)[0] >= 0.5
    assert (fire == easy).double().mean() > 0.98
    stats = exit_statistics(first)
    assert stats[fire, 0].min() > stats[~fire, 0].max() - 0.05  # monotone in maxprob, up to noise


def test_a_gate_that_never_fires_and_one_that_always_fires():
    logits, labels, easy, medium, hard = three_groups()
    # early exits never better than the last exit when cost is free: all-continue labels
    gates = fit_learned_gates(logits, labels, STAGES, HEADS, cost_weight=0.0)
    assert gates == [None, None]
    sim = run_gates(logits, labels, gates)
    assert sim.exit_counts == [0, 0, labels.shape[0]] and sim.rows_decided[:2] == [0, 0]
    # cost dominates everything: exit 0 is better for every example (loss <= 1 < mu * 11/12)
    gates = fit_learned_gates(logits, labels, STAGES, HEADS, cost_weight=1000.0)
    assert tuple(gates[0]) == ALWAYS_FIRE
    assert run_gates(logits, labels, gates).exit_counts == [labels.shape[0], 0, 0]


def test_ce_loss_and_fit_errors():
    logits, labels, *_ = three_groups(600)
    gates = fit_learned_gates(logits, labels, STAGES, HEADS, cost_weight=3.0, loss="ce")
    assert len(gates) == 2 and any(g is not None for g in gates)
    policy = LearnedPolicy.fit(logits, labels, STAGES, HEADS, cost_weight=3.0)
    assert isinstance(policy, LearnedPolicy) and len(policy.gates) == 2
    with pytest.raises(ValueError, match="loss"):
        fit_learned_gates(logits, labels, STAGES, HEADS, 1.0, loss="hinge")
    with pytest.raises(ValueError, match="cost_weight"):
        fit_learned_gates(logits, labels, STAGES, HEADS, -1.0)
    with pytest.raises(ValueError, match="stage_costs"):
        fit_learned_gates(logits, labels, STAGES[:2], HEADS, 1.0)
    with pytest.raises(ValueError, match="labels"):
        fit_learned_gates(logits, labels[:10], STAGES, HEADS, 1.0)
    with pytest.raises(ValueError, match=r"exit_logits\[1\]"):
        fit_learned_gates([logits[0], logits[1][:5], logits[2]], labels, STAGES, HEADS, 1.0)


# ---------------------------------------------------------------------------------------------
# The policy inside a model
# ---------------------------------------------------------------------------------------------
def mlp(policy=None, seed=0):
    return mlp_net([6, 16, 16, 16], CLASSES, policy, seed, head_scale=5)  # scaled: spread the confidences


def model_problem(n=500):
    model = mlp()
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        dense = model.exit_logits(x)
    return model, x, dense, dense[-1].argmax(1)  # the last exit is right by construction


@pytest.mark.parametrize("backend", ["torch_backend", pytest.param("triton_backend", marks=pytest.mark.interpreter)])
def test_model_runs_the_gates_in_the_fused_kernel_as_simulated(backend, request):
    request.getfixturevalue(backend)  # the torch reference, or the Triton kernel through the interpreter
    model, x, dense, y = model_problem(200 if backend == "triton_backend" else 500)
    stage_costs, head_costs = model.exit_costs(x, "flops")
    gates = fit_learned_gates(dense, y, stage_costs, head_costs, cost_weight=2.0)
    assert gates[0] is not None
    sim = simulate(learned_scores(dense, gates), learned_thresholds(gates),
                   torch.stack([z.argmax(1) == y for z in dense]), stage_costs, head_costs)
    model.set_policy(LearnedPolicy(gates))
    with torch.no_grad():
        out, info = model(x, return_info=True)
    assert torch.equal(info.exit_index, sim.exit_index)
    assert sum(info.exit_counts[:-1]) > 0
    assert info.flops == sim.total_cost
    # each row's output is the logits of the exit it left at
    expected = torch.stack(dense)[info.exit_index, torch.arange(x.shape[0])]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_disabled_gates_skip_their_heads_and_nan_never_exits():
    model, x, dense, y = model_problem(64)
    model.set_policy(LearnedPolicy([None, list(ALWAYS_FIRE)]))
    x = x.clone()
    x[3] = float("nan")  # NaN statistics: the always-firing gate must not fire on it
    with torch.no_grad():
        out, info = model(x, return_info=True)
    assert info.exit_index[3] == 2 and torch.isnan(out[3]).all()
    assert info.exit_counts == [0, 63, 1]
    (s0, s1, s2), (h0, h1, h2) = model.exit_costs(x)
    assert info.flops == 64 * s0 + 64 * s1 + s2 + 64 * h1 + h2  # the head of exit 0 never ran


def test_state_dict_round_trip_is_exact():
    model, x, dense, y = model_problem()
    stage_costs, head_costs = model.exit_costs(x, "flops")
    policy = LearnedPolicy.fit(dense, y, stage_costs, head_costs, cost_weight=2.0)
    model.set_policy(policy)
    with torch.no_grad():
        out, info = model(x, return_info=True)
    fresh = mlp(LearnedPolicy(), seed=7)
    assert fresh.policy.gates == [None, None]  # unfitted: never exits early
    fresh.load_state_dict(model.state_dict())
    assert fresh.policy.gates == policy.gates
    with torch.no_grad():
        out2, info2 = fresh(x, return_info=True)
    assert torch.equal(out, out2) and torch.equal(info.exit_index, info2.exit_index)
    # gates are kept as the float32 values the kernel uses, so they survive any number of round trips
    assert all(g is None or [float(torch.tensor(v, dtype=torch.float32)) for v in g] == g for g in policy.gates)


def test_policy_errors():
    model = mlp()
    with pytest.raises(ValueError, match="1 gates but the model has 3 exits"):
        model.set_policy(LearnedPolicy([None]))
    with pytest.raises(ValueError, match=r"gates\[1\] must have 4 values"):
        LearnedPolicy([None, [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"gates\[0\] must be finite"):
        LearnedPolicy([[1.0, math.nan, 0.0, 0.0], None])
    # a threshold policy's state is refused by a LearnedPolicy, not misread ...
    saved = mlp(ConfidencePolicy("maxprob", [0.9, 0.9])).state_dict()
    with pytest.raises(ValueError, match="not a LearnedPolicy"):
        LearnedPolicy().set_extra_state(saved["policy._extra_state"])
    # ... and a model loading it switches to the class the state was saved with
    model = mlp(LearnedPolicy())
    model.load_state_dict(saved)
    assert isinstance(model.policy, ConfidencePolicy) and model.policy.thresholds == [0.9, 0.9]


# ---------------------------------------------------------------------------------------------
# History gates: the previous exit's statistics and agreement, carried with the rows
# ---------------------------------------------------------------------------------------------
def agreement_problem(n=4000, seed=3):
    """Exit 1 is right exactly where it agrees with exit 0 (60% of rows); elsewhere both are wrong, on
    different classes. Every exit looks equally sure everywhere: no stats gate can tell exit 1's right
    rows from its wrong ones, agreement can."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    right = torch.rand(n, generator=g) < 0.6
    shift1 = torch.randint(1, CLASSES, (n,), generator=g)
    shift0 = (shift1 + torch.randint(1, CLASSES - 1, (n,), generator=g) - 1) % (CLASSES - 1) + 1  # != shift1
    predicted = [torch.where(right, labels, (labels + s) % CLASSES) for s in (shift0, shift1)] + [labels]
    logits = []
    for target in predicted:
        z = 0.3 * torch.randn(n, CLASSES, generator=g)
        z[torch.arange(n), target] += 2.0
        logits.append(z)
    return logits, labels, right


def test_history_gates_use_agreement_and_beat_stats_gates():
    logits, labels, right = agreement_problem()
    stage_costs, head_costs, mu = [1.0, 1.0, 10.0], [0.0, 0.0, 0.0], 0.2
    correct = torch.stack([z.argmax(1) == labels for z in logits])
    assert not bool((correct[0] & ~right).any()) and bool((correct[1] == right).all())
    stats = fit_learned_gates(logits, labels, stage_costs, head_costs, mu)
    history = fit_learned_gates(logits, labels, stage_costs, head_costs, mu, features="history")
    assert len(history[1]) == 8  # exit 1 reads exit 0
    a = learned_simulation(logits, stats, correct, stage_costs, head_costs)
    b = learned_simulation(logits, history, correct, stage_costs, head_costs)
    objective = lambda s: (1 - s.accuracy) + mu * s.cost / 12.0  # noqa: E731  (what the fit minimises)
    assert objective(b) < objective(a) - 0.05
    fired = b.exit_index == 1
    assert bool(right[fired].all()) and fired.double().mean() > 0.55 and b.accuracy == 1.0


@pytest.mark.parametrize("first", ["stats", "disabled"])
def test_history_gates_run_in_the_model_as_simulated(first):
    model, x, dense, y = model_problem()
    y = torch.where(torch.arange(y.shape[0]) % 7 == 0, (y + 1) % CLASSES, y)
    stage_costs, head_costs = model.exit_costs(x, "flops")
    gates = fit_learned_gates(dense, y, stage_costs, head_costs, cost_weight=2.0, features="history")
    gates[1] = [2.0, 1.0, 0.5, -1.0, 0.5, 0.3, 0.7, -1.2]  # a history gate at exit 1, whatever was fitted
    if first == "disabled":
        gates[0] = None  # head 0 must still run: exit 1's gate reads it
    policy = LearnedPolicy(gates)
    assert policy.history and policy.needs_head(0)
    model.set_policy(policy)
    with torch.no_grad():
        out, info = model(x, return_info=True)
    correct = torch.stack([z.argmax(1) == y for z in dense])
    sim = learned_simulation(dense, gates, correct, stage_costs, head_costs)
    assert torch.equal(info.exit_index, sim.exit_index)
    assert info.rows_decided == sim.rows_decided and info.rows_decided[0] == x.shape[0]
    assert info.flops == sim.total_cost
    assert 0 < info.exit_counts[1] < x.shape[0]
    expected = torch.stack(dense)[info.exit_index, torch.arange(x.shape[0])]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # saved and loaded with the model, like stats gates; and a NaN row never exits
    fresh = mlp(LearnedPolicy(), seed=7)
    fresh.load_state_dict(model.state_dict())
    assert fresh.policy.gates == policy.gates
    x = x.clone()
    x[5] = float("nan")
    with torch.no_grad():
        _, info2 = fresh(x, return_info=True)
    assert info2.exit_index[5] == 2


def test_stats_gate_states_saved_before_history_gates_still_load():
    saved = {"policy": "LearnedPolicy", "gates": [[1.0, 0.5, 0.25, -0.75], None]}  # adaexit 0.1's format
    policy = LearnedPolicy()
    policy.set_extra_state(saved)
    assert policy.gates == [[1.0, 0.5, 0.25, -0.75], None] and not policy.history
    assert policy.init_state(3, torch.device("cpu")) == {}  # stats gates: the fused kernel, no state
    with pytest.raises(ValueError, match=r"gates\[0\] must have 4 values"):
        LearnedPolicy([[0.0] * 8, None])  # exit 0 has no previous exit
    with pytest.raises(ValueError, match="features"):
        fit_learned_gates(*three_groups(300)[:2], STAGES, HEADS, 1.0, features="hidden")
