"""One executor for every topology: a conditional-execution graph run sparsely on a batch.

Nodes are ordinary modules (a backbone stage, a whole network, a branch). After a node, a *router*
gives every row a route: ``0`` = exit with the node's prediction, ``j >= 1`` = continue to
``node.successors[j - 1]``. The executor then

1. runs each node only on the rows routed to it (nodes run in index order; routes only go forward);
2. splits the rows by route with the stable :func:`~adaexit.kernels.partition` kernel (one host sync
   per decision point, to learn the sub-batch sizes);
3. scatters exiting rows' logits to their original positions (:func:`~adaexit.kernels.scatter_rows`)
   and gathers the survivors densely (:func:`~adaexit.kernels.gather_rows`), with every per-example
   tensor that travels with them (original row index, policy state such as patience counters, the
   input rows when a later node reads them).

Early exit is a chain; a cascade is a chain of whole networks whose nodes read the original input
("source") and may skip ahead; dynamic routing sends rows to one of several branches that later merge.
Policies never touch the executor; the executor never changes per method.

:func:`run_node` is one node's step (run, decide, split); :func:`execute` drives it over one batch, and
:func:`adaexit.stream` drives the same step over queues of rows from many batches.

Rows need not be one tensor: a :class:`RowBatch` (e.g. a padded token sequence with its attention
mask) travels through the same gathers, and may shorten itself as rows leave (padding trim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .kernels import gather_rows, partition, scatter_rows
from .kernels._dispatch import to_host

CARRY = "carry"  # the node reads its predecessor's output
SOURCE = "source"  # the node reads the original input rows
SOURCE_KEY = "executor_source"  # per-row state: the input rows, carried when a later node reads them


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
#   route: long [n] with values in [0, 1 + len(successors)); None means "every row continues to
#   successors[0]" (no decision at this node, so no partition and no host sync).
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
        read with the decision's one host sync and handed to :meth:`take`."""
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
# One node's step
# =============================================================================================
@dataclass
class Handoff:
    """Rows a node sends on: ``rows`` (their ids), what the target reads, and their state."""

    target: int
    rows: torch.Tensor
    payload: object
    state: dict


@dataclass
class NodeResult:
    """What running one node on its rows did.

    Attributes:
        exits: ``(row ids, logits)`` of the rows that exit here (at most one pair).
        handoffs: the rows that continue, per successor.
        decided: whether the router made a decision here (a partition and one host sync).
    """

    exits: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    handoffs: list[Handoff] = field(default_factory=list)
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
    """Whether a node after the first reads the original input (its rows must travel as state)."""
    return any(node.takes == SOURCE for node in nodes[1:])


def merge(parts: list[tuple], node: Node, index: int) -> tuple:
    """Concatenate the ``(rows, payload, state)`` parts routed to one node (from several predecessors,
    or several batches)."""
    if len(parts) == 1:
        return parts[0]
    rows = torch.cat([p[0] for p in parts])
    try:
        payload = cat_rows([p[1] for p in parts])
    except RuntimeError as err:
        raise ValueError(f"node {index} ({node.name}) receives inputs of different shapes: {err}") from err
    keys = set(parts[0][2])
    if any(set(p[2]) != keys for p in parts):
        raise ValueError(f"node {index} ({node.name}) receives rows whose per-example state has different keys")
    state = {key: cat_rows([p[2][key] for p in parts]) for key in keys}
    return rows, payload, state


