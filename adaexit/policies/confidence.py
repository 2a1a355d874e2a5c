"""Threshold policies: exit on a confidence score (:class:`ConfidencePolicy`), never exit
(:class:`NeverExitPolicy`), or exit when consecutive exits agree (:class:`PatiencePolicy`)."""

from __future__ import annotations

import math

import torch

from ..kernels import CRITERIA
from .base import Policy, finite_thresholds


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
        self.thresholds = finite_thresholds(thresholds)

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
        return logits, None if self._is_last(k) else exit_mask, state  # the last exit: no decision to make

    def settings(self):
        return {"criterion": self.criterion, "thresholds": list(self.thresholds)}

    def load_settings(self, settings):
        criterion, thresholds = settings.get("criterion"), finite_thresholds(settings.get("thresholds", ()))
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
    """PABEE's patience-based early exit (Zhou et al., *BERT Loses Patience*, NeurIPS 2020).

    A counter starts at 0 at the first exit; at each later exit it grows by one when the exit's
    predicted class (argmax) equals the previous exit's, and resets to 0 otherwise. A row exits at the
    first exit where the counter reaches ``patience``, with that exit's logits; the last exit always
    fires. So ``patience=0`` exits at the first exit, ``patience=1`` needs two consecutive agreeing
    exits, and so on: the same numbers as the ``patience`` of PABEE's code (``bert-loses-patience``),
    which decides for the whole batch at once; here every row decides for itself (PABEE at batch 1).

    Rows whose logits are not finite never agree (their counter resets) and never exit early.
    The counter and the previous prediction travel with the surviving rows.
    """

    def __init__(self, patience: int = 1):
        super().__init__()
        if isinstance(patience, bool) or int(patience) != patience or int(patience) < 0:
            raise ValueError(f"patience must be an integer >= 0 (PABEE's patience), got {patience}")
        self.patience = int(patience)

    def init_state(self, n, device):
        return {
            "patience_prev": torch.full((n,), -1, dtype=torch.long, device=device),
            "patience_count": torch.full((n,), -1, dtype=torch.long, device=device),  # -1: no exit seen yet
        }

    def decide(self, k, head, h, state):
        logits, score, _ = head.gate(h, "maxprob", math.inf)
        pred = logits.argmax(dim=1)
        finite = torch.isfinite(score)
        seen = state["patience_count"] >= 0
        agree = seen & (pred == state["patience_prev"]) & finite
        count = torch.where(agree, state["patience_count"] + 1, torch.zeros_like(pred))
        exit_mask = ((count >= self.patience) & finite) | torch.full_like(finite, self._is_last(k))
        return logits, exit_mask, {"patience_prev": torch.where(finite, pred, -1), "patience_count": count}

    def settings(self):
        return {"patience": self.patience}

    def load_settings(self, settings):
        patience = settings["patience"]
        if isinstance(patience, bool) or int(patience) != patience or int(patience) < 0:
            raise ValueError(f"PatiencePolicy: the saved patience must be an integer >= 0, got {patience}")
        self.patience = int(patience)

    def extra_repr(self) -> str:
        return f"patience={self.patience}"
