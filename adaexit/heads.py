"""Exit heads: the small classifiers that read a stage's output and predict early.

A head is ``features -> global mean-pool over spatial dims -> Linear``. The pool and the Linear are
exactly what the fused :func:`adaexit.kernels.exit_gate` kernel computes, so in eval mode the executor
runs ``features`` in torch and hands the pool + linear + confidence + threshold to one kernel launch.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import exit_gate


def mean_pool(h: torch.Tensor) -> torch.Tensor:
    """Mean over every dim after the channel dim: ``[N, C, *spatial] -> [N, C]``; ``[N, D]`` unchanged."""
    return h if h.dim() == 2 else h.flatten(2).mean(-1)


class ExitHead(nn.Module):
    """``classifier(mean_pool(features(h)))``.

    Args:
        in_features: channels (or width) of the stage output the head reads.
        num_classes: number of classes it predicts.
        features: optional module applied before pooling (e.g. a conv block); identity by default.
        classifier: an existing ``nn.Linear`` to use instead of a new one (how :func:`adaexit.wrap`
            reuses a model's own classifier as the last exit).
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int | None = None,
        *,
        features: nn.Module | None = None,
        classifier: nn.Linear | None = None,
    ):
        super().__init__()
        if classifier is None:
            if in_features is None or num_classes is None:
                raise ValueError("ExitHead needs in_features and num_classes, or an existing classifier")
            classifier = nn.Linear(in_features, num_classes)
        elif not isinstance(classifier, nn.Linear):
            raise ValueError(f"ExitHead classifier must be nn.Linear, got {type(classifier).__name__}")
        self.features = features if features is not None else nn.Identity()
        self.classifier = classifier

    @classmethod
    def conv(cls, in_channels: int, num_classes: int, width: int | None = None) -> "ExitHead":
        """A stronger head for conv stages: 3x3 conv (stride 2) + BN + ReLU before the pooled linear."""
        width = width or max(32, in_channels)
        features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        return cls(width, num_classes, features=features)

    @property
    def in_features(self) -> int:
        return self.classifier.in_features

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(mean_pool(self.features(h)))

    def gate(self, h: torch.Tensor, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        """Fused eval path: ``(logits, score, exit_mask)`` from one :func:`exit_gate` launch."""
        return exit_gate(
            self.features(h),
            self.classifier.weight,
            self.classifier.bias,
            criterion=criterion,
            threshold=threshold,
            gate=gate,
        )


def logits_gate(logits: torch.Tensor, criterion: str, threshold: float, gate: torch.Tensor | None = None):
    """The gate of a head whose logits come from torch: ``exit_gate`` on the logits (no linear layer)."""
    return exit_gate(logits, None, None, criterion=criterion, threshold=threshold, gate=gate)


class LogitsHead(nn.Module):
    """The head of a node whose module already outputs logits (a whole network in a cascade)."""

    def __init__(self, num_classes: int | None = None):
        super().__init__()
        self.num_classes = num_classes  # may be learnt on the first forward (the executor reads it)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def gate(self, h: torch.Tensor, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        return logits_gate(h, criterion, threshold, gate)
