"""Every plot adaexit draws, in one place (matplotlib's Agg canvas: no display, no global backend switch).

* :func:`plot_calibration`: a calibration result's frontiers per policy kind, the chosen point, the
  plain model and the oracle (what ``CalibrationResult.plot`` draws);
* :func:`plot_frontier`: operating points (policies, single networks, the oracle) against cost;
* :func:`plot_anytime_curve`: anytime accuracy against budget;
* :func:`plot_system_frontiers` and :func:`plot_exits`: the main job's figures (several systems'
  validation frontiers beside their measured test points; where the test images exit).

Functions read the results they are given by attribute or key; none runs a model.
"""

from __future__ import annotations

import math

from .evaluation import pareto_frontier

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def figure(size=(6.4, 4.4)):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot state is touched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("adaexit's plots need matplotlib (pip install matplotlib)") from err
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path, dpi: int = 120):
    """Write ``fig`` as a PNG to ``path``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=dpi)
    return path


def plot_calibration(result, path, oracle: bool = True):
    """Accuracy vs speedup of a :class:`~adaexit.calibration.CalibrationResult`: the Pareto frontier of
    each candidate kind, each family's best policy within the budget (a large marker of its colour,
    labelled with its speedup), the chosen point, the last exit (plain model), the budget and the
    oracle."""
    fig = figure((8.6, 4.6))
    ax = fig.add_subplot()
    best_by_kind = getattr(result, "best_by_kind", None) or {}
    kinds = list(dict.fromkeys(p.kind for p in result.points if p.kind != "never"))
    for i, kind in enumerate(kinds):
        color = COLORS[i % len(COLORS)]
        front = pareto_frontier([p for p in result.points if p.kind == kind])
        ax.plot([p.speedup for p in front], [100 * p.accuracy for p in front], "o-", ms=3, color=color,
                alpha=0.8, label=kind)
        best = best_by_kind.get(kind)
        if best is not None:
            ax.plot([best.speedup], [100 * best.accuracy], "D", ms=8, color=color, mec="k",
                    label=f"best {kind} in budget: {best.speedup:.2f}x")
    ax.plot([1.0], [100 * result.baseline_accuracy], "ks", label="last exit (plain model)")
    if oracle and result.oracle is not None:
        ax.plot([result.oracle.speedup], [100 * result.oracle.accuracy], "r*", ms=12,
                label=f"oracle: {result.oracle.speedup:.2f}x")
    best = result.best
    ax.plot([best.speedup], [100 * best.accuracy], "o", mfc="none", mec="k", ms=14, label="chosen")
    new_errors = getattr(result, "drop", "net") == "new_errors"
    ax.axhline(100 * result.baseline_accuracy - result.max_accuracy_drop, color="grey", ls=":", lw=1,
               label=f"-{result.max_accuracy_drop:g} pp" + (" (the budget bounds new errors)" if new_errors
                                                             else " (budget)"))
    ax.set_xscale("log")
    ax.set_xlabel(f"speedup ({result.cost}, full / expected cost)")
    ax.set_ylabel("accuracy (%)")
    # the region that matters: around the budget (far cheaper, far worse points are off the chart)
    low = 100 * result.baseline_accuracy - max(4 * result.max_accuracy_drop, 2.0)
    ax.set_ylim(max(low, ax.get_ylim()[0]), ax.get_ylim()[1])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, path)


def plot_frontier(points, path, title: str = "accuracy vs cost", cost_label: str = "cost per example"):
    """Accuracy against cost, one series per method; single networks and the oracle as markers."""
    fig = figure((6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    methods: dict[str, list] = {}
    for p in points:
        methods.setdefault(p.method, []).append(p)
    markers = {"single network": "s", "oracle": "*"}
    for method, pts in methods.items():
        pts = sorted(pts, key=lambda p: p.cost)
        style = "none" if method in markers else "-"
        ax.plot([p.cost for p in pts], [100 * p.accuracy for p in pts], marker=markers.get(method, "o"),
                linestyle=style, label=method)
        if method == "single network":
            for p in pts:
                ax.annotate(p.setting, (p.cost, 100 * p.accuracy), fontsize=7, xytext=(3, -8),
                            textcoords="offset points")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_anytime_curve(curves, path, title: str = "anytime prediction", x: str = "flops_per_example"):
    """Accuracy against budget (PNG).

    Args:
        curves: one curve from :func:`adaexit.anytime_curve`, or ``{label: curve}``.
        x: ``"flops_per_example"`` (FLOPs spent) or ``"budget"``.
    """
    if isinstance(curves, list):
        curves = {"model": curves}
    if x not in ("flops_per_example", "budget"):
        raise ValueError(f"x must be 'flops_per_example' or 'budget', got {x!r}")
    fig = figure((5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        ax.plot([p[x] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", label=label)
    ax.set_xlabel("FLOPs per example" + (" (spent)" if x == "flops_per_example" else " (budget)"))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save(fig, path, dpi=100)


def plot_system_frontiers(path, calibrations: dict, measured: dict, reference_val_acc: float,
                          reference_test_acc: float, budget: float, cost: str, scales: dict | None = None,
                          chosen: dict | None = None, target: float | None = None,
                          title: str = "accuracy vs speedup (circles: calibrated policies)"):
    """Accuracy change vs speedup for several adaptive systems: each one's validation frontier (expected
    speedup from the cost model), its oracle, the chosen policy, and the measured test point.

    ``scales[name]`` converts a calibration speedup (over the system's own reference) into a speedup
    over the strongest single network; ``chosen[name]`` is the deployed policy's calibration point
    (default: calibrate's own choice); ``measured[name]`` has ``speedup`` and ``accuracy``."""
    scales = scales or {}
    fig = figure((7.2, 4.8))
    ax = fig.add_subplot()
    for color, (name, result) in zip(COLORS, calibrations.items()):
        s = scales.get(name, 1.0)
        front = [p for p in result.frontier if math.isfinite(p.speedup)]
        ax.plot([s * p.speedup for p in front], [100 * (p.accuracy - reference_val_acc) for p in front],
                "-", color=color, lw=1.2, label=f"{name}: frontier (val, {cost})")
        best = (chosen or {}).get(name, result.best)
        ax.plot([s * best.speedup], [100 * (best.accuracy - reference_val_acc)], "o", mfc="none", mec=color, ms=9)
        if result.oracle is not None and math.isfinite(result.oracle.speedup):
            ax.plot([s * result.oracle.speedup], [100 * (result.oracle.accuracy - reference_val_acc)], "*",
                    color=color, ms=13, label=f"{name}: oracle (val)")
        m = measured.get(name)
        if m:
            ax.plot([m["speedup"]], [100 * (m["accuracy"] - reference_test_acc)], "D", color=color, ms=8,
                    mec="k", label=f"{name}: measured (test, wall-clock)")
    ax.axhline(-budget, color="grey", ls=":", lw=1, label=f"budget (-{budget:g} pp)")
    ax.axhline(0.0, color="k", lw=0.6)
    if target is not None:
        ax.axvline(target, color="grey", ls="--", lw=0.8, label=f"target {target:g}x")
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the strongest single network")
    ax.set_ylabel("accuracy change vs the strongest network (pp)")
    low = min(-3 * budget, ax.get_ylim()[0])
    ax.set_ylim(max(low, -10.0), ax.get_ylim()[1])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="lower left", ncol=2)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def plot_exits(path, measured: dict):
    """Fraction of test examples that exit at each node, one panel per adaptive system (``measured[name]``
    has ``exit_names``, ``exit_fractions``, ``speedup`` and ``accuracy_drop_pp``)."""
    systems = [(n, m) for n, m in measured.items() if m.get("exit_fractions")]
    fig = figure((4.0 * max(1, len(systems)), 3.6))
    for i, (name, m) in enumerate(systems):
        ax = fig.add_subplot(1, len(systems), i + 1)
        labels = m["exit_names"]
        ax.bar(range(len(labels)), [100 * f for f in m["exit_fractions"]], color="tab:blue")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("test examples exiting (%)")
        ax.set_title(f"{name}: {m['speedup']:.2f}x, {m['accuracy_drop_pp']:+.2f} pp", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


__all__ = [
    "figure",
    "plot_anytime_curve",
    "plot_calibration",
    "plot_exits",
    "plot_frontier",
    "plot_system_frontiers",
    "save",
]
