"""partition: Triton kernels (interpreter) and the torch reference, exact equality and properties."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaexit.kernels import host_sync_count, partition, partition_torch, set_backend
from adaexit.kernels.ops import partition as partition_mod
from bench.kernel_cases import (
    NUM_ROUTES,
    PARTITION_SIZES,
    ROUTE_DTYPES,
    ROUTE_PATTERNS,
    TINY_PARTITION_BLOCKS,
    make_route,
)

# shared with the GPU kit (bench/gpu_check.py)
SIZES = PARTITION_SIZES  # 4097 > one block of the single-launch kernel (4096)
PATTERNS = ROUTE_PATTERNS


def check_properties(route: torch.Tensor, num_routes: int, order: torch.Tensor, counts: torch.Tensor) -> None:
    n = route.numel()
    assert order.dtype == torch.int64 and counts.dtype == torch.int64
    assert order.shape == (n,) and counts.shape == (num_routes,)
    assert torch.equal(torch.sort(order).values, torch.arange(n))  # a permutation
    grouped = route.long()[order]
    assert torch.all(grouped[1:] >= grouped[:-1])  # grouped by route, in route order
    same = grouped[1:] == grouped[:-1]
    assert torch.all(order[1:][same] > order[:-1][same])  # stable within a route
    assert torch.equal(counts, torch.bincount(route.long(), minlength=num_routes))
    assert int(counts.sum()) == n


@pytest.fixture(params=["default_blocks", "tiny_blocks"])
def blocks(request, monkeypatch):
    """tiny_blocks sends small N through the multi-block (histogram, scan, scatter) kernels."""
    if request.param == "tiny_blocks":
        for name, value in TINY_PARTITION_BLOCKS.items():  # 100 rows -> 7 blocks -> 2 scan chunks
            monkeypatch.setattr(partition_mod, name, value)
    return request.param


@pytest.mark.interpreter
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("num_routes", NUM_ROUTES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_partition_triton_matches_reference(triton_backend, blocks, n, num_routes, pattern):
    if blocks == "tiny_blocks" and n > 100:
        pytest.skip("tiny blocks: 100 rows already cover 7 blocks and 2 scan chunks")
    if pattern != "random" and n > 100 and num_routes not in (2, 5):
        pytest.skip("large adversarial sizes: two route counts suffice (interpreter time)")
    route = make_route(n, num_routes, pattern)
    order, counts = partition(route, num_routes)
    ref_order, ref_counts = partition_torch(route, num_routes)
    assert torch.equal(order, ref_order)
    assert torch.equal(counts, ref_counts)
    assert counts.device == route.device


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", ROUTE_DTYPES)
def test_partition_triton_route_dtypes(triton_backend, blocks, dtype):
    route = make_route(100, 2, "random", dtype)
    order, counts = partition(route, 2)
    ref_order, ref_counts = partition_torch(route, 2)
    assert torch.equal(order, ref_order) and torch.equal(counts, ref_counts)


@pytest.mark.interpreter
def test_partition_triton_non_contiguous_route(triton_backend):
    route = torch.randint(0, 3, (200,))[::2]
    assert all(torch.equal(a, b) for a, b in zip(partition(route, 3), partition_torch(route, 3)))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("num_routes", NUM_ROUTES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_partition_torch_properties(n, num_routes, pattern):
    route = make_route(n, num_routes, pattern)
    check_properties(route, num_routes, *partition_torch(route, num_routes))


@given(data=st.data())
@settings(max_examples=100, deadline=None)
def test_partition_torch_property(data):
    num_routes = data.draw(st.integers(1, 8))
    values = data.draw(st.lists(st.integers(0, num_routes - 1), max_size=300))
    route = torch.tensor(values, dtype=torch.int64)
    check_properties(route, num_routes, *partition_torch(route, num_routes))


@pytest.mark.interpreter
@given(data=st.data())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_partition_triton_property(data):
    num_routes = data.draw(st.integers(1, 6))
    values = data.draw(st.lists(st.integers(0, num_routes - 1), max_size=200))
    block = data.draw(st.sampled_from([16, 32, 4096]))  # 16/32: multi-block path, 4096: single launch
    route = torch.tensor(values, dtype=torch.int64)
    with pytest.MonkeyPatch.context() as mp, set_backend("triton"):
        mp.setattr(partition_mod, "_SINGLE_BLOCK", block)
        mp.setattr(partition_mod, "_BLOCK", block)
        mp.setattr(partition_mod, "_SCAN_BLOCK", 4)
        order, counts = partition(route, num_routes)
    check_properties(route, num_routes, order, counts)
    ref_order, ref_counts = partition_torch(route, num_routes)
    assert torch.equal(order, ref_order) and torch.equal(counts, ref_counts)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_partition_makes_no_host_sync(backend, blocks, use_backend):
    use_backend(backend)
    route = make_route(100, 3, "random")
    before = host_sync_count()
    order, counts = partition(route, 3)
    assert host_sync_count() == before


@pytest.mark.cpu_only(reason="index / route values are checked on CPU tensors only (a check on CUDA would sync)")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_partition_errors(backend, use_backend):
    use_backend(backend)
    with pytest.raises(ValueError, match="num_routes"):
        partition(torch.zeros(3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="num_routes"):
        partition(torch.zeros(3, dtype=torch.int64), 2.0)
    with pytest.raises(ValueError, match="1-D"):
        partition(torch.zeros(2, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="integer"):
        partition(torch.zeros(3), 2)
    with pytest.raises(ValueError, match=r"route values must be in \[0, 3\)"):
        partition(torch.tensor([0, 3, 1]), 3)
    with pytest.raises(ValueError, match=r"route values must be in \[0, 3\)"):
        partition(torch.tensor([0, -1, 1]), 3)
    with pytest.raises(ValueError, match=r"route values must be in \[0, 1\)"):
        partition(torch.tensor([False, True]), 1)


@pytest.mark.cpu_only(reason="CPU tensors dispatch to the reference")
def test_partition_dispatches_to_reference_on_cpu(monkeypatch, use_backend):
    use_backend("auto")
    calls = []
    real = partition_mod._partition_reference  # (partition_torch's body, which the op calls: arguments checked once)
    monkeypatch.setattr(partition_mod, "_partition_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    partition(torch.tensor([1, 0, 1]), 2)
    assert calls == [1]


def test_partition_empty():
    order, counts = partition(torch.zeros(0, dtype=torch.int64), 4)
    assert order.shape == (0,) and order.dtype == torch.int64
    assert torch.equal(counts, torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("n, num_routes, capacity", [(0, 3, 4), (1, 2, 1), (37, 3, 40), (37, 3, 5), (100, 5, 0), (100, 2, 30)])
def test_partition_capacity(backend, n, num_routes, capacity, use_backend, blocks):
    """``capacity=c``: route r's rows (stable) in row r of an [R, c] matrix, -1 padding, overflow dropped;
    counts are the full counts; no host sync. tiny_blocks: the multi-block kernels write the layout."""
    use_backend(backend)
    route = make_route(n, num_routes, "random")
    before = host_sync_count()
    index, counts = partition(route, num_routes, capacity=capacity)
    assert host_sync_count() == before
    assert index.shape == (num_routes, capacity) and index.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(route.long(), minlength=num_routes))
    for r in range(num_routes):
        rows = torch.nonzero(route.long() == r).flatten()[:capacity]
        want = torch.full((capacity,), -1, dtype=torch.int64)
        want[: rows.numel()] = rows
        assert torch.equal(index[r], want), (r, index[r], want)


def test_partition_capacity_refused_by_name():
    with pytest.raises(ValueError, match="capacity must be None or an int >= 0"):
        partition(torch.zeros(3, dtype=torch.int64), 2, capacity=-1)
