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

# One tolerance table per dtype (FlagGems' RESOLUTION idea), defined once beside the kernel case lists that
# the tests and the GPU kit share.
from bench.kernel_cases import ATOL_PER_SQRT_K, RTOL, tolerance  # noqa: E402,F401


@pytest.fixture
def triton_backend():
    """Run adaexit.kernels through the Triton kernels (the interpreter, on CPU)."""
    pytest.importorskip("triton", reason="the Triton kernels need triton installed")
    from adaexit.kernels import set_backend

    with set_backend("triton"):
        yield


@pytest.fixture
def torch_backend():
    """Run adaexit.kernels through the torch references."""
    from adaexit.kernels import set_backend

    with set_backend("torch"):
        yield


@pytest.fixture
def use_backend():
    """``use_backend(name)`` sets the kernel backend ("auto", "torch", "triton") for the rest of the test; the
    previous one is restored afterwards."""
    from adaexit.kernels import set_backend

    switches = []
    yield lambda name: switches.append(set_backend(name))
    for switch in reversed(switches):
        switch.__exit__()


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed every test; run it on one intra-op thread. Tiny test models are dominated by per-op
    overhead, and on a shared 2-core machine two threads make them ~30x slower, not faster. Set per
    test because benchmark scripts under test change the thread count (bench/ chooses its own)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
