"""Triton kernels for adaptive inference (installed as ``adaexit.kernels``).

One op per module in :mod:`adaexit.kernels.ops` (``ops/<op>.py``); each has a Triton kernel, a host wrapper
that dispatches on the device (see :mod:`adaexit.kernels._dispatch`) and a PyTorch reference ``<op>_torch``
with the same signature. This package re-exports the ops' public functions; the op modules themselves are
``adaexit.kernels.ops.<op>`` (no function here shadows a module).

* :func:`exit_gate`    - pooled linear exit head + softmax confidence + threshold, in one pass.
* :func:`partition`    - stable k-way partition of the batch by route.
* :func:`gather_rows`  - ``x[index]``.
* :func:`scatter_rows` - ``out[index] = src``.
* :func:`compact`      - keep the rows where ``keep`` is true, for any number of tensors.

Every op is a torch op in the ``adaexit`` namespace (``torch.ops.adaexit.<op>``, with a fake implementation
for ``torch.compile`` and autograd where it applies); the public functions check their arguments and call it.
:class:`set_backend` chooses the implementation behind the ops, :func:`launch_count` counts Triton launches,
:func:`host_sync_count` host synchronisations.
"""

if __name__ == "kernels":
    # This folder is ``adaexit.kernels`` and never a top-level package, but wherever the repository root is
    # on ``sys.path`` (``python -m ...`` run from it) a bare ``import kernels`` finds it first. Hugging Face's
    # own ``kernels`` package (which transformers >= 5.25 imports) must win: step aside and import whatever
    # ``kernels`` the rest of ``sys.path`` holds, or fail exactly as if this folder were not there.
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = _sys.path[:]
    _sys.path[:] = [p for p in _path if _os.path.abspath(p or _os.curdir) != _root]
    del _sys.modules["kernels"]
    try:
        _sys.modules["kernels"] = _importlib.import_module("kernels")
    finally:
        _sys.path[:] = _path
else:
    from ._compile import CompileSpec
    from ._dispatch import backend_for, host_sync_count, interpreter_enabled, launch_count, set_backend
    from .ops import exit_gate as _exit_gate_op
    from .ops import gather_rows as _gather_rows_op
    from .ops import partition as _partition_op
    from .ops import scatter_rows as _scatter_rows_op
    from .ops.compact import compact, compact_torch
    from .ops.exit_gate import CRITERIA, exit_gate, exit_gate_torch
    from .ops.gather_rows import gather_rows, gather_rows_torch
    from .ops.partition import partition, partition_torch
    from .ops.scatter_rows import scatter_rows, scatter_rows_torch

    def all_specs() -> list[CompileSpec]:
        """Every representative launch of every kernel in the package (for the ahead-of-time compile check;
        ``compact`` has no kernel of its own: it is partition + gather_rows)."""
        ops = (_exit_gate_op, _partition_op, _gather_rows_op, _scatter_rows_op)
        return [spec for module in ops for spec in module.COMPILE_SPECS]

    __all__ = [
        "CRITERIA",
        "all_specs",
        "backend_for",
        "compact",
        "compact_torch",
        "exit_gate",
        "exit_gate_torch",
        "gather_rows",
        "gather_rows_torch",
        "host_sync_count",
        "interpreter_enabled",
        "launch_count",
        "partition",
        "partition_torch",
        "scatter_rows",
        "scatter_rows_torch",
        "set_backend",
    ]
