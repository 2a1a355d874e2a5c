"""The execution strategies the benchmarks compare, for any adaptive model of the calibration protocol.

Every factory takes a model (an :class:`adaexit.EarlyExitNet`, or a ``Cascade`` of whole networks) and
returns a callable ``run(x, return_exit_index=False)`` that gives ``logits [N, classes]`` in the input
order, or ``(logits, exit_index)`` when asked. All four run the *same* policy, so they must agree on
every row's exit and prediction (``tests/test_bench_harness.py`` checks it); they differ only in how
much work they do and how:

* :func:`plain` - the strongest single network with no early exits: every stage and only the last head
  of an early-exit backbone, or the last (largest) network of a cascade. The speed reference.
* :func:`masked_dense` - every stage and every head for every row, then each row's output is selected
  at its exit by the policy. How MSDNet-style code "simulates" early exit: no speedup, ever.
* :func:`batch1_loop` - the rows one at a time through the sparse path: how most public early-exit
  code runs (SDN, DeeBERT, BERxiT...). Correct, but it throws away batching.
* :func:`adaexit` - the real thing: one sparse eval-mode forward on the whole batch.

The factories put the model in ``eval()`` mode (its sparse path and its batch-norm statistics are what
is measured) and run under ``torch.inference_mode()``.
"""

from __future__ import annotations

from typing import Callable

import torch

from adaexit.base import AdaptiveModel
from adaexit.executor import SOURCE
from adaexit.heads import LogitsHead

Strategy = Callable[..., object]

STRATEGY_NAMES = ("plain", "masked_dense", "batch1_loop", "adaexit")


def _check_model(model, fn: str) -> None:
    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"{fn}: model must be an adaexit AdaptiveModel, got {type(model).__name__}")


def _last_exit_index(x: torch.Tensor, model) -> torch.Tensor:
    return torch.full((x.shape[0],), model.num_exits - 1, dtype=torch.long, device=x.device)


