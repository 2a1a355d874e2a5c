"""Cross-batch re-batching: every node of an adaptive model runs on full batches.

Sparse execution of one batch saves FLOPs but not always time: after a few exits the later nodes run on
a handful of rows, where the time per row is many times that of a full batch. :func:`stream` regroups
the surviving rows of *many* input batches: a queue per graph node holds the rows routed to it (with
their per-row state), and a node runs when its queue holds ``batch_size`` rows. Each input batch's
outputs are yielded in input order as soon as all its rows are done, equal to ``model(batch)``.

It is a scheduling layer over the one executor: the same node step (:func:`adaexit.executor.run_node`:
node module, router, partition, gather), the same merge of sub-batches and the same scatter of exits.

Scheduling rules (:class:`Scheduler`):

* run the deepest node whose queue holds at least ``batch_size`` rows (deep rows are closest to done);
* when no queue is full: if the rows in flight reached the bound (or a new batch waits for room), run
  the deepest non-empty queue (finishing rows makes room); if the input has ended, the shallowest one
  (moving rows on fills the later queues); if a queued row has waited ``max_wait_ms``, its queue;
* admit a new input batch only while the rows in flight stay within ``max_rows_in_flight`` (default
  ``4 * batch_size``, :func:`stream`'s ``16 * batch_size``; a batch larger than the bound is admitted alone),
  so memory stays bounded.

Rows in flight are mostly rows already done, waiting in the output ring (their logits only) for the rest of
their batch: each queue holds fewer than ``batch_size`` rows after the full ones ran, so activations stay
within about ``batch_size`` rows per node whatever the bound. The bound matters for deep nodes: a node
that a fraction ``p`` of the rows reach fills only once about ``batch_size / p`` rows are in flight; below
that, reaching the bound runs it on a partial queue (a chain with 12.5% reaching its last node runs it on
16 rows on average at ``4 * batch_size``, 58 at ``16 * batch_size``). With ``return_info=True`` each batch
in flight also keeps its input (for its :class:`~adaexit.ExitInfo`): up to 16 input batches with
:func:`stream`'s default bound; pass ``max_rows_in_flight`` to hold fewer.

Host synchronisation: one per decision point, as in one batch: the partition runs on route x input
batch, so the same read says how many rows of each batch finished (a terminal node: one read of that).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .base import AdaptiveModel, ExitInfo
from .executor import (
    ExecutionTrace,
    Packing,
    Part,
    cat_rows,
    merge,
    needs_source,
    node_failure,
    num_rows,
    run_node,
    validate_graph,
)
from .kernels import gather_rows, scatter_rows
from .kernels._dispatch import to_host

MAX_NODES = 62  # a row's visited nodes are bits of one int64
STREAM_BATCHES_IN_FLIGHT = 16  # stream()'s default bound, in batches (a Scheduler's own default: 4)


@dataclass
class _Queued:
    """Rows waiting in a node's queue, and when the oldest of them arrived."""

    part: Part
    since: float


@dataclass
class _Batch:
    """An admitted input batch: its row ids are ``start .. start + n - 1``; ``number`` counts batches."""

    start: int
    n: int
    remaining: int
    number: int
    tag: object = None
    error: Exception | None = None  # a node failed on some of its rows: the batch fails
    given: bool = False  # given out by pop_done(in_order=False) before the batches ahead of it


@dataclass
class StreamStats:
    """What the scheduler did: per node, how many times it ran and on how many rows in all."""

    runs: list[int] = field(default_factory=list)
    rows_run: list[int] = field(default_factory=list)

    @property
    def mean_rows_per_run(self) -> list[float]:
        return [r / c if c else 0.0 for r, c in zip(self.rows_run, self.runs)]


