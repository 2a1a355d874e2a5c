"""Stable k-way partition of a batch by route: ``partition(route, num_routes) -> (order, counts)``.

``order`` is a stable permutation that groups rows by route (all route-0 rows first, in their original
order, then route 1, ...); ``counts[r]`` rows go to route ``r``. Compaction is the two-route case
(:func:`adaexit.kernels.compact`). Neither the kernel nor the reference syncs with the host: ``counts``
stays on the device and callers that need sizes read them with :func:`adaexit.kernels._dispatch.to_host`.

Triton design (two passes, no cross-program spin-waits, so the interpreter's sequential execution
proves as much as a GPU run would):

* ``N <= _SINGLE_BLOCK``: one program does everything (:func:`_partition_single_kernel`), one launch.
* otherwise three launches:

  1. :func:`_partition_hist_kernel` - program ``b`` counts its ``_BLOCK`` routes into ``hist[b, :]``;
  2. :func:`_partition_scan_kernel` - one program: exclusive scan of ``hist`` over blocks, shifted by the
     route offsets (exclusive scan of the counts), giving ``base[b, r]``; writes ``counts``;
  3. :func:`_partition_scatter_kernel` - program ``b`` writes ``order[base[b, r] + rank] = i`` where
     ``rank`` is the row's rank among the block's route-``r`` rows (``tl.cumsum``).

``num_routes`` is a runtime integer (no recompilation per value): the kernels loop over routes, so
the work is O(N * num_routes) compares in registers, while memory traffic stays O(N) - fine for the
handful of routes a decision point has (exit / continue / a few later networks).

Validation: ``num_routes >= 1``; ``route`` 1-D integer (or bool, read as 0/1). Out-of-range route values
raise ``ValueError`` for CPU tensors. For CUDA tensors checking would need a host sync, so it is not done:
a row whose route is out of range is counted nowhere and its slot in ``order`` is left unwritten
(garbage) - callers own that invariant, as with ``torch`` indexing kernels.
"""

from __future__ import annotations

import torch

from .._compile import CompileSpec
from .._dispatch import count_launch, direct_call, use_triton
from .._triton import tl, triton

# Block sizes (the only compile-time constants). Module-level so tests can shrink them to reach the
# multi-block path with small, interpreter-friendly inputs.
_SINGLE_BLOCK = 4096  # largest N handled by the single-launch kernel
_BLOCK = 1024  # rows per program in the multi-block kernels
_SCAN_BLOCK = 1024  # blocks scanned per iteration by the scan kernel


@triton.jit
def _partition_single_kernel(route_ptr, order_ptr, counts_ptr, N, R, cap, BLOCK: tl.constexpr):
    """Whole partition in one program (N <= BLOCK).

    route_ptr: [N] integer routes (any int width; bool viewed as uint8).
    order_ptr: [N] int64 output permutation, or (``cap >= 0``, static capacity) [R, cap] int64, route r's
    rows in row r (slots past the route's count stay as the host filled them, -1; rows past cap dropped).
    counts_ptr: [R] int64 output counts.
    Bytes: reads N * sizeof(route); writes 8 * N + 8 * R.
    """
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    route = tl.load(route_ptr + offs, mask=mask, other=-1).to(tl.int32)
    per_route = cap >= 0
    dest = tl.zeros([BLOCK], dtype=tl.int32)
    keep = offs < 0  # rows of no route in range are written nowhere
    total = 0
    for r in range(0, R):
        hit = (route == r).to(tl.int32)
        rank = tl.cumsum(hit, axis=0)  # inclusive rank among route-r rows
        start = tl.where(per_route, r * cap, total)
        dest = tl.where(hit != 0, start + rank - 1, dest)
        keep = tl.where(hit != 0, mask & (~per_route | (rank - 1 < cap)), keep)
        n_r = tl.sum(hit, axis=0)
        tl.store(counts_ptr + r, n_r.to(tl.int64))
        total += n_r
    tl.store(order_ptr + dest, offs.to(tl.int64), mask=keep)


