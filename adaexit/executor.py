"""One executor for every topology: a conditional-execution graph run sparsely on a batch.

Nodes are ordinary modules (a backbone stage, a whole network, a branch). After a node, a *router*
gives every row a route: ``0`` = exit with the node's prediction, ``j >= 1`` = continue to
``node.successors[j - 1]``. The executor then

1. runs each node only on the rows routed to it (nodes run in index order; routes only go forward);
2. splits the rows by route with the stable :func:`~adaexit.kernels.partition` kernel (one host sync
   per decision point, to learn the sub-batch sizes);
3. scatters exiting rows' logits to their original positions (:func:`~adaexit.kernels.scatter_rows`)
   and gathers the survivors densely (:func:`~adaexit.kernels.gather_rows`).

What travels with the rows is a :class:`Part`: the rows' ids and the policy's per-row state packed in
*one* int64 tensor (:class:`Packing`: one gather moves it all), what the node reads, and the input rows
when a later node reads them. One node run is the node's module, one gate pass (in the router), one
partition and a handful of gathers and scatters - a fixed, small number of ops (``tests/test_overhead.py``
counts them).

Early exit is a chain; a cascade is a chain of whole networks whose nodes read the original input
("source") and may skip ahead; dynamic routing sends rows to one of several branches that later merge.
Policies never touch the executor; the executor never changes per method.

**Zero-sync mode** (``execute(..., sync=False)``, ``model.set_execution(sync=False)``): sub-batch sizes
stay on the device. Every node runs on a buffer of static capacity (the batch size) whose live rows are
compacted to the front; the tail is masked (its rows never exit, never reach the output). No decision
reads the device, so a forward can be captured in a CUDA graph or compiled with
``torch.compile(fullgraph=True)``; it computes every node on the full capacity (no FLOPs saved: on a GPU
the launches saved pay for it), with outputs equal to the syncing mode.

:func:`run_node` is one node's step (run, decide, split); :func:`execute` drives it over one batch, and
:func:`adaexit.stream` drives the same step over queues of rows from many batches.

Rows need not be one tensor: a :class:`RowBatch` (e.g. a padded token sequence with its attention
mask) travels through the same gathers, and may shorten itself as rows leave (padding trim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import gather_rows, partition, scatter_rows
from .kernels._dispatch import to_host

CARRY = "carry"  # the node reads its predecessor's output
SOURCE = "source"  # the node reads the original input rows


@dataclass
class Node:
    """A node of the conditional-execution graph.

    Args:
        name: for error messages and reports.
        module: computes the node's features from its input.
        head: the exit head that turns features into logits; ``None`` if rows cannot exit here.
        successors: indices of later nodes a row may be routed to (route ``j`` -> ``successors[j-1]``).
        takes: ``"carry"`` (the predecessor's output) or ``"source"`` (the original input rows).
    """

    name: str
    module: nn.Module
    head: nn.Module | None = None
    successors: tuple[int, ...] = ()
    takes: str = CARRY


# router(node_index, node, features, state) -> (logits or None, route or None, state)
#   route: long (or bool: True = continue) [n] with values in [0, 1 + len(successors)); None means
#   "every row continues to successors[0]" (no decision at this node, so no partition and no host sync).
Router = Callable[[int, Node, object, dict], tuple]


# =============================================================================================
# Rows that are not one tensor
# =============================================================================================
class RowBatch:
    """Rows made of several tensors (e.g. hidden states with their attention mask), moved as one.

    Subclasses implement ``__len__`` (the number of rows), :meth:`take` and :meth:`cat`; they may
    implement :meth:`route_lengths` to shorten the rows that continue (padding trim).
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, index: torch.Tensor, length: int | None = None) -> "RowBatch":
        """The rows at ``index``, in that order; ``length`` is this route's entry of
        :meth:`route_lengths` (``None`` when it gave none)."""
        raise NotImplementedError

    @classmethod
    def cat(cls, parts: Sequence["RowBatch"]) -> "RowBatch":
        """The rows of ``parts`` one after another (e.g. sequences padded to the longest part)."""
        raise NotImplementedError

    def route_lengths(self, route: torch.Tensor, num_routes: int) -> torch.Tensor | None:
        """Optional: long ``[num_routes]`` on the device, the length the rows of each route need. It is
        read with the decision's one host sync and handed to :meth:`take` (never in zero-sync mode)."""
        return None


