"""Default exit heads for a cut, from its traced layout."""

from __future__ import annotations

from torch import nn

from ...heads import ChannelsFirst, ExitHead, SelectToken, TokensAsChannels
from .layouts import CutPoint


def _layout_reader(cut: CutPoint) -> nn.Module | None:
    """What a pooled-linear head applies first so that the exit-gate kernel reads the features directly:
    nothing for NCHW maps and flat features, a channels-first view of a channels-last map, the class token
    (or the tokens as channels, to average them) of a sequence. All are views: the kernel reads them in place."""
    if cut.layout in ("nchw", "flat"):
        return None
    if cut.layout == "nhwc":
        return ChannelsFirst()
    if cut.layout == "tokens":
        return SelectToken(cut.token_index) if cut.token_index is not None else TokensAsChannels()
    raise ValueError(
        f"wrap: exit '{cut.name}' outputs a tensor of shape {cut.shape}, which no default head reads; pass "
        "head=<callable (width, num_classes) -> nn.Module>"
    )


HEAD_KINDS = ("linear", "conv")


def _make_head(kind, cut: CutPoint, num_classes: int, device, dtype) -> nn.Module:
    """An exit head for ``cut``: ``"linear"`` (pooled linear on the layout's view, fused), ``"conv"`` (a conv
    block before it, for feature maps) or a callable ``(width, num_classes) -> nn.Module``, which receives
    the stage output as it is (see ``cut.layout``)."""
    width = cut.feature_dim if cut.feature_dim is not None else cut.shape[1]
    if callable(kind) and not isinstance(kind, str):
        head = kind(width, num_classes)
        if not isinstance(head, nn.Module):
            raise ValueError(f"wrap: head(width, num_classes) must return an nn.Module, got {type(head).__name__} "
                             f"(exit '{cut.name}')")
    elif kind == "linear":
        head = ExitHead(width, num_classes, features=_layout_reader(cut))
    elif kind == "conv":
        if cut.layout not in ("nchw", "nhwc"):
            raise ValueError(
                f"wrap: head='conv' needs a feature map, but exit '{cut.name}' outputs {cut.layout} {cut.shape}; "
                "use head='linear' or a callable"
            )
        head = ExitHead.conv(width, num_classes)
        if cut.layout == "nhwc":
            head.features = nn.Sequential(ChannelsFirst(), head.features)
    else:
        raise ValueError(f"wrap: head must be one of {HEAD_KINDS} or a callable, got {kind!r} (exit '{cut.name}')")
    return head.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