@triton.jit
def _partition_hist_kernel(route_ptr, hist_ptr, N, R, BLOCK: tl.constexpr):
    """Pass 1: per-block histogram.

    route_ptr: [N] integer routes. hist_ptr: [num_blocks, R] int32 (row-major), hist[b, r] = number of
    route-r rows among rows [b * BLOCK, (b + 1) * BLOCK).
    Bytes: reads N * sizeof(route); writes 4 * num_blocks * R.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    route = tl.load(route_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
    for r in range(0, R):
        n_r = tl.sum((route == r).to(tl.int32), axis=0)
        tl.store(hist_ptr + pid * R + r, n_r)


@triton.jit
def _partition_scan_kernel(hist_ptr, base_ptr, counts_ptr, num_blocks, R, cap, BLOCK: tl.constexpr):
    """Exclusive scan over blocks, in one program.

    hist_ptr: [num_blocks, R] int32 per-block counts. base_ptr: [num_blocks, R] int64 output,
    base[b, r] = (rows of routes < r, or ``r * cap`` with static capacity ``cap >= 0``) + (route-r rows in
    blocks < b). counts_ptr: [R] int64 output.
    Bytes: reads 4 * num_blocks * R; writes 8 * num_blocks * R + 8 * R.
    """
    total = tl.zeros([], dtype=tl.int64)  # rows of all routes before r
    for r in range(0, R):
        carry = tl.zeros([], dtype=tl.int64)  # route-r rows in earlier chunks of blocks
        start = tl.where(cap >= 0, r * cap, total)
        for b0 in range(0, num_blocks, BLOCK):
            b = b0 + tl.arange(0, BLOCK)
            m = b < num_blocks
            h = tl.load(hist_ptr + b.to(tl.int64) * R + r, mask=m, other=0).to(tl.int64)
            incl = tl.cumsum(h, axis=0)
            tl.store(base_ptr + b.to(tl.int64) * R + r, start + carry + incl - h, mask=m)
            carry += tl.sum(h, axis=0)
        tl.store(counts_ptr + r, carry)
        total += carry


@triton.jit
def _partition_scatter_kernel(route_ptr, base_ptr, order_ptr, N, R, cap, BLOCK: tl.constexpr):
    """Pass 2: every row writes its own index at its stable destination.

    route_ptr: [N] integer routes. base_ptr: [num_blocks, R] int64 from the scan.
    order_ptr: [N] int64 output, order[base[b, r] + rank_in_block] = row (static capacity ``cap >= 0``:
    [R, cap], rows whose place in their route is ``>= cap`` are dropped).
    Bytes: reads N * sizeof(route) + 8 * num_blocks * R; writes 8 * N (scattered by route, but each
    block's route-r rows land in one contiguous run).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    route = tl.load(route_ptr + offs, mask=mask, other=-1).to(tl.int32)
    per_route = cap >= 0
    dest = tl.zeros([BLOCK], dtype=tl.int64)
    keep = offs < 0  # rows of no route in range are written nowhere
    for r in range(0, R):
        hit = (route == r).to(tl.int32)
        rank = tl.cumsum(hit, axis=0)
        base = tl.load(base_ptr + pid * R + r)
        dest = tl.where(hit != 0, base + rank - 1, dest)
        keep = tl.where(hit != 0, mask & (~per_route | (base + rank - 1 - r * cap < cap)), keep)
    tl.store(order_ptr + dest, offs, mask=keep)


def _check(route: torch.Tensor, num_routes: int) -> None:
    """Metadata checks (free on every device)."""
    if isinstance(num_routes, bool) or not isinstance(num_routes, int) or num_routes < 1:
        raise ValueError(f"num_routes must be an int >= 1, got {num_routes!r}")
    if not isinstance(route, torch.Tensor):
        raise ValueError(f"route must be a torch.Tensor, got {type(route).__name__}")
    if route.dim() != 1:
        raise ValueError(f"route must be 1-D [N], got shape {tuple(route.shape)}")
    if route.is_floating_point() or route.is_complex():
        raise ValueError(f"route must be an integer (or bool) tensor, got {route.dtype}")


def _check_values(route: torch.Tensor, num_routes: int) -> None:
    """Range check of the route values; CPU tensors only (on CUDA it would be a host sync)."""
    if route.device.type == "cpu" and route.numel() > 0:
        values = route.view(torch.uint8) if route.dtype == torch.bool else route
        lo, hi = (int(v) for v in torch.aminmax(values))
        if lo < 0 or hi >= num_routes:
            raise ValueError(f"route values must be in [0, {num_routes}), got values in [{lo}, {hi}]")


def _check_capacity(capacity) -> None:
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"capacity must be None or an int >= 0, got {capacity!r}")


