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
        "heads=[one module per early exit] or heads=<callable (width, num_classes) -> nn.Module>"
    )


def default_head(cut: CutPoint, num_classes: int, device, dtype) -> nn.Module:
    """The default exit head for ``cut``: a pooled linear on the layout's view, run fused in the exit-gate kernel."""
    head = ExitHead(cut.feature_dim, num_classes, features=_layout_reader(cut))
    return head.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
