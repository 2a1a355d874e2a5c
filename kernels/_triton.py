"""The one place that imports triton: ``from .._triton import triton, tl, HAS_TRITON``.

triton is a Linux-only dependency and the ``<op>_torch`` references work without it. When it cannot be
imported, ``triton`` and ``tl`` are stand-ins just rich enough for the kernel modules to import unchanged:
``triton.jit`` returns the function as it is and ``tl.constexpr`` exists (for the kernels' annotations and
defaults). Any other attribute raises ``AttributeError`` naming the missing dependency; the host wrappers
never reach one, because :func:`adaexit.kernels._dispatch.use_triton` is false without triton.
"""

from __future__ import annotations

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by tests/test_exit_gate.py
    HAS_TRITON = False

    class _Missing(types.ModuleType):
        """A stand-in module whose unknown attributes say that triton is not installed."""

        def __getattr__(self, name: str):
            raise AttributeError(f"{self.__name__}.{name} needs triton, which is not installed")

    def _jit(fn=None, **kwargs):
        """``@triton.jit`` and ``@triton.jit(...)`` without triton: the function, unchanged."""
        return fn if fn is not None else (lambda f: f)

    class _Constexpr:
        """Stands in for ``tl.constexpr`` in annotations (``BLOCK: tl.constexpr``)."""

    triton = _Missing("triton")
    triton.jit = _jit
    tl = _Missing("triton.language")
    tl.constexpr = _Constexpr

__all__ = ["HAS_TRITON", "tl", "triton"]
