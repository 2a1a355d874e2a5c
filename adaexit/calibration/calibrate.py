"""``calibrate``: choose the exit policy that minimises expected cost within an accuracy budget.

:func:`calibrate` runs a model once, densely, over calibration data and keeps every exit's logits
(:func:`adaexit.evaluation.collect`). Everything after that is offline: candidate policies are
*simulated* exactly as the sparse executor would run them (:mod:`adaexit.simulation`), so hundreds of
candidates cost one forward pass. The candidates:

* ``"uniform"``: one confidence threshold shared by every early exit (per criterion), swept over a
  grid of score quantiles (Bolukbasi et al.'s uniform-threshold baseline);
* ``"per_exit"``: one threshold per exit (:func:`~adaexit.calibration.thresholds.per_exit_thresholds`),
  the cost multiplier ``mu`` swept;
* ``"learned"``: :class:`adaexit.LearnedPolicy` (Bolukbasi et al. 2017), ``mu`` swept.

Any :class:`~adaexit.base.AdaptiveModel` whose exits form a chain can be calibrated.

Cost units: ``cost_weight`` (``mu``) multiplies the cost as a *fraction of the full model's cost*, so
the objective per example is ``loss + mu * cost / full_cost``: with ``mu = 1``, running the whole model
is worth one error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..base import COSTS, AdaptiveModel
from ..evaluation import OperatingPoint, OracleResult, collect, oracle, pareto_frontier
from ..policies import Policy, fit_learned_gates
from ..reports import plot_calibration
from ..simulation import CONFIDENCE_CRITERIA, exit_scores, learned_scores, learned_thresholds, simulate
from .thresholds import per_exit_thresholds, uniform_thresholds

POLICY_KINDS = ("uniform", "per_exit", "learned")
DROP_MEASURES = ("net", "new_errors")

PER_EXIT_WEIGHTS = (0.0,) + tuple(float(w) for w in torch.logspace(-4, 1.5, 45).tolist())
LEARNED_WEIGHTS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)

#: One evaluated candidate policy (see :class:`adaexit.evaluation.OperatingPoint`).
CalibrationPoint = OperatingPoint


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found. ``policy`` is set on the model already.

    Attributes:
        policy: the chosen policy. best: its point. points: every evaluated candidate.
        frontier: the Pareto-optimal points (accuracy vs cost) over all kinds, sorted by cost.
        baseline_accuracy: the last exit's accuracy on the calibration data. full_cost: the plain
        model's cost per example. cost: ``"flops"`` or ``"latency"``. max_accuracy_drop: the budget
        (percentage points). num_examples: calibration rows. oracle: :class:`OracleResult`.
    """

    policy: Policy
    best: CalibrationPoint
    points: list[CalibrationPoint]
    frontier: list[CalibrationPoint]
    baseline_accuracy: float
    full_cost: float
    cost: str
    max_accuracy_drop: float
    num_examples: int
    oracle: OracleResult | None = None

    def to_dict(self) -> dict:
        """Everything as JSON-able Python values (disabled thresholds become ``null``)."""
        return {
            "best": self.best.to_dict(),
            "baseline_accuracy": self.baseline_accuracy,
            "full_cost": self.full_cost,
            "cost": self.cost,
            "max_accuracy_drop": self.max_accuracy_drop,
            "num_examples": self.num_examples,
            "oracle": None if self.oracle is None else self.oracle.to_dict(),
            "frontier": [p.to_dict() for p in self.frontier],
            "points": [p.to_dict() for p in self.points],
        }

    def table(self) -> str:
        """A short text table of the frontier (``*`` marks the chosen policy)."""
        unit = "MFLOPs" if self.cost == "flops" else "ms"
        scale = 1e-6 if self.cost == "flops" else 1.0
        lines = [
            f"calibration on {self.num_examples} examples, budget {self.max_accuracy_drop:g} pp, "
            f"last-exit accuracy {100 * self.baseline_accuracy:.2f}%, full cost {self.full_cost * scale:.4g} {unit}",
            f"  {'kind':<9} {'criterion':<9} {'acc %':>7} {'drop pp':>8} {'cost':>10} {'speedup':>8}",
        ]
        for p in self.frontier:
            mark = "*" if p is self.best else " "
            lines.append(
                f"{mark} {p.kind:<9} {p.criterion or '':<9} {100 * p.accuracy:7.2f} {p.accuracy_drop_pp:8.2f} "
                f"{p.cost * scale:10.4g} {p.speedup:7.2f}x"
            )
        if self.oracle is not None:
            o = self.oracle
            lines.append(
                f"  {'oracle':<9} {'':<9} {100 * o.accuracy:7.2f} {100 * (self.baseline_accuracy - o.accuracy):8.2f} "
                f"{o.cost * scale:10.4g} {o.speedup:7.2f}x"
            )
        return "\n".join(lines)

    def plot(self, path, oracle: bool = True):
        """Save a PNG: accuracy vs speedup, the Pareto frontier of each policy kind, the chosen point,
        the last-exit (plain model) point and, if ``oracle``, the oracle point. Returns ``path``."""
        return plot_calibration(self, path, oracle=oracle)