def _strongest_network(model: AdaptiveModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain forward of the model's last member network with its early exits removed: its nodes in
    order, then the last head (an early-exit backbone is its only member; a cascade's is its last)."""
    nodes, members = model.graph(), model.node_members()
    own = [node for node, m in zip(nodes, members) if m == members[-1]]

    def forward(x):
        h = x
        for node in own:
            h = node.module(h)
        return own[-1].head(h)

    return forward


def plain(model) -> Strategy:
    """The strongest single network: every stage plus the last head, or a cascade's last network."""
    _check_model(model, "plain")
    model.eval()
    forward = _strongest_network(model)

    def run(x: torch.Tensor, return_exit_index: bool = False):
        with torch.inference_mode():
            logits = forward(x)
        return (logits, _last_exit_index(x, model)) if return_exit_index else logits

    return run


def execute_dense(nodes, x: torch.Tensor, router, state: dict | None = None):
    """Masked dense execution of an execution graph: every node's module and router run on *every*
    row; each row's output is taken from the node where its route says it exits.

    The dense twin of :func:`adaexit.executor.execute` (same nodes, same router, same decisions), with
    no partition, gather or scatter - and no speedup. Carry nodes must read from exactly their
    preceding node (a chain of stages); source nodes (whole networks) may be reached from anywhere.

    Returns ``(logits [N, classes], exit_index long [N])``.
    """
    n, device = x.shape[0], x.device
    state = dict(state or {})
    at = torch.zeros(n, dtype=torch.long, device=device)  # the node each row waits at; -1 once done
    exit_index = torch.full((n,), -1, dtype=torch.long, device=device)
    out = None
    features = None
    for i, node in enumerate(nodes):
        if node.takes == SOURCE or i == 0:
            inputs = x
        else:
            preds = [j for j, other in enumerate(nodes[:i]) if i in other.successors]
            if preds != [i - 1]:
                raise ValueError(
                    f"masked_dense: node {i} ({node.name}) reads features from nodes {preds}; dense "
                    "simulation needs each carry node to follow its predecessor in a chain"
                )
            inputs = features
        features = node.module(inputs)
        logits, route, new_state = router(i, node, features, state)
        here = at == i
        if not node.successors:
            route = torch.zeros(n, dtype=torch.long, device=device)  # terminal: everyone exits
        elif route is None:
            route = torch.ones(n, dtype=torch.long, device=device)  # no decision: on to successors[0]
        exiting = here & (route == 0)
        if logits is not None:
            if out is None:
                out = torch.zeros((n, logits.shape[1]), dtype=logits.dtype, device=device)
            out = torch.where(exiting[:, None], logits.to(out.dtype), out)
        exit_index = torch.where(exiting, torch.full_like(exit_index, i), exit_index)
        # Route r >= 1 sends the row to successors[r - 1]; route 0 (exit) parks it at -1.
        table = torch.tensor((-1, *node.successors), dtype=torch.long, device=device)
        at = torch.where(here, table[route.clamp(0, len(node.successors))], at)
        # Only the rows that were at this node take this node's state update.
        for key, value in new_state.items():
            old = state.get(key)
            if old is None or old is value:
                state[key] = value
            else:
                mask = here.view(-1, *([1] * (value.dim() - 1)))
                state[key] = torch.where(mask, value, old)
    if out is None:
        classes = getattr(nodes[-1].head, "num_classes", 0)
        out = torch.empty((n, classes), device=device)
    return out, exit_index


_LOGITS_HEAD = LogitsHead(0)


def _dense_from_exit_logits(model, x: torch.Tensor):
    """Masked dense through the public protocol only: ``exit_logits`` (every exit, every row), then the
    policy decides on those logits, exit by exit, for the rows still alive."""
    policy = model.policy
    all_logits = model.exit_logits(x)
    n, device = x.shape[0], x.device
    state = policy.init_state(n, device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    exit_index = torch.full((n,), -1, dtype=torch.long, device=device)
    out = torch.zeros((n, all_logits[-1].shape[1]), dtype=torch.float32, device=device)
    last = len(all_logits) - 1
    for k, logits in enumerate(all_logits):
        if k == last:
            exit_mask = torch.ones(n, dtype=torch.bool, device=device)
        elif policy.needs_head(k):
            _, exit_mask, new_state = policy.decide(k, _LOGITS_HEAD, logits, state)
            for key, value in new_state.items():
                old = state.get(key)
                mask = alive.view(-1, *([1] * (value.dim() - 1)))
                state[key] = value if old is None else torch.where(mask, value, old)
        else:
            continue
        take = alive & exit_mask
        out = torch.where(take[:, None], logits.float(), out)
        exit_index = torch.where(take, torch.full_like(exit_index, k), exit_index)
        alive &= ~exit_mask
    return out, exit_index


def masked_dense(model, via: str = "auto") -> Strategy:
    """Compute every stage and every head for every row, then select each row's output by the policy.

    Args:
        via: ``"graph"`` runs the model's own execution graph and router densely
            (:func:`execute_dense`; works for any policy, including ones that read features);
            ``"exit_logits"`` uses only ``exit_logits`` + the policy applied to the logits (for policies
            that decide from logits); ``"auto"`` is ``"graph"``.
    """
    _check_model(model, "masked_dense")
    if via not in ("auto", "graph", "exit_logits"):
        raise ValueError(f"masked_dense: via must be 'auto', 'graph' or 'exit_logits', got {via!r}")
    model.eval()
    use_graph = via != "exit_logits"

    def run(x: torch.Tensor, return_exit_index: bool = False):
        with torch.inference_mode():
            if use_graph:
                state = model.policy.init_state(x.shape[0], x.device)
                logits, exit_index = execute_dense(model.graph(), x, model.route, state)
            else:
                logits, exit_index = _dense_from_exit_logits(model, x)
        return (logits, exit_index) if return_exit_index else logits

    return run


def batch1_loop(model) -> Strategy:
    """One row at a time through the model's sparse eval forward (how most public code runs)."""
    _check_model(model, "batch1_loop")
    model.eval()

    def run(x: torch.Tensor, return_exit_index: bool = False):
        outs, exits = [], []
        with torch.inference_mode():
            if x.shape[0] == 0:
                return adaexit(model)(x, return_exit_index)
            for i in range(x.shape[0]):
                if return_exit_index:
                    logits, info = model(x[i : i + 1], return_info=True)
                    exits.append(info.exit_index)
                else:
                    logits = model(x[i : i + 1])
                outs.append(logits)
            logits = torch.cat(outs)
        return (logits, torch.cat(exits)) if return_exit_index else logits

    return run


def adaexit(model) -> Strategy:
    """adaexit's sparse execution: one eval-mode forward on the whole batch."""
    _check_model(model, "adaexit")
    model.eval()

    def run(x: torch.Tensor, return_exit_index: bool = False):
        with torch.inference_mode():
            if return_exit_index:
                logits, info = model(x, return_info=True)
                return logits, info.exit_index
            return model(x)

    return run


STRATEGIES: dict[str, Callable] = {
    "plain": plain,
    "masked_dense": masked_dense,
    "batch1_loop": batch1_loop,
    "adaexit": adaexit,
}


def strategies(model, names=STRATEGY_NAMES) -> dict[str, Strategy]:
    """``{name: run}`` for the named strategies (all four by default)."""
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {list(STRATEGIES)}")
    return {name: STRATEGIES[name](model) for name in names}
