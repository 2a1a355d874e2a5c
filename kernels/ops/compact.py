"""Compaction: ``compact(keep, *tensors, capacity=None) -> (kept_index, *compacted)``.

``kept_index`` (int64) lists the rows where ``keep`` is true, in their original order, and every tensor
that travels with the batch is gathered to those rows (``gather_rows(t, kept_index)``).

Built on the other kernels: :func:`adaexit.kernels.partition`'s kernel with one route (``route = ~keep``: kept
rows form route 0; dropped rows, route 1, are out of range and written nowhere, so ``order[:counts[0]]`` is the
stable list of kept rows, and with ``capacity`` the kernel writes the padded list itself) followed by one
:func:`adaexit.kernels.gather_rows` launch per tensor. This module has no kernel of its own.

Host synchronisation:

* ``capacity=None``: exactly **one** sync (``_dispatch.to_host`` of the kept count) to size the outputs.
* ``capacity=c`` (static-capacity variant): **none**. Outputs have exactly ``c`` rows; ``kept_index[j] = -1``
  marks a padding slot and the compacted tensors hold zeros there. If more than ``c`` rows are kept, only
  the first ``c`` (in order) are returned and the rest are dropped; detect it on the device with
  ``keep.sum() > c`` (``(kept_index >= 0).sum()`` is the number of rows actually returned).

The reference :func:`compact_torch` is an independent implementation on ``torch.nonzero_static``
(no ``nonzero`` sync), with the same sync accounting.
"""

from __future__ import annotations

import torch

from .._dispatch import direct_call, to_host, use_triton
from .._layout import empty_rows, in_row_layout
from .gather_rows import bytes_moved as gather_bytes
from .gather_rows import gather_rows_triton, padded_rows_torch
from .partition import bytes_moved as partition_bytes
from .partition import partition_triton

# compact launches partition's and gather_rows' kernels (listed in their COMPILE_SPECS); none of its own.
COMPILE_SPECS: list = []


