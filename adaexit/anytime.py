"""Anytime prediction (Hu, Dey, Hebert & Bagnell, *Anytime Neural Network*): budgets, EANN, loss weights.

An anytime predictor evaluates its exits in order and, when the budget ends, returns for every example
the latest prediction it has. Here that is one more reason to stop on the same executor as early exit:
the :class:`AnytimeRunner` router wraps the model's own policy (a row that exits by policy still stops
early) and routes a row to ``0`` (exit with this exit's prediction) when the budget cannot pay for the
next exit. Budgets:

* ``budget_flops``: a FLOPs budget for the whole batch. Before each stage the runner checks that the
  stage *and its exit head* for the rows that would continue fit in what is left; if not, every row
  stops at the current exit. The spend never exceeds the budget.
* ``per_example_budget``: a FLOPs budget per row (``[N]``). Each row stops at the last exit it can
  afford, and its result does not depend on the rest of the batch.
* ``deadline_ms``: a wall-clock deadline measured as it goes (``time.perf_counter``, CUDA-synchronised
  on GPU). The runner stops when the elapsed time plus the predicted time of the next stage (from
  measured times: :meth:`AnytimeRunner.profile`, or earlier calls) would pass the deadline.

The first exit always runs, so every row gets a prediction: a FLOPs budget below the cost of the first
exit raises ``ValueError`` (a deadline shorter than the first exit is reported with
``info.deadline_met = False``).

FLOPs accounting (``info.flops_per_row``): reaching exit ``k`` costs its stage, plus head ``k`` when it
is evaluated. A head is evaluated on a row when the policy needs it there (it decides on every row that
reached the exit) or when the row stops there for a budget; a stage is entered only if the row can still
pay for the stage and its head, so a prediction is always affordable.

Host synchronisation: besides the executor's one per decision point, a batch budget or a deadline
reads the number of continuing rows only when the check with every row at the exit fails, and a row
stopping for its own budget at an exit whose head the policy skips costs one compaction (one sync) to
run that head on the stopping rows only. A budget that cannot bind adds no decision at all.

Also here: anytime training (:func:`anytime_loss`, :func:`train_anytime`: ``MultiExitLoss`` with the
oscillating or AdaLoss weighting from :mod:`adaexit.training`) and :class:`EANN`, a sequence of anytime
networks of exponentially increasing depth run as one executor graph.
"""

from __future__ import annotations

import math
import numbers
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .data import batches as _batches
from .cost import chain_latency, sync
from .early_exit import EarlyExitNet
from .executor import CARRY, SOURCE, Node, execute
from .heads import ExitHead
from .kernels import compact, scatter_rows
from .kernels._dispatch import to_host
from .policies import NeverExitPolicy, Policy
from .training import MultiExitLoss, train

# Why a row stopped where it did (``AnytimeInfo.stop_reason``).
STOP_POLICY = 0  # the model's policy exited it, or it reached the last exit
STOP_BATCH_BUDGET = 1  # the batch FLOPs budget could not pay for the next exit
STOP_EXAMPLE_BUDGET = 2  # its own FLOPs budget could not pay for the next exit
STOP_DEADLINE = 3  # the next exit would have finished after the deadline
STOP_REASONS = ("policy", "batch_budget", "example_budget", "deadline")