def num_rows(rows) -> int:
    return rows.shape[0] if isinstance(rows, torch.Tensor) else len(rows)


def take_rows(rows, index: torch.Tensor | None, length: int | None = None):
    """``rows[index]`` for a tensor (the gather kernel) or a :class:`RowBatch`; ``None``: all rows."""
    if index is None and length is None:
        return rows
    if isinstance(rows, torch.Tensor):
        return rows if index is None else gather_rows(rows, index)
    if index is None:
        index = torch.arange(len(rows), device=_device(rows))
    return rows.take(index, length)


def cat_rows(parts: Sequence):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    return type(parts[0]).cat(parts)


def _device(rows) -> torch.device:
    if isinstance(rows, torch.Tensor):
        return rows.device
    device = getattr(rows, "device", None)
    if device is None:
        raise ValueError(f"{type(rows).__name__} must have a .device to run on the executor")
    return device


# =============================================================================================
# Per-row state, packed: one gather moves it all
# =============================================================================================
@dataclass(frozen=True)
class Packing:
    """Where the per-row tensors sit in a part's ``meta``: an int64 ``[n, width]`` tensor whose first
    ``1 + extra`` columns are the row id and bookkeeping (:func:`adaexit.stream`: the input batch) and
    whose other columns hold the policy's integer state (counters, predictions, masks), each field bit-cast
    to whole 8-byte words. With nothing but the row id, ``meta`` is the ``[n]`` ids themselves.
    Floating-point state stays ``loose`` (one gather each): autograd may track it (a D2NN's
    log-probabilities), and a bit-cast would cut the gradient.

    ``fields``: ``(key, dtype, row shape, first column, last column, bytes per row)``.
    """

    extra: int = 0
    fields: tuple = ()
    loose: tuple[str, ...] = ()

    @staticmethod
    def of(state: dict, extra: int = 0) -> "Packing":
        fields, loose, col = [], [], 1 + extra
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.is_floating_point() or value.is_complex():
                loose.append(key)
                continue
            nbytes = value[:1].numel() * value.element_size()
            words = -(-nbytes // 8)
            fields.append((key, value.dtype, tuple(value.shape[1:]), col, col + words, nbytes))
            col += words
        return Packing(extra, tuple(fields), tuple(loose))

    @property
    def flat(self) -> bool:
        """Whether ``meta`` is the 1-D ids (nothing else packed)."""
        return not self.extra and not self.fields

    def ids(self, meta: torch.Tensor) -> torch.Tensor:
        """The row ids (contiguous: the kernels read index tensors densely)."""
        return meta if meta.dim() == 1 else meta[:, 0].contiguous()

    def pack(self, head: torch.Tensor, state: dict) -> torch.Tensor:
        """``meta`` from the id (+ bookkeeping) columns ``head`` and the packable fields of ``state``."""
        if not self.fields:
            return head
        n = head.shape[0]
        words = [head.view(n, -1)]
        for key, dtype, shape, first, last, nbytes in self.fields:
            value = state[key]
            if value.dtype != dtype or tuple(value.shape[1:]) != shape:
                raise ValueError(f"the per-row state {key!r} changed shape or dtype ({dtype}, {shape} -> "
                                 f"{value.dtype}, {tuple(value.shape[1:])})")
            flat = value.reshape(n, -1)
            if dtype != torch.int64:
                flat = flat.contiguous().view(torch.uint8)
                if nbytes % 8:
                    flat = F.pad(flat, (0, 8 - nbytes % 8))
                flat = flat.view(torch.int64)
            words.append(flat)
        return torch.cat(words, dim=1)

    def unpack(self, meta: torch.Tensor) -> dict:
        """The packed fields of ``meta`` as views (no copies)."""
        state = {}
        n = meta.shape[0]
        for key, dtype, shape, first, last, nbytes in self.fields:
            if dtype == torch.int64:
                state[key] = meta[:, first] if not shape else meta[:, first:last].view(n, *shape)
            else:
                raw = meta[:, first:last].view(torch.uint8)[:, :nbytes]
                state[key] = raw.view(dtype).view(n, *shape)
        return state

    def head(self, meta: torch.Tensor) -> torch.Tensor:
        """The id (+ bookkeeping) columns of ``meta``."""
        return meta if self.flat or not self.fields else meta[:, : 1 + self.extra]


@dataclass
class Part:
    """Rows on their way to a node: ``meta`` (ids + packed state, see :class:`Packing`), what the node
    reads (``payload``), the input rows when a later node reads them (``source``) and the state tensors
    that cannot be packed (``loose``)."""

    meta: torch.Tensor
    payload: object
    source: object = None
    loose: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.meta.shape[0]

    def take(self, index: torch.Tensor | None, payload, length: int | None = None) -> "Part":
        """The rows at ``index`` (``None``: all), reading ``payload`` next."""
        return Part(
            take_rows(self.meta, index),
            take_rows(payload, index, length),
            None if self.source is None else take_rows(self.source, index),
            {key: take_rows(v, index) for key, v in self.loose.items()},
        )


# =============================================================================================
# One node's step
# =============================================================================================
@dataclass
class NodeResult:
    """What running one node on its rows did.

    Attributes:
        exits: ``(meta, logits)`` of the rows that exit here (at most one pair).
        exit_groups: with ``groups``, how many exiting rows each group holds (host ints).
        handoffs: ``(target node, part)`` of the rows that continue.
        decided: whether the router made a decision here (a partition and one host sync).
    """

    exits: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    exit_groups: list[int] | None = None
    handoffs: list[tuple[int, Part]] = field(default_factory=list)
    decided: bool = False


def validate_graph(nodes: list[Node]) -> None:
    """Raise ``ValueError`` naming the node if the graph cannot be executed without losing rows."""
    if not nodes:
        raise ValueError("the execution graph has no nodes")
    for i, node in enumerate(nodes):
        if node.takes not in (CARRY, SOURCE):
            raise ValueError(f"node {i} ({node.name}): takes must be 'carry' or 'source', got {node.takes!r}")
        for j in node.successors:
            if not i < j < len(nodes):
                raise ValueError(f"node {i} ({node.name}): successor {j} is not a later node")
        if not node.successors and node.head is None:
            raise ValueError(f"node {i} ({node.name}) has no successors and no exit head: rows would be lost")
    # (the first node always reads the input, whatever its ``takes`` says: nothing precedes it)


def needs_source(nodes: list[Node]) -> bool:
    """Whether a node after the first reads the original input (its rows must travel with them)."""
    return any(node.takes == SOURCE for node in nodes[1:])


def merge(parts: list[Part], node: Node, index: int) -> Part:
    """Concatenate the parts routed to one node (from several predecessors, or several batches)."""
    if len(parts) == 1:
        return parts[0]
    try:
        payload = cat_rows([p.payload for p in parts])
    except RuntimeError as err:
        raise ValueError(f"node {index} ({node.name}) receives inputs of different shapes: {err}") from err
    source = None if parts[0].source is None else cat_rows([p.source for p in parts])
    loose = {key: cat_rows([p.loose[key] for p in parts]) for key in parts[0].loose}
    return Part(torch.cat([p.meta for p in parts]), payload, source, loose)


def run_module(i: int, node: Node, rows):
    """``node.module(rows)``, a failure named by its node (a bare shape error from deep inside a model
    does not say which stage got the wrong input)."""
    try:
        return node.module(rows)
    except (RuntimeError, ValueError) as err:
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise node_failure(f"node {i} ({node.name}) failed on its input ({shape}): {err}", err, i) from err


def node_failure(message: str, cause: Exception, node: int) -> Exception:
    """``message`` as the kind of error ``cause`` is (``ValueError`` stays one, anything else becomes a
    ``RuntimeError``), with ``.node``: the index of the node it names (so callers do not name it again)."""
    error = (ValueError if isinstance(cause, ValueError) else RuntimeError)(message)
    error.node = node
    error.__cause__ = cause
    return error


def _decide(nodes, i, part: Part, router: Router, packing: Packing):
    """Run node ``i``'s module and its router: ``(features, logits, route, meta, loose)``, the state
    repacked when the router changed it."""
    node = nodes[i]
    features = run_module(i, node, part.payload)
    state = packing.unpack(part.meta)
    state.update(part.loose)
    logits, route, new_state = router(i, node, features, state)
    meta, loose = part.meta, part.loose
    if new_state is not state:
        if set(new_state) != set(state):
            raise ValueError(f"node {i} ({node.name}): the router changed the per-row state's keys "
                             f"({sorted(state)} -> {sorted(new_state)})")
        if any(new_state[f[0]] is not state[f[0]] for f in packing.fields):
            meta = packing.pack(packing.head(meta), new_state)
        loose = {key: new_state[key] for key in packing.loose}
    return features, logits, route, meta, loose


def _no_logits(i: int, node: Node) -> ValueError:
    return ValueError(f"node {i} ({node.name}): rows exit here but the router gave no logits")


def run_node(nodes: list[Node], i: int, part: Part, router: Router, packing: Packing,
             groups: tuple[int, int] | None = None) -> NodeResult:
    """Run node ``i`` on the rows of ``part``, let the router decide, and split the rows by route.

    ``groups=(base, count)``: column 1 of ``meta`` numbers each row's group (:func:`adaexit.stream`: its
    input batch) from ``base``; the result then says how many exiting rows each of the ``count`` groups
    holds, read with the decision's one host sync (the partition runs on route x group).
    """
    node = nodes[i]
    count = len(part)
    features, logits, route, meta, loose = _decide(nodes, i, part, router, packing)
    part = Part(meta, part.payload, part.source, loose)
    result = NodeResult(decided=route is not None or not node.successors)  # (a terminal node's head always runs)
    if not node.successors:  # terminal: everyone exits, no partition needed
        if logits is None:
            raise _no_logits(i, node)
        result.exits.append((meta, logits))
        if groups is not None:
            base, g = groups
            result.exit_groups = to_host(torch.bincount(meta[:, 1] - base, minlength=g)) if g > 1 else [count]
        return result
    if route is None:  # no decision here: everyone continues to the first successor
        target = node.successors[0]
        result.handoffs.append((target, part.take(None, features if nodes[target].takes == CARRY else part.source)))
        return result

    num_routes = 1 + len(node.successors)
    g = 1 if groups is None else groups[1]
    key = route if g == 1 else torch.add(meta[:, 1], route, alpha=g).sub_(groups[0])
    try:
        order, counts = partition(key, num_routes * g)
    except ValueError as err:  # (the CPU path checks the values: name the node, quote its router's own routes)
        where = f"node {i} ({node.name}): the router gave"
        if route.is_floating_point() or route.is_complex():
            raise ValueError(f"{where} {route.dtype} routes; routes are integers in [0, {num_routes})") from err
        lo, hi = (int(v) for v in torch.aminmax(route.long()))
        if lo < 0 or hi >= num_routes:
            raise ValueError(f"{where} routes in [{lo}, {hi}], outside [0, {num_routes})") from err
        raise ValueError(f"node {i} ({node.name}): {err}") from err
    need = None
    if isinstance(features, RowBatch):  # (RowBatch.route_lengths reads routes as long, as documented)
        need = features.route_lengths(route.long() if route.dtype == torch.bool else route, num_routes)
    host = to_host(counts if need is None else torch.cat([counts, need.to(counts.dtype)]))  # the one sync
    lengths = host[num_routes * g :] or None
    sizes = [sum(host[r * g : (r + 1) * g]) for r in range(num_routes)]
    if sum(sizes) != count:  # free check: on GPU out-of-range routes would lose rows silently
        raise ValueError(f"node {i} ({node.name}): the router gave routes outside [0, {num_routes})")
    if groups is not None:
        result.exit_groups = host[:g]
    start = 0
    for r, size in enumerate(sizes):
        if size:
            sel = None if size == count else order[start : start + size]
            if r == 0:
                if logits is None:
                    raise _no_logits(i, node)
                result.exits.append((take_rows(meta, sel), take_rows(logits, sel)))
            else:
                target = node.successors[r - 1]
                payload = features if nodes[target].takes == CARRY else part.source
                result.handoffs.append((target, part.take(sel, payload, None if lengths is None else lengths[r])))
        start += size
    return result


# =============================================================================================
# One batch
# =============================================================================================
@dataclass
class ExecutionTrace:
    """What one sparse execution did.

    Attributes:
        exit_index: long ``[N]``, the node whose prediction each row returned.
        exit_counts: per node, how many rows exited there.
        rows_run: per node, how many rows ran its module.
        rows_decided: per node, how many rows went through its head/router decision.

    In zero-sync mode the counts stay on the device (``counts``: long ``[3, nodes]``) until
    :meth:`settle` reads them (one host sync), which :class:`~adaexit.ExitInfo` does.
    """

    exit_index: torch.Tensor
    exit_counts: list[int] = field(default_factory=list)
    rows_run: list[int] = field(default_factory=list)
    rows_decided: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None

    def settle(self) -> "ExecutionTrace":
        """Read device-side counts into the lists (zero-sync mode; nothing to do otherwise).

        Raises ``ValueError`` if a router lost rows: zero-sync mode cannot check routes when it runs (that
        would read the device), so it gives lost rows NaN logits and ``exit_index`` -1, and says so here."""
        if self.counts is not None:
            self.exit_counts, self.rows_run, self.rows_decided = to_host(self.counts)
            lost = len(self.exit_index) - sum(self.exit_counts)
            if not lost:
                self.counts = None
            else:  # (counts kept: every later read raises too)
                raise ValueError(
                    f"the policy lost rows ({lost} of {len(self.exit_index)}; their logits are NaN, their "
                    "exit_index -1): routes must lie in [0, 1 + len(successors[k])) at every node k; "
                    "set_execution(sync=True) names the node"
                )
        return self


class Outputs:
    """Logits written at the rows' original positions, one exit at a time."""

    def __init__(self, n: int, device: torch.device, num_nodes: int):
        self.logits: torch.Tensor | None = None
        self.n, self.device = n, device
        self.exit_index = torch.full((n,), -1, dtype=torch.long, device=device)
        self.exit_counts = [0] * num_nodes

    def write(self, node_index: int, node: Node, rows: torch.Tensor, logits: torch.Tensor) -> None:
        if self.logits is None:
            self.logits = torch.empty((self.n, logits.shape[1]), dtype=logits.dtype, device=self.device)
        elif logits.shape[1] != self.logits.shape[1]:
            raise ValueError(
                f"node {node_index} ({node.name}) predicts {logits.shape[1]} classes, "
                f"an earlier exit predicted {self.logits.shape[1]}"
            )
        scatter_rows(self.logits, rows, logits if logits.dtype == self.logits.dtype else logits.to(self.logits.dtype))
        self.exit_index.index_fill_(0, rows, node_index)
        self.exit_counts[node_index] += rows.shape[0]

    def finish(self, nodes: list[Node]) -> torch.Tensor:
        if self.logits is None:  # empty batch: the class count comes from the last head when it is known
            classes = getattr(nodes[-1].head, "num_classes", 0) or 0
            self.logits = torch.empty((self.n, classes), device=self.device)
        return self.logits


def execute(nodes: list[Node], x, router: Router, state: dict | None = None, *,
            sync: bool = True) -> tuple[torch.Tensor, ExecutionTrace]:
    """Run the graph sparsely on the batch ``x`` (a tensor or a :class:`RowBatch`); return
    ``(logits [N, classes], trace)``. Every row gets exactly one prediction, at its original position.

    ``sync=False``: the zero-sync mode (see the module docstring): no host sync, capacity-sized buffers.
    """
    validate_graph(nodes)
    n, device = num_rows(x), _device(x)
    state = dict(state or {})
    packing = Packing.of(state)
    if not sync and n > 0:
        return _execute_static(nodes, x, router, state, packing)
    out = Outputs(n, device, len(nodes))
    trace = ExecutionTrace(out.exit_index, out.exit_counts, [0] * len(nodes), [0] * len(nodes))
    pending: list[list[Part]] = [[] for _ in nodes]
    if n > 0:
        source = x if needs_source(nodes) else None
        loose = {key: state[key] for key in packing.loose}
        pending[0].append(Part(packing.pack(torch.arange(n, device=device), state), x, source, loose))

    for i, node in enumerate(nodes):
        if not pending[i]:
            continue
        part = merge(pending[i], node, i)
        pending[i] = []
        trace.rows_run[i] = len(part)
        result = run_node(nodes, i, part, router, packing)
        if result.decided:
            trace.rows_decided[i] = len(part)
        for meta, logits in result.exits:
            out.write(i, node, packing.ids(meta), logits)
        for target, handoff in result.handoffs:
            pending[target].append(handoff)
    return out.finish(nodes), trace


# =============================================================================================
# Zero-sync mode: static capacity, sizes on the device
# =============================================================================================
def _compact_static(part: Part, live: torch.Tensor, capacity: int, payload=None) -> tuple[Part, torch.Tensor]:
    """The live rows of ``part`` moved to the front of a ``capacity``-row part (the tail: other rows,
    masked), with its live mask; ``payload`` replaces what the rows read. No host sync."""
    order, counts = partition(~live, 2)  # live rows first, in order
    if order.shape[0] != capacity:
        order = order[:capacity]
    taken = part.take(order, part.payload if payload is None else payload)
    return taken, torch.arange(capacity, device=live.device) < counts[0]


def _execute_static(nodes, x, router, state, packing) -> tuple[torch.Tensor, ExecutionTrace]:
    n, device = num_rows(x), _device(x)
    ids = torch.arange(n, device=device)
    source = x if needs_source(nodes) else None
    loose = {key: state[key] for key in packing.loose}
    pending: list[list[tuple[Part, torch.Tensor]]] = [[] for _ in nodes]
    pending[0].append((Part(packing.pack(ids, state), x, source, loose), torch.ones(n, dtype=torch.bool, device=device)))
    logits_out = None
    exit_index = torch.full((n + 1,), -1, dtype=torch.long, device=device)  # row n: where masked rows write
    zero = torch.zeros((), dtype=torch.long, device=device)
    rows_run, rows_decided = [zero] * len(nodes), [zero] * len(nodes)
    for i, node in enumerate(nodes):
        if not pending[i]:
            continue
        if len(pending[i]) == 1:
            part, live = pending[i][0]
        else:
            merged = merge([p for p, _ in pending[i]], node, i)
            part, live = _compact_static(merged, torch.cat([m for _, m in pending[i]]), n)
        pending[i] = []
        features, logits, route, meta, loose = _decide(nodes, i, part, router, packing)
        part = Part(meta, part.payload, part.source, loose)
        rows_run[i] = live.sum()
        if not node.successors:
            exiting = live
            rows_decided[i] = rows_run[i]
        elif route is None:
            exiting = None
            target = node.successors[0]
            pending[target].append((Part(meta, features if nodes[target].takes == CARRY else part.source,
                                         part.source, loose), live))
        else:
            rows_decided[i] = rows_run[i]
            route = route.long()
            exiting = live & (route == 0)
            for r, target in enumerate(node.successors, start=1):
                payload = features if nodes[target].takes == CARRY else part.source
                pending[target].append(_compact_static(part, live & (route == r), n, payload))
        if exiting is not None and logits is None:
            if not node.successors:
                raise _no_logits(i, node)
            exiting = None  # the router gives no logits here: no row may exit (a route 0 would be lost)
        if exiting is not None:
            if logits_out is None:  # NaN until written: a row a bad router lost is never a plausible answer
                logits_out = torch.full((n + 1, logits.shape[1]), float("nan"), dtype=logits.dtype, device=device)
            dest = torch.where(exiting, packing.ids(meta), n)
            logits_out.index_copy_(0, dest, logits if logits.dtype == logits_out.dtype else logits.to(logits_out.dtype))
            exit_index.index_fill_(0, dest, i)
    exit_index = exit_index[:n]
    # (bincount would sync on CUDA to size its output; -1: a row a bad router lost, counted nowhere: settle raises)
    exit_counts = torch.zeros(len(nodes) + 1, dtype=torch.long, device=device)
    exit_counts = exit_counts.scatter_add_(0, exit_index + 1, torch.ones_like(exit_index))[1:]
    counts = torch.stack([exit_counts, torch.stack(rows_run), torch.stack(rows_decided)])
    trace = ExecutionTrace(exit_index, counts=counts)
    if logits_out is None:  # every row lost before any exit: NaN of the last head's width (settle raises)
        classes = getattr(nodes[-1].head, "num_classes", 0) or 0
        logits_out = torch.full((n + 1, classes), float("nan"), device=device)
    return logits_out[:n], trace
