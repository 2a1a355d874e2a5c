"""The policy interface: per-example decisions "exit here", "continue", or (routing) "go to node j".

A policy only decides; the executor (:mod:`adaexit.executor`) does the sparse execution. The interface
the executor uses, for exit ``k`` of ``num_exits``:

* ``needs_head(k)``: False when no example can exit at ``k`` and the policy needs nothing from head
  ``k`` (the executor then skips the head and its gate, so a never-exit policy costs nothing over the
  plain model);
* ``init_state(n, device)``: per-example tensors that travel with the surviving rows;
* ``decide(k, head, h, state) -> (logits, exit_mask, state)``, or for routing policies
  ``decide_route(k, head, h, state) -> (logits, route, state)``.

The last exit always fires. Settings live in ``state_dict()`` (as extra state tagged with the class
name), so a saved model reloads with its policy (see :func:`policy_from_state`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def finite_thresholds(thresholds, name: str = "thresholds") -> list[float]:
    values = [float(t) for t in thresholds]
    for i, t in enumerate(values):
        if math.isnan(t):
            raise ValueError(f"{name}[{i}] is NaN")
    return values


_REGISTRY: dict[str, type] = {}


class Policy(nn.Module):
    """Base class. ``num_exits`` is known once the policy is attached to a model (see :meth:`bind`).

    Settings are saved as extra state tagged with the class name: subclasses implement
    :meth:`settings` / :meth:`load_settings`; loading a state saved by another class raises
    ``ValueError`` (models rebuild the right class first, see :func:`policy_from_state`).
    """

    num_exits: int | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def settings(self) -> dict:
        """Everything that defines the policy's decisions, as plain Python values."""
        return {}

    def load_settings(self, settings: dict) -> None:
        pass

    def get_extra_state(self):
        return {"policy": type(self).__name__, **self.settings()}

    def set_extra_state(self, state):
        name = state.get("policy") if isinstance(state, dict) else None
        if name != type(self).__name__:
            raise ValueError(
                f"the saved policy state is a {name or 'unknown'} policy's, not a {type(self).__name__}'s: "
                "build the model with the policy class it was saved with"
            )
        self.load_settings(state)

    def bind(self, num_exits: int) -> "Policy":
        """Check the policy fits a model with ``num_exits`` exits; called by the model that owns it."""
        self.num_exits = num_exits
        return self

    def needs_head(self, k: int) -> bool:
        return True

    def init_state(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def decide(self, k: int, head: nn.Module, h: torch.Tensor, state: dict):
        raise NotImplementedError

    def decide_route(self, k: int, head: nn.Module, h: torch.Tensor, state: dict):
        """The executor's interface: ``(logits, route, state)`` with route 0 = exit, 1 = continue (a bool
        route: ``True`` = continue; one op, no dtype conversion)."""
        logits, exit_mask, state = self.decide(k, head, h, state)
        return logits, None if exit_mask is None else ~exit_mask, state

    def _is_last(self, k: int) -> bool:
        return self.num_exits is not None and k == self.num_exits - 1


def _chain_successors(num_nodes: int) -> list[tuple[int, ...]]:
    return [(k + 1,) if k + 1 < num_nodes else () for k in range(num_nodes)]


# =============================================================================================
# policies that route: multi-way decisions (network selection, skipping nodes)
# =============================================================================================
class RoutingPolicy(Policy):
    """A policy whose decision at node ``k`` is a *route*, not just an exit mask.

    ``decide_route(k, head, h, state) -> (logits, route, state)`` returns a long ``[n]`` route per row:
    ``0`` = exit with ``logits``, ``j >= 1`` = go to ``successors[k][j - 1]``. The owning model calls
    :meth:`bind_graph` with its successor lists; bound with :meth:`bind` alone (e.g. on an
    :class:`~adaexit.EarlyExitNet`), the graph is the chain ``k -> k + 1``. Routes must lie in
    ``[0, 1 + len(successors[k]))``; at the last node every row exits whatever the route.

    :meth:`decide` (the exit-mask interface) is ``route == 0``, so a routing policy also runs on a chain.
    """

    successors: list[tuple[int, ...]] | None = None

    def bind(self, num_exits: int) -> "RoutingPolicy":
        return self.bind_graph(_chain_successors(num_exits))

    def bind_graph(self, successors: Sequence[Sequence[int]]) -> "RoutingPolicy":
        """Attach to a graph: ``successors[k]`` are the nodes a row may go to after node ``k``."""
        self.successors = [tuple(int(j) for j in s) for s in successors]
        self.num_exits = len(self.successors)
        return self

    def decide_route(self, k: int, head: nn.Module, h: torch.Tensor, state: dict):
        raise NotImplementedError

    def decide(self, k, head, h, state):
        logits, route, state = self.decide_route(k, head, h, state)
        return logits, route == 0, state


def policy_from_state(state, current: Policy) -> Policy:
    """The policy a model should hold before loading ``state`` (a policy's saved extra state).

    ``current`` if it is of the saved class; otherwise a new instance of the saved class, when that
    class is fully described by its settings (no parameters of its own). Lets ``load_state_dict`` restore
    a calibrated policy into a freshly built model whose policy is still the default.
    """
    name = state.get("policy") if isinstance(state, dict) else None
    cls = _REGISTRY.get(name)
    if cls is None or type(current) is cls:
        return current
    try:
        policy = cls()
    except TypeError:  # needs constructor arguments: cannot rebuild, set_extra_state will explain
        return current
    if any(True for _ in policy.parameters()):  # parameters need shapes only their builder knows
        return current
    policy.load_settings(state)
    return policy