class Scheduler:
    """Queues of rows per graph node, run on full batches (see the module docstring).

    Every row carries (packed in its :class:`~adaexit.executor.Part`'s ``meta``) its slot in the output
    ring buffer, its input batch's number and the nodes it visited (bit ``k``: node ``k``); the partition
    of a decision runs on route x input batch, so the decision's one host sync also tells how many rows
    of each batch exited.

    Args:
        model: an :class:`~adaexit.AdaptiveModel` in ``eval()`` mode.
        batch_size: a node runs when its queue holds at least this many rows.
        max_wait_ms: also run a partial queue once one of its rows has waited this long.
        max_rows_in_flight: bound on admitted rows not yet returned (default ``4 * batch_size``).
        track_visits: record the nodes each row visits (what :meth:`exit_trace` needs for an
            :class:`~adaexit.ExitInfo`); without it, ``pop_done`` gives each row's exit index instead (two
            ops fewer per node run).
    """

    def __init__(self, model: AdaptiveModel, batch_size: int, max_wait_ms: float | None = None,
                 max_rows_in_flight: int | None = None, track_visits: bool = True):
        if not isinstance(model, AdaptiveModel):
            raise ValueError(f"stream: model must be an adaexit AdaptiveModel, got {type(model).__name__}")
        if model.training:
            raise ValueError("stream: the model is in training mode; call model.eval() first")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or int(batch_size) < 1:
            raise ValueError(f"stream: batch_size must be an integer >= 1, got {batch_size}")
        if max_wait_ms is not None and not max_wait_ms >= 0:
            raise ValueError(f"stream: max_wait_ms must be >= 0, got {max_wait_ms}")
        self.batch_size = int(batch_size)
        self.capacity = int(4 * self.batch_size if max_rows_in_flight is None else max_rows_in_flight)
        if self.capacity < 1:
            raise ValueError(f"stream: max_rows_in_flight must be >= 1, got {max_rows_in_flight}")
        self.model = model
        self.nodes = model.graph()
        validate_graph(self.nodes)
        if len(self.nodes) > MAX_NODES:
            raise ValueError(f"stream: the model's graph has {len(self.nodes)} nodes; stream runs graphs of up "
                             f"to {MAX_NODES}")
        self.track_visits = bool(track_visits)
        self.last_failure: Exception | None = None  # the last node failure whose rows were failed
        self.max_wait = None if max_wait_ms is None else max_wait_ms / 1e3
        self.source = needs_source(self.nodes)
        self.queues: list[deque[_Queued]] = [deque() for _ in self.nodes]
        self.queued = [0] * len(self.nodes)
        self.open: deque[_Batch] = deque()
        self.next_id = 0
        self.next_number = 0
        self.packing: Packing | None = None
        self.decides = [False] * len(self.nodes)  # whether node k's router made a decision
        self.logits: torch.Tensor | None = None  # ring buffer: row id r lives at slot r % capacity
        self.visits: torch.Tensor | None = None  # per slot: the nodes its row visited (bit k: node k)
        self.stats = StreamStats([0] * len(self.nodes), [0] * len(self.nodes))

    # -- admission ------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Rows admitted and not yet returned (ids from the oldest open batch on)."""
        return self.next_id - self.open[0].start if self.open else 0

    def can_admit(self, n: int) -> bool:
        if n > self.capacity:
            return not self.open  # alone, once everything before it is out
        return self.next_id + n - (self.open[0].start if self.open else self.next_id) <= self.capacity

    def admit(self, x, tag=None, since: float | None = None) -> None:
        """Queue the rows of an input batch at the first node; ``x`` is what ``model.prepare_input``
        returned for it; ``since``: the ``time.monotonic()`` its wait counts from (default: now)."""
        self.admit_many([x], [tag], since)

    def admit_many(self, xs: list, tags: list | None = None, since: float | None = None) -> None:
        """Queue several input batches as one part at the first node (one concatenation, a few ops in all
        rather than per batch); each stays its own batch (own outputs, own failures). Together they must
        fit the bound (only a lone batch may exceed it). Nothing changes if this raises."""
        ns = [num_rows(x) for x in xs]
        n = sum(ns)
        if not self.can_admit(n) or (len(xs) > 1 and n > self.capacity):
            raise RuntimeError("stream: admit() called with no room; run steps first")
        tags = [None] * len(xs) if tags is None else tags
        if n:
            x = cat_rows([x for x, k in zip(xs, ns) if k])
            device = x.device
            state = dict(self.model.init_state(n, device))
            packing = Packing.of(state, extra=2)
            if self.packing is not None and packing != self.packing:
                raise ValueError("stream: the policy's per-row state changed between batches")
            self.packing = packing
        if n > self.capacity:  # nothing is in flight: grow the ring buffer for this batch
            self.capacity, self.logits, self.visits = n, None, None
        start, number = self.next_id, self.next_number
        for k, tag in zip(ns, tags):
            self.open.append(_Batch(self.next_id, k, k, self.next_number, tag))
            self.next_id += k
            self.next_number += 1
        if n:
            slots = torch.arange(start, start + n, device=device).remainder_(self.capacity)
            numbers = torch.arange(number, self.next_number, device=device)
            if any(k != 1 for k in ns):  # (1-row requests: one number per row already; 0-row ones get none)
                numbers = numbers.repeat_interleave(torch.tensor(ns, device=device), output_size=n)
            head = torch.stack([slots, numbers, torch.zeros_like(slots)], dim=1)
            loose = {key: state[key] for key in packing.loose}
            part = Part(packing.pack(head, state), x, x if self.source else None, loose)
            self._enqueue(0, _Queued(part, time.monotonic() if since is None else since))

    def _enqueue(self, i: int, queued: _Queued) -> None:
        self.queues[i].append(queued)
        self.queued[i] += len(queued.part)

    # -- running --------------------------------------------------------------------------------
    def next_node(self, flush: bool = False, drain: bool = False) -> int | None:
        """The node to run next, or ``None`` when none should run now (see the module docstring)."""
        for i in reversed(range(len(self.nodes))):
            if self.queued[i] >= self.batch_size:
                return i
        waiting = [i for i in range(len(self.nodes)) if self.queued[i]]
        if not waiting:
            return None
        if drain or self.in_flight >= self.capacity:
            return waiting[-1]  # room is made by finishing rows: the deepest ones are closest to done
        if flush:
            return waiting[0]  # the input has ended: move rows forward, so later queues fill up
        if self.max_wait is not None:
            now = time.monotonic()
            for i in waiting:
                if now - self.queues[i][0].since >= self.max_wait:
                    return i
        return None

    def step(self, flush: bool = False, drain: bool = False) -> bool:
        """Run one node if one should run; ``flush``: the input has ended, partial queues run too;
        ``drain``: a batch waits for room, partial queues run, deepest first. Whether a node ran."""
        i = self.next_node(flush, drain)
        if i is None:
            return False
        node = self.nodes[i]
        queue = self.queues[i]
        parts = [q.part for q in queue]
        since = min(q.since for q in queue)  # rows keep their oldest arrival: max_wait bounds the whole wait
        queue.clear()
        self.queued[i] = 0
        part = merge(parts, node, i)
        if self.track_visits:
            part.meta[:, 2].bitwise_or_(1 << i)  # (merge and gathers give this run its own meta)
        base = self.open[0].number
        try:
            result = run_node(self.nodes, i, part, self.model.route, self.packing,
                              groups=(base, self.next_number - base))
        except Exception as err:
            inner = err.__cause__ if getattr(err, "node", None) == i else err  # (run_module named the node)
            error = node_failure(f"stream: node {i} ({node.name}) failed on {len(part)} rows: {inner}", err, i)
            self._fail(part, error)
            self.last_failure = error  # (a Server tells node failures, whose rows are failed, from bugs)
            raise error from err
        self.stats.runs[i] += 1
        self.stats.rows_run[i] += len(part)
        self.decides[i] = self.decides[i] or result.decided
        for meta, logits in result.exits:
            self._write(i, meta, logits, result.exit_groups)
        for target, handoff in result.handoffs:
            self._enqueue(target, _Queued(handoff, since))
        return True

    def _fail(self, part: Part, error: Exception) -> None:
        """The rows of ``part`` are lost: their batches fail (their other rows still run, and the batches
        leave :meth:`pop_done` with ``error`` set, in order); other batches are untouched."""
        base = self.open[0].number
        lost = to_host(torch.bincount(part.meta[:, 1] - base, minlength=self.next_number - base))
        for batch, count in zip(self.open, lost):
            if count:
                batch.remaining -= count
                batch.error = batch.error or error

    def deadline(self) -> float | None:
        """The ``time.monotonic()`` at which a queued row will have waited ``max_wait_ms`` (``None``
        without ``max_wait_ms`` or with nothing queued): when a caller waiting for input should step."""
        if self.max_wait is None:
            return None
        oldest = [q[0].since for q in self.queues if q]
        return min(oldest) + self.max_wait if oldest else None

    def _write(self, i: int, meta: torch.Tensor, logits: torch.Tensor, groups: list[int]) -> None:
        if self.logits is None:
            self.logits = torch.empty((self.capacity, logits.shape[1]), dtype=logits.dtype, device=logits.device)
            self.visits = torch.zeros(self.capacity, dtype=torch.long, device=logits.device)
        elif logits.shape[1] != self.logits.shape[1]:
            raise ValueError(
                f"stream: node {i} ({self.nodes[i].name}) predicts {logits.shape[1]} classes, an earlier exit "
                f"predicted {self.logits.shape[1]}"
            )
        slots = meta[:, 0].contiguous()  # (the kernels read index tensors densely)
        scatter_rows(self.logits, slots, logits if logits.dtype == self.logits.dtype else logits.to(self.logits.dtype))
        if self.track_visits:
            self.visits.index_copy_(0, slots, meta[:, 2])
        else:
            self.visits.index_fill_(0, slots, i)
        for batch, done in zip(self.open, groups):  # groups: exits per open batch, in order
            batch.remaining -= done

    def pop_done(self, in_order: bool = True) -> Iterator[tuple[object, torch.Tensor, torch.Tensor]]:
        """``(tag, logits, visits)`` of each finished batch at the front, in input order (``visits``: per
        row, the nodes it ran, bit ``k`` for node ``k``, which :func:`exit_trace` reads; without
        ``track_visits``, the exit index). A batch a node failed on comes out as ``(tag, error, None)``.
        ``in_order=False``: every finished batch, also behind unfinished ones (a server's requests need
        not wait for the slower rows of those before them); the rows in flight still count from the
        oldest unfinished batch. The finished batches' rows are copied out of the ring in one go; each
        batch gets views of its own rows of that copy."""
        done = []
        while self.open and self.open[0].remaining == 0:
            batch = self.open.popleft()
            if not batch.given:
                done.append(batch)
        if not in_order:
            for batch in self.open:
                if batch.remaining == 0 and not batch.given:
                    batch.given = True
                    done.append(batch)
        if not done:
            return
        dtype = self.model.output_dtype()
        sizes = [batch.n for batch in done]
        start, n = done[0].start, done[-1].start + done[-1].n - done[0].start
        if sum(sizes) and self.logits is not None:  # (no ring yet: every batch with rows failed)
            first, device = start % self.capacity, self.logits.device
            if n == sum(sizes) and first + n <= self.capacity:  # contiguous in the ring: a copy
                logits, visits = self.logits[first : first + n].clone(), self.visits[first : first + n].clone()
            else:  # round the ring's end, or around batches given out earlier: gather the slots
                spans = [(start, n)] if n == sum(sizes) else [(b.start, b.n) for b in done]
                slots = torch.cat([torch.arange(a, a + k, device=device) for a, k in spans]) % self.capacity
                logits, visits = gather_rows(self.logits, slots), gather_rows(self.visits, slots)
            if dtype is not None and logits.dtype != dtype:
                logits = logits.to(dtype)
            logits, visits = logits.split(sizes), visits.split(sizes)
        for j, batch in enumerate(done):
            if batch.error is not None:
                yield batch.tag, batch.error, None
            elif batch.n == 0:
                classes = self.logits.shape[1] if self.logits is not None else self._classes()
                device = self.logits.device if self.logits is not None else torch.device("cpu")
                yield (batch.tag, torch.empty((0, classes), dtype=dtype, device=device),
                       torch.empty(0, dtype=torch.long, device=device))
            else:
                yield batch.tag, logits[j], visits[j]

    def exit_trace(self, visits: torch.Tensor) -> ExecutionTrace:
        """The :class:`~adaexit.executor.ExecutionTrace` of one batch from its rows' visited nodes (one
        host sync): the exit is the last node a row visited (routes only go forward)."""
        k = len(self.nodes)
        bits = (visits[:, None] >> torch.arange(k, device=visits.device)) & 1
        # the highest set bit: the last node visited
        exit_index = (bits * torch.arange(1, k + 1, device=visits.device)).amax(dim=1) - 1 if k else visits
        exit_counts = torch.bincount(exit_index, minlength=k)
        rows_run, exit_counts = to_host(torch.stack([bits.sum(dim=0), exit_counts]))
        rows_decided = [r if d else 0 for r, d in zip(rows_run, self.decides)]
        return ExecutionTrace(exit_index, exit_counts, rows_run, rows_decided)

    def _classes(self) -> int:
        return getattr(self.nodes[-1].head, "num_classes", 0) or 0

    @property
    def idle(self) -> bool:
        return not self.open


