"""One executor for every topology: a conditional-execution graph run sparsely on a batch.

Nodes are ordinary modules (a backbone stage, a whole network, a branch). After a node, a *router*
gives every row a route: ``0`` = exit with the node's prediction, ``j >= 1`` = continue to
``node.successors[j - 1]``. The executor then

1. runs each node only on the rows routed to it (nodes run in index order; routes only go forward);
2. splits the rows by route with the stable :func:`~adaexit.kernels.partition` kernel (one host sync
   per decision point, to learn the sub-batch sizes);
3. scatters exiting rows' logits to their original positions (:func:`~adaexit.kernels.scatter_rows`)
   and gathers the survivors densely (:func:`~adaexit.kernels.gather_rows`), with every per-example
   tensor that travels with them (original row index, policy state such as patience counters).

Early exit is a chain; a cascade is a chain of whole networks whose nodes read the original input
("source") and may skip ahead; dynamic routing sends rows to one of several branches that later merge.
Policies never touch the executor; the executor never changes per method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
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
#   route: long [n] with values in [0, 1 + len(successors)); None means "every row continues to
#   successors[0]" (no decision at this node, so no partition and no host sync).
Router = Callable[[int, Node, torch.Tensor, dict], tuple]


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


def _take(t: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    return t if sel is None else gather_rows(t, sel)


def _merge(parts: list[tuple], node: Node, index: int):
    """Concatenate the sub-batches routed to one node from several predecessors."""
    if len(parts) == 1:
        return parts[0]
    rows = torch.cat([p[0] for p in parts])
    try:
        inputs = torch.cat([p[1] for p in parts])
    except RuntimeError as err:
        raise ValueError(
            f"node {index} ({node.name}) receives inputs of different shapes from its predecessors"
        ) from err
    keys = set(parts[0][2])
    if any(set(p[2]) != keys for p in parts):
        raise ValueError(f"node {index} ({node.name}) receives rows whose per-example state has different keys")
    state = {key: torch.cat([p[2][key] for p in parts]) for key in keys}
    return rows, inputs, state


def execute(
    nodes: list[Node], x: torch.Tensor, router: Router, state: dict | None = None
) -> tuple[torch.Tensor, ExecutionTrace]:
    """Run the graph sparsely on the batch ``x``; return ``(logits [N, classes], trace)``.

    Every row gets exactly one prediction, written at its original position.
    """
    validate_graph(nodes)
    n, device = x.shape[0], x.device
    trace = ExecutionTrace(
        exit_index=torch.full((n,), -1, dtype=torch.long, device=device),
        exit_counts=[0] * len(nodes),
        rows_run=[0] * len(nodes),
        rows_decided=[0] * len(nodes),
    )
    out: torch.Tensor | None = None
    pending: list[list[tuple]] = [[] for _ in nodes]
    if n > 0:
        pending[0].append((torch.arange(n, device=device), x, state or {}))

    for i, node in enumerate(nodes):
        if not pending[i]:
            continue
        rows, inputs, st = _merge(pending[i], node, i)
        pending[i] = []
        count = rows.shape[0]
        trace.rows_run[i] = count
        features = node.module(inputs)
        logits, route, st = router(i, node, features, st)
        if route is not None:
            trace.rows_decided[i] = count

        if not node.successors:  # terminal: everyone exits, no partition needed
            groups = [(0, None, count)]
        elif route is None:  # no decision here: everyone continues to the first successor
            groups = [(1, None, count)]
        else:
            order, counts = partition(route, 1 + len(node.successors))
            sizes = to_host(counts)  # the one host sync of this decision point
            if sum(sizes) != count:  # free check: on GPU out-of-range routes would lose rows silently
                raise ValueError(
                    f"node {i} ({node.name}): the router gave routes outside [0, {1 + len(node.successors)})"
                )
            groups, start = [], 0
            for r, size in enumerate(sizes):
                if size:
                    groups.append((r, None if size == count else order[start : start + size], size))
                start += size

        for r, sel, size in groups:
            sub_rows = _take(rows, sel)
            if r == 0:
                if logits is None:
                    raise ValueError(f"node {i} ({node.name}): rows exit here but the router gave no logits")
                sub_logits = _take(logits, sel)
                if out is None:
                    out = torch.empty((n, sub_logits.shape[1]), dtype=sub_logits.dtype, device=device)
                elif sub_logits.shape[1] != out.shape[1]:
                    raise ValueError(
                        f"node {i} ({node.name}) predicts {sub_logits.shape[1]} classes, "
                        f"an earlier exit predicted {out.shape[1]}"
                    )
                scatter_rows(out, sub_rows, sub_logits.to(out.dtype))
                trace.exit_index.index_fill_(0, sub_rows, i)
                trace.exit_counts[i] += size
            else:
                target = node.successors[r - 1]
                payload = _take(features, sel) if nodes[target].takes == CARRY else gather_rows(x, sub_rows)
                sub_state = {key: _take(v, sel) for key, v in st.items()}  # state travels with survivors
                pending[target].append((sub_rows, payload, sub_state))

    if out is None:  # empty batch: the class count comes from the last head when it is known
        classes = getattr(nodes[-1].head, "num_classes", 0)
        out = torch.empty((0, classes), device=device)
    return out, trace