def _per_route(order: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[R, capacity]`` int64: row ``r`` lists route ``r``'s rows (``order[start_r : start_r + counts[r]]``),
    then ``-1`` padding; rows past ``capacity`` are dropped. Device ops only: no host sync."""
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(capacity, device=order.device)
    pos = starts[:, None] + slot[None, :]
    valid = slot[None, :] < counts[:, None]
    if order.numel() == 0:
        return torch.full((counts.shape[0], capacity), -1, dtype=torch.int64, device=order.device)
    return torch.where(valid, order[pos.clamp(max=order.numel() - 1)], -1)


def partition_torch(route: torch.Tensor, num_routes: int, *, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: stable sort of the routes; counts by ``bincount`` on the CPU, ``scatter_add_`` elsewhere
    (``bincount`` would sync to size its output); no host sync on any device."""
    _check(route, num_routes)
    _check_capacity(capacity)
    return _partition_reference(route, num_routes, capacity)


def _partition_reference(route: torch.Tensor, num_routes: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partition_torch` on checked arguments (the op's path: the public function checked them)."""
    keys = route.to(torch.int64)
    # no separate pass over the routes: on the CPU bincount (one op) rejects negative routes and larger ones
    # lengthen its output; elsewhere scatter_add_ bounds-checks them where it can
    try:
        if route.device.type == "cpu":
            counts = torch.bincount(keys, minlength=num_routes)
        else:
            counts = torch.zeros(num_routes, dtype=torch.int64, device=route.device)
            counts.scatter_add_(0, keys, torch.ones_like(keys))
    except RuntimeError:
        _check_values(route, num_routes)  # raises the ValueError
        raise
    if counts.shape[0] != num_routes:
        _check_values(route, num_routes)  # raises the ValueError
    order = torch.sort(keys, stable=True).indices
    return (order if capacity is None else _per_route(order, counts, capacity)), counts


def partition_triton(route: torch.Tensor, num_routes: int, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels (one launch up to ``_SINGLE_BLOCK`` rows, three above; with ``capacity`` the
    kernels write the ``[R, capacity]`` layout themselves, into a ``-1``-filled buffer)."""
    n = route.numel()
    device = route.device
    if capacity is None:
        order = torch.empty(n, dtype=torch.int64, device=device)
    else:
        order = torch.full((num_routes, capacity), -1, dtype=torch.int64, device=device)
    counts = torch.zeros(num_routes, dtype=torch.int64, device=device)
    cap = -1 if capacity is None else capacity
    if n == 0:
        return order, counts
    if route.dtype == torch.bool:
        route = route.view(torch.uint8)
    route = route.contiguous()
    if n <= _SINGLE_BLOCK:
        block = max(16, triton.next_power_of_2(n))
        count_launch("partition")
        _partition_single_kernel[(1,)](route, order, counts, n, num_routes, cap, BLOCK=block, num_warps=8 if block >= 2048 else 4)
        return order, counts
    num_blocks = triton.cdiv(n, _BLOCK)
    hist = torch.empty((num_blocks, num_routes), dtype=torch.int32, device=device)
    base = torch.empty((num_blocks, num_routes), dtype=torch.int64, device=device)
    count_launch("partition", 3)
    _partition_hist_kernel[(num_blocks,)](route, hist, n, num_routes, BLOCK=_BLOCK)
    scan_block = min(_SCAN_BLOCK, max(16, triton.next_power_of_2(num_blocks)))
    _partition_scan_kernel[(1,)](hist, base, counts, num_blocks, num_routes, cap, BLOCK=scan_block)
    _partition_scatter_kernel[(num_blocks,)](route, base, order, n, num_routes, cap, BLOCK=_BLOCK)
    return order, counts


def bytes_moved(route: torch.Tensor, num_routes: int, capacity: int | None = None) -> int:
    """The bytes-moved model of ``partition(route, num_routes, capacity=capacity)``. One block: read the
    routes, write ``order`` (8 B a row) and ``counts``. Several blocks: histogram (read the routes, write
    ``4*blocks*R``), scan (read ``4*blocks*R``, write ``8*blocks*R + 8*R``), scatter (read the routes and
    ``8*blocks*R``, write ``order``). ``capacity=c``: the ``[R, c]`` index filled with -1 first (``8*R*c``)."""
    n, r, size = route.numel(), num_routes, route.element_size()
    fill = 0 if capacity is None else 8 * r * capacity
    if n == 0:
        return fill
    if n <= _SINGLE_BLOCK:
        return fill + n * size + 8 * n + 8 * r
    nb = -(-n // _BLOCK)
    return fill + (n * size + 4 * nb * r) + (4 * nb * r + 8 * nb * r + 8 * r) + (n * size + 8 * nb * r + 8 * n)


# ---------------------------------------------------------------------------------------------
# The torch op ``torch.ops.adaexit.partition``: the Triton kernels and the reference behind one op
# ---------------------------------------------------------------------------------------------
def _partition_impl(route: torch.Tensor, num_routes: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(route.device):
        return _partition_reference(route, num_routes, capacity)
    _check_values(route, num_routes)
    return partition_triton(route, num_routes, capacity)


_partition_op = torch.library.custom_op("adaexit::partition", mutates_args=())(_partition_impl)


@_partition_op.register_fake
def _(route, num_routes, capacity):
    shape = (route.shape[0],) if capacity is None else (num_routes, capacity)
    return route.new_empty(shape, dtype=torch.int64), route.new_empty((num_routes,), dtype=torch.int64)


def partition(route: torch.Tensor, num_routes: int, *, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable partition of rows by ``route`` (the op ``torch.ops.adaexit.partition``).

    Args:
        route: [N] integer (or bool) tensor with values in ``[0, num_routes)``.
        num_routes: number of routes R >= 1 (a runtime value; no recompilation per R).
        capacity: ``None`` -> ``order`` is the flat permutation. An int ``c`` (static capacity, for the
            zero-sync mode) -> ``order`` is ``[R, c]``: row ``r`` holds route ``r``'s rows in order, then ``-1``
            padding (ready for ``gather_rows(..., padded=True)`` / ``scatter_rows(..., padded=True)``); a route
            with more than ``c`` rows keeps its first ``c`` (detect it on the device: ``counts > c``).

    Returns:
        ``(order, counts)``: ``order`` int64 [N] (or [R, c]), rows of route 0 (in original order), then
        route 1, ...; ``counts`` int64 [R] on ``route.device``. No host synchronisation.
    """
    _check(route, num_routes)
    _check_capacity(capacity)
    if direct_call(route):
        return _partition_impl(route, num_routes, capacity)
    return _partition_op(route, num_routes, capacity)


# Representative launches for the ahead-of-time compile report (kernels._compile).
_sig_1 = {"route_ptr": "*i64", "order_ptr": "*i64", "counts_ptr": "*i64", "N": "i32", "R": "i32", "cap": "i32"}
COMPILE_SPECS = [
    CompileSpec("partition_single[i64 route, 4096]", _partition_single_kernel, _sig_1, {"BLOCK": 4096}, num_warps=8),
    CompileSpec("partition_single[u8 route, 256]", _partition_single_kernel, {**_sig_1, "route_ptr": "*u8"}, {"BLOCK": 256}),
    CompileSpec(
        "partition_hist[i64 route]",
        _partition_hist_kernel,
        {"route_ptr": "*i64", "hist_ptr": "*i32", "N": "i32", "R": "i32"},
        {"BLOCK": _BLOCK},
    ),
    CompileSpec(
        "partition_scan",
        _partition_scan_kernel,
        {"hist_ptr": "*i32", "base_ptr": "*i64", "counts_ptr": "*i64", "num_blocks": "i32", "R": "i32", "cap": "i32"},
        {"BLOCK": _SCAN_BLOCK},
    ),
    CompileSpec(
        "partition_scatter[i64 route]",
        _partition_scatter_kernel,
        {"route_ptr": "*i64", "base_ptr": "*i64", "order_ptr": "*i64", "N": "i32", "R": "i32", "cap": "i32"},
        {"BLOCK": _BLOCK},
    ),
]