def stream(
    model: AdaptiveModel,
    batches: Iterable,
    *,
    batch_size: int | None = None,
    max_wait_ms: float | None = None,
    max_rows_in_flight: int | None = None,
    return_info: bool = False,
) -> Iterator:
    """Run ``model`` over an iterable of input batches with cross-batch re-batching; yield each batch's
    output in input order, equal to ``model(batch)`` (see the module docstring).

    Args:
        model: an :class:`~adaexit.AdaptiveModel` in ``eval()`` mode.
        batches: input batches, as ``model`` takes them (tensors; any number of rows, 0 included). For a
            DataLoader of ``(inputs, labels)`` pass the inputs: ``(x for x, _ in loader)``.
        batch_size: rows per node run (default: the first batch's size).
        max_wait_ms: run a partial queue once a row has waited this long (checked between node runs;
            for requests arriving in real time use :class:`adaexit.Server`).
        max_rows_in_flight: bound on rows admitted and not yet yielded (default ``16 * batch_size``: deep
            nodes fill, see the module docstring; the rows waiting for their batch hold only their logits).
        return_info: yield ``(output, info)``, ``info`` the batch's :class:`~adaexit.ExitInfo` as
            ``model(batch, return_info=True)`` gives it.

    Yields what ``model(batch)`` returns, one per input batch. A failing node raises an error naming it;
    batches not finished by then are not yielded.
    """
    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"stream: model must be an adaexit AdaptiveModel, got {type(model).__name__}")
    scheduler = None
    with torch.inference_mode():
        for index, x in enumerate(batches):
            x = prepare(model, x, f"stream: batch {index}")
            n = num_rows(x)
            if scheduler is None:
                size = batch_size if batch_size is not None else max(1, n)
                bound = STREAM_BATCHES_IN_FLIGHT * size if max_rows_in_flight is None else max_rows_in_flight
                scheduler = Scheduler(model, size, max_wait_ms, bound, track_visits=return_info)
            while not scheduler.can_admit(n):
                scheduler.step(drain=True)
                yield from _outputs(model, scheduler, return_info)
            scheduler.admit(x, tag=x if return_info else None)
            while scheduler.step():
                yield from _outputs(model, scheduler, return_info)
            yield from _outputs(model, scheduler, return_info)
        if scheduler is not None:
            while scheduler.step(flush=True):
                yield from _outputs(model, scheduler, return_info)
            yield from _outputs(model, scheduler, return_info)


