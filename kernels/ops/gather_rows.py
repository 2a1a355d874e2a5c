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

from .._dispatch import use_triton
from .._layout import (
    MAX_STRIDED_DIMS,
    check_index,
    check_index_values,
    coalesce,
    dense_strides,
    memory_order,
    raw_view,
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
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the rows)")
    check_index(index)
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but x is on {x.device}")


def gather_rows_torch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reference: ``x[index]`` (``index_select`` for contiguous ``x``: same values, faster on CPU)."""
    _check(x, index)
    if x.is_contiguous():
        try:  # index_select bounds-checks (negative indices included): no separate pass over index
            return x.index_select(0, index)
        except (IndexError, RuntimeError):  # RuntimeError: any index into a 0-row x
            check_index_values(index, x.shape[0])  # raises the ValueError
            raise
    check_index_values(index, x.shape[0])  # x[index] would wrap negative indices
    return x[index]


def _gather_rows_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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
    order = memory_order(trail, x.stride()[1:])
    x_sizes = [trail[d] for d in order]
    sizes, (strides,) = coalesce(x_sizes, [x.stride(d + 1) for d in order])
    if len(sizes) == 1 and strides[0] == 1:  # dense rows: keep x's row layout
        out_strides = dense_strides(trail, order)
    else:  # strided rows: out is contiguous, x is read in its own memory order
        out_strides = dense_strides(trail, list(range(len(trail))))
        sizes, (strides, o_strides) = coalesce(x_sizes, [x.stride(d + 1) for d in order], [out_strides[d] for d in order])
        if len(sizes) > MAX_STRIDED_DIMS:
            x = x.contiguous()  # fallback: one extra read + write of all of x (see module docstring)
            sizes, strides = [R], [1]
    out = torch.empty_strided([n, *trail], [R, *out_strides], dtype=x.dtype, device=x.device)
    if n == 0 or R == 0:
        return out
    xr, outr = raw_view(x), raw_view(out)
    block_rows, block_cols = tile_shape(R, x.element_size())
    grid = (triton.cdiv(n, block_rows), triton.cdiv(R, block_cols))
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


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0.

    Args:
        x: ``[M, *T]`` tensor, any dtype, any strides (channels_last is kept in the output).
        index: ``[n]`` int64/int32 row indices in ``[0, M)``.

    Returns:
        ``[n, *T]`` tensor; rows keep ``x``'s memory order of the trailing dims.
    """
    if not use_triton(x):
        return gather_rows_torch(x, index)
    _check(x, index)
    check_index_values(index, x.shape[0])
    return _gather_rows_triton(x, index)


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
