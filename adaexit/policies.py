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

import torch
from torch import nn

from .kernels import CRITERIA


def _finite_thresholds(thresholds, name: str = "thresholds") -> list[float]:
    values = [float(t) for t in thresholds]
    for i, t in enumerate(values):
        if math.isnan(t):
            raise ValueError(f"{name}[{i}] is NaN")
    return values


class Policy(nn.Module):
    """Base class. ``num_exits`` is known once the policy is attached to a model (see :meth:`bind`)."""

    num_exits: int | None = None

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

    def get_extra_state(self):
        return {"criterion": self.criterion, "thresholds": list(self.thresholds)}

    def set_extra_state(self, state):
        self.criterion = state["criterion"]
        self.thresholds = _finite_thresholds(state["thresholds"])

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

    def get_extra_state(self):
        return {"patience": self.patience}

    def set_extra_state(self, state):
        self.patience = int(state["patience"])

    def extra_repr(self) -> str:
        return f"patience={self.patience}"
