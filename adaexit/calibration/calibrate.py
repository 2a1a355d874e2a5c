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

The guarantee (``confidence``, default 0.9; :mod:`adaexit.calibration.guarantee` has the procedure and
its proof): the search above runs on a random half of the calibration rows, its candidates are ordered
from most to least conservative by the bound their new errors there would give, and tested in that order
on the other half with exact binomial bounds (Learn-then-Test with fixed-sequence testing); the
cheapest certified candidate is chosen. Its expected drop on new data is then within the budget with probability ``>= confidence``.
Every reported estimate (accuracy, drop, cost) is on all the calibration rows; ``bound_pp`` beside it
is the upper confidence bound from the test half. ``confidence=None`` picks the cheapest policy whose
drop on all the rows is within the budget (a point estimate, biased low for the chosen policy).

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
import warnings
from typing import Sequence

import torch

from ..base import COSTS, AdaptiveModel
from ..evaluation import ExitOutputs, collect, oracle, pareto_frontier
from ..simulation import CONFIDENCE_CRITERIA
from .candidates import Candidates
from .guarantee import approximate_bound, fixed_sequence, least_certifiable, risk_bound, search_budget, split_rows
from .result import CalibrationPoint, CalibrationResult

POLICY_KINDS = ("uniform", "per_exit", "learned", "selection")
DROP_MEASURES = ("net", "new_errors")
#: The order families are listed in (tables, plots).
FAMILY_ORDER = ("never", "uniform", "per_exit", "learned", "selection")


def collect_exit_logits(model: AdaptiveModel, data, cost: str = "flops", progress: bool = True, batch_size: int = 256):
    """Run the model densely over ``data`` once: ``(exit_logits [K, N, C] CPU, labels [N], stage_costs,
    head_costs, reference_cost)`` (the tuple form of :func:`adaexit.evaluation.collect`)."""
    out = collect(model, data, cost, progress, batch_size, desc="calibrate: exit logits")
    return out.logits, out.labels, out.stage_costs, out.head_costs, out.reference_cost


class CalibrationWarning(UserWarning):
    """:func:`calibrate` could not do what was asked (a model at chance, a budget no policy meets at the
    confidence) and fell back to the never-exit policy."""


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
    confidence: float | None = 0.9,
) -> CalibrationResult:
    """Choose and set the policy with the least expected cost whose accuracy drop is within budget.

    Args:
        model: an :class:`~adaexit.base.AdaptiveModel` (:class:`adaexit.EarlyExitNet`, a cascade,
            an anytime network...).
        data: a DataLoader / iterable of ``(x, y)`` batches, or a tuple ``(x, y)`` of tensors (split into
            batches of ``batch_size``), or this model's :class:`~adaexit.evaluation.ExitOutputs` on the
            calibration data, already collected with ``cost`` (:func:`adaexit.evaluation.collect`).
            Labels are required.
        max_accuracy_drop: the budget, in percentage points below the last exit's accuracy.
        cost: ``"flops"`` or ``"latency"`` (``model.exit_costs``).
        criteria: confidence criteria for the threshold candidates.
        policies: candidate kinds among ``"uniform"``, ``"per_exit"``, ``"learned"``, ``"selection"``
            (network selection; tried only on models where a row may skip a node); the never-exit policy
            (drop 0) is always a candidate, so a policy is always found.
        progress: show tqdm progress bars.
        batch_size: rows per dense forward when collecting the exit logits.
        drop: what the budget bounds. ``"net"``: last-exit accuracy minus the policy's accuracy.
            ``"new_errors"``: the examples the last exit gets right and the policy gets wrong, ignoring
            those an early exit fixes by luck (a stricter measure: new errors >= net drop). Every search
            minimises cost against this same measure.
        confidence: the probability, over the draw of the calibration data, that the chosen policy's
            expected ``drop`` on new data from the same distribution is within the budget (default
            0.9). Learn-then-Test with fixed-sequence testing (:mod:`adaexit.calibration.guarantee`):
            the search runs on half of the rows, its candidates are tested on the other half with exact
            binomial bounds, the cheapest certified one is chosen. ``None``: no guarantee, the cheapest
            policy whose drop on all the calibration rows is within the budget (a point estimate,
            biased low for the chosen policy: the best of many candidates on one sample looks better
            than it is).

    Warns (:class:`CalibrationWarning`, also kept in ``result.warnings``) and falls back to the
    never-exit policy when the last exit is no better than chance on the data, or when no early-exit
    policy is certified at the confidence (the budget is too small for the number of rows).

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
    if confidence is not None and not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.9), or be None for no guarantee; "
                         f"got {confidence}")

    started = time.perf_counter()
    if isinstance(data, ExitOutputs):  # already collected (on this model, with this cost)
        outputs = data
        if outputs.logits.shape[0] != model.num_exits:
            raise ValueError(f"data holds outputs of {outputs.logits.shape[0]} exits; the model has {model.num_exits}")
    else:
        outputs = collect(model, data, cost, progress, int(batch_size), desc="calibrate: exit logits")
    collected = time.perf_counter()
    cpu = time.process_time()
    settings = dict(budget=budget, cost=cost, criteria=criteria, policies=policies, progress=progress, drop=drop)
    with _one_thread():
        result = _search(model, outputs, settings, None if confidence is None else float(confidence))
    result.seconds["collect"] = collected - started
    result.seconds["search"] = time.perf_counter() - collected
    result.seconds["search_cpu"] = time.process_time() - cpu  # CPU seconds: what the search costs on an idle core
    for message in result.warnings:
        warnings.warn(message, CalibrationWarning, stacklevel=2)
    return result


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


def _generate(model, outputs, budget, settings, seconds) -> Candidates:
    """Run every candidate family's search on ``outputs`` against ``budget``; returns the candidates."""
    from tqdm.auto import tqdm

    criteria, policies, drop = settings["criteria"], settings["policies"], settings["drop"]
    cands = Candidates(outputs, drop, budget, model.successors, model.node_members())
    cands.budget_pp = budget
    cands.add_thresholds("never", None, torch.zeros(cands.k_exits, cands.n), [math.inf] * (cands.k_exits - 1))
    if cands.k_exits == 1:
        return cands
    jobs = [("thresholds", criterion) for criterion in criteria if "uniform" in policies or "per_exit" in policies]
    if "learned" in policies:
        jobs.append(("learned", None))
    if "selection" in policies and any(len(s) > 1 for s in cands.successors):
        jobs.append(("selection", None))
    refined = []
    for job, criterion in tqdm(jobs, desc="calibrate: candidates", disable=not settings["progress"], leave=False):
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
        seconds[job] = seconds.get(job, 0.0) + time.perf_counter() - t0
    if refined:  # pair moves from the best per-exit policy over the criteria
        t0 = time.perf_counter()
        min(refined, key=lambda r: r[:2])[3]()
        seconds["thresholds"] += time.perf_counter() - t0
    return cands


