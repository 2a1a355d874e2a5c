"""Exit policies: per-example decisions "exit here" or "continue".

A policy only decides; the executor (:mod:`adaexit.executor`) does the sparse execution. The interface
the executor uses, for exit ``k`` of ``num_exits``:

* ``needs_head(k)``: False when no example can exit at ``k`` and the policy needs nothing from head
  ``k`` (the executor then skips the head and its gate, so a never-exit policy costs nothing over the
  plain model);
* ``init_state(n, device)``: per-example tensors that travel with the surviving rows;
* ``decide(k, head, h, state) -> (logits, exit_mask, state)``.

The last exit always fires. Thresholds and other settings live in ``state_dict()`` (as extra state),
so a saved model reloads with its policy.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .kernels import CRITERIA


def _finite_thresholds(thresholds, name: str = "thresholds") -> list[float]:
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
        """The executor's interface: ``(logits, route, state)`` with route 0 = exit, 1 = continue."""
        logits, exit_mask, state = self.decide(k, head, h, state)
        return logits, None if exit_mask is None else (~exit_mask).long(), state

    def _is_last(self, k: int) -> bool:
        return self.num_exits is not None and k == self.num_exits - 1


class ConfidencePolicy(Policy):
    """Exit at the first exit ``k`` whose confidence ``score_k >= thresholds[k]``.

    Args:
        criterion: ``"maxprob"`` (top-1 probability), ``"margin"`` (top-1 minus top-2 probability) or
            ``"entropy"`` (1 - H(p)/log C); all in [0, 1], higher is more confident.
        thresholds: one per exit except the last (which always fires): ``len == num_exits - 1``.
            A threshold above 1 disables that exit. NaN/Inf confidences never exit.
    """

    def __init__(self, criterion: str = "maxprob", thresholds=()):
        super().__init__()
        if criterion not in CRITERIA or criterion == "learned":
            raise ValueError(f"criterion must be one of maxprob, margin, entropy; got {criterion!r}")
        self.criterion = criterion
        self.thresholds = _finite_thresholds(thresholds)

    def bind(self, num_exits: int) -> "ConfidencePolicy":
        if len(self.thresholds) != num_exits - 1:
            raise ValueError(
                f"ConfidencePolicy has {len(self.thresholds)} thresholds but the model has {num_exits} "
                f"exits: pass len(thresholds) == {num_exits - 1} (the last exit always fires)"
            )
        return super().bind(num_exits)

    def needs_head(self, k: int) -> bool:
        return self._is_last(k) or self.thresholds[k] <= 1.0

    def decide(self, k, head, h, state):
        threshold = -math.inf if self._is_last(k) else self.thresholds[k]
        logits, _, exit_mask = head.gate(h, self.criterion, threshold)
        if self._is_last(k):
            exit_mask = torch.ones_like(exit_mask)
        return logits, exit_mask, state

    def settings(self):
        return {"criterion": self.criterion, "thresholds": list(self.thresholds)}

    def load_settings(self, settings):
        criterion, thresholds = settings.get("criterion"), _finite_thresholds(settings.get("thresholds", ()))
        if criterion not in CRITERIA or criterion == "learned":
            raise ValueError(f"ConfidencePolicy: the saved criterion {criterion!r} is not maxprob/margin/entropy")
        if self.num_exits is not None and len(thresholds) != self.num_exits - 1:
            raise ValueError(
                f"ConfidencePolicy: the saved state has {len(thresholds)} thresholds, the model has "
                f"{self.num_exits} exits (needs {self.num_exits - 1})"
            )
        self.criterion, self.thresholds = criterion, thresholds

    def extra_repr(self) -> str:
        return f"criterion={self.criterion!r}, thresholds={[round(t, 4) for t in self.thresholds]}"


class NeverExitPolicy(ConfidencePolicy):
    """Every example runs to the last exit: reproduces the wrapped model (a baseline, and a default)."""

    def __init__(self):
        super().__init__("maxprob", ())

    def bind(self, num_exits: int) -> "NeverExitPolicy":
        self.thresholds = [math.inf] * (num_exits - 1)
        return Policy.bind(self, num_exits)


class PatiencePolicy(Policy):
    """Exit once ``patience`` consecutive exits agree on the predicted class (PABEE-style).

    The streak counter and the previous prediction travel with the surviving rows. Rows whose logits
    are not finite never count as agreeing, so NaN/Inf never triggers an exit.
    """

    def __init__(self, patience: int = 2):
        super().__init__()
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)

    def init_state(self, n, device):
        return {
            "patience_prev": torch.full((n,), -1, dtype=torch.long, device=device),
            "patience_streak": torch.zeros(n, dtype=torch.long, device=device),
        }

    def decide(self, k, head, h, state):
        logits, score, _ = head.gate(h, "maxprob", math.inf)
        pred = logits.argmax(dim=1)
        finite = torch.isfinite(score)
        same = (pred == state["patience_prev"]) & finite
        streak = torch.where(same, state["patience_streak"] + 1, finite.long())
        exit_mask = (streak >= self.patience) | torch.full_like(finite, self._is_last(k))
        return logits, exit_mask, {"patience_prev": pred, "patience_streak": streak}

    def settings(self):
        return {"patience": self.patience}

    def load_settings(self, settings):
        self.patience = int(settings["patience"])

    def extra_repr(self) -> str:
        return f"patience={self.patience}"


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


