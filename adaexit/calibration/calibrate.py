"""``calibrate``: choose the exit policy that minimises expected cost within an accuracy budget.

:func:`calibrate` runs a model once, densely, over calibration data and keeps every exit's logits
(:func:`adaexit.evaluation.collect`). Everything after that is offline: candidate policies are
*simulated* exactly as the sparse executor would run them (:mod:`adaexit.simulation`), so hundreds of
candidates cost one forward pass. The candidates:

* ``"uniform"``: one confidence threshold shared by every early exit (per criterion), swept over a
  grid of score quantiles (Bolukbasi et al.'s uniform-threshold baseline);
* ``"per_exit"``: one threshold per exit: a Lagrangian sweep of the cost multiplier ``mu``
  (:func:`~adaexit.calibration.thresholds.per_exit_thresholds`), then an exact constrained coordinate
  search (:func:`~adaexit.calibration.thresholds.refine_thresholds`) started from the best uniform
  policy and from the best swept one, so it never loses to the uniform family;
* ``"learned"``: :class:`adaexit.LearnedPolicy` (Bolukbasi et al. 2017), fitted bottom-up as weighted
  binary classification over a sweep of ``mu``, with stats gates and (3+ exits) history gates that also
  read the previous exit; the offsets of the best ones then refined exactly within the budget;
* ``"selection"``: :class:`adaexit.cascade.NetworkSelectionPolicy` (Bolukbasi et al.'s network
  selection: a row may skip networks), fitted bottom-up over a sweep of ``lam``, on every model where a
  node has more than one successor (cascades of 3+ networks), simulated route by route
  (:func:`adaexit.simulation.simulate_routes`); the exit decisions of the best ones then refined
  exactly within the budget, every other route kept.

Why the Lagrangian sweep alone is not enough (it used to lose to one uniform threshold): it minimised
the *net* errors while the budget may bound the *new* errors (an early exit that fixes a last-exit
error by luck counted as a gain, so at the budget only timid multipliers stayed feasible), and a
sweep of ``mu`` only reaches the supported points of the convex hull of (cost, errors), with each
point only a local optimum of its Lagrangian. Now every search minimises cost against what the budget
bounds (``drop``), and the constrained refinement (single thresholds, then pairs that trade errors
between exits) works on the budget directly. The result keeps each family's best policy within the
budget (:attr:`CalibrationResult.best_by_kind`, :meth:`CalibrationResult.families_table`) beside the
oracle.

Any :class:`~adaexit.base.AdaptiveModel` whose exits form a chain can be calibrated (network selection
uses its skip edges too). The search runs on one torch thread (its tensors are small); on the
demo's 5000 rows and 3-5 exits it takes a few seconds.

Cost units: ``cost_weight`` (``mu``) multiplies the cost as a *fraction of the full model's cost*, so
the objective per example is ``loss + mu * cost / full_cost``: with ``mu = 1``, running the whole model
is worth one error.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..base import COSTS, AdaptiveModel
from ..evaluation import ExitOutputs, OperatingPoint, OracleResult, collect, oracle, pareto_frontier
from ..policies import Policy, fit_learned_gates
from ..policies.learned import decision_scores, is_history, learned_simulation, shift_gates
from ..reports import plot_calibration
from ..simulation import CONFIDENCE_CRITERIA, budget_losses, exit_scores, simulate, simulate_routes, softmax_statistics
from .thresholds import ChainSearch, _pick, per_exit_thresholds, refine_thresholds, route_options, uniform_thresholds

POLICY_KINDS = ("uniform", "per_exit", "learned", "selection")
DROP_MEASURES = ("net", "new_errors")
#: The order families are listed in (tables, plots).
FAMILY_ORDER = ("never", "uniform", "per_exit", "learned", "selection")

PER_EXIT_WEIGHTS = (0.0,) + tuple(float(w) for w in torch.logspace(-4, 1.5, 30).tolist())
LEARNED_WEIGHTS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)
SELECTION_WEIGHTS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

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
        best_by_kind: each candidate family's best point within the budget (``"never"``,
        ``"uniform"``, ``"per_exit"``, ``"learned"``, ``"selection"``; families that were not tried or
        found nothing within the budget are absent). drop: the budget's measure (``"net"`` or
        ``"new_errors"``). seconds: wall-clock seconds of the dense pass (``"collect"``), of the
        offline search (``"search"``; ``"search_cpu"``: its CPU seconds) and per family.
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
    best_by_kind: dict = field(default_factory=dict)
    drop: str = "net"
    seconds: dict = field(default_factory=dict)

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
            "best_by_kind": {k: p.to_dict() for k, p in self.best_by_kind.items()},
            "drop": self.drop,
            "seconds": dict(self.seconds),
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

    def families_table(self) -> str:
        """Each candidate family's best policy within the budget beside the oracle: how far each method
        is from the limit (``*`` marks the chosen policy; ``% of oracle`` = speedup / oracle speedup)."""
        unit = "MFLOPs" if self.cost == "flops" else "ms"
        scale = 1e-6 if self.cost == "flops" else 1.0
        measure = "new errors" if self.drop == "new_errors" else "net drop"
        oracle_speedup = self.oracle.speedup if self.oracle is not None else math.nan
        lines = [
            f"best policy per family within {self.max_accuracy_drop:g} pp ({measure}) on {self.num_examples} "
            f"examples",
            f"  {'family':<10} {'criterion':<9} {'acc %':>7} {'drop pp':>8} {'new err pp':>10} {'cost':>10} "
            f"{'speedup':>8} {'% of oracle':>11}",
        ]
        for kind, p in self.best_by_kind.items():
            mark = "*" if p is self.best else " "
            share = 100 * p.speedup / oracle_speedup if math.isfinite(oracle_speedup) else math.nan
            lines.append(
                f"{mark} {kind:<10} {p.criterion or '':<9} {100 * p.accuracy:7.2f} {p.accuracy_drop_pp:8.2f} "
                f"{p.new_errors_pp:10.2f} {p.cost * scale:10.4g} {p.speedup:7.2f}x {share:10.1f}%"
            )
        if self.oracle is not None:
            o = self.oracle
            lines.append(
                f"  {'oracle':<10} {'':<9} {100 * o.accuracy:7.2f} "
                f"{100 * (self.baseline_accuracy - o.accuracy):8.2f} {'':>10} {o.cost * scale:10.4g} "
                f"{o.speedup:7.2f}x {100.0:10.1f}%"
            )
        lines.append(f"  cost unit: {unit}")
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


def _allowed_count(budget_pp: float, n: int) -> int:
    """The largest number of rows whose share ``100 * a / n`` stays within ``budget_pp`` (+1e-9, the
    tolerance of the feasibility test)."""
    a = int(math.floor((budget_pp + 1e-9) * n / 100.0))
    while 100.0 * (a + 1) / n <= budget_pp + 1e-9:
        a += 1
    while a > 0 and 100.0 * a / n > budget_pp + 1e-9:
        a -= 1
    return max(a, 0)


class _Candidates:
    """The candidates of one calibration: exact simulation of each, on the dense exit outputs."""

    def __init__(self, outputs, drop: str, budget: float, successors, members):
        self.outputs = outputs
        self.stack, self.labels = outputs.logits, outputs.labels
        self.stage_costs, self.head_costs = outputs.stage_costs, outputs.head_costs
        self.full = outputs.reference_cost
        self.k_exits, self.n, _ = self.stack.shape
        self.correct = self.stack.argmax(dim=2) == self.labels
        self.base_right = int(self.correct[-1].sum())
        self.drop = drop
        # what the budget bounds, per row and exit: the objective every search minimises with it
        self.losses = budget_losses(self.correct, drop)
        allowed = _allowed_count(budget, self.n)
        self.max_loss = float(allowed + (self.n - self.base_right if drop == "net" else 0))
        self.successors = [tuple(s) for s in successors]
        self.members = members
        self.points: list[CalibrationPoint] = []
        self.seen: set = set()
        self.score_cache: dict = {}
        self.stats = None  # the exits' softmax statistics, for the learned family

    def scores(self, criterion):
        if criterion not in self.score_cache:
            self.score_cache[criterion] = exit_scores(self.stack, criterion)
        return self.score_cache[criterion]

    def measured(self, p: CalibrationPoint) -> float:
        return p.accuracy_drop_pp if self.drop == "net" else p.new_errors_pp

    def add_simulation(self, sim, kind, criterion=None, thresholds=None, gates=None, mu=None, policy=None):
        n = self.n
        got = self.correct[sim.exit_index, torch.arange(n)]
        right = int(got.sum())
        p = CalibrationPoint(
            kind=kind, criterion=criterion,
            thresholds=None if thresholds is None else [float(t) for t in thresholds],
            gates=None if gates is None else [None if g is None else list(g) for g in gates],
            cost_weight=mu, accuracy=right / n,
            accuracy_drop_pp=100.0 * (self.base_right - right) / n,  # from integer counts: no rounding noise
            cost=sim.cost, speedup=self.full / sim.cost if sim.cost else math.inf,
            exit_counts=sim.exit_counts,
            new_errors_pp=100.0 * int((self.correct[-1] & ~got).sum()) / n,
            policy_object=policy,
        )  # fmt: skip
        self.points.append(p)
        return p

    def add_thresholds(self, kind, criterion, scores, thresholds, mu=None):
        key = (kind, criterion, tuple(float(t) if t <= 1.0 else math.inf for t in thresholds))
        if key in self.seen:
            return None
        self.seen.add(key)
        sim = simulate(scores, thresholds, self.correct, self.stage_costs, self.head_costs)
        return self.add_simulation(sim, kind, criterion, thresholds=thresholds, mu=mu)

    def add_gates(self, gates, mu=None):
        key = ("learned", tuple(None if g is None else tuple(g) for g in gates))
        if key in self.seen:
            return None
        self.seen.add(key)
        sim = learned_simulation(self.stack, gates, self.correct, self.stage_costs, self.head_costs, self.stats)
        return self.add_simulation(sim, "learned", None, gates=gates, mu=mu)

    def feasible(self, p) -> bool:
        return p is not None and self.measured(p) <= self.budget_pp + 1e-9

    # -- the families ----------------------------------------------------------------------------
    def uniform(self, criterion, record: bool = True):
        """Every shared threshold; returns the best feasible one (``None`` if none is)."""
        scores = self.scores(criterion)
        search = ChainSearch(scores, self.losses, self.stage_costs, self.head_costs)
        best = None
        for t in uniform_thresholds(scores):
            thresholds = [t] * (self.k_exits - 1)
            if record:
                self.add_thresholds("uniform", criterion, scores, thresholds)
            loss, cost = search.evaluate(thresholds)
            if loss <= self.max_loss + 1e-9 and (best is None or (cost, loss) < best[:2]):
                best = (cost, loss, thresholds)
        return None if best is None else best[2]

    def refine(self, search, starts, finish, pairs: bool = True):
        """The exact constrained refinement: one threshold at a time from every start (``finish(t)``
        adds the point), then from the best of those with pair moves too. Returns the best
        ``(cost, loss, thresholds)`` found, or ``None`` if no start is feasible."""
        best = None
        for start in starts:
            if search.evaluate(start)[0] > self.max_loss + 1e-9:
                continue  # (a learned start whose float32 boundary moved a row)
            thresholds, loss, cost = refine_thresholds(search, start, self.max_loss, pairs=False)
            finish(thresholds)
            if best is None or (cost, loss) < best[:2]:
                best = (cost, loss, thresholds)
        if best is not None and pairs:
            thresholds, loss, cost = refine_thresholds(search, best[2], self.max_loss)
            if thresholds != best[2]:
                finish(thresholds)
                best = (cost, loss, thresholds)
        return best

    def per_exit(self, criterion, uniform_start, pairs: bool = True):
        """The Lagrangian sweep (bottom-up + coordinate passes), then the exact constrained refinement
        started from the best uniform policy and from the best swept one. Returns the refinement's
        ``(cost, loss, thresholds)`` and a function running the pair moves from it."""
        scores = self.scores(criterion)
        search = ChainSearch(scores, self.losses, self.stage_costs, self.head_costs)
        starts = [] if uniform_start is None else [uniform_start]
        best = None
        for mu in PER_EXIT_WEIGHTS:
            thresholds = per_exit_thresholds(scores, self.losses, self.stage_costs, self.head_costs, mu)
            self.add_thresholds("per_exit", criterion, scores, thresholds, mu=mu)
            loss, cost = search.evaluate(thresholds)
            if loss <= self.max_loss + 1e-9 and (best is None or (cost, loss) < best[:2]):
                best = (cost, loss, thresholds)
        if best is not None and best[2] not in starts:
            starts.append(best[2])

        def finish(thresholds):
            self.add_thresholds("per_exit", criterion, scores, thresholds)

        found = self.refine(search, starts, finish, pairs=False)
        return found, (lambda: self.refine(search, [found[2]], finish)) if found is not None else None

    def learned(self):
        """Bolukbasi's gates over the ``mu`` sweep (stats gates, and history gates where the model has
        3+ exits), then the offsets of the best feasible ones refined exactly within the budget."""
        features = ("stats", "history") if self.k_exits >= 3 else ("stats",)
        self.stats = [softmax_statistics(z) for z in self.stack]
        for feats in features:
            fitted = []
            for mu in LEARNED_WEIGHTS:
                gates = fit_learned_gates(self.stack, self.labels, self.stage_costs, self.head_costs, mu,
                                          loss=self.losses, features=feats, statistics=self.stats)
                p = self.add_gates(gates, mu)
                if self.feasible(p):
                    fitted.append((p.cost, -p.accuracy, mu, gates))
            if not fitted:
                continue
            _, _, mu, gates = min(fitted, key=lambda f: f[:2])
            scores = decision_scores(self.stack, gates, self.stats)
            read = [k + 1 < len(gates) and is_history(gates[k + 1]) for k in range(len(gates))] + [True]
            search = ChainSearch(scores, self.losses, self.stage_costs, self.head_costs, bounded=False,
                                 always_head=read)
            start = [0.0 if g is not None else math.inf for g in gates]
            self.refine(search, [start], lambda t, gates=gates, mu=mu: self.add_gates(shift_gates(gates, t), mu))

    def selection(self, model):
        from ..cascade.policies import NetworkSelectionPolicy

        fitted = []
        for lam in SELECTION_WEIGHTS:
            policy = NetworkSelectionPolicy().fit(model, self.outputs, lam, loss=self.losses)
            p = self.add_routes(policy, lam)
            if self.feasible(p):
                fitted.append((p.cost, -p.accuracy, lam, policy))
        if not fitted:
            return
        # the best feasible one's exit and skip decisions, moved exactly within the budget
        _, _, lam, policy = min(fitted, key=lambda f: f[:2])
        self.refine_selection(policy, lam)

    def refine_selection(self, policy, lam, rounds: int = 4):
        """Alternate the exact refinement of every node's exit offset (the skip decisions fixed) with
        an exact search of each skip offset (the exits fixed), while the cost falls."""
        m = policy.margins(self.stack)
        k_minus = self.k_exits - 1
        skippers = [k for k in range(k_minus) if bool(torch.isfinite(m["skip"][k]).any())]
        # from the fitted skips, and from none (a chain on the fitted exit margins), then skips added
        for start_skips in ([0.0] * k_minus, [math.inf] * k_minus):
            self._refine_selection(policy, lam, m, skippers, start_skips, rounds)

    def _refine_selection(self, policy, lam, m, skippers, start_skips, rounds):
        k_minus = self.k_exits - 1
        exits = torch.cat([m["exit"], torch.zeros(1, self.n)])
        t, u = [0.0] * k_minus, list(start_skips)

        def targets():
            return [torch.where(m["skip"][k] > u[k], m["skip_to"][k], m["next"][k]) for k in range(k_minus)]

        def finish(thresholds, skips):
            self.add_routes(policy.with_offsets(thresholds, skips), lam)

        search = ChainSearch(exits, self.losses, self.stage_costs, self.head_costs, bounded=False,
                             always_head=[True] * self.k_exits, cont_to=targets())
        if search.evaluate(t)[0] > self.max_loss + 1e-9:
            t = [math.inf] * k_minus  # never exit: always within the budget
        loss, cost = search.evaluate(t)
        for _ in range(rounds):
            found = self.refine(search, [t], lambda th: finish(th, u))
            t, loss, cost = found[2], found[1], found[0]
            moved = False
            for k in skippers:
                c = _pick(*route_options(search, k, t, m["skip"][k], m["skip_to"][k], m["next"][k]),
                          self.max_loss)
                if c is not None and (c[2] < cost - 1e-12 * max(1.0, cost) or (c[2] <= cost and c[1] < loss)):
                    u[k], loss, cost, moved = c[0], c[1], c[2], True
                    search.cont_to[k] = np.asarray(targets()[k])
                    finish(t, u)
            if not moved:
                break

    def add_routes(self, policy, lam):
        sim = simulate_routes(policy.routes(self.stack), self.successors, self.correct,
                              self.stage_costs, self.head_costs)
        return self.add_simulation(sim, "selection", None, mu=lam, policy=policy)


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
            batches of ``batch_size``), or this model's :class:`~adaexit.evaluation.ExitOutputs` on the
            calibration data, already collected with ``cost`` (:func:`adaexit.evaluation.collect`).
        max_accuracy_drop: the budget, in percentage points below the last exit's accuracy on ``data``.
        cost: ``"flops"`` or ``"latency"`` (``model.exit_costs``).
        criteria: confidence criteria for the threshold candidates.
        policies: candidate kinds among ``"uniform"``, ``"per_exit"``, ``"learned"``, ``"selection"``
            (network selection; tried only on models where a row may skip a node); the never-exit policy
            (drop 0) is always a candidate, so a policy is always found.
        progress: show tqdm progress bars.
        drop: what the budget bounds. ``"net"``: last-exit accuracy minus the policy's accuracy.
            ``"new_errors"``: the examples the last exit gets right and the policy gets wrong, ignoring
            those an early exit fixes by luck. The net rule lets the search collect such lucky fixes on
            the calibration data, which need not recur on new data; ``"new_errors"`` is the
            conservative choice when the calibration set is small or easier than deployment data.
            Every search minimises cost against this same measure.

    Returns a :class:`CalibrationResult`; the model's policy is set to ``result.policy``.
    """

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

    started = time.perf_counter()
    if isinstance(data, ExitOutputs):  # already collected (on this model, with this cost)
        outputs = data
        if outputs.logits.shape[0] != model.num_exits:
            raise ValueError(f"data holds outputs of {outputs.logits.shape[0]} exits; the model has {model.num_exits}")
    else:
        outputs = collect(model, data, cost, progress, int(batch_size), desc="calibrate: exit logits")
    collected = time.perf_counter()
    cpu = time.process_time()
    with _one_thread():
        return _search(model, outputs, budget, cost, criteria, policies, progress, drop, started, collected, cpu)


