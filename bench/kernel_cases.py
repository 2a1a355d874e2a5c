"""Kernel cases shared by the kernel tests (``tests/test_<op>.py``) and the GPU validation kit
(``bench/gpu_check.py``): the kit sweeps on a GPU what the tests sweep through the interpreter, from the
same lists, so neither can drift from the other.

Every maker takes a ``device`` (default ``None``: torch's default device, which the test suite's
``--device cuda`` sets to CUDA). Views (slices, ``h[:, 0]``, channels_last, expand) are taken *after* any
move, so the device tensor has the layout under test (``Tensor.to`` would make a sliced view contiguous).

Also here: :func:`check_exit_gate`, the exit gate's comparison rule (kernel vs reference), used by
``tests/test_exit_gate.py`` and the kit alike, and a copy of the tolerance table of ``tests/conftest.py``
for code outside the test suite (see :data:`RTOL`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from adaexit.kernels import exit_gate, exit_gate_torch
from adaexit.kernels.ops import partition as _partition_mod

# ----------------------------------------------------------------------------------------------------
# Tolerances
#
# One row per dtype, atol scaled with the reduction length; ``tests/conftest.py`` and the GPU kit import it.
RTOL = {torch.float32: 1.3e-6 * 10, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
ATOL_PER_SQRT_K = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


# The kernel test files: conftest switches them to ``--device``; the GPU kit runs them on CUDA.
KERNEL_TESTS = ("test_exit_gate.py", "test_partition.py", "test_gather_scatter.py", "test_compact.py", "test_torch_ops.py")


def tolerance(dtype: torch.dtype, reduction_length: int = 1) -> dict:
    """``assert_close`` keyword arguments for a result of a ``reduction_length``-term sum in ``dtype``."""
    return {"rtol": RTOL[dtype], "atol": ATOL_PER_SQRT_K[dtype] * max(1, reduction_length) ** 0.5}


# ----------------------------------------------------------------------------------------------------
# exit_gate

GATE = torch.tensor([2.0, 1.0, 3.0, -3.0])  # the learned criterion's 4 gate weights in the cases
FP32_UNIT_ROUNDOFF = 2.0**-24  # u: fp32 rounds to nearest with relative error <= 2^-24

#: (N, D, K): odd sizes, N across block boundaries (BLOCK_N = 16), K across class tiles (64).
EXIT_GATE_SHAPES_2D = [
    (1, 3, 2),
    (7, 33, 10),
    (70, 33, 17),
    (7, 300, 10),
    (16, 3, 17),
    (17, 64, 2),
    (7, 33, 1000),
    (33, 300, 130),
]

#: (h shape, K) with spatial dims. K > 64 (one class tile) with spatial h is the kernel's scratch path.
EXIT_GATE_SPATIAL = [
    ((7, 12, 5, 3), 10),  # [N, C, H, W], one class tile: pooled on the fly
    ((5, 12, 3, 3), 100),  # several class tiles: pooled once into the fp32 scratch
    ((18, 33, 7), 17),  # [N, C, L]
    ((3, 8, 2, 3, 2), 10),  # [N, C, D, H, W]
    ((4, 6, 1, 1), 2),  # 1x1 spatial: treated as 2D
    ((2, 5, 70), 3),  # S larger than one BLOCK_S
]

#: name -> maker(device) of a strided 2-D ``h`` with 40 features.
EXIT_GATE_STRIDED = {
    "cls_token": lambda device=None: torch.randn(11, 9, 40).to(device)[:, 0],  # CLS token of [N, L, D]
    "transposed": lambda device=None: torch.randn(40, 11).to(device).t(),
    "sliced_cols": lambda device=None: torch.randn(11, 80).to(device)[:, ::2],
    "sliced_rows": lambda device=None: torch.randn(30, 40).to(device)[3:25:2],
    "expanded": lambda device=None: torch.randn(1, 40).to(device).expand(11, 40),  # stride 0
}

#: ``h`` shapes for ``weight=None`` (``h`` holds the logits): 2D, 2D over several class tiles, spatial.
EXIT_GATE_WEIGHT_NONE = [(9, 12), (9, 300), (9, 40, 3), (4, 100, 2, 2)]
EXIT_GATE_WEIGHT_NONE_IDS = ["2d", "2d_multitile", "spatial", "spatial_multitile"]

#: (h shape, K or None) for rows with NaN / +Inf / -Inf features (rows 1, 4, 6): they must never exit.
EXIT_GATE_NONFINITE = [((8, 10), 10), ((8, 10), 100), ((8, 10, 3), 100), ((8, 70), None)]
NONFINITE_ROWS = (1, 4, 6)


def gate_for(criterion: str):
    return GATE if criterion == "learned" else None


def nonfinite_h(shape, device=None) -> torch.Tensor:
    """Random ``h`` with a NaN in row 1, +Inf in row 4 and -Inf in row 6 (:data:`NONFINITE_ROWS`)."""
    h = torch.randn(shape)
    h[1].view(-1)[3] = float("nan")
    h[4].view(-1)[0] = float("inf")
    h[6].view(-1)[-1] = float("-inf")
    return h.to(device)


def summed_magnitude(h, weight, bias) -> float:
    """The largest finite ``sum |terms|`` behind one logit: ``|h|`` pooled, then ``@ |weight|^T + |bias|``."""
    a = h.double().abs()
    if a.dim() > 2:
        a = a.flatten(2).mean(dim=2)
    if weight is not None:
        a = a @ weight.double().abs().T
        if bias is not None:
            a = a + bias.double().abs()
    a = a[torch.isfinite(a)]
    return float(a.max()) if a.numel() else 0.0


def check_exit_gate(
    h, weight, bias=None, criterion="maxprob", threshold=None, gate=None, nonfinite_rows=(), tolerance=tolerance
):
    """Run kernel and reference on the same tensors; compare logits, scores and (away from ties) the exit
    mask. Raises ``AssertionError`` on a mismatch; returns ``(kernel outputs, reference outputs)``.

    ``exit_gate`` dispatches as configured (``ADAEXIT_BACKEND``): the caller makes sure it is the Triton
    kernel. ``tolerance`` is the tolerance table's function (the tests pass conftest's).

    Tolerances. A logit is an fp32 sum of ``n <= D*S`` terms (pooling, then the dot product), and the two
    implementations order that sum differently (the kernel's tiles vs the BLAS behind ``F.linear``). The
    rounding error of such a sum scales with the magnitude of its *terms*, not of its result: each
    implementation is off by about ``sqrt(n) * u * sum|terms|`` (u = 2^-24; the probabilistic bound of
    Higham & Mary, 2019 -- the worst case is ``n * u * sum|terms|``), so the two differ by up to twice that.
    The logits' atol is that bound, ``2 * sqrt(n) * u * max sum|terms|``, or the table's ``tolerance(fp32, n)``
    where that is larger. For inputs of order one the table's atol is the larger (every test case but
    ``test_large_logits_stable``), so only large-magnitude inputs -- logits ~1e4 that cancel to ~1 and differ
    by ~1e-3 -- get a wider atol. Both implementations compute in fp32 from exactly converted inputs
    (fp16/bf16 included), so the fp32 row of the table applies to every input dtype.

    Scores: the kernel's scores must match the reference's scores *of the kernel's own logits* to the
    table's tolerance for a K-term softmax, which checks the score stage tightly at any magnitude. Against
    the reference's scores, a logit error ``delta`` moves a score by about ``delta`` at most (a softmax
    probability by ``<= delta / 2``), so that comparison and the exit mask's tie band use the logits' atol.
    """
    if gate is None:
        gate = gate_for(criterion)
    ref_logits, ref_score, _ = exit_gate_torch(h, weight, bias, criterion=criterion, threshold=0.0, gate=gate)
    if threshold is None:  # split the batch: about half the rows exit
        finite = ref_score[torch.isfinite(ref_score)]
        threshold = float(finite.median()) if finite.numel() else 0.5
    ref = exit_gate_torch(h, weight, bias, criterion=criterion, threshold=threshold, gate=gate)
    out = exit_gate(h, weight, bias, criterion=criterion, threshold=threshold, gate=gate)
    N = h.shape[0]
    K = ref[0].shape[1]
    length = h.shape[1] * max(1, math.prod(h.shape[2:]))
    assert out[0].shape == (N, K) and out[0].dtype == torch.float32
    assert out[1].shape == (N,) and out[1].dtype == torch.float32
    assert out[2].shape == (N,) and out[2].dtype == torch.bool
    table = tolerance(torch.float32, length)
    rounding = 2 * math.sqrt(length) * FP32_UNIT_ROUNDOFF * summed_magnitude(h, weight, bias)
    tol = dict(table, atol=max(table["atol"], rounding))
    torch.testing.assert_close(out[0], ref[0], equal_nan=True, **tol)
    own = exit_gate_torch(out[0], None, criterion=criterion, threshold=threshold, gate=gate)
    torch.testing.assert_close(out[1], own[1], equal_nan=True, **tolerance(torch.float32, K))
    torch.testing.assert_close(out[1], ref[1], equal_nan=True, **tol)
    score = ref[1]
    assert ((score >= 0) & (score <= 1) | score.isnan()).all()
    assert (out[1].isnan() == score.isnan()).all()
    assert not out[2][out[1].isnan()].any(), "a NaN score exited"
    away = (score - threshold).abs() > tol["atol"] + tol["rtol"] * abs(threshold)
    assert torch.equal(out[2][away], ref[2][away])
    for r in nonfinite_rows:
        assert out[1][r].isnan() and not out[2][r]
    return out, ref


# ----------------------------------------------------------------------------------------------------
# partition

PARTITION_SIZES = [0, 1, 7, 33, 100, 4097]  # 4097 > one block of the single-launch kernel (4096)
NUM_ROUTES = [1, 2, 3, 5]
ROUTE_PATTERNS = ["random", "all_last", "alternating", "all_but_one", "descending"]
ROUTE_DTYPES = [torch.int32, torch.uint8, torch.int16, torch.bool]

#: Block sizes that send small N through the multi-block (histogram, scan, scatter) kernels: 100 rows
#: -> 7 blocks -> 2 scan chunks.
TINY_PARTITION_BLOCKS = {"_SINGLE_BLOCK": 16, "_BLOCK": 16, "_SCAN_BLOCK": 4}


def make_route(n: int, r: int, pattern: str, dtype=torch.int64, device=None) -> torch.Tensor:
    if pattern == "random":
        route = torch.randint(0, r, (n,))
    elif pattern == "all_last":
        route = torch.full((n,), r - 1)
    elif pattern == "alternating":
        route = torch.arange(n) % r
    elif pattern == "all_but_one":
        route = torch.zeros(n, dtype=torch.int64)
        if n:
            route[n // 2] = r - 1
    elif pattern == "descending":
        route = (r - 1 - torch.arange(n) * r // max(n, 1)).clamp(0, r - 1)
    else:
        raise ValueError(f"unknown route pattern {pattern!r}; choose from {ROUTE_PATTERNS}")
    return route.to(dtype).to(device)


@contextmanager
def partition_blocks(blocks: dict | None):
    """Run with the partition module's block sizes replaced by ``blocks`` (e.g. :data:`TINY_PARTITION_BLOCKS`;
    ``None`` keeps the defaults); restored afterwards."""
    saved = {name: getattr(_partition_mod, name) for name in (blocks or {})}
    try:
        for name, value in (blocks or {}).items():
            setattr(_partition_mod, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(_partition_mod, name, value)


# ----------------------------------------------------------------------------------------------------
# gather_rows / scatter_rows

ROW_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]


def rand(shape, dtype, device=None) -> torch.Tensor:
    """Values that survive the cast to any dtype (bf16 too: copies move bits, no arithmetic involved)."""
    if dtype == torch.bool:
        return (torch.rand(shape) < 0.5).to(device)
    return (torch.randn(shape) * 100).to(dtype).to(device)


#: name -> (maker(M, dtype, device=None) of a source ``[M, ...]`` with the layout under test, rows dense in
#: memory?)
LAYOUTS = {
    "1d": (lambda m, dt, device=None: rand((m,), dt, device), True),
    "row5": (lambda m, dt, device=None: rand((m, 5), dt, device), True),
    "row345": (lambda m, dt, device=None: rand((m, 3, 4, 5), dt, device), True),
    "channels_last": (
        lambda m, dt, device=None: rand((m, 3, 4, 5), dt, device).to(memory_format=torch.channels_last),
        True,
    ),
    "transposed": (lambda m, dt, device=None: rand((m, 5, 4), dt, device).transpose(1, 2), True),
    # h[:, 0]: dense rows, row stride 30
    "cls_token": (lambda m, dt, device=None: rand((m, 6, 5), dt, device)[:, 0], True),
    "sliced_last": (lambda m, dt, device=None: rand((m, 4, 8), dt, device)[..., :5], False),
    "stepped": (lambda m, dt, device=None: rand((m, 3, 6, 5), dt, device)[:, :, ::2, 1:], False),
    "channels_last_sliced": (
        lambda m, dt, device=None: rand((m, 4, 3, 5), dt, device).to(memory_format=torch.channels_last)[:, :2],
        False,
    ),
    "expanded": (lambda m, dt, device=None: rand((m, 1, 5), dt, device).expand(m, 4, 5), False),
    # more than 3 strided dims: the .contiguous() fallback
    "four_strided_dims": (
        lambda m, dt, device=None: rand((m, 4, 4, 4, 4), dt, device)[:, ::2, ::2, ::2, ::2],
        False,
    ),
    "wide": (lambda m, dt, device=None: rand((m, 1500), dt, device), True),  # > one column chunk for fp32
}

#: name -> maker(M, device=None) of an int64 row index into M rows.
INDEX_PATTERNS = {
    "empty": lambda m, device=None: torch.zeros(0, dtype=torch.int64, device=device),
    "single": lambda m, device=None: torch.tensor([m - 1], device=device),
    "reversed": lambda m, device=None: torch.arange(m - 1, -1, -1, device=device),
    "random_repeats": lambda m, device=None: torch.randint(0, m, (2 * m + 1,)).to(device),
    "every_other": lambda m, device=None: torch.arange(0, m, 2, device=device),
}

#: (out layout, src layout) pairs for scatter_rows.
SCATTER_PAIRS = [
    ("1d", "1d"),
    ("row5", "row5"),
    ("row345", "row345"),
    ("channels_last", "channels_last"),
    ("channels_last", "row345"),  # mixed layouts: strided kernel
    ("row345", "channels_last"),
    ("transposed", "transposed"),
    ("cls_token", "row5"),
    ("sliced_last", "sliced_last"),
    ("row5", "cls_token"),
    ("stepped", "stepped"),
    ("four_strided_dims", "four_strided_dims"),  # torch fallback
    ("wide", "wide"),
]
#: index patterns for scatter_rows (its indices must not repeat).
SCATTER_INDEX_PATTERNS = ["empty", "single", "reversed", "every_other"]

#: Sources with more rows than one row tile (row tiles of 1024 / 512 / 64 rows for these shapes).
MANY_ROW_BLOCK_SHAPES = [(1200,), (700, 5), (70, 3, 4, 5)]


def scatter_case(out_layout: str, src_layout: str, m: int, index: torch.Tensor, dtype=torch.float32, device=None):
    """``(out, src)`` for ``scatter_rows(out, index, src)`` with the given layouts."""
    n = index.numel()
    out = LAYOUTS[out_layout][0](m, dtype, device)
    src = LAYOUTS[src_layout][0](n, dtype, device)
    return out, src


# ----------------------------------------------------------------------------------------------------
# compact

COMPACT_SIZES = [0, 1, 7, 33, 300]
KEEP_PATTERNS = ["random", "all", "none", "alternating", "all_but_one", "only_one"]


def make_keep(n: int, pattern: str, device=None) -> torch.Tensor:
    i = torch.arange(n)
    keep = {
        "random": torch.rand(n) < 0.5,  # drawn for every pattern, as the tests always have
        "all": torch.ones(n, dtype=torch.bool),
        "none": torch.zeros(n, dtype=torch.bool),
        "alternating": i % 2 == 0,
        "all_but_one": i != n // 2,
        "only_one": i == n - 1,
    }[pattern]
    return keep.to(device)


def make_tensors(n: int, device=None) -> list:
    """Per-example tensors that travel with a batch: activations, ids, masks, fp16 features, images."""
    return [
        torch.randn(n, 5).to(device),
        (torch.arange(n) * 3).to(device),
        (torch.rand(n, 4) < 0.5).to(device),
        torch.randn(n, 6).half().to(device),
        torch.randn(n, 3, 2, 2).to(device).to(memory_format=torch.channels_last),
        torch.randn(n, 4, 6).to(device)[:, 0],  # CLS-token view
    ]


def capacities(n: int) -> list:
    """Static capacities to try for ``n`` rows: none, a third, exactly ``n``, more than ``n``."""
    return sorted({0, max(n // 3, 1), n, n + 4})
