"""Anytime prediction (Hu, Dey, Hebert & Bagnell, *Anytime Neural Network*): stop on a budget.

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

The runner accepts any :class:`~adaexit.base.AdaptiveModel` whose exits form a chain (an
:class:`~adaexit.EarlyExitNet`, an :class:`~adaexit.anytime.EANN`, a cascade: routes 0 = stop, 1 = next).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..base import (
    STOP_BATCH_BUDGET,
    STOP_DEADLINE,
    STOP_EXAMPLE_BUDGET,
    STOP_POLICY,
    STOP_REASONS,
    AdaptiveModel,
    ExitInfo,
)
from ..cost import sync
from ..data import batches
from ..executor import SOURCE, Node, execute, num_rows, take_rows
from ..kernels import compact, scatter_rows
from ..kernels._dispatch import to_host
from ..policies import Policy

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
    """The chain of exits an anytime model runs, and its policy."""
    if not isinstance(model, AdaptiveModel):
        raise ValueError(
            f"model must be an adaexit AdaptiveModel (an EarlyExitNet, an EANN...), got {type(model).__name__}"
        )
    nodes = model.graph()
    for k, node in enumerate(nodes):
        chained = k + 1 == len(nodes) or (node.successors and node.successors[0] == k + 1)
        if node.head is None or not chained:
            raise ValueError(
                f"anytime prediction needs a chain of exits; node {k} ({node.name}) of {type(model).__name__} "
                "has no exit head or does not continue to the next node"
            )
    return nodes, model.policy


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
                f"exit head {k} ({node.name}) does not fit its stage's output "
                f"({tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}): {err}"
            ) from err

    def __call__(self, k: int, node: Node, h: torch.Tensor, state: dict):
        n, last = num_rows(h), k == len(self.nodes) - 1  # h: a tensor, or rows of several (a RowBatch)
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
            return logits, torch.zeros(n, dtype=torch.long, device=self.device), state

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
            stopping = torch.ones(n, dtype=torch.bool, device=self.device) if cont is None else cont
            base = torch.zeros(n, dtype=torch.long, device=self.device) if reason is None else reason
            reason = torch.where(stopping, batch_stop, base)
            cont = torch.zeros(n, dtype=torch.bool, device=self.device)

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
                (kept,) = compact(budget_stop)  # one host sync: how many rows stop here
                h_stop = take_rows(h, kept)
                stopped = kept.shape[0]
                if stopped:
                    sub = _head_logits(node, h_stop)
                    logits = torch.zeros((n, sub.shape[1]), dtype=sub.dtype, device=self.device)
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
    """Anytime prediction over an adaptive model whose exits form a chain, on the sparse executor.

    The runner keeps the stage-time estimates that deadlines use (from :meth:`profile` and from every
    call with a deadline), so reuse one runner per model.

    Args:
        model: an ``EarlyExitNet``, ``EANN`` or cascade in ``eval()`` mode. Its policy still applies: a row that
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
        x = self.model.prepare_input(x)
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
            self._latency.record(k, num_rows(x), ms, replace=True)
        return medians

    def predict(
        self,
        x: torch.Tensor,
        budget_flops: float | None = None,
        deadline_ms: float | None = None,
        per_example_budget=None,
    ) -> tuple[torch.Tensor, ExitInfo]:
        """Anytime prediction of the batch ``x``; returns ``(logits [N, classes], ExitInfo)``: besides what
        every forward reports, ``flops_per_row``, ``stop_reason`` (index into :data:`STOP_REASONS`),
        ``elapsed_ms`` (CUDA-synchronised when a deadline is set; without one, host time) and the budgets.

        Args:
            x: the batch as the model takes it (a tensor; a mapping of keyword tensors for a wrapped Hugging
                Face model).
            budget_flops: FLOPs for the whole batch; at least the first exit's cost for every row.
            deadline_ms: wall-clock deadline for the call, in milliseconds (> 0).
            per_example_budget: ``[N]`` FLOPs per row (a tensor or sequence; ``inf`` = unlimited), each
                at least :meth:`min_budget`.
        """
        model = self.model
        if model.training:
            raise ValueError("model is in training mode: call model.eval() before anytime prediction")
        nodes, policy = _graph(model)
        x = model.prepare_input(x)  # as the model takes it (a Hugging Face model's keyword inputs: a mapping)
        n, device = num_rows(x), x.device
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
        info = ExitInfo(
            exit_index=trace.exit_index,
            exit_counts=trace.exit_counts,
            rows_run=trace.rows_run,
            rows_decided=trace.rows_decided,
            flops=call.spent,
            full_flops=float(n * model.reference_cost(x, "flops")) if n else 0.0,
            node_names=[node.name for node in nodes],
            flops_per_row=call.spent_out,
            stop_reason=call.reason_out,
            elapsed_ms=elapsed,
            budget_flops=budget,
            deadline_ms=deadline,
        )
        return logits, info

    __call__ = predict


def _runner(model) -> AnytimeRunner:
    """The model's own runner, so deadlines keep learning from earlier calls. Kept on the model (a cycle the
    garbage collector frees with it), not in a weak-keyed table whose values would keep their keys alive."""
    runner = model.__dict__.get("_anytime_runner")
    if runner is None:
        runner = model.__dict__["_anytime_runner"] = AnytimeRunner(model)
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
    chunks = [(x, y) for x, y in batches(data, batch_size) if x.shape[0]]
    if chunks:
        first = runner.min_budget(chunks[0][0])
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
        for x, y in chunks:
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