@contextlib.contextmanager
def _one_thread():
    """Run the offline search on one torch thread: its tensors are small (``[K, N]``), and intra-op
    threads only add synchronisation (many times slower on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _search(model, outputs, budget, cost, criteria, policies, progress, drop, started, collected, cpu):
    from tqdm.auto import tqdm

    cands = _Candidates(outputs, drop, budget, model.successors, model.node_members())
    cands.budget_pp = budget
    k_exits, n = cands.k_exits, cands.n

    never = [math.inf] * (k_exits - 1)
    cands.add_thresholds("never", None, torch.zeros(k_exits, n), never)
    seconds: dict = {}
    if k_exits > 1:
        jobs = [("thresholds", criterion) for criterion in criteria
                if "uniform" in policies or "per_exit" in policies]
        if "learned" in policies:
            jobs.append(("learned", None))
        skips = any(len(s) > 1 for s in cands.successors)
        if "selection" in policies and skips:
            jobs.append(("selection", None))
        refined = []
        for job, criterion in tqdm(jobs, desc="calibrate: candidates", disable=not progress, leave=False):
            t0 = time.perf_counter()
            if job == "thresholds":
                start = cands.uniform(criterion, record="uniform" in policies)
                if "per_exit" in policies:
                    found, pairs = cands.per_exit(criterion, start)
                    if found is not None:
                        refined.append((found[0], found[1], criterion, pairs))
            elif job == "learned":
                cands.learned()
            else:
                cands.selection(model)
            key = "thresholds" if job == "thresholds" else job
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        if refined:  # pair moves from the best per-exit policy over the criteria
            t0 = time.perf_counter()
            min(refined, key=lambda r: r[:2])[3]()
            seconds["thresholds"] += time.perf_counter() - t0

    points = cands.points
    # the never-exit point has drop 0, so a feasible candidate always exists
    feasible = [p for p in points if cands.measured(p) <= budget + 1e-9]
    order = lambda p: (p.cost, -p.accuracy)  # noqa: E731
    best = min(feasible, key=order)
    by_kind: dict = {}
    for p in feasible:
        if p.kind not in by_kind or order(p) < order(by_kind[p.kind]):
            by_kind[p.kind] = p
    policy = best.policy()
    model.set_policy(policy)
    seconds["collect"] = collected - started
    seconds["search"] = time.perf_counter() - collected
    seconds["search_cpu"] = time.process_time() - cpu  # CPU seconds: what the search costs on an idle core
    return CalibrationResult(
        policy=policy,
        best=best,
        points=points,
        frontier=pareto_frontier(points),
        baseline_accuracy=cands.base_right / n,
        full_cost=cands.full,
        cost=cost,
        max_accuracy_drop=budget,
        num_examples=n,
        oracle=oracle(cands.stack, cands.labels, cands.stage_costs, cands.head_costs, reference_cost=cands.full,
                      members=cands.members),
        best_by_kind={k: by_kind[k] for k in FAMILY_ORDER if k in by_kind},
        drop=drop,
        seconds=seconds,
    )
