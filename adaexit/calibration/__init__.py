"""Calibration: choose the policy with the least expected cost within an accuracy budget.

* :mod:`.calibrate`: :func:`calibrate` (and :class:`CalibrationWarning`);
* :mod:`.result`: :class:`CalibrationResult` (tables, plot) and :class:`CalibrationPoint`;
* :mod:`.candidates`: :class:`~.candidates.Candidates`, every candidate simulated on dense exit outputs;
* :mod:`.guarantee`: the risk control behind ``confidence`` (Learn-then-Test, exact binomial bounds);
* :mod:`.thresholds`: the uniform and per-exit threshold searches, and the exact constrained refinement
  (:class:`ChainSearch`, :func:`refine_thresholds`, :func:`route_options`) every family's best policy
  within the budget comes from.

The simulation it runs on is :mod:`adaexit.simulation`; the learned gates are
:mod:`adaexit.policies.learned`; the oracle and frontiers are :mod:`adaexit.evaluation`.
"""

from .calibrate import CalibrationWarning, calibrate
from .result import CalibrationPoint, CalibrationResult

__all__ = ["CalibrationPoint", "CalibrationResult", "CalibrationWarning", "calibrate"]