def collect_exit_logits(model: AdaptiveModel, data, cost: str = "flops", progress: bool = True, batch_size: int = 256):
    """Run the model densely over ``data`` once: ``(exit_logits [K, N, C] CPU, labels [N], stage_costs,
    head_costs, reference_cost)`` (the tuple form of :func:`adaexit.evaluation.collect`)."""
    out = collect(model, data, cost, progress, batch_size, desc="calibrate: exit logits")
    return out.logits, out.labels, out.stage_costs, out.head_costs, out.reference_cost


def calibrate(
    model,
    data,
    max_accuracy_drop: float = 0.5,
    cost: str = "flops",
    criteria: Sequence[str] = CONFIDENCE_CRITERIA,
    policies: Sequence[str] = POLICY_KINDS,
    progress: bool = True,
    batch_size: int = 256,
    drop: str = "net",
) -> CalibrationResult:
    """Choose and set the policy with the least expected cost whose accuracy drop is within budget.

    Args:
        model: an :class:`~adaexit.base.AdaptiveModel` (:class:`adaexit.EarlyExitNet`, a cascade,
            an anytime network...).
        data: a DataLoader / iterable of ``(x, y)`` batches, or a tuple ``(x, y)`` of tensors (split into
            batches of ``batch_size``).
        max_accuracy_drop: the budget, in percentage points below the last exit's accuracy on ``data``.
        cost: ``"flops"`` or ``"latency"`` (``model.exit_costs``).
        criteria: confidence criteria for the threshold candidates.
        policies: candidate kinds among ``"uniform"``, ``"per_exit"``, ``"learned"``; the never-exit
            policy (drop 0) is always a candidate, so a policy is always found.
        progress: show tqdm progress bars.
        drop: what the budget bounds. ``"net"``: last-exit accuracy minus the policy's accuracy.
            ``"new_errors"``: the examples the last exit gets right and the policy gets wrong, ignoring
            those an early exit fixes by luck. The net rule lets the search collect such lucky fixes on
            the calibration data, which need not recur on new data; ``"new_errors"`` is the
            conservative choice when the calibration set is small or easier than deployment data.

    Returns a :class:`CalibrationResult`; the model's policy is set to ``result.policy``.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"calibrate: model must be an adaexit AdaptiveModel, got {type(model).__name__}")
    budget = float(max_accuracy_drop)
    if not budget >= 0 or math.isinf(budget):
        raise ValueError(f"max_accuracy_drop must be a finite number >= 0 (percentage points), got {max_accuracy_drop}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    criteria = tuple(criteria)
    for c in criteria:
        if c not in CONFIDENCE_CRITERIA:
            raise ValueError(f"unknown criterion {c!r}; criteria must be among {CONFIDENCE_CRITERIA}")
    policies = tuple(policies)
    for p in policies:
        if p not in POLICY_KINDS:
            raise ValueError(f"unknown policy kind {p!r}; policies must be among {POLICY_KINDS}")
    if any(p in ("uniform", "per_exit") for p in policies) and not criteria:
        raise ValueError("criteria is empty but threshold policies (uniform/per_exit) were asked for")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop not in DROP_MEASURES:
        raise ValueError(f"drop must be one of {DROP_MEASURES}, got {drop!r}")

    outputs = collect(model, data, cost, progress, int(batch_size), desc="calibrate: exit logits")
    stack, labels = outputs.logits, outputs.labels
    stage_costs, head_costs, full = outputs.stage_costs, outputs.head_costs, outputs.reference_cost
    k_exits, n, _ = stack.shape
    correct = stack.argmax(dim=2) == labels
    losses = (~correct).double()
    base_right = int(correct[-1].sum())
    baseline = base_right / n

    points: list[CalibrationPoint] = []
    seen: set = set()

    def add(kind, criterion, scores, thresholds, gates=None, mu=None):
        key = (kind, criterion, tuple(thresholds) if gates is None else tuple(gates))
        if key in seen:
            return
        seen.add(key)
        sim = simulate(scores, thresholds, correct, stage_costs, head_costs)
        got = correct[sim.exit_index, torch.arange(n)]
        right = int(got.sum())
        points.append(CalibrationPoint(
            kind=kind, criterion=criterion,
            thresholds=None if gates is not None else [float(t) for t in thresholds],
            gates=None if gates is None else [None if g is None else list(g) for g in gates],
            cost_weight=mu, accuracy=right / n,
            accuracy_drop_pp=100.0 * (base_right - right) / n,  # from integer counts: no rounding noise
            cost=sim.cost, speedup=full / sim.cost if sim.cost else math.inf,
            exit_counts=sim.exit_counts,
            new_errors_pp=100.0 * int((correct[-1] & ~got).sum()) / n,
        ))

    never = [math.inf] * (k_exits - 1)
    add("never", None, torch.zeros(k_exits, n), never)
    if k_exits > 1:
        jobs = []
        for criterion in criteria:
            if "uniform" in policies:
                jobs.append(("uniform", criterion))
            if "per_exit" in policies:
                jobs.append(("per_exit", criterion))
        if "learned" in policies:
            jobs.append(("learned", None))
        score_cache: dict = {}
        for kind, criterion in tqdm(jobs, desc="calibrate: candidates", disable=not progress, leave=False):
            if kind == "learned":
                for mu in LEARNED_WEIGHTS:
                    gates = fit_learned_gates(stack, labels, stage_costs, head_costs, mu)
                    add("learned", None, learned_scores(stack, gates), learned_thresholds(gates), gates, mu)
                continue
            if criterion not in score_cache:
                score_cache[criterion] = exit_scores(stack, criterion)
            scores = score_cache[criterion]
            if kind == "uniform":
                for t in uniform_thresholds(scores):
                    add("uniform", criterion, scores, [t] * (k_exits - 1))
            else:
                for mu in PER_EXIT_WEIGHTS:
                    add("per_exit", criterion, scores,
                        per_exit_thresholds(scores, losses, stage_costs, head_costs, mu), mu=mu)

    # the never-exit point has drop 0, so a feasible candidate always exists
    measured = (lambda p: p.accuracy_drop_pp) if drop == "net" else (lambda p: p.new_errors_pp)
    feasible = [p for p in points if measured(p) <= budget + 1e-9]
    best = min(feasible, key=lambda p: (p.cost, -p.accuracy))
    policy = best.policy()
    model.set_policy(policy)
    return CalibrationResult(
        policy=policy,
        best=best,
        points=points,
        frontier=pareto_frontier(points),
        baseline_accuracy=baseline,
        full_cost=full,
        cost=cost,
        max_accuracy_drop=budget,
        num_examples=n,
        oracle=oracle(stack, labels, stage_costs, head_costs, reference_cost=full, members=model.node_members()),
    )