@dataclass
class AnytimeInfo:
    """What one anytime prediction did.

    Attributes:
        exit_index: long ``[N]``, the exit whose prediction each row returned (its latest one).
        exit_counts: rows that returned each exit's prediction.
        rows_run: rows that ran each stage.
        flops: FLOPs spent on the batch (stages run + heads evaluated); ``<= budget_flops``.
        flops_per_row: float64 ``[N]``, FLOPs spent on each row; ``<= per_example_budget``.
        stop_reason: long ``[N]``, index into :data:`STOP_REASONS`.
        elapsed_ms: wall-clock time of the call (CUDA-synchronised when a deadline is set; without
            one, host time: GPU work may still be in flight).
        budget_flops, deadline_ms: the budgets it ran under (``None`` = none).
    """

    exit_index: torch.Tensor
    exit_counts: list[int]
    rows_run: list[int]
    flops: float
    flops_per_row: torch.Tensor
    stop_reason: torch.Tensor
    elapsed_ms: float
    budget_flops: float | None = None
    deadline_ms: float | None = None

    @property
    def deadline_met(self) -> bool:
        return self.deadline_ms is None or self.elapsed_ms <= self.deadline_ms

    @property
    def stop_counts(self) -> dict[str, int]:
        """Rows per stop reason."""
        counts = torch.bincount(self.stop_reason.cpu(), minlength=len(STOP_REASONS)).tolist()
        return dict(zip(STOP_REASONS, counts))


def _head_logits(node: Node, h: torch.Tensor) -> torch.Tensor:
    """A head's fp32 logits, through the fused gate kernel when the head has one (as policies do)."""
    gate = getattr(node.head, "gate", None)
    if gate is not None:
        return gate(h, "maxprob", math.inf)[0]
    return node.head(h).float()


def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    return value


@dataclass
class _Latency:
    """Per-stage time estimates (ms for ``rows`` rows), blended over measurements."""

    ms: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)
    momentum: float = 0.5

    def record(self, k: int, rows: int, ms: float, replace: bool = False) -> None:
        if replace or k not in self.ms:
            self.ms[k], self.rows[k] = ms, float(max(rows, 1))
        else:
            a = self.momentum
            self.ms[k] = a * self.ms[k] + (1 - a) * ms
            self.rows[k] = a * self.rows[k] + (1 - a) * max(rows, 1)

    def predict(self, k: int, rows: int) -> float:
        """Conservative: never less than measured for fewer rows (fixed costs dominate small batches),
        linear in rows above the measured batch. An unmeasured stage is assumed to cost as much as the
        slowest measured one."""
        if k in self.ms:
            return self.ms[k] * max(1.0, rows / self.rows[k])
        if not self.ms:
            return 0.0
        return max(self.predict(j, rows) for j in self.ms)


def _graph(model) -> tuple[list[Node], Policy]:
    """The chain of nodes an anytime model runs, and its policy."""
    if isinstance(model, (EANN, EarlyExitNet)):
        return model.graph(), model.policy
    raise ValueError(f"model must be an EarlyExitNet or an EANN, got {type(model).__name__}")


