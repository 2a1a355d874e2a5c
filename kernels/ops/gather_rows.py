"""Row gather: ``gather_rows(x, index) -> out`` with ``out ≡ x[index]``.

``x`` is ``[M, *T]`` for any trailing shape ``T`` (including ``()``), any dtype (rows are copied as raw
bits: the kernel sees 1/2/4/8-byte integers), any strides; ``index`` is int64 or int32 ``[n]``.

Layouts (planned on the host by :mod:`adaexit.kernels._layout`, shared with ``scatter_rows``). The trailing
dims are put in memory order (decreasing stride of ``x``) and merged where they are contiguous with each
other ("coalesced"):

* **dense rows** (contiguous, channels_last, any permutation of the trailing dims without gaps, and views
  such as ``h[:, 0]`` whose rows are dense but whose row stride is not): one dimension remains, and
  :func:`_gather_rows_kernel` copies each row as a contiguous run of bytes (vectorised 16-byte accesses
  when the row length and row stride allow). ``out`` keeps the row layout of ``x`` (channels_last in,
  channels_last out).
* **strided rows** (slices such as ``x[..., :5]``, ``x[..., ::2]``, expanded dims) with at most 3
  dims left after coalescing: :func:`_gather_rows_strided_kernel` walks the row in ``x``'s memory order
  through strided addresses (no extra copy) and writes a contiguous ``out``.
* anything else (more than 3 non-mergeable trailing dims): ``x.contiguous()`` first, which costs one extra
  read and write of *all* of ``x`` (not just the gathered rows) - documented fallback, rare in practice.

Index checks: values must lie in ``[0, M)`` (negative indices are *not* wrapped as in ``x[index]``);
a ``ValueError`` is raised for CPU tensors. For CUDA tensors checking would need a host sync, so it is
skipped; the kernel never reads out of bounds and writes a row of zeros for an out-of-range index
(that is also how :func:`adaexit.kernels.compact` pads with index ``-1``).
"""

from __future__ import annotations

import torch

from .._dispatch import count_launch, direct_call, use_triton
from .._layout import (
    MAX_STRIDED_DIMS,
    check_index,
    check_index_values,
    coalesce,
    empty_rows,
    in_row_layout,
    memory_order,
    raw_view,
    rows_bytes,
    tile_shape,
    tile_spec,
)
from .._triton import tl, triton


