"""Backend selection, launch counting and host-sync accounting shared by every op in ``adaexit.kernels``.

Backend rule (``ADAEXIT_BACKEND`` is read **once**, at import; :class:`set_backend` changes it afterwards):

* ``"torch"``  -> always the ``<op>_torch`` reference.
* ``"triton"`` -> always the Triton kernel; CPU tensors need ``TRITON_INTERPRET=1`` (also read once: triton
  decides at decoration time whether ``@triton.jit`` functions are interpreted).
* ``"auto"`` (unset) -> Triton for CUDA tensors, the torch reference for everything else.

Nothing here reads the environment per call: an op's dispatch costs a few attribute reads.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._triton import HAS_TRITON  # triton is a Linux-only dependency; the torch references work without it

BACKENDS = ("auto", "torch", "triton")


def _checked(backend: str, source: str) -> str:
    name = (backend or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not one of {BACKENDS}")
    return name


_BACKEND = _checked(os.environ.get("ADAEXIT_BACKEND", "auto"), "ADAEXIT_BACKEND")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET`` at import)."""
    return _INTERPRET


def requested_backend() -> str:
    """The backend asked for: ``"auto"``, ``"torch"`` or ``"triton"`` (see :class:`set_backend`)."""
    return _BACKEND


class set_backend:
    """Choose the kernel backend for every op: ``"auto"``, ``"torch"`` or ``"triton"``.

    A plain call sets it for the process; used as a context manager it restores the previous backend on
    exit (how tests switch)::

        set_backend("torch")            # from now on
        with set_backend("triton"):     # only inside the block
            ...

    The setting is process-wide (not per thread): a worker thread running ops sees the same backend.
    """

    def __init__(self, backend: str):
        global _BACKEND
        self.previous = _BACKEND
        _BACKEND = _checked(backend, "backend")

    def __enter__(self) -> "set_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _BACKEND
        _BACKEND = self.previous


def backend_for(device: torch.device | str) -> str:
    """The backend ("triton" or "torch") that ops use for tensors on ``device``."""
    if isinstance(device, str):
        device = torch.device(device)
    if _BACKEND == "torch":
        return "torch"
    if _BACKEND == "triton":
        if not (HAS_TRITON and (device.type == "cuda" or _INTERPRET)):
            raise RuntimeError(
                f"ADAEXIT_BACKEND=triton but Triton cannot run on device {device}: "
                "install triton and use CUDA tensors, or set TRITON_INTERPRET=1 for CPU tensors"
            )
        return "triton"
    return "triton" if HAS_TRITON and device.type == "cuda" else "torch"


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` launches its Triton kernel (inside the op's implementation)."""
    return backend_for(device) == "triton"


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call(*tensors: torch.Tensor | None) -> bool:
    """Whether a public function may run its op's implementation without the dispatcher round trip.

    Going through ``torch.ops.adaexit.<op>`` costs ~15-20 us per call on a CPU (custom-op dispatch in
    Python), several times a small op's own work. Skipping it changes nothing observable when nobody is
    looking: so the op itself is called whenever something is -- ``torch.compile`` tracing, the profiler (so
    traces show ``adaexit::<op>``), a dispatch mode (fake tensors, functionalisation), functorch transforms,
    tensor subclasses, or autograd (an input that requires grad under grad mode).
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._autograd._profiler_enabled() or torch.autograd.profiler._is_profiler_enabled  # (any thread)
        or _get_current_dispatch_mode() is not None
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or grad and t.requires_grad):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Launch counting: every Triton launch goes through ``count_launch`` (tests and benchmarks count launches per
# node run with ``launch_count``).
_LAUNCHES: Counter = Counter()


def count_launch(op: str, n: int = 1) -> None:
    """Record ``n`` Triton kernel launches made by ``op`` (called by the host wrappers at each launch)."""
    _LAUNCHES[op] += n


def launch_count(op: str | None = None) -> int:
    """Triton kernel launches so far in this process: all ops, or only ``op``'s (``"exit_gate"``,
    ``"partition"``, ``"gather_rows"``, ``"scatter_rows"``; ``compact`` launches partition's and gather_rows'
    kernels and counts under those). Take the difference around the code to count."""
    return sum(_LAUNCHES.values()) if op is None else _LAUNCHES[op]


# ---------------------------------------------------------------------------------------------
# Host synchronisation accounting. Every device->host read the library makes goes through
# ``to_host`` so that tests can count them (at most one per decision point).
_HOST_SYNCS = 0


def to_host(t: torch.Tensor) -> list:
    """Copy a small device tensor to a Python list; the one place the library syncs with the host."""
    global _HOST_SYNCS
    _HOST_SYNCS += 1
    if torch._C._autograd._profiler_enabled():  # named in profiler traces (bench.profile reads it there)
        with torch.profiler.record_function("adaexit::to_host"):
            return t.tolist()
    return t.tolist()


def host_sync_count() -> int:
    """Number of ``to_host`` calls so far in this process (for tests and the profiler)."""
    return _HOST_SYNCS
