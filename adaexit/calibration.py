"""Calibration: choose the exit policy that minimises expected cost within an accuracy budget.

:func:`calibrate` runs a model once, densely, over calibration data and keeps every exit's logits.
Everything after that is offline: candidate policies are *simulated* exactly as the sparse executor
would run them, so hundreds of candidates cost one forward pass. The candidates:

* ``"uniform"``: one confidence threshold shared by every early exit (per criterion), swept over a
  grid of score quantiles (Bolukbasi et al.'s uniform-threshold baseline);
* ``"per_exit"``: one threshold per exit, chosen by a Lagrangian dynamic program: for a multiplier
  ``mu`` trading cost for errors, the thresholds are chosen from the last early exit to the first,
  each minimising ``errors + mu * cost`` against the already-fixed downstream thresholds, then refined
  by exact coordinate descent (each step re-chooses one threshold for the examples that really reach
  it, so the objective never increases); ``mu`` is swept;
* ``"learned"``: :class:`adaexit.LearnedPolicy` (Bolukbasi et al. 2017): one linear gate per early exit
  on the exit's softmax statistics, fitted bottom-up as weighted logistic regression, ``mu`` swept.

The model only has to follow the calibration protocol: ``num_exits``, ``exit_logits(x)``,
``exit_costs(x, cost)`` and ``set_policy(policy)``.

Cost units: ``cost_weight`` (``mu``) multiplies the cost as a *fraction of the full model's cost*, so
the objective per example is ``loss + mu * cost / full_cost``: with ``mu = 1``, running the whole model
is worth one error.

Robustness: the sparse executor evaluates heads on sub-batches, whose logits can differ from the dense
ones by float rounding (~1e-7). Thresholds are therefore placed in the middle of gaps between calibration
scores, never on a score, and scores closer than :data:`TIE_TOL` are treated as ties, so the deployed
policy makes the decisions the simulation predicted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .cost import module_device
from .data import batches as _batches
from .kernels import exit_gate_torch
from .policies import ConfidencePolicy, LearnedPolicy, NeverExitPolicy, Policy

COSTS = ("flops", "latency")
CONFIDENCE_CRITERIA = ("maxprob", "margin", "entropy")
POLICY_KINDS = ("uniform", "per_exit", "learned")
DROP_MEASURES = ("net", "new_errors")
LOSSES = ("error", "ce")
PROTOCOL = ("num_exits", "exit_logits", "exit_costs", "set_policy")

#: Scores closer than this are ties: no threshold is placed between them (see the module docstring).
TIE_TOL = 1e-5
#: Gate that always fires (on rows with finite statistics): ``sigmoid(8) >= 0.5``.
ALWAYS_FIRE = (0.0, 0.0, 0.0, 8.0)

UNIFORM_GRID = 64  # quantile positions per criterion
PER_EXIT_WEIGHTS = (0.0,) + tuple(float(w) for w in torch.logspace(-4, 1.5, 45).tolist())
LEARNED_WEIGHTS = (0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)


# =============================================================================================
# Scores, losses and the simulation (pure functions over dense exit logits)
# =============================================================================================
def _stack(exit_logits) -> torch.Tensor:
    """``[K, N, C]`` float32 CPU tensor from a list of ``[N, C]`` logits (or an existing stack)."""
    if isinstance(exit_logits, torch.Tensor):
        if exit_logits.dim() != 3:
            raise ValueError(f"exit_logits must be [K, N, C] or a list of [N, C], got {tuple(exit_logits.shape)}")
        return exit_logits.detach().float().cpu()
    exit_logits = list(exit_logits)
    if not exit_logits:
        raise ValueError("exit_logits is empty: need one [N, C] tensor per exit")
    shape = tuple(exit_logits[0].shape)
    for k, logits in enumerate(exit_logits):
        if logits.dim() != 2 or tuple(logits.shape) != shape:
            raise ValueError(f"exit_logits[{k}] has shape {tuple(logits.shape)}; every exit needs {shape} = [N, C]")
    return torch.stack([t.detach().float().cpu() for t in exit_logits])


def _check_labels(labels, n: int, classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be [N] with N = {n}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.long()
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels


def _check_costs(stage_costs, head_costs, k: int) -> tuple[list[float], list[float]]:
    stage_costs, head_costs = [float(c) for c in stage_costs], [float(c) for c in head_costs]
    for name, costs in (("stage_costs", stage_costs), ("head_costs", head_costs)):
        if len(costs) != k:
            raise ValueError(f"{name} has {len(costs)} entries; the model has {k} exits")
        if any(not math.isfinite(c) or c < 0 for c in costs):
            raise ValueError(f"{name} must be finite and >= 0, got {costs}")
    if sum(stage_costs) + head_costs[-1] <= 0:
        raise ValueError("the full model's cost (all stages + the last head) must be > 0")
    return stage_costs, head_costs


def full_cost(stage_costs, head_costs) -> float:
    """Per-example cost of the plain model: every stage plus the last head."""
    return float(sum(stage_costs) + head_costs[-1])


def exit_scores(exit_logits, criterion: str) -> torch.Tensor:
    """Float32 ``[K, N]`` confidence of every exit for every row, computed exactly as the exit-gate
    kernel's torch reference does (NaN for rows with a non-finite logit)."""
    if criterion not in CONFIDENCE_CRITERIA:
        raise ValueError(f"criterion must be one of {CONFIDENCE_CRITERIA}, got {criterion!r}")
    stack = _stack(exit_logits)
    return torch.stack([exit_gate_torch(z, None, criterion=criterion, threshold=math.inf)[1] for z in stack])


