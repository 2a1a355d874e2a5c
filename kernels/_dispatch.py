"""Backend selection shared by every op in ``adaexit.kernels``.

Rule (read on every call, so tests can flip it with ``monkeypatch.setenv``):

* ``ADAEXIT_BACKEND=torch``  -> always the ``<op>_torch`` reference.
* ``ADAEXIT_BACKEND=triton`` -> always the Triton kernel; CPU tensors need ``TRITON_INTERPRET=1``.
* unset / ``auto``           -> Triton for CUDA tensors, the torch reference for everything else.
"""

from __future__ import annotations

import os

import torch

from ._triton import HAS_TRITON  # triton is a Linux-only dependency; the torch references work without it

BACKENDS = ("auto", "torch", "triton")


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def requested_backend() -> str:
    backend = os.environ.get("ADAEXIT_BACKEND", "auto").lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"ADAEXIT_BACKEND={backend!r} is not one of {BACKENDS}")
    return backend


def backend_for(device: torch.device | str) -> str:
    """The backend ("triton" or "torch") that ops use for tensors on ``device``."""
    device = torch.device(device)
    backend = requested_backend()
    if backend == "torch":
        return "torch"
    runnable = HAS_TRITON and (device.type == "cuda" or interpreter_enabled())
    if backend == "triton":
        if not runnable:
            raise RuntimeError(
                f"ADAEXIT_BACKEND=triton but Triton cannot run on device {device}: "
                "install triton and use CUDA tensors, or set TRITON_INTERPRET=1 for CPU tensors"
            )
        return "triton"
    return "triton" if HAS_TRITON and device.type == "cuda" else "torch"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on ``tensors`` should launch its Triton kernel.

    The Triton kernels have no backward: a call that autograd must differentiate (grad mode on and an
    input that requires grad) uses the torch reference, so gradients are never silently dropped.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return backend_for(tensors[0].device) == "triton"


# ---------------------------------------------------------------------------------------------
# Host synchronisation accounting. Every device->host read the library makes goes through
# ``to_host`` so that tests can count them (at most one per decision point).
_HOST_SYNCS = 0


def to_host(t: torch.Tensor) -> list:
    """Copy a small device tensor to a Python list; the one place the library syncs with the host."""
    global _HOST_SYNCS
    _HOST_SYNCS += 1
    return t.tolist()


def host_sync_count() -> int:
    """Number of ``to_host`` calls so far in this process (for tests and the profiler)."""
    return _HOST_SYNCS
