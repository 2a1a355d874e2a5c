"""Calibration: choose the policy with the least expected cost within an accuracy budget.

* :mod:`.calibrate`: :func:`calibrate` and :class:`CalibrationResult`;
* :mod:`.thresholds`: the uniform and per-exit threshold searches, and the exact constrained refinement
  (:class:`ChainSearch`, :func:`refine_thresholds`, :func:`route_options`) every family's best policy
  within the budget comes from.

The simulation it runs on is :mod:`adaexit.simulation`; the learned gates are
:mod:`adaexit.policies.learned`; the oracle and frontiers are :mod:`adaexit.evaluation`. Their names are
re-exported here, where earlier versions defined them.
"""

from ..evaluation import OracleResult, oracle, pareto_frontier
from ..policies.learned import ALWAYS_FIRE, fit_learned_gates, learned_simulation
from ..simulation import (
    CONFIDENCE_CRITERIA,
    LOSSES,
    Simulation,
    budget_losses,
    exit_losses,
    exit_scores,
    exit_statistics,
    full_cost,
    learned_scores,
    learned_thresholds,
    simulate,
    simulate_routes,
    softmax_statistics,
)
from .calibrate import (
    DROP_MEASURES,
    FAMILY_ORDER,
    LEARNED_WEIGHTS,
    PER_EXIT_WEIGHTS,
    POLICY_KINDS,
    SELECTION_WEIGHTS,
    CalibrationPoint,
    CalibrationResult,
    calibrate,
    collect_exit_logits,
)
from .thresholds import (
    TIE_TOL,
    UNIFORM_GRID,
    ChainSearch,
    per_exit_thresholds,
    refine_thresholds,
    route_options,
    uniform_thresholds,
)


__all__ = [
    "ALWAYS_FIRE",
    "CONFIDENCE_CRITERIA",
    "DROP_MEASURES",
    "FAMILY_ORDER",
    "LEARNED_WEIGHTS",
    "LOSSES",
    "PER_EXIT_WEIGHTS",
    "POLICY_KINDS",
    "SELECTION_WEIGHTS",
    "TIE_TOL",
    "UNIFORM_GRID",
    "CalibrationPoint",
    "ChainSearch",
    "CalibrationResult",
    "OracleResult",
    "Simulation",
    "budget_losses",
    "calibrate",
    "collect_exit_logits",
    "exit_losses",
    "exit_scores",
    "exit_statistics",
    "fit_learned_gates",
    "full_cost",
    "learned_scores",
    "learned_simulation",
    "learned_thresholds",
    "oracle",
    "pareto_frontier",
    "per_exit_thresholds",
    "refine_thresholds",
    "route_options",
    "simulate",
    "simulate_routes",
    "softmax_statistics",
    "uniform_thresholds",
]
