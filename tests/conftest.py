"""Shared test setup.

The Triton interpreter is switched on before anything imports triton, so kernel tests run on CPU.
Kernel tests take the ``triton_backend`` fixture (sets ``ADAEXIT_BACKEND=triton``) and carry the
``interpreter`` marker; everything else runs the torch path that CPU users get.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One tolerance table per dtype (FlagGems' RESOLUTION idea): relative tolerance, and an absolute
# tolerance per unit of reduction length (atol = ATOL_PER_SQRT_K[dtype] * sqrt(K) for a K-term sum).
RTOL = {torch.float32: 1.3e-6 * 10, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
ATOL_PER_SQRT_K = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def tolerance(dtype: torch.dtype, reduction_length: int = 1) -> dict:
    """``assert_close`` keyword arguments for a result of a ``reduction_length``-term sum in ``dtype``."""
    return {"rtol": RTOL[dtype], "atol": ATOL_PER_SQRT_K[dtype] * max(1, reduction_length) ** 0.5}


@pytest.fixture
def triton_backend(monkeypatch):
    """Run adaexit.kernels through the Triton kernels (the interpreter, on CPU)."""
    pytest.importorskip("triton", reason="the Triton kernels need triton installed")
    monkeypatch.setenv("ADAEXIT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    """Run adaexit.kernels through the torch references."""
    monkeypatch.setenv("ADAEXIT_BACKEND", "torch")
    yield


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed every test; run it on one intra-op thread. Tiny test models are dominated by per-op
    overhead, and on a shared 2-core machine two threads make them ~30x slower, not faster. Set per
    test because benchmark scripts under test change the thread count (bench/ chooses its own)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
