"""Probing (shapes, dtypes, FLOPs with an example input) and what each cut's output looks like
(:class:`CutPoint`: shape, layout, token index)."""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import fx, nn

from .tracing import _mode, _Trace

LAYOUTS = ("nchw", "nhwc", "tokens", "flat")


class _Probe(fx.Interpreter):
    """Runs the traced graph once, recording every node's output shape and dtype and the FLOPs so far."""

    def __init__(self, gm: fx.GraphModule, counter=None):
        super().__init__(gm)
        self.counter = counter
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
            self.dtypes[n] = out.dtype
        if self.counter is not None:
            self.flops[n] = self.counter.get_total_flops()
        return out


def _probe(trace: _Trace, example_input: torch.Tensor, flops: bool,
           what: str = "wrap: {model} failed on example_input") -> _Probe:
    """One eval-mode, no-grad run: a probe never updates BatchNorm statistics or builds an autograd graph.
    ``what`` starts the error message (``{model}`` is the model's class name)."""
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("wrap: example_input must be a tensor holding at least one row (a batch of 1-2 is enough)")
    with _mode(trace.model, False), torch.no_grad():
        try:
            if flops:
                with FlopCounterMode(display=False) as counter:
                    probe = _Probe(trace.gm, counter)
                    probe.run(example_input)
            else:
                probe = _Probe(trace.gm)
                probe.run(example_input)
        except Exception as err:
            raise ValueError(
                f"{what.format(model=type(trace.model).__name__)} of shape {tuple(example_input.shape)} "
                f"({type(err).__name__}: {str(err).splitlines()[0]}); pass a batch the model itself accepts"
            ) from err
    return probe


@dataclass
class CutPoint:
    """What flows across one cut (the output of the module ``name``), and how an exit head reads it.

    Attributes:
        name: the module's dotted path.
        shape: its output's shape for the example input (``None`` without one).
        layout: ``"nchw"`` (``[N, C, H, W]``), ``"nhwc"`` (channels last, Swin), ``"tokens"`` (``[N, L, D]``,
            ViT), ``"flat"`` (``[N, D]``), ``"other"``; ``None`` without an example input.
        layout_ambiguous: the shape alone could not tell NCHW from NHWC, or the producing / consuming
            modules (which decide) disagreed with the input's aspect ratio.
        token_index: for tokens, the token the model's own tail reads (``x[:, 0]``: a class token).
        flops_fraction: FLOPs (matmuls and convolutions) done before the cut / the whole model's.
        inplace_consumer: an op right after the cut that overwrites the value in place (a head must then
            read it before the next stage runs and must not save it for backward).
    """

    name: str
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    layout: str | None = None
    layout_ambiguous: bool = False
    token_index: int | None = None
    flops_fraction: float | None = None
    inplace_consumer: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def feature_dim(self) -> int | None:
        """The width of the vector a pooled head classifies from: C for maps, D for tokens and flat."""
        if self.shape is None or self.layout not in LAYOUTS or len(self.shape) < 2:
            return None
        return self.shape[1] if self.layout == "nchw" else self.shape[-1]

    def read(self, h: torch.Tensor) -> torch.Tensor:
        """The ``[N, feature_dim]`` vector a pooled head classifies from (a torch reference)."""
        if self.layout == "nchw":
            return h.mean(dim=tuple(range(2, h.dim())))
        if self.layout == "nhwc":
            return h.mean(dim=tuple(range(1, h.dim() - 1)))
        if self.layout == "tokens":
            return h[:, self.token_index] if self.token_index is not None else h.mean(dim=1)
        if self.layout == "flat":
            return h
        raise ValueError(f"exit '{self.name}': no head reads the layout {self.layout!r}")


_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                   nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                   nn.GroupNorm, nn.InstanceNorm2d)


def _module_layout_hint(m: nn.Module, shape: tuple[int, ...]) -> str | None:
    """Which axis a module treats as the channels, when it tells."""
    if isinstance(m, _CHANNELS_FIRST):
        return "nchw"
    if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == tuple(shape[-1:]):
        return "nhwc"
    if isinstance(m, nn.Linear) and m.in_features == shape[-1]:
        return "nhwc"
    return None


