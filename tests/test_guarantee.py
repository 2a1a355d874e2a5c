"""calibrate(confidence=...): exact binomial bounds, the split, fixed-sequence testing, the violation rate
over many calibration draws from a known distribution, the point-estimate mode, warnings and messages."""

import math
import warnings

import pytest
import torch
from torch import nn

from adaexit import EarlyExitNet, ExitHead, NeverExitPolicy
from adaexit.calibration import CalibrationWarning, calibrate
from adaexit.calibration.candidates import Candidates
from adaexit.calibration.guarantee import (
    fixed_sequence,
    least_certifiable,
    lower_bound,
    risk_bound,
    search_budget,
    split_rows,
    upper_bound,
)
from adaexit.evaluation import ExitOutputs

CLASSES = 4


def two_exit_model():
    """The model calibrate needs beside precollected outputs: two exits (its weights are never run)."""
    torch.manual_seed(0)
    return EarlyExitNet([nn.Linear(6, 8), nn.Linear(8, 8)], [ExitHead(8, CLASSES), ExitHead(8, CLASSES)])


def draw(n, seed, last_accuracy=0.9):
    """``n`` rows of a known two-exit distribution: the early exit's confidence ``s`` is uniform and its
    prediction is right with probability ``s`` (calibrated; wrong: another class at random); the last
    exit is right with probability ``last_accuracy``, independently. The early exit costs 1, the rest 9."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    s = 0.3 + 0.7 * torch.rand(n, generator=g)
    early = torch.where(torch.rand(n, generator=g) < s, labels,
                        (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES)
    last = torch.where(torch.rand(n, generator=g) < last_accuracy, labels,
                       (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES)
    logits = torch.zeros(2, n, CLASSES)
    logits[0, torch.arange(n), early] = torch.log(3 * s / (1 - s + 1e-6))  # maxprob = s
    logits[1, torch.arange(n), last] = 5.0
    return ExitOutputs(logits, labels, [1.0, 9.0], [0.0, 0.0], [1.0, 10.0], 10.0)


# ---------------------------------------------------------------------------------------------
# The bounds
# ---------------------------------------------------------------------------------------------
def binomial_cdf(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("n,delta", [(1, 0.1), (20, 0.1), (300, 0.05), (1000, 0.1)])
def test_upper_bound_is_the_exact_clopper_pearson_bound(n, delta):
    for k in sorted({0, 1, 2, n // 3, n - 1} & set(range(n))):
        b = upper_bound(k, n, delta)
        assert k / n <= b <= 1
        if n <= 300:  # the binomial CDF at the bound is delta (the bound is the exact tail inversion)
            assert binomial_cdf(k, n, b) == pytest.approx(delta, rel=1e-6)
    assert upper_bound(n, n, delta) == 1.0
    assert upper_bound(0, 300, 0.1) == pytest.approx(1 - 0.1 ** (1 / 300))
    assert lower_bound(0, n, delta) == 0.0 and lower_bound(n, n, delta) == pytest.approx(delta ** (1 / n))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        upper_bound(5, 4, 0.1)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.37])
def test_upper_bound_covers_exactly(p):
    """P(bound < p) <= delta, summed exactly over the binomial distribution."""
    n, delta = 60, 0.1
    miss = sum(binomial_cdf(k, n, p) - binomial_cdf(k - 1, n, p) for k in range(n + 1) if upper_bound(k, n, delta) < p)
    assert miss <= delta + 1e-12


def test_risk_bound_for_each_rule():
    n, delta = 2000, 0.1
    assert risk_bound(20, 0, n, "new_errors", delta) == upper_bound(20, n, delta)
    net = risk_bound(20, 15, n, "net", delta)
    assert net == pytest.approx(upper_bound(20, n, delta / 2) - lower_bound(15, n, delta / 2))
    assert net < risk_bound(20, 0, n, "new_errors", delta)  # fixes help the net rule
    assert least_certifiable(n, "net", delta) == risk_bound(0, 0, n, "net", delta) > 0
    assert 0 < search_budget(1.0, n, "new_errors", delta) < 1.0
    assert search_budget(0.1, 100, "new_errors", delta) == 0.0  # 100 rows cannot certify 0.1 pp


def test_split_and_fixed_sequence():
    search, test = split_rows(101)
    assert len(search) == 50 and len(test) == 51
    assert torch.equal(torch.sort(torch.cat([search, test])).values, torch.arange(101))
    again = split_rows(101)
    assert torch.equal(search, again[0]) and torch.equal(test, again[1])  # deterministic
    assert fixed_sequence([0.001, 0.009, 0.02, 0.001], 0.01) == 2  # stops at the first failure
    assert fixed_sequence([0.5], 0.01) == 0 and fixed_sequence([], 0.01) == 0


# ---------------------------------------------------------------------------------------------
# The guarantee, measured
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def population():
    """A large sample standing for the distribution: a policy's risk on it is its expected drop (the
    standard error on 200,000 rows is under 0.03 pp)."""
    return draw(200_000, seed=12345)


def true_drop(model, population, point, drop):
    p = Candidates(population, drop, 1.0, model.successors, model.node_members()).replay(point)
    return p.accuracy_drop_pp if drop == "net" else p.new_errors_pp


@pytest.mark.parametrize("drop", ["net", "new_errors"])
def test_violation_rate_is_within_one_minus_confidence(population, drop):
    """Over many calibration sets drawn from the distribution, the chosen policy's expected drop exceeds
    the budget in at most 1 - confidence of the draws (up to the draws' sampling error), while the
    point estimate exceeds it in about half of them (the best of many candidates looks better on its
    own sample than it is)."""
    model, budget, draws = two_exit_model(), 2.0, 40
    violations = {None: 0, 0.9: 0}
    speedups = {None: [], 0.9: []}
    for seed in range(draws):
        data = draw(800, seed)
        for confidence in violations:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CalibrationWarning)
                result = calibrate(model, data, max_accuracy_drop=budget, policies=("uniform",),
                                   criteria=("maxprob",), progress=False, drop=drop, confidence=confidence)
            violations[confidence] += true_drop(model, population, result.best, drop) > budget
            speedups[confidence].append(result.best.speedup)
    # P(Binomial(40, 0.1) >= 10) < 0.01: the guarantee's rate is far below this; the estimate's far above
    assert violations[0.9] < 10
    assert violations[None] >= 10
    assert sum(speedups[0.9]) / draws > 1.1  # the guarantee still exits early on 800 rows
    assert sum(speedups[0.9]) <= sum(speedups[None])  # what the guarantee costs


def test_confidence_none_is_the_point_estimate_and_the_guarantee_reports_bounds():
    model, data = two_exit_model(), draw(2000, seed=7)
    plain = calibrate(model, data, max_accuracy_drop=2.0, progress=False, confidence=None)
    feasible = [p for p in plain.points if p.accuracy_drop_pp <= 2.0 + 1e-9]
    assert plain.best.cost == min(p.cost for p in feasible)  # the cheapest within budget on all the rows
    assert all(p.bound_pp is None and p.certified is None for p in plain.points)
    assert plain.confidence is None and "no guarantee" in plain.families_table()

    sure = calibrate(model, data, max_accuracy_drop=2.0, progress=False)  # confidence=0.9 by default
    assert sure.confidence == 0.9 and sure.search_examples == sure.test_examples == 1000
    assert sure.best.certified and sure.best.bound_pp <= 2.0 and sure.best.kind != "never"
    assert sure.best.cost >= plain.best.cost  # the guarantee never buys more speed
    assert isinstance(model.policy, type(sure.policy))
    # everything the fixed-sequence test certified has a bound within the budget
    assert all(p.bound_pp <= 2.0 for p in sure.points if p.certified and p.kind != "never")
    for table in (sure.table(), sure.families_table()):
        assert "bound pp" in table and "probability >= 0.9" in table and f"{sure.best.bound_pp:.2f}" in table
    assert sure.to_dict()["best"]["bound_pp"] == sure.best.bound_pp
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
        calibrate(model, data, progress=False, confidence=1.0)


# ---------------------------------------------------------------------------------------------
# Warnings and messages
# ---------------------------------------------------------------------------------------------
def test_a_model_at_chance_gets_a_warning_and_the_never_exit_policy():
    model, data = two_exit_model(), draw(2000, seed=3, last_accuracy=0.25)  # 4 classes: chance
    data = ExitOutputs(data.logits, data.labels[torch.randperm(2000, generator=torch.Generator().manual_seed(0))],
                       data.stage_costs, data.head_costs, data.node_costs, data.reference_cost)
    for confidence in (None, 0.9):
        with pytest.warns(CalibrationWarning, match="no better than chance"):
            result = calibrate(model, data, max_accuracy_drop=1.0, progress=False, confidence=confidence)
        assert result.best.kind == "never" and isinstance(model.policy, NeverExitPolicy)
        assert any("chance" in w for w in result.warnings)


def test_a_budget_the_rows_cannot_certify_gets_a_warning():
    model = two_exit_model()
    with pytest.warns(CalibrationWarning, match=r"calibration rows would be needed"):
        result = calibrate(model, draw(200, seed=1), max_accuracy_drop=0.5, progress=False)
    assert result.best.kind == "never" and "warning:" in result.families_table()
    with pytest.warns(CalibrationWarning, match="budget of 0 pp"):
        calibrate(model, draw(2000, seed=1), max_accuracy_drop=0.0, progress=False)
    with warnings.catch_warnings():  # a budget it can meet: no warning
        warnings.simplefilter("error", CalibrationWarning)
        calibrate(model, draw(2000, seed=1), max_accuracy_drop=3.0, progress=False)


def test_data_without_labels_is_named():
    torch.manual_seed(0)
    model = EarlyExitNet([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)], [ExitHead(4, 3), ExitHead(4, 3)])
    x1, x2 = torch.randn(32, 3, 16, 16), torch.randn(32, 3, 16, 16)
    with pytest.raises(ValueError, match=r"shape \(32, 3, 16, 16\) .* not integer class labels .*without labels"):
        calibrate(model, [x1, x2], progress=False)  # two input batches read as one (x, y) pair
    with pytest.raises(ValueError, match="inputs without labels"):
        calibrate(model, x1, progress=False)
    with pytest.raises(ValueError, match="not integer class labels"):
        calibrate(model, [(x1, torch.rand(32))], progress=False)  # float targets
