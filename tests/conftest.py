"""Shared test setup.

The Triton interpreter is switched on before anything imports triton, so kernel tests run on CPU.
Kernel tests take the ``triton_backend`` fixture (``set_backend("triton")``) and carry the ``interpreter``
marker; everything else runs the torch path that CPU users get.

``--device cuda`` (with ``TRITON_INTERPRET=0``) runs the kernel test files (:data:`KERNEL_TESTS`) on a GPU
through the compiled kernels: there torch's default device is CUDA, so every tensor a test makes is a CUDA
tensor; tests of CPU-only behaviour carry the ``cpu_only`` marker and are skipped, with its reason.
``bench.gpu_check`` runs them that way.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One tolerance table per dtype (FlagGems' RESOLUTION idea), defined once beside the kernel case lists that
# the tests and the GPU kit share.
from bench.kernel_cases import ATOL_PER_SQRT_K, KERNEL_TESTS, RTOL, tolerance  # noqa: E402,F401


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device of the kernel tests (cuda: the compiled Triton kernels; run with TRITON_INTERPRET=0)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): behaviour that only CPU tensors have; skipped on --device cuda")
    if config.getoption("--device") == "cuda":
        from adaexit.kernels import interpreter_enabled

        if interpreter_enabled():
            raise pytest.UsageError("--device cuda tests the compiled kernels: run with TRITON_INTERPRET=0")
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device")


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """The device the kernel tests run on (``--device``; default cpu)."""
    return torch.device(pytestconfig.getoption("--device"))


@pytest.fixture(autouse=True)
def _kernel_test_device(request, device):
    """In the kernel test files on ``--device cuda``: CUDA as torch's default device; ``cpu_only`` tests skipped."""
    if device.type == "cpu" or request.path.name not in KERNEL_TESTS:
        yield
        return
    marker = request.node.get_closest_marker("cpu_only")
    if marker is not None:
        pytest.skip(f"CPU only: {marker.kwargs.get('reason') or (marker.args[0] if marker.args else '')}")
    with torch.device(device):
        yield


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