def exit_statistics(logits: torch.Tensor) -> torch.Tensor:
    """Float32 ``[N, 3]``: the softmax statistics a learned gate reads (maxprob, margin, entropy score)."""
    logits = logits.detach().float().cpu()
    return torch.stack(
        [exit_gate_torch(logits, None, criterion=c, threshold=math.inf)[1] for c in CONFIDENCE_CRITERIA], dim=1
    )


def learned_scores(exit_logits, gates) -> torch.Tensor:
    """Float32 ``[K, N]`` gate scores ``sigmoid(g . stats + b)`` as the kernel computes them; NaN rows
    for the last exit and for disabled (``None``) gates."""
    stack = _stack(exit_logits)
    out = torch.full(stack.shape[:2], float("nan"))
    for k, gate in enumerate(gates):
        if gate is not None:
            g = torch.tensor(gate, dtype=torch.float32)
            out[k] = exit_gate_torch(stack[k], None, criterion="learned", threshold=math.inf, gate=g)[1]
    return out


def learned_thresholds(gates) -> list[float]:
    """The thresholds that make :func:`simulate` run a :class:`LearnedPolicy` on :func:`learned_scores`."""
    return [0.5 if g is not None else math.inf for g in gates]


def exit_losses(exit_logits, labels, loss: str = "error") -> torch.Tensor:
    """Float64 ``[K, N]`` per-example loss of every exit: ``"error"`` (0/1) or ``"ce"`` (cross-entropy)."""
    stack = _stack(exit_logits)
    labels = _check_labels(labels, stack.shape[1], stack.shape[2])
    if loss == "error":
        return (stack.argmax(dim=2) != labels).double()
    if loss == "ce":
        ce = torch.stack([F.cross_entropy(z.double(), labels, reduction="none") for z in stack])
        # cap the loss of rows with non-finite logits so sums over examples stay finite
        return torch.nan_to_num(ce, nan=50.0, posinf=50.0)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


@dataclass
class Simulation:
    """What the sparse executor does with a threshold policy, predicted from dense scores.

    Attributes:
        exit_index: long ``[N]``, the exit each row returns from.
        exit_counts: rows per exit.
        rows_run: rows that run each stage. ``rows_decided``: rows whose head is evaluated at each exit.
        accuracy: fraction of rows whose returned prediction is correct.
        total_cost: cost of the whole set, summed exactly as :class:`adaexit.ExitInfo` sums FLOPs.
        cost: mean cost per example.
    """

    exit_index: torch.Tensor
    exit_counts: list[int]
    rows_run: list[int]
    rows_decided: list[int]
    accuracy: float
    total_cost: float
    cost: float


