"""The candidate policies of one calibration, each simulated exactly on dense exit outputs.

:class:`Candidates` holds every exit's logits on a set of rows and evaluates policies on them as the
sparse executor would run them (:mod:`adaexit.simulation`): the families' searches
(:meth:`Candidates.uniform`, :meth:`Candidates.per_exit`, :meth:`Candidates.learned`,
:meth:`Candidates.selection`) add their points, and :meth:`Candidates.replay` evaluates a policy found on
other rows (what the risk-controlled calibration tests on held-out rows). See
:mod:`adaexit.calibration.calibrate` for the families and why the search is built this way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..policies import fit_learned_gates
from ..policies.learned import decision_scores, is_history, learned_simulation, shift_gates
from ..simulation import budget_losses, exit_scores, simulate, simulate_routes, softmax_statistics
from .result import CalibrationPoint
from .thresholds import ChainSearch, _pick, per_exit_thresholds, refine_thresholds, route_options, uniform_thresholds

PER_EXIT_WEIGHTS = (0.0,) + tuple(float(w) for w in torch.logspace(-4, 1.5, 30).tolist())
LEARNED_WEIGHTS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)
SELECTION_WEIGHTS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _allowed_count(budget_pp: float, n: int) -> int:
    """The largest number of rows whose share ``100 * a / n`` stays within ``budget_pp`` (+1e-9, the
    tolerance of the feasibility test)."""
    a = int(math.floor((budget_pp + 1e-9) * n / 100.0))
    while 100.0 * (a + 1) / n <= budget_pp + 1e-9:
        a += 1
    while a > 0 and 100.0 * a / n > budget_pp + 1e-9:
        a -= 1
    return max(a, 0)


class Candidates:
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

    def replay(self, p: CalibrationPoint) -> CalibrationPoint:
        """The point of the same policy as ``p`` (found on other rows) evaluated on these rows."""
        if p.kind == "selection":
            return self.add_routes(p.policy_object, p.cost_weight)
        if p.gates is not None:
            if self.stats is None:
                self.stats = [softmax_statistics(z) for z in self.stack]
            sim = learned_simulation(self.stack, p.gates, self.correct, self.stage_costs, self.head_costs, self.stats)
            return self.add_simulation(sim, p.kind, None, gates=p.gates, mu=p.cost_weight)
        scores = torch.zeros(self.k_exits, self.n) if p.kind == "never" else self.scores(p.criterion)
        sim = simulate(scores, p.thresholds, self.correct, self.stage_costs, self.head_costs)
        return self.add_simulation(sim, p.kind, p.criterion, thresholds=p.thresholds, mu=p.cost_weight)

    def counts(self, p: CalibrationPoint) -> tuple[int, int]:
        """``(new errors, fixes)`` of a point of these rows, as integers."""
        new = round(p.new_errors_pp * self.n / 100.0)
        net = round(p.accuracy_drop_pp * self.n / 100.0)
        return new, new - net
