"""Evaluation tools for every adaptive model: dense outputs on a data set, the oracle, operating points,
Pareto frontiers, sparse evaluation of a policy, and text tables.

* :func:`collect` runs a model densely once and keeps every exit's logits with the labels and costs
  (:class:`ExitOutputs`); calibration and the learned routing policies work from it.
* :func:`oracle`: every row answered by the cheapest exit that classifies it correctly (a bound, not a
  policy). :func:`cascade_oracle` is the same from per-node logits and costs.
* :class:`OperatingPoint`: one candidate's accuracy and cost (and how it was obtained);
  :func:`pareto_frontier`, :func:`policy_frontier`, :func:`frontier_table`.
* :func:`evaluate_policy`: a real sparse run of a policy on data (accuracy, cost, exits).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch

from .base import AdaptiveModel, standalone_costs
from .cost import eval_mode, module_device
from .data import batches, to_device
from .executor import num_rows
from .policies import ConfidencePolicy, LearnedPolicy, NeverExitPolicy, Policy
from .simulation import check_costs, check_labels, stack_logits


# =============================================================================================
# Dense outputs
# =============================================================================================
@dataclass
class ExitOutputs:
    """Every exit's logits on a data set, with the labels and the per-example costs.

    Attributes:
        logits: float32 CPU ``[K, N, C]``; ``logits[k]`` is exit ``k``'s ``[N, C]``.
        labels: long CPU ``[N]``.
        stage_costs, head_costs: per exit (:meth:`AdaptiveModel.exit_costs`).
        node_costs: per exit, the cost of using it alone (:meth:`AdaptiveModel.node_costs`).
        reference_cost: what speedups are measured against (:meth:`AdaptiveModel.reference_cost`).
    """

    logits: torch.Tensor
    labels: torch.Tensor
    stage_costs: list[float]
    head_costs: list[float]
    node_costs: list[float]
    reference_cost: float

    @property
    def step_costs(self) -> list[float]:
        """Per exit, ``stage + head`` cost per example (what moving to that exit costs)."""
        return [s + h for s, h in zip(self.stage_costs, self.head_costs)]

    @property
    def correct(self) -> torch.Tensor:
        """bool ``[K, N]``: whether exit ``k`` classifies row ``n`` correctly."""
        return self.logits.argmax(dim=2) == self.labels

    def rows(self, index: torch.Tensor) -> "ExitOutputs":
        """The same outputs restricted to the rows ``index`` (costs unchanged)."""
        return ExitOutputs(self.logits[:, index], self.labels[index], list(self.stage_costs),
                           list(self.head_costs), list(self.node_costs), self.reference_cost)

    def node_accuracy(self) -> list[float]:
        """Accuracy of every exit on its own."""
        n = self.labels.shape[0]
        return self.correct.double().mean(dim=1).tolist() if n else [float("nan")] * self.logits.shape[0]


def _check_batch_labels(y, i: int) -> None:
    """Labels must be integer class indices ``[N]``: say so when a batch carries inputs instead (a list
    of two unlabelled input batches reads as one ``(x, y)`` pair)."""
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"data: batch {i}'s second element has shape {tuple(y.shape)} and dtype {y.dtype}, not integer class "
            f"labels of shape [N]: calibration and evaluation need labelled data, (x, y) batches or an (x, y) pair "
            f"of tensors with y the class of every row (a list of two input batches without labels reads as one "
            f"(x, y) pair)"
        )


@torch.no_grad()
def collect(model: AdaptiveModel, data, cost: str = "flops", progress: bool = False, batch_size: int = 256,
            desc: str = "exit logits") -> ExitOutputs:
    """Run ``model`` densely (eval mode) over ``data`` once and keep every exit's logits.

    Costs come from the model on the first batch (per-example costs do not depend on the batch; latency
    is measured at that batch's size). ``data``: a DataLoader / iterable of ``(x, y)`` batches, or a
    tuple ``(x, y)`` of tensors.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"model must be an adaexit AdaptiveModel, got {type(model).__name__}")
    if isinstance(data, torch.Tensor):
        raise ValueError(f"data is one tensor of shape {tuple(data.shape)} (inputs without labels): calibration and "
                         f"evaluation need labelled data, an (x, y) pair of tensors or an iterable of (x, y) batches")
    num_exits = int(model.num_exits)
    device = module_device(model)
    logits, labels, first = [[] for _ in range(num_exits)], [], None
    with eval_mode(model):
        for i, batch in enumerate(tqdm(batches(data, batch_size), desc=desc, disable=not progress, leave=False)):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"data: batch {i} is not an (x, y) pair")
            x, y = model.prepare_input(to_device(batch[0], device)), batch[1]
            _check_batch_labels(y, i)
            if num_rows(x) != len(y):
                raise ValueError(f"data: batch {i} has {num_rows(x)} inputs but {len(y)} labels")
            if num_rows(x) == 0:
                continue
            outs = list(model.exit_logits(x))
            if len(outs) != num_exits:
                raise ValueError(f"model.exit_logits returned {len(outs)} tensors; model.num_exits is {num_exits}")
            for k, z in enumerate(outs):
                logits[k].append(z.detach().float().cpu())
            labels.append(torch.as_tensor(y).cpu())
            first = x if first is None else first
    if first is None:
        raise ValueError("data is empty (no examples)")
    stack = stack_logits([torch.cat(parts) for parts in logits])
    labels = check_labels(torch.cat(labels), stack.shape[1], stack.shape[2])
    stage_costs, head_costs = check_costs(*model.exit_costs(first, cost), num_exits)
    return ExitOutputs(
        logits=stack,
        labels=labels,
        stage_costs=stage_costs,
        head_costs=head_costs,
        node_costs=[float(c) for c in model.node_costs(first, cost)],
        reference_cost=float(model.reference_cost(first, cost)),
    )


