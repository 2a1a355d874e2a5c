"""Builders for the D2NN paper's topologies (high-low capacity, cascade, chain, hierarchy), with small
MLP blocks (for tests and demos)."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from ..executor import CARRY, SOURCE, Node
from ..heads import ExitHead
from .model import D2NN, Controller


# -- builders for the paper's topologies (small MLP blocks) ----------------------------------------
def _mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o), nn.ReLU())


class _Residual(nn.Module):
    """``h + relu(Linear(h))``: a block that can be skipped without changing shapes."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + F.relu(self.linear(h))


def high_low_d2nn(
    in_features: int,
    num_classes: int,
    width: int = 16,
    high_width: int = 64,
    controller_hidden: int | None = None,
    stem: nn.Module | None = None,
) -> D2NN:
    """High-low capacity: a controller on the stem's output picks the high-capacity branch (action 0,
    a 3-layer MLP) or the low-capacity one (action 1, one linear layer); both produce ``width`` features
    that merge into one shared classifier. ``stem`` defaults to the identity (the controller reads x)."""
    stem = stem if stem is not None else nn.Identity()
    high = nn.Sequential(
        _mlp(in_features, high_width), _mlp(high_width, high_width), nn.Linear(high_width, width), nn.ReLU()
    )
    low = nn.Linear(in_features, width)  # with the linear classifier: a linear model
    nodes = [
        Node("stem", stem, None, (1, 2), SOURCE),
        Node("high", high, None, (3,), CARRY),
        Node("low", low, None, (3,), CARRY),
        Node("classifier", nn.Identity(), ExitHead(width, num_classes), (), CARRY),
    ]
    return D2NN(nodes, {0: Controller(in_features, 2, controller_hidden)})


def cascade_d2nn(
    in_features: int, num_classes: int, widths: Sequence[int] = (8, 32, 128), controller_hidden: int | None = None
) -> D2NN:
    """Cascade: stage ``k`` widens the features to ``widths[k]`` and has a classifier; after every stage
    but the last a controller returns that classifier's prediction (action 0) or continues (action 1)."""
    widths = list(widths)
    if not widths:
        raise ValueError("widths must not be empty")
    nodes, ctrls, prev = [], {}, in_features
    for k, w in enumerate(widths):
        last = k == len(widths) - 1
        successors = () if last else (k + 1,)
        takes = SOURCE if k == 0 else CARRY
        nodes.append(Node(f"stage {k}", _mlp(prev, w), ExitHead(w, num_classes), successors, takes))
        if not last:
            ctrls[k] = Controller(w, 2, controller_hidden)
        prev = w
    return D2NN(nodes, ctrls)


def chain_d2nn(
    in_features: int, num_classes: int, width: int = 32, depth: int = 3, controller_hidden: int | None = None
) -> D2NN:
    """Chain: a stem, then ``depth`` residual blocks, each preceded by a gate node whose controller runs
    the block (action 0) or skips it (action 1, the features pass through unchanged); then a classifier.

    Node layout: ``stem, gate 1, block 1, gate 2, block 2, ..., gate L, block L, classifier``.
    """
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    nodes = [Node("stem", _mlp(in_features, width), None, (1,), SOURCE)]
    ctrls = {}
    for j in range(depth):
        gate, block = len(nodes), len(nodes) + 1
        after = block + 1  # the next gate, or the classifier
        nodes.append(Node(f"gate {j + 1}", nn.Identity(), None, (block, after), CARRY))
        nodes.append(Node(f"block {j + 1}", _Residual(width), None, (after,), CARRY))
        ctrls[gate] = Controller(width, 2, controller_hidden)
    nodes.append(Node("classifier", nn.Identity(), ExitHead(width, num_classes), (), CARRY))
    return D2NN(nodes, ctrls)


def hierarchy_d2nn(
    in_features: int,
    num_classes: int,
    width: int = 32,
    branching: Sequence[int] = (2, 2),
    controller_hidden: int | None = None,
) -> D2NN:
    """Hierarchy: a tree of controllers. The root (a stem) sends each row to one of ``branching[0]``
    subtrees, each of those to one of ``branching[1]``, ...; the leaves are blocks with classifiers.
    Nodes are numbered breadth first."""
    branching = list(branching)
    if not branching or any(int(b) < 2 for b in branching):
        raise ValueError(f"branching must be a non-empty list of ints >= 2, got {branching!r}")
    levels = [[0]]
    count = 1
    for b in branching:
        level = []
        for _ in levels[-1]:
            level.extend(range(count, count + b))
            count += b
        levels.append(level)
    nodes: list[Node | None] = [None] * count
    ctrls = {}
    for depth, level in enumerate(levels):
        for pos, i in enumerate(level):
            leaf = depth == len(branching)
            succ = () if leaf else tuple(levels[depth + 1][pos * branching[depth] : (pos + 1) * branching[depth]])
            module = _mlp(in_features, width) if depth == 0 else _mlp(width, width)
            head = ExitHead(width, num_classes) if leaf else None
            name = "root" if depth == 0 else f"level {depth} node {pos}"
            nodes[i] = Node(name, module, head, succ, SOURCE if depth == 0 else CARRY)
            if not leaf:
                ctrls[i] = Controller(width, branching[depth], controller_hidden)
    return D2NN(nodes, ctrls)