@triton.jit
def _gather_rows_kernel(
    x_ptr, index_ptr, out_ptr, n, M, R, stride_xm, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """out[j, c] = x[index[j], c] for rows that are dense runs of R elements.

    x_ptr: source, row i starts at x_ptr + i * stride_xm and holds R contiguous elements.
    index_ptr: [n] int64/int32 row indices; an index outside [0, M) yields a zero row.
    out_ptr: [n, R] contiguous destination (row stride R).
    Grid: (cdiv(n, BLOCK_ROWS), cdiv(R, BLOCK_COLS)); a tile is BLOCK_ROWS rows x BLOCK_COLS elements.
    Bytes: reads n * R * elsize (gathered rows) + n * sizeof(index) (once per column chunk);
    writes n * R * elsize.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < n
    col_ok = cols < R
    idx = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    src_ok = row_ok & (idx >= 0) & (idx < M)
    src = x_ptr + idx[:, None] * stride_xm + cols[None, :]
    vals = tl.load(src, mask=src_ok[:, None] & col_ok[None, :], other=0)
    dst = out_ptr + rows[:, None] * R + cols[None, :]
    tl.store(dst, vals, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gather_rows_strided_kernel(
    x_ptr,
    index_ptr,
    out_ptr,
    n,
    M,
    R,
    stride_xm,
    size1,
    size2,
    stride_x0,
    stride_x1,
    stride_x2,
    stride_o0,
    stride_o1,
    stride_o2,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """out[j, c0, c1, c2] = x[index[j], c0, c1, c2] for c = (c0 * size1 + c1) * size2 + c2 < R.

    The trailing dims are coalesced and put in x's memory order by the host, giving the 3 dims
    (R // (size1 * size2), size1, size2).
    x_ptr: source, row stride stride_xm, trailing strides (stride_x0, stride_x1, stride_x2).
    index_ptr: [n] int64/int32 row indices; an index outside [0, M) yields a zero row.
    out_ptr: destination, row stride R, trailing strides (stride_o0, stride_o1, stride_o2).
    Bytes: reads n * R * elsize through strided addresses (sector efficiency depends on the
    strides) + n * sizeof(index); writes n * R * elsize.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < n
    col_ok = cols < R
    idx = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    src_ok = row_ok & (idx >= 0) & (idx < M)
    c2 = cols % size2
    c1 = (cols // size2) % size1
    c0 = cols // (size2 * size1)
    c0 = c0.to(tl.int64)
    c1 = c1.to(tl.int64)
    c2 = c2.to(tl.int64)
    x_off = c0 * stride_x0 + c1 * stride_x1 + c2 * stride_x2
    o_off = c0 * stride_o0 + c1 * stride_o1 + c2 * stride_o2
    src = x_ptr + idx[:, None] * stride_xm + x_off[None, :]
    vals = tl.load(src, mask=src_ok[:, None] & col_ok[None, :], other=0)
    dst = out_ptr + rows[:, None] * R + o_off[None, :]
    tl.store(dst, vals, mask=row_ok[:, None] & col_ok[None, :])


def _check(x: torch.Tensor, index: torch.Tensor) -> None:
    """Metadata checks (free, no host sync: they run in the public function, also under ``torch.compile``)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the rows)")
    check_index(index)
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")


def gather_rows_torch(x: torch.Tensor, index: torch.Tensor, *, padded: bool = False) -> torch.Tensor:
    """Reference: ``x[index]`` (``index_select`` for contiguous ``x``: same values, faster on CPU); with
    ``padded``, index ``-1`` gives a zero row."""
    _check(x, index)
    return _gather_reference(x, index, padded)


def _gather_reference(x: torch.Tensor, index: torch.Tensor, padded: bool) -> torch.Tensor:
    """:func:`gather_rows_torch` on checked arguments (the op's path: the public function checked them)."""
    if padded:
        check_index_values(index, x.shape[0], padded=True)
        return padded_rows_torch(x, index)
    if x.is_contiguous():
        try:  # index_select bounds-checks (negative indices included): no separate pass over index
            return x.index_select(0, index)
        except (IndexError, RuntimeError):  # RuntimeError: any index into a 0-row x
            check_index_values(index, x.shape[0])  # raises the ValueError
            raise
    check_index_values(index, x.shape[0])  # x[index] would wrap negative indices
    return x[index]


def padded_rows_torch(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` with zero rows where ``index == -1`` (other values valid by construction); no host sync."""
    pad = index < 0
    if t.shape[0] == 0:  # nothing to read: every slot is padding
        return torch.zeros((index.numel(), *t.shape[1:]), dtype=t.dtype, device=t.device)
    safe = index.clamp(min=0)
    rows = t.index_select(0, safe) if t.is_contiguous() else t[safe]
    bits = raw_view(rows)
    if bits is None:  # no same-width integer type (e.g. complex128)
        return rows.masked_fill_(pad.view(-1, *([1] * (t.dim() - 1))), 0)
    # AND the raw bits with 0 / all-ones per row: exact zeros for every dtype (NaN/Inf rows included) and
    # ~25x faster on CPU than a broadcast masked_fill_.
    keep_bits = (~pad).to(bits.dtype).neg_().view(-1, *([1] * (t.dim() - 1)))
    bits.bitwise_and_(keep_bits)
    return rows


def gather_rows_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Triton path without index checks; out-of-range indices (e.g. -1 padding) give zero rows."""
    n, M, trail = index.numel(), x.shape[0], list(x.shape[1:])
    R = 1
    for s in trail:
        R *= s
    if raw_view(x) is None:  # element size without a same-width integer type (e.g. complex128)
        out = torch.zeros([n, *trail], dtype=x.dtype, device=x.device)
        ok = (index >= 0) & (index < M)
        out[ok] = x[index[ok]]  # torch's own kernels; boolean indexing syncs (rare dtypes only)
        return out
    out = empty_rows(x, n)
    if n == 0 or R == 0:
        return out
    order = memory_order(trail, x.stride()[1:])
    x_sizes = [trail[d] for d in order]
    sizes, (strides, o_strides) = coalesce(x_sizes, [x.stride(d + 1) for d in order], [out.stride(d + 1) for d in order])
    if len(sizes) > MAX_STRIDED_DIMS:
        x = x.contiguous()  # fallback: one extra read + write of all of x (see module docstring)
        sizes, strides, o_strides = [R], [1], [1]
    xr, outr = raw_view(x), raw_view(out)
    block_rows, block_cols = tile_shape(R, x.element_size())
    grid = (triton.cdiv(n, block_rows), triton.cdiv(R, block_cols))
    count_launch("gather_rows")
    if len(sizes) == 1 and strides[0] == 1:
        _gather_rows_kernel[grid](xr, index, outr, n, M, R, x.stride(0), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    else:
        pad = MAX_STRIDED_DIMS - len(sizes)
        sizes, strides, o_strides = [1] * pad + sizes, [0] * pad + strides, [0] * pad + o_strides
        _gather_rows_strided_kernel[grid](
            xr, index, outr, n, M, R, x.stride(0), sizes[1], sizes[2], *strides, *o_strides,
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        )  # fmt: skip
    return out


def bytes_moved(x: torch.Tensor, index: torch.Tensor) -> int:
    """The bytes-moved model of ``gather_rows(x, index)`` (every benchmark and the GPU kit use it): the
    gathered rows read once and written once, the index once per column chunk."""
    return rows_bytes(index.numel(), x[0].numel() if x.shape[0] else 0, x.element_size(), index.element_size())


# ---------------------------------------------------------------------------------------------
# The torch op ``torch.ops.adaexit.gather_rows``: the Triton kernel and the reference behind one op
# ---------------------------------------------------------------------------------------------
def _gather_rows_impl(x: torch.Tensor, index: torch.Tensor, padded: bool) -> torch.Tensor:
    if use_triton(x.device):
        check_index_values(index, x.shape[0], padded=padded)
        return gather_rows_triton(x, index)
    rows = _gather_reference(x, index, padded)
    return rows if x.is_contiguous() else in_row_layout(rows, x)  # contiguous x: rows are contiguous too


_gather_rows_op = torch.library.custom_op("adaexit::gather_rows", mutates_args=())(_gather_rows_impl)


@_gather_rows_op.register_fake
def _(x, index, padded):
    return empty_rows(x, index.shape[0])


def _setup_context(ctx, inputs, output):
    x, index, padded = inputs
    ctx.save_for_backward(index)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.padded = padded


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    shape, dtype = ctx.x_meta
    if ctx.padded:  # padding slots carry no gradient
        grad = grad * (index >= 0).view(-1, *([1] * (grad.dim() - 1)))
        index = index.clamp(min=0)
    return grad.new_zeros(shape, dtype=dtype).index_add_(0, index, grad.to(dtype)), None, None


_gather_rows_op.register_autograd(_backward, setup_context=_setup_context)


def gather_rows(x: torch.Tensor, index: torch.Tensor, *, padded: bool = False) -> torch.Tensor:
    """``x[index]`` along dim 0 (the op ``torch.ops.adaexit.gather_rows``; differentiable in ``x``).

    Args:
        x: ``[M, *T]`` tensor, any dtype, any strides (channels_last is kept in the output).
        index: ``[n]`` int64/int32 row indices in ``[0, M)``.
        padded: ``index`` may hold ``-1`` padding slots (as ``compact(..., capacity=)`` and ``partition(...,
            capacity=)`` return them): those rows of the output are zeros. No host sync either way on CUDA.

    Returns:
        ``[n, *T]`` tensor; rows keep ``x``'s memory order of the trailing dims.
    """
    _check(x, index)
    if direct_call(x, index):
        return _gather_rows_impl(x, index, padded)
    return _gather_rows_op(x, index, padded)


# Representative launches for the ahead-of-time compile report (kernels._compile). Rows are moved as
# same-width integers, so fp32 rows run the *i32 specialisation and fp16/bf16 rows the *i16 one.
_sig = {"x_ptr": "*i32", "index_ptr": "*i64", "out_ptr": "*i32", "n": "i32", "M": "i32", "R": "i32", "stride_xm": "i32"}
_sig_strided = {**_sig, **{k: "i32" for k in ("size1", "size2", "stride_x0", "stride_x1", "stride_x2", "stride_o0", "stride_o1", "stride_o2")}}


COMPILE_SPECS = [
    tile_spec("gather_rows[fp32 x512, i64 index]", _gather_rows_kernel, _sig, 512, 4),
    tile_spec("gather_rows[fp16 x512, i64 index]", _gather_rows_kernel, {**_sig, "x_ptr": "*i16", "out_ptr": "*i16"}, 512, 2),
    tile_spec("gather_rows[fp32 x4096, i32 index]", _gather_rows_kernel, {**_sig, "index_ptr": "*i32"}, 4096, 4),
    tile_spec("gather_rows[i64 x1, i64 index]", _gather_rows_kernel, {**_sig, "x_ptr": "*i64", "out_ptr": "*i64"}, 1, 8),
    tile_spec("gather_rows_strided[fp32 x512, i64 index]", _gather_rows_strided_kernel, _sig_strided, 512, 4),
]
