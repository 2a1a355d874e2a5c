"""Anytime prediction (Hu, Dey, Hebert & Bagnell, *Anytime Neural Network*).

* :mod:`.runner`: :class:`AnytimeRunner`, :func:`anytime_predict`, :func:`anytime_curve` (FLOPs and
  deadline budgets on the sparse executor; what a call did is an :class:`adaexit.ExitInfo`, with each row's
  FLOPs and its reason to stop, :data:`STOP_REASONS`);
* :mod:`.eann`: :class:`EANN`, exponentially deepening anytime networks as one graph;
* :mod:`.training`: :func:`anytime_loss`, :func:`train_anytime`.
"""

from ..base import STOP_BATCH_BUDGET, STOP_DEADLINE, STOP_EXAMPLE_BUDGET, STOP_POLICY, STOP_REASONS
from ..reports import plot_anytime_curve
from .eann import EANN, exponential_mlp_networks, exponential_networks
from .runner import AnytimeRunner, anytime_curve, anytime_predict
from .training import anytime_loss, train_anytime

__all__ = [
    "AnytimeRunner",
    "EANN",
    "STOP_BATCH_BUDGET",
    "STOP_DEADLINE",
    "STOP_EXAMPLE_BUDGET",
    "STOP_POLICY",
    "STOP_REASONS",
    "anytime_curve",
    "anytime_loss",
    "anytime_predict",
    "exponential_mlp_networks",
    "exponential_networks",
    "plot_anytime_curve",
    "train_anytime",
]
