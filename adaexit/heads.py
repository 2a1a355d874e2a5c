"""Exit heads: the small classifiers that read a stage's output and predict early.

:class:`ExitHead` is ``features -> global mean-pool over spatial dims -> Linear``. The pool and the Linear
are exactly what the fused :func:`adaexit.kernels.exit_gate` kernel computes, so in eval mode the executor
runs ``features`` in torch and hands the pool + linear + confidence + threshold to one kernel launch.

Any other ``nn.Module`` that maps a stage output to ``[N, classes]`` logits is a valid head too:
:func:`exit_head` gives it the ``gate(h, criterion, threshold, gate=None)`` method the policies call, fused
where that is exact (an ``nn.Linear`` on ``[N, D]`` features; ``Sequential(global average pool, Flatten,
Linear)`` on a feature map), otherwise the head's logits computed in torch and the gate run on them.

Layout readers (:class:`ChannelsFirst`, :class:`SelectToken`, :class:`TokensAsChannels`) turn a
channels-last map or a token sequence into a strided view the kernel pools or reads directly (no copy), as
``ExitHead(features=...)``.
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


# =============================================================================================
# Layout readers: parameter-free views that put the channel (or feature) axis second
# =============================================================================================
class ChannelsFirst(nn.Module):
    """``[N, *spatial, C] -> [N, C, *spatial]`` as a strided view (no copy): a channels-last map (Swin's
    ``[N, H, W, C]``) read by a pooled head; the exit-gate kernel pools the view in place."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.permute(0, h.dim() - 1, *range(1, h.dim() - 1))


class SelectToken(nn.Module):
    """``[N, L, D] -> [N, D]``: token ``index`` (a ViT's class token, ``index=0``) as a strided view."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = int(index)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


class TokensAsChannels(nn.Module):
    """``[N, L, D] -> [N, D, L]`` as a strided view: a pooled head then averages over the tokens (for token
    sequences without a class token)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.transpose(1, 2)


# =============================================================================================
# Any module as a head
# =============================================================================================
# a global average pool and the rank of the features it reads ([N, C, L], [N, C, H, W], [N, C, D, H, W])
_GLOBAL_POOLS = {nn.AdaptiveAvgPool1d: 3, nn.AdaptiveAvgPool2d: 4, nn.AdaptiveAvgPool3d: 5}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PASS_THROUGH = (nn.Identity, *_DROPOUTS)


def head_classes(module: nn.Module) -> int | None:
    """The number of classes a head predicts, where the module says it: a ``num_classes`` attribute, an
    ``nn.Linear``'s ``out_features``, or that of a ``Sequential``'s last module; ``None`` otherwise."""
    classes = getattr(module, "num_classes", None)
    if isinstance(classes, int) and not isinstance(classes, bool):
        return classes
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Sequential) and len(module):
        return head_classes(module[-1])
    return None


def _is_global_pool(module: nn.Module) -> bool:
    size = module.output_size if type(module) in _GLOBAL_POOLS else None
    return size is not None and all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def _pooled_linear(module: nn.Module) -> tuple[nn.Module | None, nn.Linear] | None:
    """``(pool or None, linear)`` when ``module`` is a Linear, or a Sequential of (optionally a global
    average pool and a Flatten over every dim after the batch) and a Linear, with identities/dropouts in
    between; ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return None, module
    if not isinstance(module, nn.Sequential):
        return None
    parts = [m for m in module if not isinstance(m, _PASS_THROUGH)]
    if not parts or not isinstance(parts[-1], nn.Linear):
        return None
    linear, rest = parts[-1], parts[:-1]
    if rest and isinstance(rest[-1], nn.Flatten) and rest[-1].start_dim == 1 and rest[-1].end_dim == -1:
        rest = rest[:-1]
        if rest and _is_global_pool(rest[-1]):
            return rest[-1], linear
        return (None, linear) if not rest else None  # Flatten on [N, D] features: nothing to do
    return (None, linear) if not rest else None


class HeadView(nn.Module):
    """A head that lacks ``gate``, seen through one: ``forward`` is the head's own, ``gate`` returns
    ``(logits, score, exit_mask)`` as :meth:`ExitHead.gate` does.

    Built by :func:`exit_head` each time a model builds its execution graph: the view is transient and
    never registered, so the head keeps its place (and its ``state_dict`` keys) in the model.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    @property
    def num_classes(self) -> int | None:
        return head_classes(self.head)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def torch_gate(self, h: torch.Tensor, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        """The head's logits computed in torch, then the gate on them (``exit_gate`` with no weight)."""
        logits = self.head(h)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"a {type(self.head).__name__} exit head must map its features to logits [N, classes]; got {got}"
            )
        return logits_gate(logits, criterion, threshold, gate)

    def gate(self, h: torch.Tensor, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        return self.torch_gate(h, criterion, threshold, gate)


class FusedLinearView(HeadView):
    """A ``Linear`` head, or ``Sequential(global average pool, Flatten, Linear)``: one ``exit_gate`` launch
    on the features (the kernel mean-pools a feature map itself). Exact for a Linear on ``[N, D]``; for a
    pooled head up to float rounding (the kernel's pool sums in another order). Falls back to
    :meth:`HeadView.torch_gate` when the features do not have the shape the pattern needs, or a dropout in
    the head is in training mode."""

    def __init__(self, head: nn.Module, pool: nn.Module | None, linear: nn.Linear):
        super().__init__(head)
        self._rank = 2 if pool is None else _GLOBAL_POOLS[type(pool)]  # the features the pattern reads
        self._linear = [linear]  # a plain list: the head registers it already
        self._dropouts = [m for m in head.modules() if isinstance(m, _DROPOUTS)]

    def gate(self, h: torch.Tensor, criterion: str, threshold: float, gate: torch.Tensor | None = None):
        linear = self._linear[0]
        if h.dim() == self._rank and h.shape[1] == linear.in_features and not any(m.training for m in self._dropouts):
            return exit_gate(h, linear.weight, linear.bias, criterion=criterion, threshold=threshold, gate=gate)
        return self.torch_gate(h, criterion, threshold, gate)


def exit_head(module: nn.Module) -> nn.Module:
    """``module`` as an exit head the policies can call: the module itself when it has a
    ``gate(h, criterion, threshold, gate=None)`` method (:class:`ExitHead`, :class:`LogitsHead`), otherwise
    a transient view (:class:`HeadView`) holding it: fused into one ``exit_gate`` launch for an
    ``nn.Linear`` or ``Sequential(AdaptiveAvgPool{1,2,3}d(1), Flatten(), Linear)``, else the module's
    logits in torch and the gate on them."""
    if callable(getattr(module, "gate", None)):
        return module
    if not isinstance(module, nn.Module):
        raise ValueError(f"an exit head must be an nn.Module, got {type(module).__name__}")
    pattern = _pooled_linear(module)
    if pattern is not None:
        return FusedLinearView(module, *pattern)
    return HeadView(module)
