"""Calibration: choose the policy with the least expected cost within an accuracy budget.

* :mod:`.calibrate`: :func:`calibrate` and :class:`CalibrationResult`;
* :mod:`.thresholds`: the uniform and per-exit threshold searches.

The simulation it runs on is :mod:`adaexit.simulation`; the learned gates are
:mod:`adaexit.policies.learned`; the oracle and frontiers are :mod:`adaexit.evaluation`. Their names are
re-exported here, where earlier versions defined them.
"""

from ..evaluation import OracleResult, oracle, pareto_frontier
from ..policies.learned import ALWAYS_FIRE, fit_learned_gates
from ..simulation import (
    CONFIDENCE_CRITERIA,
    LOSSES,
    Simulation,
    exit_losses,
    exit_scores,
    exit_statistics,
    full_cost,
    learned_scores,
    learned_thresholds,
    simulate,
)
from .calibrate import (
    DROP_MEASURES,
    LEARNED_WEIGHTS,
    PER_EXIT_WEIGHTS,
    POLICY_KINDS,
    CalibrationPoint,
    CalibrationResult,
    calibrate,
    collect_exit_logits,
)
from .thresholds import TIE_TOL, UNIFORM_GRID, per_exit_thresholds, uniform_thresholds


__all__ = [
    "ALWAYS_FIRE",
    "CONFIDENCE_CRITERIA",
    "DROP_MEASURES",
    "LEARNED_WEIGHTS",
    "LOSSES",
    "PER_EXIT_WEIGHTS",
    "POLICY_KINDS",
    "TIE_TOL",
    "UNIFORM_GRID",
    "CalibrationPoint",
    "CalibrationResult",
    "OracleResult",
    "Simulation",
    "calibrate",
    "collect_exit_logits",
    "exit_losses",
    "exit_scores",
    "exit_statistics",
    "fit_learned_gates",
    "full_cost",
    "learned_scores",
    "learned_thresholds",
    "oracle",
    "pareto_frontier",
    "per_exit_thresholds",
    "simulate",
    "uniform_thresholds",
]
