"""Host-side layout planning and index checks shared by the row-copy ops (``gather_rows``, ``scatter_rows``,
``compact``).

The row kernels see a row as up to :data:`MAX_STRIDED_DIMS` trailing dims: the host puts the trailing dims
in memory order (:func:`memory_order`), merges neighbours that are contiguous with each other
(:func:`coalesce`), moves rows as same-width integers (:func:`raw_view`) and sizes the program tile
(:func:`tile_shape`; :func:`tile_spec` for the compile report). Pure Python + torch: nothing here needs triton.
"""

from __future__ import annotations

import torch

from ._compile import CompileSpec

MAX_STRIDED_DIMS = 3  # trailing dims the strided row kernels walk; more -> the ops' documented fallbacks
_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE_BYTES = 16384  # bytes per program tile (rows x columns)
_MAX_COL_BYTES = 4096  # widest column chunk per program
_MAX_BLOCK_ROWS = 1024


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``), as ``triton.next_power_of_2``."""
    return 1 << max(0, int(n) - 1).bit_length()


def memory_order(sizes, strides) -> list[int]:
    """Trailing dims of size > 1, outermost (largest stride) first; ties keep logical order."""
    dims = [d for d, s in enumerate(sizes) if s != 1]
    return sorted(dims, key=lambda d: -strides[d])


def coalesce(sizes, *stride_sets) -> tuple[list[int], list[list[int]]]:
    """Merge neighbouring dims (already in the order to iterate, outermost first) that are contiguous
    with each other in *every* stride set. Returns (sizes, [strides per set]); () becomes [1], [[1]...]."""
    out_sizes: list[int] = []
    out_strides: list[list[int]] = [[] for _ in stride_sets]
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        if out_sizes and all(st[-1] == s[i] * size for st, s in zip(out_strides, stride_sets)):
            out_sizes[-1] *= size
            for st, s in zip(out_strides, stride_sets):
                st[-1] = s[i]
        else:
            out_sizes.append(size)
            for st, s in zip(out_strides, stride_sets):
                st.append(s[i])
    if not out_sizes:
        return [1], [[1] for _ in stride_sets]
    return out_sizes, out_strides


def dense_strides(sizes, order) -> list[int]:
    """Strides of a dense layout of ``sizes`` whose dims, outermost first, are ``order`` (others size 1)."""
    strides = [1] * len(sizes)
    acc = 1
    for d in reversed(order):
        strides[d] = acc
        acc *= sizes[d]
    # size-1 dims: the stride of the next-inner dim times its size, like torch's contiguous strides
    for d in range(len(sizes) - 1, -1, -1):
        if sizes[d] == 1:
            strides[d] = strides[d + 1] * sizes[d + 1] if d + 1 < len(sizes) else 1
    return strides


def _contiguous_strides(sizes) -> list[int]:
    strides, acc = [], 1
    for size in reversed(sizes):
        strides.append(acc)
        acc *= size
    return strides[::-1]


def out_row_strides(x: torch.Tensor) -> list[int]:
    """Strides of the trailing dims of ``gather_rows(x, ...)``'s output (row stride: their product): ``x``'s
    row layout when its rows are dense runs (channels_last stays channels_last), else contiguous. One rule for
    the Triton path, the torch path and the fake (meta) implementation of the op."""
    trail = list(x.shape[1:])
    contiguous = _contiguous_strides(trail)
    if list(x.stride()[1:]) == contiguous:  # the common case, decided without planning
        return contiguous
    order = memory_order(trail, x.stride()[1:])
    sizes, (strides,) = coalesce([trail[d] for d in order], [x.stride(d + 1) for d in order])
    if x.element_size() in _RAW_DTYPES and len(sizes) == 1 and strides[0] == 1:
        return dense_strides(trail, order)
    return contiguous


def empty_rows(x: torch.Tensor, n) -> torch.Tensor:
    """An uninitialised ``[n, *x.shape[1:]]`` tensor like ``x`` in the layout of :func:`out_row_strides`."""
    trail = list(x.shape[1:])
    row = 1
    for s in trail:
        row *= s
    return torch.empty_strided([n, *trail], [row, *out_row_strides(x)], dtype=x.dtype, device=x.device)


def in_row_layout(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``rows`` (gathered from ``x`` by torch) in the layout of :func:`out_row_strides` (a copy only when
    torch chose another layout)."""
    strides = out_row_strides(x)
    if all(st == want or sz == 1 for st, want, sz in zip(rows.stride()[1:], strides, rows.shape[1:])):
        return rows  # same layout (strides of size-1 dims do not matter)
    return empty_rows(x, rows.shape[0]).copy_(rows)


def raw_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` reinterpreted as same-width integers (copies move bits, not values); None if unsupported."""
    raw = _RAW_DTYPES.get(t.element_size())
    if raw is None:
        return None
    return t if t.dtype == raw else t.view(raw)


def tile_shape(R: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS): a ~16 KiB tile of whole rows when they fit, else column chunks."""
    block_cols = min(next_power_of_2(max(R, 1)), _MAX_COL_BYTES // element_size)
    block_rows = max(1, min(_MAX_BLOCK_ROWS, (_TILE_BYTES // element_size) // block_cols))
    return block_rows, block_cols


def rows_bytes(rows: int, row_elems: int, elem_size: int, index_size: int = 8) -> int:
    """Bytes a row-copy kernel moves for ``rows`` rows of ``row_elems`` elements: each row read once and
    written once; the index read once per column chunk of the program tile (:func:`tile_shape`)."""
    if rows == 0 or row_elems == 0:
        return 0
    _, block_cols = tile_shape(row_elems, elem_size)
    chunks = -(-row_elems // block_cols)
    return 2 * rows * row_elems * elem_size + rows * index_size * chunks


def tile_spec(label: str, fn, signature: dict, R: int, element_size: int) -> CompileSpec:
    """A row-copy kernel's representative launch for the compile report, tiled as :func:`tile_shape` tiles
    rows of ``R`` elements of ``element_size`` bytes."""
    block_rows, block_cols = tile_shape(R, element_size)
    return CompileSpec(label, fn, signature, {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols})


def check_index(index: torch.Tensor, name: str = "index") -> None:
    """Metadata checks of an index tensor (free on every device)."""
    if not isinstance(index, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D [n], got shape {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32, got {index.dtype}")


def check_index_values(index: torch.Tensor, bound: int, name: str = "index", padded: bool = False) -> None:
    """Range check, CPU tensors only (on CUDA it would be a host sync; the kernels mask instead). With
    ``padded``, ``-1`` (a padding slot) is allowed too."""
    if index.device.type == "cpu" and index.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < (-1 if padded else 0) or hi >= bound:
            allowed = f"-1 (padding) or [0, {bound})" if padded else f"[0, {bound})"
            raise ValueError(f"{name} values must be in {allowed}, got values in [{lo}, {hi}]")
