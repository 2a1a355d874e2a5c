"""Exact offline simulation of exit decisions from dense exit logits.

Everything here is a pure function of every exit's logits on a data set (``[K, N, C]``), the labels and
the per-example costs of each stage and head: the confidence each exit's gate computes (exactly as the
:func:`~adaexit.kernels.exit_gate` kernel's torch reference computes it), the loss of each exit, and what
the sparse executor does with a threshold policy (:func:`simulate`). Calibration and the learned
policies use it to evaluate hundreds of candidate policies for the price of one dense forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import exit_gate_torch

CONFIDENCE_CRITERIA = ("maxprob", "margin", "entropy")
LOSSES = ("error", "ce")


# =============================================================================================
# Scores, losses and the simulation (pure functions over dense exit logits)
# =============================================================================================
def stack_logits(exit_logits) -> torch.Tensor:
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


def check_labels(labels, n: int, classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be [N] with N = {n}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.long()
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels


def check_costs(stage_costs, head_costs, k: int) -> tuple[list[float], list[float]]:
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
    stack = stack_logits(exit_logits)
    return torch.stack([exit_gate_torch(z, None, criterion=criterion, threshold=math.inf)[1] for z in stack])


def exit_statistics(logits: torch.Tensor) -> torch.Tensor:
    """Float32 ``[N, 3]``: the softmax statistics a learned gate reads (maxprob, margin, entropy score)."""
    logits = logits.detach().float().cpu()
    return torch.stack(
        [exit_gate_torch(logits, None, criterion=c, threshold=math.inf)[1] for c in CONFIDENCE_CRITERIA], dim=1
    )


def softmax_statistics(logits: torch.Tensor) -> torch.Tensor:
    """Float32 ``[N, 3]`` (maxprob, margin, entropy score) of ``[N, C]`` logits on their own device,
    computed as the exit-gate kernel's torch reference computes each criterion (clamped to [0, 1];
    NaN rows for non-finite logits). What history gates (:class:`adaexit.LearnedPolicy`) read, in the
    sparse run and in the simulation alike."""
    logits = logits.float()
    classes = logits.shape[1]
    p = torch.softmax(logits, dim=1)
    top1, idx = p.max(dim=1)
    top2 = p.scatter(1, idx[:, None], -1.0).max(dim=1).values
    entropy = -(p * torch.log_softmax(logits, dim=1)).sum(dim=1)
    stats = torch.stack([top1, top1 - top2, 1.0 - entropy / math.log(classes)], dim=1).clamp(0.0, 1.0)
    return stats.masked_fill(~torch.isfinite(logits).all(dim=1, keepdim=True), float("nan"))


def prob_features(logits: torch.Tensor, top_k: int = 3) -> torch.Tensor:
    """Class-agnostic statistics of a node's softmax output, the input of the learned routing policies.

    Columns: top-1 probability, top-1 minus top-2 probability, ``1 - H(p)/log C``, then the ``top_k``
    largest probabilities in decreasing order (zero-padded when there are fewer classes). Rows with
    non-finite logits give non-finite features (the policies never let such a row exit).
    """
    logits = logits.float()
    classes = logits.shape[1]
    if classes < 2:
        raise ValueError(f"prob_features: need >= 2 classes, got logits of shape {tuple(logits.shape)}")
    p = torch.softmax(logits, dim=1)
    top = p.topk(min(max(top_k, 2), classes), dim=1).values
    entropy = -torch.special.xlogy(p, p).sum(dim=1)  # xlogy: 0 * log 0 = 0
    cols = [top[:, 0], top[:, 0] - top[:, 1], 1.0 - entropy / math.log(classes)]
    feats = torch.stack(cols, dim=1)
    if top_k:
        sorted_top = top[:, :top_k]
        if sorted_top.shape[1] < top_k:
            sorted_top = F.pad(sorted_top, (0, top_k - sorted_top.shape[1]))
        feats = torch.cat([feats, sorted_top], dim=1)
    finite = torch.isfinite(logits).all(dim=1, keepdim=True)
    return torch.where(finite, feats, torch.full_like(feats, float("nan")))


def learned_scores(exit_logits, gates) -> torch.Tensor:
    """Float32 ``[K, N]`` gate scores ``sigmoid(g . stats + b)`` as the kernel computes them; NaN rows
    for the last exit and for disabled (``None``) gates."""
    stack = stack_logits(exit_logits)
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
    stack = stack_logits(exit_logits)
    labels = check_labels(labels, stack.shape[1], stack.shape[2])
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


def _outcome(exit_index, counts, rows_run, rows_decided, correct, stage_costs, head_costs) -> Simulation:
    """The :class:`Simulation` of decided routes: accuracy from ``correct`` and the cost of the rows each node
    ran and decided, summed in the order :func:`adaexit.base.trace_flops` uses (so FLOPs agree to the last
    bit)."""
    n = exit_index.shape[0]
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
    stage_costs, head_costs = check_costs(stage_costs, head_costs, k_exits)

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
    return _outcome(exit_index, counts, rows_run, rows_decided, correct, stage_costs, head_costs)


def budget_losses(correct, drop: str = "net") -> torch.Tensor:
    """Float64 ``[K, N]``: what exiting row ``n`` at exit ``k`` adds to the quantity a calibration
    budget bounds (``drop`` as in :func:`adaexit.calibrate`).

    ``"net"``: the 0/1 error of exit ``k`` (the net drop is the sum minus the last exit's errors).
    ``"new_errors"``: 1 where the last exit is right and exit ``k`` is wrong (the last exit's own row
    is 0), so a policy's new errors are exactly the sum of its rows' losses.
    """
    correct = torch.as_tensor(correct, dtype=torch.bool)
    if drop == "net":
        return (~correct).double()
    if drop == "new_errors":
        return (correct[-1:] & ~correct).double()
    raise ValueError(f"drop must be 'net' or 'new_errors', got {drop!r}")


def simulate_routes(routes, successors, correct, stage_costs, head_costs, decided=None) -> Simulation:
    """Predict what the executor does with a routing policy, from the route every node would give
    every row (computed densely, e.g. by a policy's classifier on the dense per-node logits).

    Args:
        routes: long ``[K, N]``: at node ``k``, route ``0`` = exit, ``j >= 1`` = go to
            ``successors[k][j - 1]``; only the rows that really reach ``k`` use their entry; at a node
            without successors every row exits.
        successors: per node, the nodes a row may go to (``model.successors``).
        correct: bool ``[K, N]``. stage_costs, head_costs: per node.
        decided: per node, whether the policy evaluates the node's head and decision (``needs_head``);
            default all. A terminal node always decides.

    Each row runs the stage of every node it visits and the head of every visited node that decides;
    ``cost`` sums them exactly as :class:`adaexit.ExitInfo` does.
    """
    correct = torch.as_tensor(correct, dtype=torch.bool)
    k_exits, n = correct.shape
    routes = torch.as_tensor(routes).long()
    if tuple(routes.shape) != (k_exits, n):
        raise ValueError(f"routes must be [K, N] = {(k_exits, n)} like correct, got {tuple(routes.shape)}")
    successors = [tuple(int(j) for j in s) for s in successors]
    if len(successors) != k_exits:
        raise ValueError(f"successors has {len(successors)} entries for {k_exits} nodes")
    stage_costs, head_costs = check_costs(stage_costs, head_costs, k_exits)
    decided = [True] * k_exits if decided is None else [bool(d) for d in decided]
    at = torch.zeros(n, dtype=torch.long)  # the node each row is at (or exited from)
    exit_index = torch.full((n,), -1, dtype=torch.long)
    rows_run, rows_decided = [0] * k_exits, [0] * k_exits
    for k in range(k_exits):
        here = (at == k) & (exit_index < 0)
        count = int(here.sum())
        rows_run[k] = count
        succ = successors[k]
        if not succ:
            rows_decided[k] = count
            exit_index[here] = k
            continue
        if not decided[k]:  # no decision: every row continues to the first successor
            at[here] = succ[0]
            continue
        rows_decided[k] = count
        r = routes[k]
        if bool(((r[here] < 0) | (r[here] > len(succ))).any()):
            raise ValueError(f"routes[{k}] holds routes outside [0, {1 + len(succ)})")
        exit_index[here & (r == 0)] = k
        table = torch.tensor((k,) + succ, dtype=torch.long)
        move = here & (r > 0)
        at[move] = table[r[move]]
    counts = torch.bincount(exit_index, minlength=k_exits).tolist()
    return _outcome(exit_index, counts, rows_run, rows_decided, correct, stage_costs, head_costs)


# ---------------------------------------------------------------------------------------------
# The bottom-up value shared by per-exit thresholds and learned gates
# ---------------------------------------------------------------------------------------------
def relative_costs(stage_costs, head_costs):
    """Stage and head costs as fractions of the full model's cost."""
    full = full_cost(stage_costs, head_costs)
    return [c / full for c in stage_costs], [c / full for c in head_costs]


def exit_value(losses, k: int, fire, active: bool, rel_stage, rel_head, mu: float, value_next):
    """Per-example ``mu * cost + loss`` from the start of stage ``k`` on, given exit ``k``'s decisions."""
    here = mu * (rel_stage[k] + (rel_head[k] if active else 0.0))
    if value_next is None:  # the last exit: everyone exits
        return here + losses[k]
    return here + torch.where(fire, losses[k], value_next)


def fire_mask(score, t: float) -> torch.Tensor:
    """Which rows a threshold ``t`` lets exit (``t > 1`` disables the exit; NaN never fires)."""
    return score >= t if t <= 1.0 else torch.zeros_like(score, dtype=torch.bool)