# =============================================================================================
# The oracle
# =============================================================================================
@dataclass
class OracleResult:
    """Each row answered by the cheapest exit that classifies it correctly (the most expensive if none
    does), paying that exit's cost alone. A bound on what any policy can reach, not a policy.

    Attributes:
        accuracy: fraction of rows some exit gets right. cost: mean cost per example.
        speedup: reference cost / cost. exit_counts: rows per chosen exit. choice: long ``[N]``.
    """

    accuracy: float
    cost: float
    speedup: float
    exit_counts: list[int]
    choice: torch.Tensor | None = None

    @property
    def mean_cost(self) -> float:
        return self.cost

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "choice"}


def cascade_oracle(node_logits, labels: torch.Tensor, node_costs, reference_cost: float | None = None) -> OracleResult:
    """The oracle from per-node logits and the cost of using each node alone (skipping allowed).

    Args:
        node_logits: per node ``[N, classes]`` (a list, or a ``[K, N, C]`` stack).
        labels: ``[N]``.
        node_costs: per node, the cost of using that node alone (:meth:`AdaptiveModel.node_costs`).
        reference_cost: the cost speedups are measured against (default: the most expensive node).
    """
    if len(node_logits) == 0:
        raise ValueError("node_logits is empty")
    costs = torch.as_tensor(node_costs, dtype=torch.float64).flatten()
    if costs.numel() != len(node_logits):
        raise ValueError(f"node_costs has {costs.numel()} entries for {len(node_logits)} nodes")
    labels = torch.as_tensor(labels).cpu()
    correct = torch.stack([lg.detach().cpu().argmax(1) == labels for lg in node_logits], dim=1)  # [N, K]
    n = correct.shape[0]
    if n == 0:
        return OracleResult(float("nan"), float("nan"), float("nan"), [0] * costs.numel(),
                            torch.zeros(0, dtype=torch.long))
    priced = torch.where(correct, costs[None, :], torch.full_like(costs[None, :], math.inf))
    any_right = correct.any(dim=1)
    choice = torch.where(any_right, priced.argmin(dim=1), torch.full((n,), int(costs.argmax())))
    mean = float(costs[choice].mean())
    reference = float(costs.max()) if reference_cost is None else float(reference_cost)
    return OracleResult(
        accuracy=float(any_right.double().mean()),
        cost=mean,
        speedup=reference / mean if mean else math.inf,
        exit_counts=torch.bincount(choice, minlength=costs.numel()).tolist(),
        choice=choice,
    )


