"""gather_rows / scatter_rows: Triton kernels (interpreter) against ``x[index]`` / ``out[index] = src``."""

import pytest
import torch

from adaexit.kernels import _layout, gather_rows, gather_rows_torch, scatter_rows, scatter_rows_torch
from adaexit.kernels.ops import gather_rows as gather_mod
from adaexit.kernels.ops import scatter_rows as scatter_mod
from bench.kernel_cases import (
    INDEX_PATTERNS,
    LAYOUTS,
    MANY_ROW_BLOCK_SHAPES,
    ROW_DTYPES,
    SCATTER_INDEX_PATTERNS,
    SCATTER_PAIRS,
    rand,
    scatter_case,
)

DTYPES = ROW_DTYPES  # the case lists are shared with the GPU kit (bench/gpu_check.py)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("pattern", list(INDEX_PATTERNS))
def test_gather_rows_triton_layouts(triton_backend, layout, pattern):
    make, dense = LAYOUTS[layout]
    x = make(9, torch.float32)
    index = INDEX_PATTERNS[pattern](9)
    out = gather_rows(x, index)
    assert torch.equal(out, x[index])
    assert out.shape == (index.numel(), *x.shape[1:])
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif dense:
        assert out.stride()[1:] == tuple(s for s in x.stride()[1:])  # the row layout of x is kept
    else:
        assert out.is_contiguous()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["1d", "row345", "channels_last", "sliced_last"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gather_rows_triton_dtypes(triton_backend, dtype, layout, index_dtype):
    x = LAYOUTS[layout][0](11, dtype)
    index = torch.randint(0, 11, (13,), dtype=index_dtype)
    assert torch.equal(gather_rows(x, index), x[index])


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", MANY_ROW_BLOCK_SHAPES)
def test_gather_rows_triton_many_row_blocks(triton_backend, shape):
    """More rows than one tile (row tiles of 1024 / 512 / 64 rows for these shapes)."""
    x = rand(shape, torch.float32)
    index = torch.randperm(shape[0])
    assert torch.equal(gather_rows(x, index), x[index])


@pytest.mark.interpreter
def test_gather_rows_triton_small_tiles(triton_backend, monkeypatch):
    """Tiles smaller than a row: several column chunks, ragged last chunk, on both kernels."""
    monkeypatch.setattr(_layout, "_TILE_BYTES", 64)
    monkeypatch.setattr(_layout, "_MAX_COL_BYTES", 32)
    for x in (rand((10, 3, 4, 5), torch.float32), rand((10, 4, 8), torch.float16)[..., :7]):
        index = torch.randint(0, 10, (17,))
        assert torch.equal(gather_rows(x, index), x[index])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gather_rows_torch_reference(layout):
    x = LAYOUTS[layout][0](9, torch.float32)
    index = torch.randint(0, 9, (12,))
    assert torch.equal(gather_rows_torch(x, index), x[index])
    assert torch.equal(gather_rows(x, index), x[index])  # CPU default: the reference


@pytest.mark.interpreter
@pytest.mark.parametrize("out_layout,src_layout", SCATTER_PAIRS)
@pytest.mark.parametrize("pattern", SCATTER_INDEX_PATTERNS)
def test_scatter_rows_triton_layouts(triton_backend, out_layout, src_layout, pattern):
    index = INDEX_PATTERNS[pattern](9)
    out, src = scatter_case(out_layout, src_layout, 9, index)
    if src.shape[1:] != out.shape[1:]:  # e.g. cls_token rows are (5,), row5 rows are (5,)
        pytest.skip("layouts with different row shapes")
    expected = out.clone()
    expected[index] = src
    result = scatter_rows(out, index, src)
    assert result is out
    assert torch.equal(out, expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["1d", "row345", "channels_last", "sliced_last"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_scatter_rows_triton_dtypes(triton_backend, dtype, layout, index_dtype):
    index = torch.randperm(11)[:6].to(index_dtype)
    out, src = scatter_case(layout, layout, 11, index, dtype)
    expected = out.clone()
    expected[index] = src
    assert torch.equal(scatter_rows(out, index, src), expected)


@pytest.mark.interpreter
def test_scatter_rows_triton_many_row_blocks(triton_backend):
    out = torch.zeros(1500, dtype=torch.int64)
    index = torch.randperm(1500)[:1100]
    src = torch.arange(1100)
    expected = out.clone()
    expected[index] = src
    assert torch.equal(scatter_rows(out, index, src), expected)


@pytest.mark.parametrize("out_layout,src_layout", SCATTER_PAIRS)
def test_scatter_rows_torch_reference(out_layout, src_layout):
    index = torch.randperm(9)[:5]
    out, src = scatter_case(out_layout, src_layout, 9, index)
    expected = out.clone()
    expected[index] = src
    assert torch.equal(scatter_rows_torch(out.clone(), index, src), expected)
    assert torch.equal(scatter_rows(out, index, src), expected)


def test_gather_then_scatter_roundtrip():
    x = rand((20, 3, 4, 5), torch.float32).to(memory_format=torch.channels_last)
    index = torch.randperm(20)
    out = torch.empty_like(x)
    assert torch.equal(scatter_rows(out, index, gather_rows(x, index)), x)


@pytest.mark.cpu_only(reason="index / route values are checked on CPU tensors only (a check on CUDA would sync)")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_gather_rows_errors(backend, use_backend):
    use_backend(backend)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"index values must be in \[0, 5\)"):
        gather_rows(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"index values must be in \[0, 5\)"):
        gather_rows(x, torch.tensor([-1]))
    with pytest.raises(ValueError, match="index must be 1-D"):
        gather_rows(x, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="index must be int64 or int32"):
        gather_rows(x, torch.zeros(2))
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        gather_rows(torch.tensor(1.0), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"index values must be in \[0, 0\)"):
        gather_rows(torch.zeros(0, 3), torch.tensor([0]))


@pytest.mark.cpu_only(reason="index / route values are checked on CPU tensors only (a check on CUDA would sync)")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_scatter_rows_errors(backend, use_backend):
    use_backend(backend)
    out = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="src must have shape"):
        scatter_rows(out, torch.tensor([0, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="src must have shape"):
        scatter_rows(out, torch.tensor([0, 1]), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="index must be 1-D with src.shape"):
        scatter_rows(out, torch.tensor([0, 1, 2]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="src dtype"):
        scatter_rows(out, torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"index values must be in \[0, 5\)"):
        scatter_rows(out, torch.tensor([0, 7]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="overlapping"):
        scatter_rows(torch.zeros(1, 3).expand(5, 3), torch.tensor([0, 1]), torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(5, 3))  # nothing written by a rejected call


class _Spy:
    """Stands in for a @triton.jit kernel: records launches, then forwards them."""

    def __init__(self, kernel, calls, name):
        self.kernel, self.calls, self.name = kernel, calls, name

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]


def _spy_kernels(monkeypatch, module, names):
    calls = []
    for name in names:
        monkeypatch.setattr(module, name, _Spy(getattr(module, name), calls, name))
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gather_rows_kernel_choice(triton_backend, monkeypatch, layout):
    """Dense rows take the contiguous-run kernel; strided rows the strided one (or the documented fallback)."""
    calls = _spy_kernels(monkeypatch, gather_mod, ["_gather_rows_kernel", "_gather_rows_strided_kernel"])
    make, dense = LAYOUTS[layout]
    x = make(6, torch.float32)
    gather_rows(x, torch.tensor([1, 0]))
    expected = "_gather_rows_kernel" if dense or layout == "four_strided_dims" else "_gather_rows_strided_kernel"
    assert calls == [expected]


@pytest.mark.interpreter
@pytest.mark.parametrize("out_layout,src_layout", SCATTER_PAIRS)
def test_scatter_rows_kernel_choice(triton_backend, monkeypatch, out_layout, src_layout):
    calls = _spy_kernels(monkeypatch, scatter_mod, ["_scatter_rows_kernel", "_scatter_rows_strided_kernel"])
    index = torch.tensor([1, 0])
    out, src = scatter_case(out_layout, src_layout, 6, index)
    scatter_rows(out, index, src)
    same_dense = out_layout == src_layout and LAYOUTS[out_layout][1]
    if out_layout == "four_strided_dims":
        assert calls == []  # torch fallback
    elif same_dense or (out_layout, src_layout) in {("cls_token", "row5"), ("row5", "cls_token")}:
        assert calls == ["_scatter_rows_kernel"]
    else:
        assert calls == ["_scatter_rows_strided_kernel"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("layout", ["1d", "row345", "channels_last", "sliced_last"])
def test_padded_index(backend, layout, use_backend):
    """``padded=True``: index -1 marks a padding slot (the zero-sync mode's static-capacity buffers): gather
    writes a zero row there, scatter skips it; other values are checked as usual."""
    use_backend(backend)
    x = LAYOUTS[layout][0](7, torch.float32)
    index = torch.tensor([3, -1, 0, 6, -1])
    got = gather_rows(x, index, padded=True)
    want = x[index.clamp(min=0)].clone()
    want[index < 0] = 0
    assert torch.equal(got, want)
    out, src = scatter_case(layout, layout, 7, torch.tensor([3, 5, 0, 6, 1]))
    expected = out.clone()
    expected[index[index >= 0]] = src[index >= 0]
    assert scatter_rows(out, index, src, padded=True) is out
    assert torch.equal(out, expected)


@pytest.mark.cpu_only(reason="index / route values are checked on CPU tensors only (a check on CUDA would sync)")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_padded_index_errors(backend, use_backend):
    use_backend(backend)
    x, out, src = torch.randn(7, 3), torch.zeros(7, 3), torch.randn(5, 3)
    index = torch.tensor([3, -1, 0, 6, -1])
    with pytest.raises(ValueError, match=r"index values must be in \[0, 7\)"):
        gather_rows(x, index)  # -1 without padded=True is an error, as before
    with pytest.raises(ValueError, match=r"-1 \(padding\) or \[0, 7\)"):
        gather_rows(x, torch.tensor([-2, 0]), padded=True)
    with pytest.raises(ValueError, match=r"-1 \(padding\) or \[0, 7\)"):
        scatter_rows(out, torch.tensor([0, 7]), src[:2], padded=True)