def simulate(scores, thresholds, correct, stage_costs, head_costs) -> Simulation:
    """Predict a threshold policy's decisions, accuracy and cost (the executor's rules, exactly).

    Args:
        scores: ``[K, N]`` float32 confidence (or learned gate score) of every exit for every row; the
            last row is ignored (the last exit always fires).
        thresholds: ``K - 1`` floats. Row ``n`` exits at the first ``k`` with ``scores[k, n] >=
            thresholds[k]`` (compared in the scores' dtype, like the kernel); NaN never exits; a
            threshold above 1 disables exit ``k``, whose head is then not evaluated (costs nothing).
        correct: bool ``[K, N]``, whether exit ``k`` classifies row ``n`` correctly.
        stage_costs, head_costs: per-example cost of each stage and each head (``K`` each).
    """
    scores = torch.as_tensor(scores)
    correct = torch.as_tensor(correct, dtype=torch.bool)
    if correct.dim() != 2:
        raise ValueError(f"correct must be [K, N], got {tuple(correct.shape)}")
    k_exits, n = correct.shape
    if tuple(scores.shape) != (k_exits, n):
        raise ValueError(f"scores must be [K, N] = {(k_exits, n)} like correct, got {tuple(scores.shape)}")
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != k_exits - 1:
        raise ValueError(f"need {k_exits - 1} thresholds (one per early exit), got {len(thresholds)}")
    if any(math.isnan(t) for t in thresholds):
        raise ValueError(f"thresholds must not be NaN, got {thresholds}")
    stage_costs, head_costs = _check_costs(stage_costs, head_costs, k_exits)

    exit_index = torch.full((n,), k_exits - 1, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    for k, t in enumerate(thresholds):
        if t > 1.0:  # disabled: the policy skips this head
            continue
        fire = alive & (scores[k] >= t)  # same comparison as the kernel; NaN compares False
        exit_index[fire] = k
        alive &= ~fire
    counts = torch.bincount(exit_index, minlength=k_exits).tolist()
    rows_run, reach = [], n
    for k in range(k_exits):
        rows_run.append(reach)
        reach -= counts[k]
    active = [t <= 1.0 for t in thresholds] + [True]
    rows_decided = [r if a else 0 for r, a in zip(rows_run, active)]
    # summed in the order adaexit.early_exit.trace_flops uses, so FLOPs agree to the last bit
    total = float(
        sum(r * f for r, f in zip(rows_run, stage_costs)) + sum(r * f for r, f in zip(rows_decided, head_costs))
    )
    right = correct[exit_index, torch.arange(n)] if n else torch.zeros(0, dtype=torch.bool)
    return Simulation(
        exit_index=exit_index,
        exit_counts=counts,
        rows_run=rows_run,
        rows_decided=rows_decided,
        accuracy=float(right.double().mean()) if n else float("nan"),
        total_cost=total,
        cost=total / n if n else float("nan"),
    )


# =============================================================================================
# The bottom-up dynamic program shared by per-exit thresholds and learned gates
# =============================================================================================
def _relative_costs(stage_costs, head_costs):
    full = full_cost(stage_costs, head_costs)
    return [c / full for c in stage_costs], [c / full for c in head_costs]


def _exit_value(losses, k: int, fire, active: bool, rel_stage, rel_head, mu: float, value_next):
    """Per-example ``mu * cost + loss`` from the start of stage ``k`` on, given exit ``k``'s decisions."""
    here = mu * (rel_stage[k] + (rel_head[k] if active else 0.0))
    if value_next is None:  # the last exit: everyone exits
        return here + losses[k]
    return here + torch.where(fire, losses[k], value_next)


def _cuts(sorted_desc: torch.Tensor) -> torch.Tensor:
    """Allowed numbers of exiting rows ``i`` (1..m) for scores sorted descending: a cut may not
    split a group of ties (scores within :data:`TIE_TOL`)."""
    m = sorted_desc.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    gap_ok = (sorted_desc[:-1] - sorted_desc[1:]) > TIE_TOL
    return torch.cat([torch.nonzero(gap_ok).flatten() + 1, torch.tensor([m])])


def _threshold_for_cut(sorted_desc: torch.Tensor, i: int) -> float:
    """A threshold letting exactly the top ``i`` rows through, in the middle of the gap below them."""
    if i >= sorted_desc.shape[0]:
        return 0.0  # every finite score is >= 0
    return float((sorted_desc[i - 1] + sorted_desc[i]) / 2)


def _best_threshold(score, exit_val, cont_val, reach, head_penalty: float) -> float:
    """The threshold for one exit minimising ``sum over reaching rows`` of (exit ? exit_val :
    cont_val) plus the head's cost if the exit is enabled; ``inf`` (disabled) when nothing beats it."""
    candidates = reach & torch.isfinite(score)
    s = score[candidates].double()
    order = torch.sort(s, descending=True, stable=True).indices
    s = s[order]
    gain = (exit_val - cont_val)[candidates][order]  # change in the objective when a row exits
    if s.numel() == 0:
        return math.inf
    cuts = _cuts(s)
    objective = torch.cumsum(gain, 0)[cuts - 1] + head_penalty * float(reach.sum())
    best = int(torch.argmin(objective))
    if not float(objective[best]) < 0.0:  # disabled (0 change, no head cost) is at least as good
        return math.inf
    return _threshold_for_cut(s, int(cuts[best]))


def _fires(score, t: float) -> torch.Tensor:
    return score >= t if t <= 1.0 else torch.zeros_like(score, dtype=torch.bool)


def per_exit_thresholds(scores, losses, stage_costs, head_costs, cost_weight: float, passes: int = 4) -> list[float]:
    """Per-exit thresholds minimising ``sum(loss) + cost_weight * sum(cost / full_cost)`` on the data.

    Pass 1 is Bolukbasi's bottom-up order: from the last early exit to the first, each threshold is
    chosen against the already-fixed downstream thresholds, over every example (the upstream policy is
    not known yet). Later passes are exact coordinate descent: each threshold is re-chosen for the rows
    that really reach it, so the objective never increases; they stop when nothing changes.

    Args:
        scores: ``[K, N]`` float32 confidences (:func:`exit_scores`).
        losses: ``[K, N]`` per-example loss of each exit (:func:`exit_losses`).
        cost_weight: ``mu >= 0``.
    Returns ``K - 1`` thresholds (``inf`` = exit disabled).
    """
    scores, losses = torch.as_tensor(scores), torch.as_tensor(losses, dtype=torch.float64)
    k_exits, n = losses.shape
    rel_stage, rel_head = _relative_costs(*_check_costs(stage_costs, head_costs, k_exits))
    mu = float(cost_weight)
    thresholds = [math.inf] * (k_exits - 1)
    for pass_ in range(max(1, passes)):
        previous = list(thresholds)
        fires = [_fires(scores[k], t) for k, t in enumerate(thresholds)]
        value = _exit_value(losses, k_exits - 1, None, True, rel_stage, rel_head, mu, None)
        for k in range(k_exits - 2, -1, -1):
            reach = torch.ones(n, dtype=torch.bool)
            if pass_ > 0:  # rows the current upstream thresholds let through to exit k
                for j in range(k):
                    reach &= ~fires[j]
            cont = mu * rel_stage[k] + value  # the stage runs either way; only the choice differs
            here = mu * rel_stage[k] + losses[k]
            thresholds[k] = _best_threshold(scores[k], here, cont, reach, mu * rel_head[k])
            fires[k] = _fires(scores[k], thresholds[k])
            value = _exit_value(losses, k, fires[k], thresholds[k] <= 1.0, rel_stage, rel_head, mu, value)
        if thresholds == previous:
            break
    return thresholds


# =============================================================================================
# Learned gates (Bolukbasi et al. 2017): bottom-up weighted logistic regression
# =============================================================================================
def _weighted_logistic(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float = 1e-3, steps: int = 200):
    """Fit ``sigmoid(x @ a + b)`` to labels ``y`` with example weights ``w``; returns ``(a, b)`` in the
    units of ``x`` (fitted on standardised features, then folded back)."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    w = w / w.sum()
    pos = min(max(float((w * y).sum()), 1e-6), 1 - 1e-6)
    a = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(math.log(pos / (1 - pos)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xs @ a + b
        loss = (w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() + l2 * (a * a).sum()
        loss.backward()
        return loss

    opt.step(closure)
    a, b = a.detach(), b.detach()
    return a / std, b - (a * mean / std).sum()


def _gate_objective(decide, here, cont, head_penalty: float) -> float:
    return float(torch.where(decide, here, cont).sum()) + head_penalty * decide.shape[0]


def fit_learned_gates(
    exit_logits, labels, stage_costs, head_costs, cost_weight: float, loss: str = "error"
) -> list[tuple[float, float, float, float] | None]:
    """Learn one gate per early exit, bottom-up (Bolukbasi et al. 2017); see :meth:`LearnedPolicy.fit`.

    For exit ``k``, from the last early exit to the first, with the gates below already fixed: for
    every example, ``here = loss_k + mu * 0`` (exit now) and ``continue = the cost of the stages and
    heads it would run next + the loss at the exit the fixed downstream gates send it to`` (costs as
    fractions of the full model, times ``mu = cost_weight``). Label: exiting is strictly better; weight:
    ``|here - continue|``. A weighted logistic regression on the exit's softmax statistics
    ``[maxprob, margin, entropy score]`` gives ``(w, b)``; the gate fires when ``sigmoid(w . stats + b)
    >= 0.5``. A gate is disabled (``None``, its head never evaluated) when no example is better off
    exiting, or when the fitted gate does not pay for its head's cost on the data.
    """
    stack = _stack(exit_logits)
    k_exits, n, classes = stack.shape
    labels = _check_labels(labels, n, classes)
    if n == 0:
        raise ValueError("fit_learned_gates needs at least one example")
    if not (math.isfinite(float(cost_weight)) and float(cost_weight) >= 0):
        raise ValueError(f"cost_weight must be finite and >= 0, got {cost_weight}")
    rel_stage, rel_head = _relative_costs(*_check_costs(stage_costs, head_costs, k_exits))
    losses = exit_losses(stack, labels, loss)
    mu = float(cost_weight)

    gates: list = [None] * (k_exits - 1)
    value = _exit_value(losses, k_exits - 1, None, True, rel_stage, rel_head, mu, None)
    for k in range(k_exits - 2, -1, -1):
        here = losses[k]
        cont = value  # the stage-k cost is paid either way
        head_penalty = mu * rel_head[k]
        stats = exit_statistics(stack[k])
        finite = torch.isfinite(stats).all(dim=1)  # NaN rows never exit, whatever the gate
        label = (here < cont) & finite
        weight = (here - cont).abs()
        gate, fire = None, torch.zeros(n, dtype=torch.bool)
        # rows with zero weight are indifferent: they do not pull the gate either way
        train = finite & (weight > 0)
        if bool(label.any()):
            if bool(label[train].all()):
                gate = ALWAYS_FIRE
            else:
                x = stats[train].double()
                a, b = _weighted_logistic(x, label[train].double(), weight[train])
                gate = _centre_gate(a, b, stats[finite].double())
            fire = _fires(learned_scores(stack[k : k + 1], [gate])[0], 0.5)
            # keep the gate only if it beats never exiting here, head cost included
            if _gate_objective(fire, here, cont, head_penalty) >= float(cont.sum()):
                gate, fire = None, torch.zeros(n, dtype=torch.bool)
        value = _exit_value(losses, k, fire, gate is not None, rel_stage, rel_head, mu, value)
        gates[k] = gate
    return gates


def _centre_gate(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float, float]:
    """Move the bias so the boundary sits mid-way between the nearest training rows on either side
    (same decisions on the data, the largest local margin against rounding), as float32 values."""
    z = x @ a + b
    below, above = z[z < 0], z[z >= 0]
    if below.numel() and above.numel():
        b = b - (float(below.max()) + float(above.min())) / 2
    return tuple(float(v) for v in torch.cat([a, b.reshape(1)]).float())


# =============================================================================================
# Oracle and results
# =============================================================================================
@dataclass
class OracleResult:
    """Each example exits at the cheapest exit that classifies it correctly (the last if none does);
    its cost counts the stages up to that exit and that exit's head only. A lower bound, not a policy."""

    accuracy: float
    cost: float
    speedup: float
    exit_counts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def oracle(exit_logits, labels, stage_costs, head_costs, reference_cost: float | None = None) -> OracleResult:
    """The oracle point (Bolukbasi et al.'s upper bound) from dense exit logits; its speedup is against
    ``reference_cost`` (default: the plain model, every stage and the last head)."""
    stack = _stack(exit_logits)
    k_exits, n, classes = stack.shape
    labels = _check_labels(labels, n, classes)
    if n == 0:
        raise ValueError("oracle needs at least one example")
    stage_costs, head_costs = _check_costs(stage_costs, head_costs, k_exits)
    correct = stack.argmax(dim=2) == labels
    first = torch.where(correct.any(0), correct.double().argmax(0), torch.full((n,), k_exits - 1))
    reach = [sum(stage_costs[: k + 1]) + head_costs[k] for k in range(k_exits)]
    cost = float(torch.tensor(reach, dtype=torch.float64)[first].mean())
    return OracleResult(
        accuracy=float(correct.any(0).double().mean()),
        cost=cost,
        speedup=(reference_cost or full_cost(stage_costs, head_costs)) / cost if cost else math.inf,
        exit_counts=torch.bincount(first, minlength=k_exits).tolist(),
    )


def _json_float(v):
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class CalibrationPoint:
    """One evaluated candidate policy.

    Attributes:
        kind: ``"uniform"``, ``"per_exit"``, ``"learned"`` or ``"never"``.
        criterion: confidence criterion (``None`` for learned/never).
        thresholds: per early exit (``inf`` = disabled) for threshold policies, else ``None``.
        gates: per early exit, 4 floats or ``None`` (disabled), for learned policies, else ``None``.
        cost_weight: the multiplier ``mu`` that produced it (per_exit/learned), else ``None``.
        accuracy: fraction correct on the calibration data. accuracy_drop_pp: percentage points below
            the last exit's accuracy (negative = better). cost: mean per example. speedup: full / cost.
        exit_counts: rows per exit.
        new_errors_pp: percentage of examples the last exit classifies correctly and this policy
            does not (>= accuracy_drop_pp: the net drop minus the examples an early exit fixes).
    """

    kind: str
    criterion: str | None
    thresholds: list[float] | None
    gates: list | None
    cost_weight: float | None
    accuracy: float
    accuracy_drop_pp: float
    cost: float
    speedup: float
    exit_counts: list[int] = field(default_factory=list)
    new_errors_pp: float = 0.0

    def policy(self) -> Policy:
        """A fresh policy object implementing this point."""
        if self.kind == "never":
            return NeverExitPolicy()
        if self.kind == "learned":
            return LearnedPolicy([None if g is None else list(g) for g in self.gates])
        return ConfidencePolicy(self.criterion, self.thresholds)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.thresholds is not None:  # JSON has no infinity: a disabled exit is null
            d["thresholds"] = [_json_float(t) for t in self.thresholds]
        if self.gates is not None:
            d["gates"] = [None if g is None else [float(v) for v in g] for g in self.gates]
        return d


def pareto_frontier(points: Sequence[CalibrationPoint]) -> list[CalibrationPoint]:
    """The points no other point dominates (cost <= and accuracy >=, one strictly), sorted by cost."""
    ordered = sorted(points, key=lambda p: (p.cost, -p.accuracy))
    frontier, best_acc = [], -math.inf
    for p in ordered:
        if p.accuracy > best_acc:
            if frontier and frontier[-1].cost == p.cost:  # same cost, better accuracy: replace
                frontier.pop()
            frontier.append(p)
            best_acc = p.accuracy
    return frontier


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
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as err:  # pragma: no cover - matplotlib is an optional dependency
            raise ImportError("CalibrationResult.plot needs matplotlib (pip install adaexit[bench])") from err
        fig = Figure(figsize=(6.4, 4.4))
        FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
        ax = fig.add_subplot()
        for kind in ("uniform", "per_exit", "learned"):
            front = pareto_frontier([p for p in self.points if p.kind == kind])
            if front:
                ax.plot([p.speedup for p in front], [100 * p.accuracy for p in front], "o-", ms=3, label=kind)
        ax.plot([1.0], [100 * self.baseline_accuracy], "ks", label="last exit (plain model)")
        if oracle and self.oracle is not None:
            ax.plot([self.oracle.speedup], [100 * self.oracle.accuracy], "r*", ms=12, label="oracle")
        ax.plot([self.best.speedup], [100 * self.best.accuracy], "o", mfc="none", mec="k", ms=12, label="chosen")
        ax.axhline(100 * self.baseline_accuracy - self.max_accuracy_drop, color="grey", ls=":", lw=1,
                   label=f"budget (-{self.max_accuracy_drop:g} pp)")
        ax.set_xlabel(f"speedup ({self.cost}, full / expected cost)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


# =============================================================================================
# calibrate
# =============================================================================================
def _check_protocol(model) -> None:
    missing = [name for name in PROTOCOL if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"calibrate: {type(model).__name__} does not follow the calibration protocol; missing "
            f"{', '.join(missing)} (a model needs num_exits, exit_logits(x), exit_costs(x, cost), set_policy(p))"
        )


@torch.no_grad()
def collect_exit_logits(model, data, cost: str = "flops", progress: bool = True, batch_size: int = 256):
    """Run the model densely over ``data`` once: ``(exit_logits [K, N, C] CPU, labels [N], stage_costs,
    head_costs, reference_cost)``. Costs come from ``model.exit_costs`` on the first batch (per-example costs do not
    depend on the batch; latency is measured at that batch's size)."""
    from tqdm.auto import tqdm

    _check_protocol(model)
    num_exits = int(model.num_exits)
    device = module_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    logits, labels, costs, reference = [[] for _ in range(num_exits)], [], None, None
    try:
        for i, batch in enumerate(tqdm(_batches(data, batch_size), desc="calibrate: exit logits",
                                       disable=not progress, leave=False)):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"data: batch {i} is not an (x, y) pair")
            x, y = batch[0], batch[1]
            if x.shape[0] != len(y):
                raise ValueError(f"data: batch {i} has {x.shape[0]} inputs but {len(y)} labels")
            if x.shape[0] == 0:
                continue
            if device is not None:
                x = x.to(device)
            outs = list(model.exit_logits(x))
            if len(outs) != num_exits:
                raise ValueError(f"model.exit_logits returned {len(outs)} tensors; model.num_exits is {num_exits}")
            for k, z in enumerate(outs):
                logits[k].append(z.detach().float().cpu())
            labels.append(torch.as_tensor(y).cpu())
            if costs is None:
                costs = model.exit_costs(x, cost)
                # Optional protocol method: the cost speedups are measured against (for a cascade,
                # the strongest single network alone, not every network in sequence).
                reference = model.reference_cost(x, cost) if hasattr(model, "reference_cost") else None
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    if not labels:
        raise ValueError("calibrate: data is empty (no examples)")
    stack = _stack([torch.cat(parts) for parts in logits])
    labels = _check_labels(torch.cat(labels), stack.shape[1], stack.shape[2])
    stage_costs, head_costs = _check_costs(*costs, num_exits)
    if reference is None:
        reference = full_cost(stage_costs, head_costs)
    return stack, labels, stage_costs, head_costs, float(reference)


def _uniform_thresholds(scores: torch.Tensor, grid: int = UNIFORM_GRID) -> list[float]:
    """One shared threshold per candidate: gap midpoints near ``grid`` quantiles of the early exits' scores."""
    pooled = scores[:-1].flatten()
    pooled = torch.unique(pooled[torch.isfinite(pooled)].double())  # sorted ascending
    if pooled.numel() == 0:
        return []
    gaps = torch.nonzero((pooled[1:] - pooled[:-1]) > TIE_TOL).flatten()
    mids = (pooled[gaps] + pooled[gaps + 1]) / 2
    out = {0.0}
    if mids.numel():
        ranks = torch.linspace(0, pooled.numel() - 1, grid).round().long()
        targets = pooled[ranks]  # the grid's quantiles of the pooled scores
        pos = torch.searchsorted(mids, targets).clamp(max=mids.numel() - 1)
        out.update(float(v) for v in mids[pos])
    return sorted(out)


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
        model: follows the calibration protocol (``num_exits``, ``exit_logits``, ``exit_costs``,
            ``set_policy``), e.g. :class:`adaexit.EarlyExitNet`.
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

    _check_protocol(model)
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

    stack, labels, stage_costs, head_costs, full = collect_exit_logits(
        model, data, cost, progress, int(batch_size)
    )
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
                for t in _uniform_thresholds(scores):
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
        oracle=oracle(stack, labels, stage_costs, head_costs, reference_cost=full),
    )
