"""compact: Triton path (partition + gather_rows kernels, interpreter) and the torch reference, exact
equality, static capacity, host-sync accounting; and the ahead-of-time compile check of every
compaction kernel (partition, gather_rows, scatter_rows)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from adaexit.kernels import compact, compact_torch, host_sync_count, partition
from bench.kernel_cases import COMPACT_SIZES, KEEP_PATTERNS, capacities, make_keep, make_tensors

# shared with the GPU kit (bench/gpu_check.py)
SIZES = COMPACT_SIZES
PATTERNS = KEEP_PATTERNS


def naive(keep: torch.Tensor, tensors: list, capacity=None) -> list:
    """Independent oracle: boolean masking, padded by hand."""
    idx = torch.nonzero(keep).flatten()
    outs = [t[idx] for t in tensors]
    if capacity is None:
        return [idx, *outs]
    k = min(capacity, idx.numel())
    padded_idx = torch.full((capacity,), -1, dtype=torch.int64)
    padded_idx[:k] = idx[:k]
    padded = []
    for t, o in zip(tensors, outs):
        p = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype)
        p[:k] = o[:k]
        padded.append(p)
    return [padded_idx, *padded]


def assert_all_equal(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compact_torch_matches_naive(n, pattern):
    keep, tensors = make_keep(n, pattern), make_tensors(n)
    assert_all_equal(compact_torch(keep, *tensors), naive(keep, tensors))
    for capacity in capacities(n):
        assert_all_equal(compact_torch(keep, *tensors, capacity=capacity), naive(keep, tensors, capacity))


@pytest.mark.interpreter
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_compact_triton_matches_reference(triton_backend, n, pattern):
    keep, tensors = make_keep(n, pattern), make_tensors(n)
    assert_all_equal(compact(keep, *tensors), compact_torch(keep, *tensors))
    for capacity in capacities(n):
        assert_all_equal(compact(keep, *tensors, capacity=capacity), compact_torch(keep, *tensors, capacity=capacity))


@pytest.mark.interpreter
def test_compact_triton_multi_block(triton_backend):
    """More rows than the single-launch partition kernel takes (4096): the three-kernel path."""
    n = 5000
    keep = torch.rand(n) < 0.3
    x = torch.randn(n, 3)
    assert_all_equal(compact(keep, x), compact_torch(keep, x))
    assert_all_equal(compact(keep, x, capacity=1000), compact_torch(keep, x, capacity=1000))


def test_compact_capacity_semantics():
    keep = torch.tensor([True, False, True, True, False])
    x = torch.arange(5.0)[:, None] + 1
    kept_index, rows = compact(keep, x, capacity=5)
    assert kept_index.tolist() == [0, 2, 3, -1, -1]
    assert rows.flatten().tolist() == [1.0, 3.0, 4.0, 0.0, 0.0]
    kept_index, rows = compact(keep, x, capacity=2)  # overflow: the first rows in order are kept
    assert kept_index.tolist() == [0, 2]
    assert bool(keep.sum() > 2)  # how callers detect overflow, on the device
    kept_index, = compact(keep, capacity=0)
    assert kept_index.shape == (0,)


def test_compact_no_tensors_and_empty():
    keep = torch.tensor([False, True])
    (kept_index,) = compact(keep)
    assert kept_index.tolist() == [1]
    kept_index, x = compact(torch.zeros(0, dtype=torch.bool), torch.zeros(0, 7))
    assert kept_index.shape == (0,) and x.shape == (0, 7)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_host_syncs(backend, use_backend):
    """compact: exactly one sync (the kept count); static capacity: none; partition: none."""
    use_backend(backend)
    keep = torch.rand(64) < 0.5
    x, ids = torch.randn(64, 8), torch.arange(64)
    before = host_sync_count()
    compact(keep, x, ids)
    assert host_sync_count() - before == 1
    before = host_sync_count()
    compact(keep, x, ids, capacity=32)
    assert host_sync_count() - before == 0
    before = host_sync_count()
    partition(keep.long(), 2)
    assert host_sync_count() - before == 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compact_errors(backend, use_backend):
    use_backend(backend)
    keep = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="keep must be a 1-D bool tensor"):
        compact(keep.long(), torch.zeros(3))
    with pytest.raises(ValueError, match="keep must be a 1-D bool tensor"):
        compact(keep[None], torch.zeros(3))
    with pytest.raises(ValueError, match=r"tensors\[1\] must have 3 rows"):
        compact(keep, torch.zeros(3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"tensors\[0\] must have 3 rows"):
        compact(keep, torch.tensor(1.0))
    with pytest.raises(ValueError, match="capacity must be None or an int >= 0"):
        compact(keep, torch.zeros(3), capacity=-1)
    with pytest.raises(ValueError, match="capacity must be None or an int >= 0"):
        compact(keep, torch.zeros(3), capacity=2.0)


_COMPILE_SCRIPT = """
import json
from adaexit.kernels import _compile
from adaexit.kernels.ops import compact, gather_rows, partition, scatter_rows
results = []
for module in (partition, gather_rows, scatter_rows, compact):
    for spec in module.COMPILE_SPECS:
        for arch in _compile.TARGETS:
            r = _compile.compile_spec(spec, arch)
            results.append(dict(label=r.label, arch=r.arch, registers=r.registers, spills=r.spills, shared=r.shared))
print(json.dumps(results))
"""


@pytest.mark.compile
def test_compaction_kernels_compile_sm80_sm90():
    """Every COMPILE_SPECS launch of partition/gather_rows/scatter_rows compiles for sm_80 and sm_90 with
    zero spills. Runs in a subprocess: with TRITON_INTERPRET=1 (set by conftest) @triton.jit yields
    interpreter functions, which cannot be compiled."""
    pytest.importorskip("triton", reason="ahead-of-time compilation needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    labels = {r["label"] for r in results}
    assert any(label.startswith("partition") for label in labels)
    assert any(label.startswith("gather_rows") for label in labels)
    assert any(label.startswith("scatter_rows") for label in labels)
    assert {r["arch"] for r in results} == {80, 90}
    spilled = [r for r in results if r["spills"] != 0]
    assert not spilled, f"register spills: {spilled}"
    assert all(0 < r["registers"] <= 255 for r in results)
