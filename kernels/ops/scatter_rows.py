"""Row scatter: ``scatter_rows(out, index, src) -> out`` with ``out[index] = src`` in place.

``out`` is ``[M, *T]``, ``src`` is ``[n, *T]`` of the same dtype and device, ``index`` is int64/int32 ``[n]``
with values in ``[0, M)`` that **must not repeat** (as in torch, which row wins is undefined otherwise).
Any trailing shape, any dtype (raw bits are moved), any strides on either side.

Layouts (see :mod:`adaexit.kernels._layout` for the shared planning): the trailing dims are walked in
``out``'s memory order and merged where they are contiguous in *both* tensors.

* both rows dense in the same layout (contiguous/contiguous, channels_last/channels_last, ``h[:, 0]``
  views...): :func:`_scatter_rows_kernel` copies contiguous runs of bytes (vectorised when aligned);
* otherwise, at most 3 dims after coalescing: :func:`_scatter_rows_strided_kernel` (strided addresses
  on either side, no extra copy);
* more than 3 dims: torch's own ``out[index] = src`` (documented fallback, no extra copy).

Index checks: a ``ValueError`` for CPU tensors whose index values fall outside ``[0, M)``. For CUDA
tensors the check would need a host sync, so it is skipped: the kernel skips rows whose index is out of
range (never writes out of bounds). Repeated indices are not detected on any device.
"""

from __future__ import annotations

import torch

from .._dispatch import count_launch, direct_call, use_triton
from .._layout import (
    MAX_STRIDED_DIMS,
    check_index,
    check_index_values,
    coalesce,
    memory_order,
    raw_view,
    rows_bytes,
    tile_shape,
    tile_spec,
)
from .._triton import tl, triton


