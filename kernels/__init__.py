"""Triton kernels for adaptive inference (installed as ``adaexit.kernels``).

One op per module; each has a Triton kernel, a host wrapper that dispatches on the device
(see :mod:`adaexit.kernels._dispatch`) and a PyTorch reference ``<op>_torch`` with the same signature.

* :func:`exit_gate`    - pooled linear exit head + softmax confidence + threshold, in one pass.
* :func:`partition`    - stable k-way partition of the batch by route.
* :func:`gather_rows`  - ``x[index]``.
* :func:`scatter_rows` - ``out[index] = src``.
* :func:`compact`      - keep the rows where ``keep`` is true, for any number of tensors.
"""

from ._dispatch import backend_for, host_sync_count, interpreter_enabled
from .compact import compact, compact_torch
from .exit_gate import CRITERIA, exit_gate, exit_gate_torch
from .gather_rows import gather_rows, gather_rows_torch
from .partition import partition, partition_torch
from .scatter_rows import scatter_rows, scatter_rows_torch

__all__ = [
    "CRITERIA",
    "backend_for",
    "compact",
    "compact_torch",
    "exit_gate",
    "exit_gate_torch",
    "gather_rows",
    "gather_rows_torch",
    "host_sync_count",
    "interpreter_enabled",
    "partition",
    "partition_torch",
    "scatter_rows",
    "scatter_rows_torch",
]