class _AnytimeCall:
    """The router of one anytime call: the model's policy plus the budgets (see the module docstring)."""

    def __init__(self, runner: "AnytimeRunner", x, nodes, policy, stage, head, budget, deadline, n, keys):
        self.runner, self.nodes, self.policy = runner, nodes, policy
        self.stage, self.head = stage, head
        self.budget, self.deadline = budget, deadline
        self.policy_keys = keys
        self.spent = 0.0  # host-side: the batch budget is checked without reading the device
        self.device = x.device
        self.spent_out = torch.zeros(n, dtype=torch.float64, device=x.device)
        self.reason_out = torch.zeros(n, dtype=torch.long, device=x.device)
        self.start = self.prev = self.now()

    def now(self) -> float:
        if self.deadline is not None:  # a deadline is wall-clock time of finished work
            sync(self.device)
        return time.perf_counter() * 1e3

    def _decide(self, k, node, h, pol_state):
        try:
            return self.policy.decide(k, node.head, h, pol_state)
        except RuntimeError as err:
            raise ValueError(
                f"exit head {k} ({node.name}) does not fit its stage's output (shape {tuple(h.shape)}): {err}"
            ) from err

    def __call__(self, k: int, node: Node, h: torch.Tensor, state: dict):
        n, last = h.shape[0], k == len(self.nodes) - 1
        state = dict(state)
        spent_row = state["anytime_spent"] + self.stage[k]
        self.spent += n * self.stage[k]
        pol_state = {key: state[key] for key in self.policy_keys}
        logits = exit_mask = None
        if self.policy.needs_head(k) or last:
            if self.policy.needs_head(k):
                logits, exit_mask, pol_state = self._decide(k, node, h, pol_state)
            else:  # a policy that skips the last head still owes the last prediction
                logits = _head_logits(node, h)
            spent_row = spent_row + self.head[k]
            self.spent += n * self.head[k]
        state.update(pol_state)

        if self.deadline is not None:  # measure the stage as it goes (what predicts the next one)
            t = self.now()
            self.runner._latency.record(k, n, t - self.prev)
            self.prev = t
        if last:
            self._write(state, spent_row, None)
            state["anytime_spent"] = spent_row
            return logits, torch.zeros(n, dtype=torch.long, device=h.device), state

        need = self.stage[k + 1] + self.head[k + 1]  # enter a stage only if its exit is affordable too
        cont = None if exit_mask is None else ~exit_mask  # None: every row would continue
        reason = None
        if "anytime_budget" in state:
            afford = spent_row + need <= state["anytime_budget"]
            stop = ~afford if cont is None else cont & ~afford
            reason = torch.where(stop, STOP_EXAMPLE_BUDGET, STOP_POLICY)
            cont = afford if cont is None else cont & afford

        # Batch-wide stops. The count of continuing rows costs a host read, so it is taken only when
        # the budget cannot pay for every row at the node.
        count = [None]

        def continuing() -> int:
            if count[0] is None:
                count[0] = n if cont is None else to_host(cont.sum().view(1))[0]
            return count[0]

        batch_stop = None
        if self.budget is not None:
            left = self.budget - self.spent
            if n * need > left and continuing() * need > left:
                batch_stop = STOP_BATCH_BUDGET
        if batch_stop is None and self.deadline is not None:
            elapsed = self.prev - self.start
            predict = self.runner._latency.predict
            if elapsed + predict(k + 1, n) > self.deadline and elapsed + predict(k + 1, continuing()) > self.deadline:
                batch_stop = STOP_DEADLINE
        if batch_stop is not None:
            stopping = torch.ones(n, dtype=torch.bool, device=h.device) if cont is None else cont
            base = torch.zeros(n, dtype=torch.long, device=h.device) if reason is None else reason
            reason = torch.where(stopping, batch_stop, base)
            cont = torch.zeros(n, dtype=torch.bool, device=h.device)

        if cont is None:  # no decision at this exit: all rows go on (no partition, no host sync)
            state["anytime_spent"] = spent_row
            return None, None, state

        if logits is None:  # the policy skipped this head, but rows stopping for a budget need it
            budget_stop = ~cont
            if batch_stop is not None:
                logits = _head_logits(node, h)
                spent_row = spent_row + self.head[k]
                self.spent += n * self.head[k]
            else:
                kept, h_stop = compact(budget_stop, h)  # one host sync: how many rows stop here
                stopped = kept.shape[0]
                if stopped:
                    sub = _head_logits(node, h_stop)
                    logits = torch.zeros((n, sub.shape[1]), dtype=sub.dtype, device=h.device)
                    scatter_rows(logits, kept, sub)
                    spent_row = spent_row + budget_stop.to(spent_row.dtype) * self.head[k]
                    self.spent += stopped * self.head[k]
        self._write(state, spent_row, reason)
        state["anytime_spent"] = spent_row
        return logits, cont.long(), state

    def _write(self, state, spent_row, reason) -> None:
        """Record every row's spend and stop reason at its original position; a row's last write is at
        the exit it returns from (rows continuing are overwritten later)."""
        rows = state["anytime_row"]
        scatter_rows(self.spent_out, rows, spent_row)
        if reason is None:
            reason = torch.zeros_like(rows)
        scatter_rows(self.reason_out, rows, reason)