def _cheapest(points):
    """The cheapest point (ties: the more accurate) and the cheapest of each family, in FAMILY_ORDER."""
    order = lambda p: (p.cost, -p.accuracy)  # noqa: E731
    by_kind: dict = {}
    for p in points:
        if p.kind not in by_kind or order(p) < order(by_kind[p.kind]):
            by_kind[p.kind] = p
    return min(points, key=order), {k: by_kind[k] for k in FAMILY_ORDER if k in by_kind}


def _search(model, outputs, settings, confidence) -> CalibrationResult:
    budget, drop = settings["budget"], settings["drop"]
    seconds: dict = {}
    notes: list[str] = []
    if confidence is None:
        full = _generate(model, outputs, budget, settings, seconds)
        points = full.points
        allowed = [p for p in points if full.measured(p) <= budget + 1e-9]  # never-exit (drop 0) is always in
        n_search = n_test = None
    else:
        full, points, allowed, n_search, n_test = _risk_controlled(model, outputs, settings, confidence, seconds,
                                                                   notes)
    never = next(p for p in points if p.kind == "never")
    best, by_kind = _cheapest(allowed)
    n, classes = full.n, full.stack.shape[2]
    chance = max(1.0 / classes, float(torch.bincount(full.labels, minlength=classes).max()) / n)
    if full.base_right / n <= chance + 1e-12 and best is not never:
        notes.append(f"the model's last exit is no better than chance on the calibration data "
                     f"({100 * full.base_right / n:.2f}% correct; chance: {100 * chance:.2f}%, the most frequent "
                     f"class): exits cannot be calibrated against it, so the never-exit policy is kept. Train "
                     f"the model, or check that the labels match the inputs")
        best, by_kind = never, {"never": never}
    policy = best.policy()
    model.set_policy(policy)
    return CalibrationResult(
        policy=policy,
        best=best,
        points=points,
        frontier=pareto_frontier(points),
        baseline_accuracy=full.base_right / n,
        full_cost=full.full,
        cost=settings["cost"],
        max_accuracy_drop=budget,
        num_examples=n,
        oracle=oracle(full.stack, full.labels, full.stage_costs, full.head_costs, reference_cost=full.full,
                      members=full.members),
        best_by_kind=by_kind,
        drop=drop,
        seconds=seconds,
        confidence=confidence,
        search_examples=n_search,
        test_examples=n_test,
        warnings=notes,
    )