@triton.jit
def _scatter_rows_kernel(
    src_ptr, index_ptr, out_ptr, n, M, R, stride_sm, stride_om, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """out[index[j], c] = src[j, c] for rows that are dense runs of R elements on both sides.

    src_ptr: source, row j starts at src_ptr + j * stride_sm.
    index_ptr: [n] int64/int32 destination rows (distinct); an index outside [0, M) is skipped.
    out_ptr: destination, row i starts at out_ptr + i * stride_om.
    Grid: (cdiv(n, BLOCK_ROWS), cdiv(R, BLOCK_COLS)).
    Bytes: reads n * R * elsize + n * sizeof(index) (once per column chunk); writes n * R * elsize.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < n
    col_ok = cols < R
    idx = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    dst_ok = row_ok & (idx >= 0) & (idx < M)
    vals = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :], mask=dst_ok[:, None] & col_ok[None, :])
    tl.store(out_ptr + idx[:, None] * stride_om + cols[None, :], vals, mask=dst_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_rows_strided_kernel(
    src_ptr,
    index_ptr,
    out_ptr,
    n,
    M,
    R,
    stride_sm,
    stride_om,
    size1,
    size2,
    stride_s0,
    stride_s1,
    stride_s2,
    stride_o0,
    stride_o1,
    stride_o2,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """out[index[j], c0, c1, c2] = src[j, c0, c1, c2], c = (c0 * size1 + c1) * size2 + c2 < R.

    The trailing dims are coalesced and put in out's memory order by the host, giving the 3 dims
    (R // (size1 * size2), size1, size2).
    src_ptr: source, row stride stride_sm, trailing strides (stride_s0, stride_s1, stride_s2).
    index_ptr: [n] int64/int32 destination rows (distinct); an index outside [0, M) is skipped.
    out_ptr: destination, row stride stride_om, trailing strides (stride_o0, stride_o1, stride_o2).
    Bytes: reads n * R * elsize + n * sizeof(index); writes n * R * elsize (strided addresses:
    sector efficiency depends on the strides).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < n
    col_ok = cols < R
    idx = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    dst_ok = row_ok & (idx >= 0) & (idx < M)
    c2 = (cols % size2).to(tl.int64)
    c1 = ((cols // size2) % size1).to(tl.int64)
    c0 = (cols // (size2 * size1)).to(tl.int64)
    s_off = c0 * stride_s0 + c1 * stride_s1 + c2 * stride_s2
    o_off = c0 * stride_o0 + c1 * stride_o1 + c2 * stride_o2
    mask = dst_ok[:, None] & col_ok[None, :]
    vals = tl.load(src_ptr + rows[:, None] * stride_sm + s_off[None, :], mask=mask)
    tl.store(out_ptr + idx[:, None] * stride_om + o_off[None, :], vals, mask=mask)


def _check(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """Metadata checks (free, no host sync: they run in the public function, also under ``torch.compile``)."""
    for name, t in (("out", out), ("index", index), ("src", src)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out.dim() < 1:
        raise ValueError("out must have at least one dimension (the rows)")
    if src.dim() != out.dim() or src.shape[1:] != out.shape[1:]:
        raise ValueError(
            f"src must have shape [n, {', '.join(map(str, out.shape[1:]))}] to match out {tuple(out.shape)}, "
            f"got {tuple(src.shape)}"
        )
    if src.dtype != out.dtype:
        raise ValueError(f"src dtype {src.dtype} does not match out dtype {out.dtype}")
    check_index(index)
    if src.device != out.device or index.device != out.device:
        raise ValueError(f"out ({out.device}), index ({index.device}) and src ({src.device}) must share a device")
    if index.dim() != 1 or index.shape[0] != src.shape[0]:
        raise ValueError(f"index must be 1-D with src.shape[0] = {src.shape[0]} entries, got shape {tuple(index.shape)}")
    if any(st == 0 and sz > 1 for st, sz in zip(out.stride(), out.shape)):
        raise ValueError("out has overlapping memory (a stride-0 dim, e.g. from expand): cannot write rows in place")


def scatter_rows_torch(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, padded: bool = False) -> torch.Tensor:
    """Reference: ``out[index] = src`` (``index_copy_`` when both are contiguous: same result, faster); with
    ``padded``, rows whose index is ``-1`` are skipped (no host sync: they are written to a scratch row)."""
    _check(out, index, src)
    return _scatter_reference(out, index, src, padded)


def _scatter_reference(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, padded: bool) -> torch.Tensor:
    """:func:`scatter_rows_torch` on checked arguments (the op's path: the public function checked them)."""
    check_index_values(index, out.shape[0], padded=padded)  # before any write: a rejected call leaves out untouched
    if padded:
        # one extra row takes the padding slots' writes, so the copy needs no data-dependent size
        scratch = torch.empty((1, *out.shape[1:]), dtype=out.dtype, device=out.device)
        full = torch.cat([out, scratch])
        full.index_copy_(0, torch.where(index < 0, out.shape[0], index).to(torch.int64), src)
        out.copy_(full[: out.shape[0]])
        return out
    if out.is_contiguous() and src.is_contiguous():
        return out.index_copy_(0, index.to(torch.int64), src)
    out[index] = src
    return out


def scatter_rows_triton(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """Triton path without index checks; rows whose index is out of range (e.g. -1 padding) are skipped."""
    n, M, trail = index.numel(), out.shape[0], list(out.shape[1:])
    R = 1
    for s in trail:
        R *= s
    if n == 0 or R == 0:
        return
    order = memory_order(trail, out.stride()[1:])
    sizes, (s_strides, o_strides) = coalesce(
        [trail[d] for d in order], [src.stride(d + 1) for d in order], [out.stride(d + 1) for d in order]
    )
    if len(sizes) > MAX_STRIDED_DIMS or raw_view(out) is None:
        ok = (index >= 0) & (index < M)
        out[index[ok]] = src[ok]  # documented fallback: torch's own kernel (boolean indexing syncs)
        return
    srcr, outr = raw_view(src), raw_view(out)
    block_rows, block_cols = tile_shape(R, out.element_size())
    grid = (triton.cdiv(n, block_rows), triton.cdiv(R, block_cols))
    count_launch("scatter_rows")
    if len(sizes) == 1 and s_strides[0] == 1 and o_strides[0] == 1:
        _scatter_rows_kernel[grid](
            srcr, index, outr, n, M, R, src.stride(0), out.stride(0), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols
        )
    else:
        pad = MAX_STRIDED_DIMS - len(sizes)
        sizes, s_strides, o_strides = [1] * pad + sizes, [0] * pad + s_strides, [0] * pad + o_strides
        _scatter_rows_strided_kernel[grid](
            srcr, index, outr, n, M, R, src.stride(0), out.stride(0), sizes[1], sizes[2], *s_strides, *o_strides,
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        )  # fmt: skip


def bytes_moved(src: torch.Tensor, index: torch.Tensor) -> int:
    """The bytes-moved model of ``scatter_rows(out, index, src)``: the ``src`` rows read once and written once,
    the index once per column chunk."""
    row = 1
    for s in src.shape[1:]:
        row *= s
    return rows_bytes(index.numel(), row, src.element_size(), index.element_size())


# ---------------------------------------------------------------------------------------------
# The torch op ``torch.ops.adaexit.scatter_rows`` (mutates ``out``): the Triton kernel and the reference
# behind one op. A mutating op cannot carry an autograd formula: a call that autograd must differentiate runs
# the reference in the public function instead (``out[index] = src`` is differentiable in place).
# ---------------------------------------------------------------------------------------------
def _scatter_rows_impl(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, padded: bool) -> None:
    if use_triton(out.device):
        check_index_values(index, out.shape[0], padded=padded)
        scatter_rows_triton(out, index, src)
    else:
        _scatter_reference(out, index, src, padded)


_scatter_rows_op = torch.library.custom_op("adaexit::scatter_rows", mutates_args=("out",))(_scatter_rows_impl)


@_scatter_rows_op.register_fake
def _(out, index, src, padded):
    return None


def scatter_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor, *, padded: bool = False) -> torch.Tensor:
    """``out[index] = src`` along dim 0, in place (the op ``torch.ops.adaexit.scatter_rows``); returns ``out``.

    Args:
        out: ``[M, *T]`` destination, any strides (no overlapping memory).
        index: ``[n]`` int64/int32 distinct row indices in ``[0, M)``.
        src: ``[n, *T]`` rows, same dtype and device as ``out``, any strides.
        padded: ``index`` may hold ``-1`` padding slots: those rows of ``src`` are not written (no host sync).
    """
    _check(out, index, src)
    if torch.is_grad_enabled() and (out.requires_grad or src.requires_grad):
        return scatter_rows_torch(out, index, src, padded=padded)
    if direct_call(out, index, src):
        _scatter_rows_impl(out, index, src, padded)
    else:
        _scatter_rows_op(out, index, src, padded)
    return out


# Representative launches for the ahead-of-time compile report (kernels._compile); rows move as
# same-width integers (fp32 -> *i32, fp16/bf16 -> *i16).
_sig = {"src_ptr": "*i32", "index_ptr": "*i64", "out_ptr": "*i32", "n": "i32", "M": "i32", "R": "i32", "stride_sm": "i32", "stride_om": "i32"}
_sig_strided = {**_sig, **{k: "i32" for k in ("size1", "size2", "stride_s0", "stride_s1", "stride_s2", "stride_o0", "stride_o1", "stride_o2")}}


COMPILE_SPECS = [
    tile_spec("scatter_rows[fp32 x512, i64 index]", _scatter_rows_kernel, _sig, 512, 4),
    tile_spec("scatter_rows[fp16 x512, i64 index]", _scatter_rows_kernel, {**_sig, "src_ptr": "*i16", "out_ptr": "*i16"}, 512, 2),
    tile_spec("scatter_rows[i64 x1, i32 index]", _scatter_rows_kernel, {**_sig, "src_ptr": "*i64", "out_ptr": "*i64", "index_ptr": "*i32"}, 1, 8),
    tile_spec("scatter_rows_strided[fp32 x512, i64 index]", _scatter_rows_strided_kernel, _sig_strided, 512, 4),
]
