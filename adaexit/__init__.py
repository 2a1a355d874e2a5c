"""adaexit: adaptive inference for PyTorch with genuinely sparse execution at batch size > 1.

Public API:

* :class:`EarlyExitNet`, :func:`wrap` - early-exit networks (drop-in for the model they wrap).
* :class:`ExitHead` - exit heads (pooled linear, or conv + pooled linear).
* :class:`ConfidencePolicy`, :class:`PatiencePolicy`, :class:`NeverExitPolicy` - exit policies.
* :mod:`adaexit.kernels` - the Triton kernels (exit gate, partition, gather/scatter, compact).
"""

from .adapters import wrap
from .early_exit import EarlyExitNet, ExitInfo
from .executor import Node, execute
from .heads import ExitHead, LogitsHead
from .policies import ConfidencePolicy, NeverExitPolicy, PatiencePolicy, Policy

__version__ = "0.1.0"

__all__ = [
    "ConfidencePolicy",
    "EarlyExitNet",
    "ExitHead",
    "ExitInfo",
    "LogitsHead",
    "NeverExitPolicy",
    "Node",
    "PatiencePolicy",
    "Policy",
    "execute",
    "wrap",
]