def _layout_hint(cut: fx.Node, root: nn.Module, shape) -> str | None:
    """NCHW or NHWC, as the module producing the cut value or the ops consuming it reveal."""
    hints = []
    if cut.op == "call_module":
        leaves = [m for m in root.get_submodule(cut.target).modules() if not list(m.children())]
        if leaves:  # the last leaf in registration order usually produced the value
            hints.append(_module_layout_hint(leaves[-1], shape))
    for u in cut.users:
        if u.op == "call_module":
            sub = root.get_submodule(u.target)
            first = next((m for m in sub.modules() if not list(m.children())), sub)
            hints.append(_module_layout_hint(first, shape))
        elif u.op in ("call_method", "call_function") and "permute" in str(u.target):
            dims = tuple(u.args[1:]) if len(u.args) > 2 else tuple(u.args[1]) if len(u.args) > 1 else ()
            if dims == (0, 3, 1, 2):
                hints.append("nhwc")
            elif dims == (0, 2, 3, 1):
                hints.append("nchw")
    hints = [h for h in hints if h]
    return Counter(hints).most_common(1)[0][0] if hints else None


def _infer_layout(shape: tuple[int, ...], input_shape: tuple[int, ...], hint: str | None) -> tuple[str, bool]:
    """``(layout, ambiguous)`` from the exit's shape, the input's shape and a module hint.

    A 4-D map keeps the input's aspect ratio: ``[N, a, b, c]`` is NCHW when ``b / c`` matches ``H / W``
    better than ``a / b`` does (a square input gives ``b == c`` for NCHW, ``a == b`` for NHWC). When both
    match equally (``[N, 7, 7, 7]``) the producing or consuming modules decide; when they tell (a convolution
    or BatchNorm: channels first; a LayerNorm or Linear over the last axis: channels last) they win over the
    ratio, and a disagreement is flagged as ambiguous. A 3-D ``[N, a, b]`` is a token sequence unless those
    modules say channels first (``Conv1d``: ``[N, C, L]``, pooled over ``L``).
    """
    if len(shape) == 2:
        return "flat", False
    if len(shape) == 3:
        return ("nchw" if hint == "nchw" else "tokens"), False
    if len(shape) != 4:
        return "other", False
    _, a, b, c = shape
    target = 0.0
    if len(input_shape) == 4 and min(input_shape[2:]) > 0:
        target = math.log(input_shape[2] / input_shape[3])
    err_nchw = abs(math.log(max(b, 1) / max(c, 1)) - target)
    err_nhwc = abs(math.log(max(a, 1) / max(b, 1)) - target)
    if abs(err_nchw - err_nhwc) > 1e-6:
        by_ratio = "nchw" if err_nchw < err_nhwc else "nhwc"
        return (hint or by_ratio), hint is not None and hint != by_ratio
    return (hint or "nchw"), True


def _token_index(nodes: Sequence[fx.Node]) -> int | None:
    """The token the graph reads as ``x[:, i]`` from a sequence (ViT's class token: 0), else None."""
    for n in nodes:
        if n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2:
            idx = n.args[1]
            if isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], int):
                return idx[1]
    return None


def _describe_cut(cut: CutPoint, node: fx.Node, model: nn.Module, probe: _Probe, input_shape, tok) -> None:
    """Fill ``cut``'s shape, dtype, layout and token index from a probe."""
    cut.shape, cut.dtype = probe.shapes.get(node), probe.dtypes.get(node)
    if cut.shape is None:
        raise ValueError(
            f"wrap: module '{cut.name}' does not return a tensor for the example input: exactly one tensor must "
            "flow across a cut"
        )
    cut.layout, cut.layout_ambiguous = _infer_layout(cut.shape, input_shape, _layout_hint(node, model, cut.shape))
    if cut.layout == "tokens":
        cut.token_index = tok
