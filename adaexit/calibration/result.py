"""What :func:`adaexit.calibrate` returns: :class:`CalibrationResult`, its tables and its plot."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..evaluation import OperatingPoint, OracleResult
from ..policies import Policy
from ..reports import plot_calibration

#: One evaluated candidate policy (see :class:`adaexit.evaluation.OperatingPoint`).
CalibrationPoint = OperatingPoint


def _bound(p: OperatingPoint) -> str:
    """A point's upper confidence bound for the tables ('-' where none was computed)."""
    return "-" if p.bound_pp is None else f"{p.bound_pp:.2f}"


def _certified(p: OperatingPoint) -> str:
    return "" if p.certified is None else ("yes" if p.certified else "no")


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found. ``policy`` is set on the model already.

    Attributes:
        policy: the chosen policy. best: its point. points: every evaluated candidate.
        frontier: the Pareto-optimal points (accuracy vs cost) over all kinds, sorted by cost.
        baseline_accuracy: the last exit's accuracy on the calibration data. full_cost: the plain
        model's cost per example. cost: ``"flops"`` or ``"latency"``. max_accuracy_drop: the budget
        (percentage points). num_examples: calibration rows. oracle: :class:`OracleResult`.
        best_by_kind: each candidate family's best point within the budget (``"never"``,
        ``"uniform"``, ``"per_exit"``, ``"learned"``, ``"selection"``; families that were not tried or
        found nothing within the budget are absent); with a ``confidence``, the best *certified* one.
        drop: the budget's measure (``"net"`` or ``"new_errors"``). seconds: wall-clock seconds of the
        dense pass (``"collect"``), of the offline search (``"search"``; ``"search_cpu"``: its CPU
        seconds) and per family.
        confidence: the probability that the chosen policy meets the budget on new data (``None``:
        point estimates only). search_examples, test_examples: with a confidence, the rows the
        candidates were searched on and the rows they were tested on (``None`` otherwise).
        warnings: what :func:`calibrate` warned about (also issued as :class:`CalibrationWarning`).

    Every point's accuracy, drop and cost are estimates on all ``num_examples`` calibration rows; with a
    confidence, ``bound_pp`` is the ``confidence`` upper bound of its budget measure from the test rows
    and ``certified`` says whether the fixed-sequence test accepted it (see
    :mod:`adaexit.calibration.guarantee`).
    """

    policy: Policy
    best: CalibrationPoint
    points: list[CalibrationPoint]
    frontier: list[CalibrationPoint]
    baseline_accuracy: float
    full_cost: float
    cost: str
    max_accuracy_drop: float
    num_examples: int
    oracle: OracleResult | None = None
    best_by_kind: dict = field(default_factory=dict)
    drop: str = "net"
    seconds: dict = field(default_factory=dict)
    confidence: float | None = None
    search_examples: int | None = None
    test_examples: int | None = None
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Everything as JSON-able Python values (disabled thresholds become ``null``)."""
        return {
            "best": self.best.to_dict(),
            "baseline_accuracy": self.baseline_accuracy,
            "full_cost": self.full_cost,
            "cost": self.cost,
            "max_accuracy_drop": self.max_accuracy_drop,
            "num_examples": self.num_examples,
            "oracle": None if self.oracle is None else self.oracle.to_dict(),
            "frontier": [p.to_dict() for p in self.frontier],
            "points": [p.to_dict() for p in self.points],
            "best_by_kind": {k: p.to_dict() for k, p in self.best_by_kind.items()},
            "drop": self.drop,
            "seconds": dict(self.seconds),
            "confidence": self.confidence,
            "search_examples": self.search_examples,
            "test_examples": self.test_examples,
            "warnings": list(self.warnings),
        }

    def guarantee(self) -> str:
        """One line: what the budget's guarantee is (or that there is none)."""
        measure = "new-error rate" if self.drop == "new_errors" else "net accuracy drop"
        if self.confidence is None:
            return (f"no guarantee (confidence=None): the {measure} is a point estimate on the calibration rows, "
                    f"biased low for the chosen policy")
        return (f"guarantee: with probability >= {self.confidence:g} the chosen policy's expected {measure} on new "
                f"data is <= {self.max_accuracy_drop:g} pp; bound pp = {100 * self.confidence:g}% upper confidence "
                f"bound from {self.test_examples} held-out rows, candidates searched on {self.search_examples}")

    def table(self) -> str:
        """A short text table of the frontier and the chosen policy (``*``; with a confidence it need not
        be on the frontier of the estimates); ``bound pp``: the upper confidence bound of the budget's
        measure, ``ok``: certified by the fixed-sequence test."""
        unit = "MFLOPs" if self.cost == "flops" else "ms"
        scale = 1e-6 if self.cost == "flops" else 1.0
        lines = [
            f"calibration on {self.num_examples} examples, budget {self.max_accuracy_drop:g} pp, "
            f"last-exit accuracy {100 * self.baseline_accuracy:.2f}%, full cost {self.full_cost * scale:.4g} {unit}",
            f"  {self.guarantee()}",
            f"  {'kind':<9} {'criterion':<9} {'acc %':>7} {'drop pp':>8} {'bound pp':>8} {'ok':>3} {'cost':>10} "
            f"{'speedup':>8}",
        ]
        shown = list(self.frontier)
        if not any(p is self.best for p in shown):  # a certified choice need not be on the estimates' frontier
            shown = sorted(shown + [self.best], key=lambda p: (p.cost, -p.accuracy))
        for p in shown:
            mark = "*" if p is self.best else " "
            lines.append(
                f"{mark} {p.kind:<9} {p.criterion or '':<9} {100 * p.accuracy:7.2f} {p.accuracy_drop_pp:8.2f} "
                f"{_bound(p):>8} {_certified(p):>3} {p.cost * scale:10.4g} {p.speedup:7.2f}x"
            )
        if self.oracle is not None:
            o = self.oracle
            lines.append(
                f"  {'oracle':<9} {'':<9} {100 * o.accuracy:7.2f} {100 * (self.baseline_accuracy - o.accuracy):8.2f} "
                f"{'':>8} {'':>3} {o.cost * scale:10.4g} {o.speedup:7.2f}x"
            )
        return "\n".join(lines)

    def families_table(self) -> str:
        """Each candidate family's best policy within the budget beside the oracle: how far each method
        is from the limit (``*`` marks the chosen policy; ``% of oracle`` = speedup / oracle speedup;
        ``bound pp``: the upper confidence bound of the budget's measure)."""
        unit = "MFLOPs" if self.cost == "flops" else "ms"
        scale = 1e-6 if self.cost == "flops" else 1.0
        measure = "new errors" if self.drop == "new_errors" else "net drop"
        oracle_speedup = self.oracle.speedup if self.oracle is not None else math.nan
        within = "certified within" if self.confidence is not None else "within"
        lines = [
            f"best policy per family {within} {self.max_accuracy_drop:g} pp ({measure}) on {self.num_examples} "
            f"examples",
            f"  {self.guarantee()}",
            f"  {'family':<10} {'criterion':<9} {'acc %':>7} {'drop pp':>8} {'new err pp':>10} {'bound pp':>8} "
            f"{'cost':>10} {'speedup':>8} {'% of oracle':>11}",
        ]
        for kind, p in self.best_by_kind.items():
            mark = "*" if p is self.best else " "
            share = 100 * p.speedup / oracle_speedup if math.isfinite(oracle_speedup) else math.nan
            lines.append(
                f"{mark} {kind:<10} {p.criterion or '':<9} {100 * p.accuracy:7.2f} {p.accuracy_drop_pp:8.2f} "
                f"{p.new_errors_pp:10.2f} {_bound(p):>8} {p.cost * scale:10.4g} {p.speedup:7.2f}x {share:10.1f}%"
            )
        if self.oracle is not None:
            o = self.oracle
            lines.append(
                f"  {'oracle':<10} {'':<9} {100 * o.accuracy:7.2f} "
                f"{100 * (self.baseline_accuracy - o.accuracy):8.2f} {'':>10} {'':>8} {o.cost * scale:10.4g} "
                f"{o.speedup:7.2f}x {100.0:10.1f}%"
            )
        lines.append(f"  cost unit: {unit}")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def plot(self, path, oracle: bool = True):
        """Save a PNG: accuracy vs speedup, the Pareto frontier of each policy kind, the chosen point,
        the last-exit (plain model) point and, if ``oracle``, the oracle point. Returns ``path``."""
        return plot_calibration(self, path, oracle=oracle)


__all__ = ["CalibrationPoint", "CalibrationResult"]