def _check_gate(gate, k: int):
    """A gate is ``None`` (exit disabled) or 4 finite floats ``(w_maxprob, w_margin, w_entropy, bias)``."""
    if gate is None:
        return None
    values = [float(v) for v in (gate.tolist() if isinstance(gate, torch.Tensor) else gate)]
    if len(values) != 4:
        raise ValueError(f"gates[{k}] must have 4 values (w_maxprob, w_margin, w_entropy, bias), got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"gates[{k}] must be finite, got {values}")
    # stored as the float32 values the kernel will use, so a save/load round trip is exact
    return [float(v) for v in torch.tensor(values, dtype=torch.float32)]


class LearnedPolicy(Policy):
    """Bolukbasi et al. (2017): one learned linear gate per early exit; the last exit always fires.

    Gate ``k`` reads exit ``k``'s softmax statistics ``s = [maxprob, margin, entropy score]`` and exits
    a row when ``sigmoid(w . s + b) >= 0.5``. It is evaluated inside the fused exit-gate kernel
    (``criterion="learned"``), so a learned gate costs what a confidence threshold costs.

    Args:
        gates: one per early exit (``len == num_exits - 1``): 4 floats ``(w_maxprob, w_margin,
            w_entropy, b)``, or ``None`` for a gate that never fires (its head is then skipped). ``None``
            for the whole argument: every gate disabled until fitted (:meth:`fit`) or loaded from a
            ``state_dict``.

    Fit gates with :meth:`fit` (bottom-up weighted logistic regression) or let :func:`adaexit.calibrate`
    sweep the cost multiplier. Gates live in ``state_dict()`` as plain lists of float32 values.
    """

    def __init__(self, gates=None):
        super().__init__()
        self._unset = gates is None
        self.gates = [] if gates is None else [_check_gate(g, k) for k, g in enumerate(gates)]
        self._tensors: dict = {}  # device -> [4] float32 gate tensors, so decide() copies nothing

    def bind(self, num_exits: int) -> "LearnedPolicy":
        if self._unset:
            self.gates = [None] * (num_exits - 1)
        elif len(self.gates) != num_exits - 1:
            raise ValueError(
                f"LearnedPolicy has {len(self.gates)} gates but the model has {num_exits} exits: pass "
                f"len(gates) == {num_exits - 1} (the last exit always fires)"
            )
        return super().bind(num_exits)

    @classmethod
    def fit(cls, exit_logits, labels, stage_costs, head_costs, cost_weight: float, loss: str = "error"):
        """Learn the gates bottom-up from dense exit logits (see
        :func:`adaexit.calibration.fit_learned_gates`).

        Args:
            exit_logits: one ``[N, C]`` tensor per exit (``model.exit_logits(x)``).
            labels: ``[N]`` class indices.
            stage_costs, head_costs: per-example cost of each stage and head (``model.exit_costs``).
            cost_weight: ``mu``: the objective per example is ``loss + mu * cost / full_cost``; a larger
                ``mu`` exits earlier (cheaper, usually less accurate).
            loss: ``"error"`` (0/1) or ``"ce"`` (cross-entropy) of each exit.
        """
        from .calibration import fit_learned_gates  # calibration imports this module

        return cls(fit_learned_gates(exit_logits, labels, stage_costs, head_costs, cost_weight, loss))

    def needs_head(self, k: int) -> bool:
        return self._is_last(k) or self.gates[k] is not None

    def _gate_tensor(self, k: int, device: torch.device) -> torch.Tensor:
        cached = self._tensors.get(device)
        if cached is None:
            cached = [None if g is None else torch.tensor(g, dtype=torch.float32, device=device) for g in self.gates]
            self._tensors[device] = cached
        return cached[k]

    def decide(self, k, head, h, state):
        if self._is_last(k):
            logits, _, exit_mask = head.gate(h, "maxprob", -math.inf)
            return logits, torch.ones_like(exit_mask), state
        logits, _, exit_mask = head.gate(h, "learned", 0.5, gate=self._gate_tensor(k, h.device))
        return logits, exit_mask, state

    def settings(self):
        return {"gates": [None if g is None else list(g) for g in self.gates]}

    def load_settings(self, settings):
        if "gates" not in settings:
            raise ValueError("LearnedPolicy: the saved policy state has no gates")
        gates = [_check_gate(g, k) for k, g in enumerate(settings["gates"])]
        if self.num_exits is not None and len(gates) != self.num_exits - 1:
            raise ValueError(f"LearnedPolicy: the saved state has {len(gates)} gates, the model has "
                             f"{self.num_exits} exits (needs {self.num_exits - 1})")
        self.gates, self._unset, self._tensors = gates, False, {}

    def extra_repr(self) -> str:
        shown = [None if g is None else [round(v, 3) for v in g] for g in self.gates]
        return f"gates={shown}"


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