def prepare(model: AdaptiveModel, x, where: str):
    """``model.prepare_input(x)``, with a message that says what to do when ``x`` is an ``(inputs,
    labels)`` pair (a DataLoader's batch)."""
    try:
        return model.prepare_input(x)
    except ValueError as err:
        if isinstance(x, (tuple, list)) and len(x) == 2:
            raise ValueError(
                f"{where} is a {type(x).__name__} of 2 items, like a DataLoader's (inputs, labels): pass the inputs "
                "only, e.g. stream(model, (x for x, _ in loader))"
            ) from err
        raise ValueError(f"{where} is not a valid input: {err}") from err


def batch_info(model: AdaptiveModel, scheduler: Scheduler, x, visits: torch.Tensor):
    """The :class:`~adaexit.ExitInfo` of one streamed batch ``x`` (one host sync). A model whose nodes, not an
    exit policy, carry the costs (a D2NN: ``node_flops`` / ``max_path_flops``) gets them from its nodes."""
    trace = scheduler.exit_trace(visits)
    node_flops = getattr(model, "node_flops", None)
    if node_flops is None or not num_rows(x):
        return model.exit_info(x, trace)
    flops = [float(f) for f in node_flops(x)]
    k = len(flops)
    bits = ((visits[:, None] >> torch.arange(k, device=visits.device)) & 1).double()
    return ExitInfo(trace.exit_index, trace.exit_counts, trace.rows_run, trace.rows_decided,
                    float(sum(r * f for r, f in zip(trace.rows_run, flops))),
                    float(num_rows(x) * model.max_path_flops(x)), model.node_names,
                    flops_per_row=bits @ torch.tensor(flops, dtype=torch.float64, device=visits.device))


def _outputs(model: AdaptiveModel, scheduler: Scheduler, return_info: bool):
    for x, logits, visits in scheduler.pop_done():
        out = model.finish_output(logits)
        yield (out, batch_info(model, scheduler, x, visits)) if return_info else out


__all__ = ["Scheduler", "StreamStats", "batch_info", "prepare", "stream"]