def oracle(exit_logits, labels, stage_costs, head_costs, reference_cost: float | None = None,
           members: Sequence[int] | None = None) -> OracleResult:
    """The oracle (Bolukbasi et al.'s bound) from dense exit logits and per-stage/head costs of a chain:
    using exit ``k`` alone costs the stages of its member network up to ``k`` plus head ``k``
    (``members``: member network per exit, default one network). Its speedup is against
    ``reference_cost`` (default: the plain model, every stage and the last head)."""
    stack = stack_logits(exit_logits)
    k_exits, n, classes = stack.shape
    labels = check_labels(labels, n, classes)
    if n == 0:
        raise ValueError("oracle needs at least one example")
    stage_costs, head_costs = check_costs(stage_costs, head_costs, k_exits)
    members = list(members) if members is not None else [0] * k_exits
    node_costs = standalone_costs(members, stage_costs, head_costs)
    return cascade_oracle(stack, labels, node_costs, node_costs[-1] if reference_cost is None else reference_cost)


# =============================================================================================
# Operating points and frontiers
# =============================================================================================
def _json_float(v):
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class OperatingPoint:
    """One operating point: a policy (or a single network, or the oracle) with its accuracy and cost.

    Attributes:
        kind: how it was obtained: ``"uniform"``, ``"per_exit"``, ``"learned"``, ``"selection"``,
            ``"never"`` (calibration candidates), ``"single network"``, ``"oracle"``, or a method name.
        criterion: the confidence criterion of threshold policies, or a free-form setting label.
        thresholds: per early exit (``inf`` = disabled) for threshold policies, else ``None``.
        gates: per early exit, 4 floats or ``None`` (disabled), for learned policies, else ``None``.
        cost_weight: the multiplier ``mu`` that produced it (per_exit/learned), else ``None``.
        accuracy: fraction correct. accuracy_drop_pp: percentage points below the reference (negative
            = better). cost: mean per example. speedup: reference cost / cost.
        exit_counts: rows per exit.
        new_errors_pp: percentage of examples the last exit classifies correctly and this point does
            not (>= accuracy_drop_pp: the net drop minus the examples an early exit fixes).
        bound_pp: with a calibration ``confidence``, the upper confidence bound (pp) of the budget's
            measure (net drop or new errors) from held-out rows; ``None`` where none was computed.
        certified: with a calibration ``confidence``, whether the fixed-sequence test accepted the point
            (:mod:`adaexit.calibration.guarantee`); ``None`` without one.
        policy_object: the policy itself, for kinds that thresholds and gates do not describe (network
            selection's classifiers); :meth:`policy` returns a copy. Not part of :meth:`to_dict`.
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
    bound_pp: float | None = None
    certified: bool | None = None
    policy_object: Policy | None = field(default=None, repr=False, compare=False)

    @property
    def method(self) -> str:
        return self.kind

    @property
    def setting(self) -> str:
        return "" if self.criterion is None else str(self.criterion)

    def policy(self) -> Policy:
        """A fresh policy object implementing this point (threshold, learned and never-exit points)."""
        if self.policy_object is not None:
            return copy.deepcopy(self.policy_object)
        if self.kind == "never":
            return NeverExitPolicy()
        if self.gates is not None:
            return LearnedPolicy([None if g is None else list(g) for g in self.gates])
        if self.thresholds is not None:
            return ConfidencePolicy(self.criterion, self.thresholds)
        raise ValueError(f"the {self.kind!r} point {self.setting!r} does not describe a policy")

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "policy_object"}
        if self.thresholds is not None:  # JSON has no infinity: a disabled exit is null
            d["thresholds"] = [_json_float(t) for t in self.thresholds]
        if self.gates is not None:
            d["gates"] = [None if g is None else [float(v) for v in g] for g in self.gates]
        return d


def point(kind: str, setting, accuracy: float, cost: float, reference_accuracy: float = math.nan,
          reference_cost: float = math.nan, exit_counts=()) -> OperatingPoint:
    """An :class:`OperatingPoint` that is not a calibration candidate (a network, the oracle, a policy)."""
    return OperatingPoint(
        kind=kind, criterion=str(setting), thresholds=None, gates=None, cost_weight=None,
        accuracy=accuracy, accuracy_drop_pp=100.0 * (reference_accuracy - accuracy), cost=cost,
        speedup=reference_cost / cost if cost else math.inf, exit_counts=list(exit_counts),
    )  # fmt: skip


def pareto_frontier(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
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


@torch.no_grad()
def evaluate_policy(model: AdaptiveModel, data, policy: Policy | None = None, cost: str = "flops",
                    batch_size: int = 1024) -> tuple[float, float, list[int]]:
    """Sparse eval-mode run on ``data``: ``(accuracy, mean cost per example, exit counts per node)``.

    The cost is the protocol's: each node's stage cost for every row that ran it plus its head cost for
    every row decided there. ``policy`` (optional) is used for this call only; the model's own policy
    and mode are restored afterwards.
    """
    saved = model.policy
    if policy is not None:
        model.set_policy(policy)
    right = total = 0
    rows_run = [0] * len(model.graph())
    rows_decided = list(rows_run)
    exits = list(rows_run)
    first = None
    try:
        with eval_mode(model):
            for x, y in batches(data, batch_size, device=module_device(model)):
                x = model.prepare_input(x)
                if num_rows(x) == 0:
                    continue
                first = x if first is None else first
                logits, trace = model.run(x)
                right += int((logits.argmax(1) == y.to(logits.device)).sum())
                total += num_rows(x)
                for k in range(len(rows_run)):
                    rows_run[k] += trace.rows_run[k]
                    rows_decided[k] += trace.rows_decided[k]
                    exits[k] += trace.exit_counts[k]
    finally:
        model.policy = saved
    if first is None:
        raise ValueError("data is empty")
    stage_costs, head_costs = model.exit_costs(first, cost)
    spent = sum(r * c for r, c in zip(rows_run, stage_costs)) + sum(r * c for r, c in zip(rows_decided, head_costs))
    return right / total, spent / total, exits


def policy_frontier(model: AdaptiveModel, data, policies: dict, cost: str = "flops",
                    outputs: ExitOutputs | None = None) -> list[OperatingPoint]:
    """Each policy's operating points beside every single network (member) and the oracle.

    Args:
        policies: ``{method name: policy}`` or ``{method name: [(setting label, policy), ...]}``
            (e.g. one entry per ``lam`` of a sweep).
        outputs: precomputed :func:`collect` of ``data`` (computed if omitted).
    """
    outputs = outputs or collect(model, data, cost=cost)
    accuracy = outputs.node_accuracy()
    reference_acc = accuracy[-1]
    ref = outputs.reference_cost

    def make(kind, setting, acc, mean_cost, counts=()):
        return point(kind, setting, acc, mean_cost, reference_acc, ref, counts)

    points = []
    members = model.node_members()
    names = model.node_names
    for k, m in enumerate(members):  # a single network = its last node, run alone
        if k + 1 == len(members) or members[k + 1] != m:
            points.append(make("single network", names[k], accuracy[k], outputs.node_costs[k]))
    best = cascade_oracle(outputs.logits, outputs.labels, outputs.node_costs, ref)
    points.append(make("oracle", "cheapest correct node", best.accuracy, best.cost, best.exit_counts))
    for method, entry in policies.items():
        entries = entry if isinstance(entry, (list, tuple)) else [("", entry)]
        for setting, policy in entries:
            acc, mean_cost, counts = evaluate_policy(model, data, policy, cost=cost)
            points.append(make(method, setting, acc, mean_cost, counts))
    return points


def frontier_table(points: Sequence[OperatingPoint], reference_cost: float | None = None) -> str:
    """A Markdown table of operating points; ``relative cost`` is ``cost / reference_cost`` (default:
    the most expensive single network)."""
    if reference_cost is None:
        singles = [p.cost for p in points if p.kind == "single network"]
        reference_cost = max(singles) if singles else max((p.cost for p in points), default=1.0)
    reference_cost = reference_cost or 1.0
    lines = ["| method | setting | accuracy (%) | cost / example | relative cost |", "|---|---|---:|---:|---:|"]
    for p in points:
        lines.append(
            f"| {p.method} | {p.setting} | {100 * p.accuracy:.2f} | {p.cost:.4g} | {p.cost / reference_cost:.3f} |"
        )
    return "\n".join(lines)


__all__ = [
    "ExitOutputs",
    "OperatingPoint",
    "OracleResult",
    "cascade_oracle",
    "collect",
    "evaluate_policy",
    "frontier_table",
    "oracle",
    "pareto_frontier",
    "point",
    "policy_frontier",
]