class AnytimeRunner:
    """Anytime prediction over an :class:`EarlyExitNet` (or an :class:`EANN`) on the sparse executor.

    The runner keeps the stage-time estimates that deadlines use (from :meth:`profile` and from every
    call with a deadline), so reuse one runner per model.

    Args:
        model: an ``EarlyExitNet`` or ``EANN`` in ``eval()`` mode. Its policy still applies: a row that
            exits by policy stops early; a budget is one more reason to stop.
    """

    def __init__(self, model):
        _graph(model)  # validate the model type now
        self.model = model
        self._latency = _Latency()

    def costs(self, x: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per-example FLOPs of each stage and each head for inputs shaped like ``x``."""
        return self.model.exit_costs(x, "flops")

    def exit_flops(self, x: torch.Tensor) -> list[float]:
        """Per-example FLOPs of reaching exit ``k`` with every head on the way evaluated: what a
        per-example budget must cover for a row to be sure of exit ``k``."""
        stage, head = self.costs(x)
        total, out = 0.0, []
        for s, h in zip(stage, head):
            total += s + h
            out.append(total)
        return out

    def min_budget(self, x: torch.Tensor) -> float:
        """The smallest per-example FLOPs budget: the first stage and its head (the first exit always runs)."""
        stage, head = self.costs(x)
        return float(stage[0] + head[0])

    @torch.no_grad()
    def profile(self, x: torch.Tensor, repeats: int = 1) -> list[float]:
        """Measure each stage (with its head) on ``x``'s batch size; deadlines predict from these.

        Returns the median milliseconds per stage. Later calls with a deadline keep refining them.
        """
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        nodes, _ = _graph(self.model)
        times: list[list[float]] = [[] for _ in nodes]
        for _ in range(int(repeats)):
            h = x
            for k, node in enumerate(nodes):
                sync(x.device)
                t0 = time.perf_counter()
                h = node.module(x if node.takes == SOURCE else h)
                _head_logits(node, h)
                sync(x.device)
                times[k].append((time.perf_counter() - t0) * 1e3)
        medians = [sorted(t)[len(t) // 2] for t in times]
        for k, ms in enumerate(medians):
            self._latency.record(k, x.shape[0], ms, replace=True)
        return medians

    def predict(
        self,
        x: torch.Tensor,
        budget_flops: float | None = None,
        deadline_ms: float | None = None,
        per_example_budget=None,
    ) -> tuple[torch.Tensor, AnytimeInfo]:
        """Anytime prediction of the batch ``x``; returns ``(logits [N, classes], AnytimeInfo)``.

        Args:
            budget_flops: FLOPs for the whole batch; at least the first exit's cost for every row.
            deadline_ms: wall-clock deadline for the call, in milliseconds (> 0).
            per_example_budget: ``[N]`` FLOPs per row (a tensor or sequence; ``inf`` = unlimited), each
                at least :meth:`min_budget`.
        """
        model = self.model
        if model.training:
            raise ValueError("model is in training mode: call model.eval() before anytime prediction")
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError("x must be a tensor with a batch dimension")
        nodes, policy = _graph(model)
        n, device = x.shape[0], x.device
        stage, head = self.costs(x) if n else ([0.0] * len(nodes), [0.0] * len(nodes))
        first = float(stage[0] + head[0])

        budget = None
        if budget_flops is not None:
            budget = _number(budget_flops, "budget_flops")
            if budget < n * first:
                raise ValueError(
                    f"budget_flops={budget:g} is below the cost of the first exit for this batch "
                    f"({n} rows x {first:g} FLOPs = {n * first:g}); the first exit always runs"
                )
        deadline = None
        if deadline_ms is not None:
            deadline = _number(deadline_ms, "deadline_ms")
            if deadline <= 0:
                raise ValueError(f"deadline_ms must be > 0, got {deadline:g}")

        state = {key: v for key, v in policy.init_state(n, device).items()}
        keys = tuple(state)
        state["anytime_row"] = torch.arange(n, device=device)
        state["anytime_spent"] = torch.zeros(n, dtype=torch.float64, device=device)
        if per_example_budget is not None:
            b = torch.as_tensor(per_example_budget, dtype=torch.float64).to(device)
            if b.dim() != 1 or b.shape[0] != n:
                raise ValueError(f"per_example_budget must have shape [{n}] (one per row), got {tuple(b.shape)}")
            if n:
                if torch.isnan(b).any():
                    raise ValueError("per_example_budget has NaN entries")
                low = int(torch.argmin(b))
                if float(b[low]) < first:
                    raise ValueError(
                        f"per_example_budget[{low}]={float(b[low]):g} is below the cost of the first exit "
                        f"({first:g} FLOPs); the first exit always runs"
                    )
            state["anytime_budget"] = b

        call = _AnytimeCall(self, x, nodes, policy, stage, head, budget, deadline, n, keys)
        with torch.no_grad():
            logits, trace = execute(nodes, x, call, state)
        elapsed = call.now() - call.start
        info = AnytimeInfo(
            exit_index=trace.exit_index,
            exit_counts=trace.exit_counts,
            rows_run=trace.rows_run,
            flops=call.spent,
            flops_per_row=call.spent_out,
            stop_reason=call.reason_out,
            elapsed_ms=elapsed,
            budget_flops=budget,
            deadline_ms=deadline,
        )
        return logits, info

    __call__ = predict


# One runner per model, so deadlines keep learning from earlier calls.
_RUNNERS: "weakref.WeakKeyDictionary[nn.Module, AnytimeRunner]" = weakref.WeakKeyDictionary()


def _runner(model) -> AnytimeRunner:
    runner = _RUNNERS.get(model)
    if runner is None:
        runner = _RUNNERS[model] = AnytimeRunner(model)
    return runner


def anytime_predict(model, x, budget_flops=None, deadline_ms=None, per_example_budget=None):
    """Anytime prediction with the model's shared :class:`AnytimeRunner`; see :meth:`AnytimeRunner.predict`."""
    return _runner(model).predict(x, budget_flops, deadline_ms, per_example_budget)


def anytime_curve(model, data, budgets: Iterable[float], per_example: bool = True, batch_size: int = 256):
    """Accuracy against budget for ``model`` on ``data``.

    Args:
        data: ``(inputs, labels)`` tensors, or an iterable of ``(inputs, labels)`` batches.
        budgets: FLOPs per example. With ``per_example=True`` each row gets that budget (results do not
            depend on batching); otherwise each batch gets ``budget * batch rows`` as a batch budget.

    Returns:
        one dict per budget: ``budget``, ``accuracy``, ``flops_per_example`` (spent), ``exit_counts``,
        ``examples``.
    """
    runner = _runner(model)
    budgets = [_number(b, "budgets") for b in budgets]
    if not budgets:
        raise ValueError("budgets is empty")
    batches = [(x, y) for x, y in _batches(data, batch_size) if x.shape[0]]
    if batches:
        first = runner.min_budget(batches[0][0])
        if min(budgets) < first:
            raise ValueError(
                f"budgets: {min(budgets):g} FLOPs per example is below the cost of the first exit ({first:g}); "
                "the first exit always runs"
            )
    curve = []
    for budget in budgets:
        correct = total = 0
        flops = 0.0
        counts = None
        for x, y in batches:
            n = x.shape[0]
            if per_example:
                logits, info = runner.predict(x, per_example_budget=torch.full((n,), budget, dtype=torch.float64))
            else:
                logits, info = runner.predict(x, budget_flops=budget * n)
            correct += int((logits.argmax(1) == y.to(logits.device)).sum())
            total += n
            flops += info.flops
            counts = info.exit_counts if counts is None else [a + b for a, b in zip(counts, info.exit_counts)]
        curve.append(
            {
                "budget": budget,
                "accuracy": correct / max(total, 1),
                "flops_per_example": flops / max(total, 1),
                "exit_counts": counts or [],
                "examples": total,
            }
        )
    return curve


def plot_anytime_curve(curves, path, title: str = "anytime prediction", x: str = "flops_per_example"):
    """Write the accuracy-against-budget plot to ``path`` (PNG, matplotlib's Agg canvas; no display).

    Args:
        curves: one curve from :func:`anytime_curve`, or ``{label: curve}``.
        x: ``"flops_per_example"`` (FLOPs spent) or ``"budget"``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(curves, list):
        curves = {"model": curves}
    if x not in ("flops_per_example", "budget"):
        raise ValueError(f"x must be 'flops_per_example' or 'budget', got {x!r}")
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        ax.plot([p[x] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", label=label)
    ax.set_xlabel("FLOPs per example" + (" (spent)" if x == "flops_per_example" else " (budget)"))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------------
# Anytime training (Hu et al.): the oscillating and AdaLoss weightings are the ones MultiExitLoss uses
# (adaexit.training), so an anytime network trains with the same loss as any multi-exit model.
def anytime_loss(num_exits: int, weighting: str = "adaloss", **kwargs) -> MultiExitLoss:
    """A :class:`~adaexit.training.MultiExitLoss` with an anytime weighting.

    Args:
        weighting: ``"adaloss"`` (weights inversely proportional to each exit's running-mean loss),
            ``"oscillating"`` (the emphasised exit moves over training), or any other
            :class:`~adaexit.training.MultiExitLoss` weighting.
        **kwargs: options of the weighting and the loss (``momentum=``, ``schedule=``, ``distill=``...).
    """
    return MultiExitLoss(num_exits, weighting, **kwargs)


def train_anytime(
    model, loader, epochs: int = 1, lr: float = 1e-3, weighting: str = "adaloss", weighting_kwargs=None, **train_kwargs
):
    """Train an anytime model with an anytime weighting (:func:`adaexit.training.train` underneath).

    An :class:`EANN` trains each of its networks on its own (each with its own weighting state), as in
    the paper: the networks share nothing, and AdaLoss balances the losses inside one network.

    Returns:
        the training history (for an EANN, the list of its networks' histories).
    """
    weighting_kwargs = dict(weighting_kwargs or {})
    if isinstance(model, EANN):
        return [
            train(
                net, loader, epochs, lr, anytime_loss(net.num_exits, weighting, **weighting_kwargs),
                desc=f"network {i}", **train_kwargs,
            )  # fmt: skip
            for i, net in enumerate(model.networks)
        ]
    num_exits = getattr(model, "num_exits", None)
    if num_exits is None:
        raise ValueError("model must have num_exits (an EarlyExitNet, an EANN or another multi-exit model)")
    return train(model, loader, epochs, lr, anytime_loss(num_exits, weighting, **weighting_kwargs), **train_kwargs)


# ---------------------------------------------------------------------------------------------
# EANN: exponentially deepening anytime networks, run in order as one executor graph.
class EANN(nn.Module):
    """A sequence of anytime networks (each an :class:`EarlyExitNet`) of increasing depth.

    The networks run in order on one executor graph: every network's first stage reads the input
    (``"source"``), its later stages read the previous stage (``"carry"``), and after a network's last
    exit the surviving rows go on to the next network. The exits are numbered across the sequence, so an
    interrupted example returns the latest exit it reached in any network. Each network's own policy is
    not used; ``policy`` (over all exits, default never-exit: only budgets stop) decides.

    Satisfies the calibration protocol: ``num_exits``, ``exit_logits``, ``exit_costs``, ``set_policy``.
    """

    def __init__(self, networks: Sequence[EarlyExitNet], policy: Policy | None = None):
        super().__init__()
        networks = list(networks)
        if not networks:
            raise ValueError("EANN needs at least one network")
        for i, net in enumerate(networks):
            if not isinstance(net, EarlyExitNet):
                raise ValueError(f"networks[{i}] must be an EarlyExitNet, got {type(net).__name__}")
        self.networks = nn.ModuleList(networks)
        self.policy = (policy or NeverExitPolicy()).bind(self.num_exits)

    @property
    def num_exits(self) -> int:
        return sum(net.num_exits for net in self.networks)

    def exit_owner(self, k: int) -> tuple[int, int]:
        """``(network index, exit index inside it)`` of global exit ``k``."""
        if not 0 <= k < self.num_exits:
            raise ValueError(f"exit {k} out of range: the EANN has {self.num_exits} exits")
        for i, net in enumerate(self.networks):
            if k < net.num_exits:
                return i, k
            k -= net.num_exits
        raise AssertionError("unreachable")

    def set_policy(self, policy: Policy) -> "EANN":
        self.policy = policy.bind(self.num_exits)
        return self

    def graph(self) -> list[Node]:
        """The flattened chain of nodes (global exit ``k`` = node ``k``)."""
        nodes: list[Node] = []
        total = self.num_exits
        for i, net in enumerate(self.networks):
            for k, (stage, head) in enumerate(zip(net.stages, net.heads)):
                j = len(nodes)
                nodes.append(
                    Node(
                        f"network {i} stage {k}", stage, head,
                        (j + 1,) if j + 1 < total else (), SOURCE if k == 0 else CARRY,
                    )  # fmt: skip
                )
        return nodes

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits (all networks, in order) for every row."""
        out: list[torch.Tensor] = []
        for net in self.networks:
            out.extend(net.exit_logits(x))
        return out

    def exit_costs(self, x: torch.Tensor, cost: str = "flops") -> tuple[list[float], list[float]]:
        """Per-example cost of each stage and head along the sequence (reaching exit ``k`` costs every
        earlier network in full)."""
        if cost not in ("flops", "latency"):
            raise ValueError(f"cost must be 'flops' or 'latency', got {cost!r}")
        stage, head = [], []
        for net in self.networks:
            s, h = net.exit_costs(x, "flops") if cost == "flops" else chain_latency(net.stages, net.heads, x)
            stage.extend(s)
            head.extend(h)
        return stage, head

    def forward(self, x: torch.Tensor, return_info: bool = False):
        """``train()``: every exit's logits (a list). ``eval()``: run the sequence under the policy
        (no budget: use :func:`anytime_predict` for budgets)."""
        if self.training:
            if return_info:
                raise ValueError("return_info=True is only available in eval() mode")
            return self.exit_logits(x)
        logits, info = anytime_predict(self, x)
        return (logits, info) if return_info else logits


def exponential_networks(depths: Sequence[int], make_stage, make_head, policy_factory=None) -> list[EarlyExitNet]:
    """Anytime networks of the given depths (in blocks), an exit after every block.

    Args:
        depths: blocks per network, e.g. ``(1, 2, 4)``.
        make_stage: ``make_stage(network, block) -> nn.Module`` (block 0 reads the input).
        make_head: ``make_head(network, block) -> head``.
    """
    depths = list(depths)
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"depths must be a non-empty sequence of ints >= 1, got {depths!r}")
    nets = []
    for i, d in enumerate(depths):
        stages = [make_stage(i, b) for b in range(d)]
        heads = [make_head(i, b) for b in range(d)]
        nets.append(EarlyExitNet(stages, heads, policy_factory() if policy_factory else None))
    return nets


def exponential_mlp_networks(
    in_features: int, num_classes: int, depths: Sequence[int] = (1, 2, 4), width: int = 32
) -> list[EarlyExitNet]:
    """Small MLP anytime networks of exponentially increasing depth (for tests and demos)."""

    def make_stage(i, b):
        return nn.Sequential(nn.Linear(in_features if b == 0 else width, width), nn.ReLU())

    return exponential_networks(depths, make_stage, lambda i, b: ExitHead(width, num_classes))


__all__ = [
    "AnytimeInfo",
    "AnytimeRunner",
    "EANN",
    "STOP_REASONS",
    "anytime_curve",
    "anytime_loss",
    "anytime_predict",
    "exponential_mlp_networks",
    "exponential_networks",
    "plot_anytime_curve",
    "train_anytime",
]