def _risk_controlled(model, outputs, settings, confidence, seconds, notes):
    """Learn-then-Test with fixed-sequence testing (:mod:`.guarantee`): search on one half of the rows,
    test the search half's frontier, most conservative first, on the other half. Returns the candidates
    on all rows (``full``), every point re-evaluated on all rows, the certified ones (and never-exit),
    and the two halves' sizes."""
    budget, drop = settings["budget"], settings["drop"]
    delta, alpha = 1.0 - confidence, settings["budget"] / 100.0
    search_rows, test_rows = split_rows(outputs.labels.shape[0])
    n_search, n_test = len(search_rows), len(test_rows)
    if n_search == 0 or n_test == 0:
        raise ValueError(f"confidence needs at least 2 calibration rows (half search, half test), got "
                         f"{outputs.labels.shape[0]}; pass confidence=None for a point estimate")
    search_outputs, test_outputs = outputs.rows(search_rows), outputs.rows(test_rows)
    # the search aims where a candidate can be certified on the test half, and half-way to the budget
    aim = search_budget(budget, n_test, drop, delta)
    found, seen = [], {}
    for target in sorted({aim, 0.5 * (aim + budget)}):
        cands = _generate(model, search_outputs, target, settings, seconds)
        for p in cands.points:
            key = _key(p)
            if key not in seen:
                seen[key] = len(found)
                found.append((p, approximate_bound(cands.counts(p)[0], 0, n_search, "new_errors", delta)))
    # the test order, fixed before the test half is read: the search half's frontier of the (approximate)
    # bound of the new-error rate vs cost, from the smallest bound (the most conservative) up. New errors,
    # not the net drop, for both rules: fixes are what the search half overfits (it keeps the policies
    # that were lucky there), and one such candidate early in the order ends the whole sequence.
    sequence, cheapest = [], math.inf
    for i in sorted(range(len(found)), key=lambda i: (found[i][1], found[i][0].cost)):
        p, _ = found[i]
        if p.kind != "never" and p.cost < cheapest:
            sequence.append(i)
            cheapest = p.cost
    full = Candidates(outputs, drop, budget, model.successors, model.node_members())
    test = Candidates(test_outputs, drop, budget, model.successors, model.node_members())
    points = [full.replay(p) for p, _ in found]
    bounds = {}

    def bound(i):
        if i not in bounds:
            new, fixes = test.counts(test.replay(found[i][0]))
            bounds[i] = risk_bound(new, fixes, n_test, drop, delta)
            points[i].bound_pp = 100.0 * bounds[i]
        return bounds[i]

    certified = fixed_sequence((bound(i) for i in sequence), alpha)  # lazily: stops at the first failure
    accepted = set(sequence[:certified])
    for i, p in enumerate(points):
        p.certified = i in accepted or p.kind == "never"
    shown = {id(p) for p in pareto_frontier(points)}
    for i, p in enumerate(points):  # bounds beside the estimates where the tables show them
        if id(p) in shown and p.kind != "never":
            bound(i)
    if not accepted and sequence:
        floor = least_certifiable(n_test, drop, delta)
        needed = _rows_needed(alpha, drop, delta)
        if floor <= alpha:
            why = f"the most conservative candidate's bound is {100 * bound(sequence[0]):.2f} pp"
        elif needed is None:
            why = "a budget of 0 pp can only be certified for the never-exit policy"
        else:
            why = (f"with {n_test} test rows no policy that exits can be certified below {100 * floor:.2f} pp; "
                   f"about {needed} calibration rows would be needed")
        measure = "new errors" if drop == "new_errors" else "net drop"
        notes.append(f"no early-exit policy meets the {budget:g} pp budget ({measure}) at confidence "
                     f"{confidence:g} ({why}); the never-exit policy is kept. A larger budget, more calibration "
                     f"data or a lower confidence would allow exits")
    allowed = [points[i] for i in accepted] + [p for p in points if p.kind == "never"]
    return full, points, allowed, n_search, n_test


def _rows_needed(alpha: float, drop: str, delta: float) -> int | None:
    """Calibration rows (both halves) for a policy with no new errors to be certified within ``alpha``
    (``None`` if no number is enough: a budget of 0)."""
    if alpha <= 0:
        return None
    n = 2
    while least_certifiable(n, drop, delta) > alpha:
        n *= 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if least_certifiable(mid, drop, delta) <= alpha else (mid, hi)
    return 2 * hi


def _key(p: CalibrationPoint):
    """What identifies a candidate's policy (two searches may find the same one)."""
    if p.policy_object is not None:
        return ("object", id(p.policy_object))
    gates = None if p.gates is None else tuple(None if g is None else tuple(g) for g in p.gates)
    thresholds = None if p.thresholds is None else tuple(p.thresholds)
    return (p.kind, p.criterion, thresholds, gates)