def _check(keep: torch.Tensor, tensors: tuple, capacity) -> None:
    if not isinstance(keep, torch.Tensor) or keep.dim() != 1 or keep.dtype != torch.bool:
        got = f"{keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"keep must be a 1-D bool tensor [N], got {got}")
    n = keep.shape[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[0] != n:
            raise ValueError(f"tensors[{i}] must have {n} rows (keep has {n}), got shape {tuple(t.shape)}")
        if t.device != keep.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but keep is on {keep.device}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")


def _rows_torch(t: torch.Tensor, kept_index: torch.Tensor) -> torch.Tensor:
    """``t[kept_index]`` for indices valid by construction (no range check)."""
    return t.index_select(0, kept_index) if t.is_contiguous() else t[kept_index]


def compact_torch(keep: torch.Tensor, *tensors: torch.Tensor, capacity: int | None = None) -> tuple:
    """Reference: ``nonzero_static`` for the kept rows, ``index_select`` / ``t[index]`` for each tensor."""
    _check(keep, tensors, capacity)
    if capacity is None:
        (k,) = to_host(keep.sum(dtype=torch.int64).view(1))  # the one host sync
        kept_index = torch.nonzero_static(keep, size=k).view(-1)
        return (kept_index, *(_rows_torch(t, kept_index) for t in tensors))
    kept_index = torch.nonzero_static(keep, size=capacity, fill_value=-1).view(-1)
    return (kept_index, *(padded_rows_torch(t, kept_index) for t in tensors))


def _compact_triton(keep: torch.Tensor, tensors, capacity):
    """partition's kernel with one route for the kept rows, then one gather_rows launch per tensor."""
    # route 0 = kept rows (stable); dropped rows have route 1, out of range for one route: the kernel counts
    # and writes them nowhere
    order, counts = partition_triton((~keep).view(torch.uint8), 1, capacity)
    if capacity is None:
        (k,) = to_host(counts)  # the one host sync
        kept_index = order[:k]
    else:
        kept_index = order[0]  # [capacity], -1 padded by the kernel's layout
    # kept_index is valid by construction (or -1 padding, which the kernel turns into zero rows)
    return [kept_index, *(gather_rows_triton(t, kept_index) for t in tensors)]


def bytes_moved(keep: torch.Tensor, *tensors: torch.Tensor, kept: int, capacity: int | None = None) -> int:
    """The bytes-moved model of ``compact(keep, *tensors, capacity=capacity)`` when ``kept`` rows are kept:
    ``~keep`` (read and write ``N`` bools), partition of that uint8 route with one route, a gather of the kept
    rows of each tensor. ``capacity=None`` reads the kept count back (8 B); ``capacity=c`` fills the ``c``-slot
    index with -1 first and writes ``c`` rows of each tensor, ``c - kept`` of them zeros."""
    n = keep.shape[0]
    moved = 2 * n + partition_bytes(keep.view(torch.uint8), 1, capacity)
    rows = kept if capacity is None else min(kept, capacity)
    moved += sum(gather_bytes(t, keep.new_empty(rows, dtype=torch.int64)) for t in tensors)
    if capacity is None:
        return moved + 8
    return moved + sum((capacity - rows) * (t[0].numel() if n else 0) * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# The torch op ``torch.ops.adaexit.compact``. With ``capacity=None`` the kept count is data-dependent: the
# fake implementation gives it as an unbacked size, so ``torch.compile`` captures the op whole.
# ---------------------------------------------------------------------------------------------
def _compact_impl(keep: torch.Tensor, tensors: list[torch.Tensor], capacity: int | None) -> list[torch.Tensor]:
    if use_triton(keep.device):
        return _compact_triton(keep, tensors, capacity)
    kept_index, *rows = compact_torch(keep, *tensors, capacity=capacity)
    # contiguous t: index_select's rows are contiguous too, the layout the fake promises
    return [kept_index, *(r if t.is_contiguous() else in_row_layout(r, t) for r, t in zip(rows, tensors))]


_compact_op = torch.library.custom_op("adaexit::compact", mutates_args=())(_compact_impl)


@_compact_op.register_fake
def _(keep, tensors, capacity):
    size = torch.library.get_ctx().new_dynamic_size() if capacity is None else capacity
    return [keep.new_empty((size,), dtype=torch.int64), *(empty_rows(t, size) for t in tensors)]


def _setup_context(ctx, inputs, output):
    keep, tensors, capacity = inputs
    ctx.save_for_backward(output[0])
    ctx.metas = [(t.shape, t.dtype) for t in tensors]


def _backward(ctx, grads):
    (kept_index,) = ctx.saved_tensors
    valid = kept_index >= 0  # -1: a padding slot, no gradient
    index = kept_index.clamp(min=0)
    out = []
    for (shape, dtype), grad in zip(ctx.metas, grads[1:]):
        if grad is None or not dtype.is_floating_point:
            out.append(None)
            continue
        grad = grad.to(dtype) * valid.view(-1, *([1] * (grad.dim() - 1)))
        out.append(grad.new_zeros(shape).index_add_(0, index, grad))
    return None, out, None


_compact_op.register_autograd(_backward, setup_context=_setup_context)


def compact(keep: torch.Tensor, *tensors: torch.Tensor, capacity: int | None = None) -> tuple:
    """Keep the rows where ``keep`` is true, for every tensor in ``tensors`` (the op ``torch.ops.adaexit.compact``;
    differentiable in ``tensors``).

    Args:
        keep: ``[N]`` bool.
        tensors: each ``[N, ...]`` on ``keep``'s device, any dtype/strides (see ``gather_rows``).
        capacity: ``None`` -> outputs sized to the kept count (one host sync); an int ``c`` -> outputs of
            exactly ``c`` rows, no host sync, padding ``kept_index = -1`` / zero rows, overflow dropped.

    Returns:
        ``(kept_index, *compacted)``: ``kept_index`` int64 ``[k]`` (or ``[c]``), ``compacted[i] =
        tensors[i][kept_index]``.
    """
    _check(keep, tensors, capacity)
    if direct_call(keep, *tensors):
        return tuple(_compact_impl(keep, list(tensors), capacity))
    return tuple(_compact_op(keep, list(tensors), capacity))