def run_node(nodes: list[Node], i: int, rows: torch.Tensor, payload, state: dict, router: Router) -> NodeResult:
    """Run node ``i`` on its rows, let the router decide, and split the rows by route.

    ``rows`` are the rows' ids (long), ``payload`` what the node reads, ``state`` the per-row tensors
    that travel with them (:data:`SOURCE_KEY`: the input rows, when a later node reads them).
    """
    node = nodes[i]
    count = rows.shape[0]
    features = node.module(payload)
    logits, route, state = router(i, node, features, state)
    result = NodeResult(decided=route is not None)

    lengths = None
    if not node.successors:  # terminal: everyone exits, no partition needed
        groups = [(0, None, count)]
    elif route is None:  # no decision here: everyone continues to the first successor
        groups = [(1, None, count)]
    else:
        num_routes = 1 + len(node.successors)
        order, counts = partition(route, num_routes)
        need = features.route_lengths(route, num_routes) if isinstance(features, RowBatch) else None
        host = to_host(counts if need is None else torch.cat([counts, need.to(counts.dtype)]))  # the one sync
        sizes, lengths = host[:num_routes], (host[num_routes:] or None)
        if sum(sizes) != count:  # free check: on GPU out-of-range routes would lose rows silently
            raise ValueError(f"node {i} ({node.name}): the router gave routes outside [0, {num_routes})")
        groups, start = [], 0
        for r, size in enumerate(sizes):
            if size:
                groups.append((r, None if size == count else order[start : start + size], size))
            start += size

    for r, sel, _ in groups:
        sub_rows = take_rows(rows, sel)
        if r == 0:
            if logits is None:
                raise ValueError(f"node {i} ({node.name}): rows exit here but the router gave no logits")
            result.exits.append((sub_rows, take_rows(logits, sel)))
            continue
        target = node.successors[r - 1]
        sub_state = {key: take_rows(v, sel) for key, v in state.items()}  # state travels with survivors
        if nodes[target].takes == CARRY:
            sub_payload = take_rows(features, sel, None if lengths is None else lengths[r])
        else:
            sub_payload = sub_state[SOURCE_KEY]
        result.handoffs.append(Handoff(target, sub_rows, sub_payload, sub_state))
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
    """

    exit_index: torch.Tensor
    exit_counts: list[int] = field(default_factory=list)
    rows_run: list[int] = field(default_factory=list)
    rows_decided: list[int] = field(default_factory=list)


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
        scatter_rows(self.logits, rows, logits.to(self.logits.dtype))
        self.exit_index.index_fill_(0, rows, node_index)
        self.exit_counts[node_index] += rows.shape[0]

    def finish(self, nodes: list[Node]) -> torch.Tensor:
        if self.logits is None:  # empty batch: the class count comes from the last head when it is known
            classes = getattr(nodes[-1].head, "num_classes", 0) or 0
            self.logits = torch.empty((self.n, classes), device=self.device)
        return self.logits


def execute(nodes: list[Node], x, router: Router, state: dict | None = None) -> tuple[torch.Tensor, ExecutionTrace]:
    """Run the graph sparsely on the batch ``x`` (a tensor or a :class:`RowBatch`); return
    ``(logits [N, classes], trace)``. Every row gets exactly one prediction, at its original position.
    """
    validate_graph(nodes)
    n, device = num_rows(x), _device(x)
    out = Outputs(n, device, len(nodes))
    trace = ExecutionTrace(out.exit_index, out.exit_counts, [0] * len(nodes), [0] * len(nodes))
    pending: list[list[tuple]] = [[] for _ in nodes]
    if n > 0:
        state = dict(state or {})
        if needs_source(nodes):
            state[SOURCE_KEY] = x
        pending[0].append((torch.arange(n, device=device), x, state))

    for i, node in enumerate(nodes):
        if not pending[i]:
            continue
        rows, payload, st = merge(pending[i], node, i)
        pending[i] = []
        trace.rows_run[i] = rows.shape[0]
        result = run_node(nodes, i, rows, payload, st, router)
        if result.decided:
            trace.rows_decided[i] = rows.shape[0]
        for exit_rows, logits in result.exits:
            out.write(i, node, exit_rows, logits)
        for h in result.handoffs:
            pending[h.target].append((h.rows, h.payload, h.state))
    return out.finish(nodes), trace
