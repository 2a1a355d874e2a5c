"""Does the calibration budget hold on new data? The violation rate over random validation / test splits.

``python -m bench.bench_guarantee [--splits 25] [--val-sizes 300,5000] [--budget 1.0] [--drop net]``

Two adaptive models on real Fashion-MNIST (``adaexit.data.load_fashion_mnist``), trained briefly (two
epochs) on the first 20,000 training images: the stages of the demo's early-exit CNN at a quarter of
its width with a spatial exit head after each (three exits) and a cascade of a linear model and the demo's small CNN. Every exit's logits on the 50,000 other images (the rest of the training split and the test split)
are collected once and cached, so a split costs only the offline search. For each split, a random
``n_val`` of those rows calibrate the model (``adaexit.calibrate``, guarantee off: ``confidence=None``,
and on: ``confidence=0.9``) and the remaining rows (>= 45,000) test the chosen policy. Reported per model,
validation size and mode:

* ``violations``: the share of splits whose test drop exceeds the budget (the guarantee promises at most
  1 - confidence = 10%, up to the test rows' own sampling noise, about 0.05 pp at 45,000 rows);
* ``> +0.5 pp``: the share exceeding it by more than 0.5 pp (the issue's measure);
* the mean and worst test drop, the mean FLOPs speedup on the test rows, and how often calibration fell
  back to the never-exit policy (with the guarantee: nothing certifiable).

The test drop is measured with the budget's own rule (``--drop``): net accuracy drop, or new errors.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from adaexit import Cascade, EarlyExitNet, calibrate
from adaexit.apps.common import cache_dir as apps_cache_dir
from adaexit.apps.fashion_mnist.models import small_cnn, spatial_head, wide_cnn_stages
from adaexit.calibration import CalibrationWarning
from adaexit.calibration.candidates import Candidates
from adaexit.data import load_fashion_mnist, make_loader
from adaexit.evaluation import ExitOutputs, collect
from adaexit.training import train, train_classifier
from bench import comma_list, common_arguments, finish, format_table, machine_info

TRAIN_ROWS = 20_000
CONFIDENCE = 0.9
#: Bumped when a model's architecture or training changes (part of the cache key).
VERSIONS = {"early_exit": "v2", "cascade": "v1"}


def cache_dir() -> Path:
    return apps_cache_dir("bench_guarantee")


def build(name: str):
    """A fresh, untrained model: ``"early_exit"`` (the stages of the demo's wide early-exit CNN at width
    8, three exits) or ``"cascade"`` (a linear model, then the demo's small CNN)."""
    torch.manual_seed(0)
    if name == "early_exit":  # spatial heads at every exit: a pooled last head lags after two epochs
        heads = [spatial_head(8, 10, 4, 7), spatial_head(16, 10, 8, 4), spatial_head(32, 10, 16, 4)]
        return EarlyExitNet(wide_cnn_stages(8), heads)
    return Cascade([nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), small_cnn(width=16)])


def fit(name: str, model, x, y, epochs: int):
    """A short training run (seeded): every exit jointly, or each cascade member on its own."""
    torch.manual_seed(0)
    if name == "early_exit":
        train(model.train(), make_loader(x, y, 256, seed=0), epochs=epochs, lr=3e-3, progress=False)
    else:
        for member in model.models:
            train_classifier(member.train(), make_loader(x, y, 256, seed=0), epochs=epochs, lr=3e-3, progress=False)
    return model.eval()


def outputs_of(name: str, epochs: int, refresh: bool) -> tuple[object, ExitOutputs, float]:
    """The trained model and its exit outputs on the 50,000 held-out images (cached by settings)."""
    key = hashlib.sha256(f"{name}|{epochs}|{TRAIN_ROWS}|{VERSIONS[name]}".encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.pt"
    model = build(name)
    if path.exists() and not refresh:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state"])
        out = ExitOutputs(saved["logits"], saved["labels"], saved["stage_costs"], saved["head_costs"],
                          saved["node_costs"], saved["reference_cost"])
        return model.eval(), out, 0.0
    print(f"[bench_guarantee] {name}: training ({epochs} epoch(s) on {TRAIN_ROWS} images) and collecting logits",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    fit(name, model, x[:TRAIN_ROWS], y[:TRAIN_ROWS], epochs)
    pool = (torch.cat([x[TRAIN_ROWS:], xt]), torch.cat([y[TRAIN_ROWS:], yt]))
    out = collect(model, pool, "flops", batch_size=1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "logits": out.logits, "labels": out.labels,
                "stage_costs": out.stage_costs, "head_costs": out.head_costs, "node_costs": out.node_costs,
                "reference_cost": out.reference_cost}, path)
    return model, out, time.perf_counter() - t0


def one_split(model, out: ExitOutputs, n_val: int, seed: int, budget: float, drop: str, confidence, policies):
    """Calibrate on ``n_val`` random rows, test on the rest: ``(test measure pp, test speedup, fell back)``."""
    order = torch.randperm(out.labels.shape[0], generator=torch.Generator().manual_seed(seed))
    val, test = out.rows(order[:n_val]), out.rows(order[n_val:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        result = calibrate(model, val, max_accuracy_drop=budget, drop=drop, confidence=confidence,
                           policies=policies, progress=False)
    tested = Candidates(test, drop, budget, model.successors, model.node_members()).replay(result.best)
    measure = tested.accuracy_drop_pp if drop == "net" else tested.new_errors_pp
    return measure, tested.speedup, result.best.kind == "never"


def run(args) -> dict:
    rows, seconds = [], {}
    for name in args.models:
        model, out, trained = outputs_of(name, args.epochs, args.refresh)
        seconds[f"{name}: train + collect"] = trained
        accuracy = out.node_accuracy()
        for n_val in args.val_sizes:
            for mode, confidence in (("off", None), ("on", CONFIDENCE)):
                print(f"[bench_guarantee] {name}: {args.splits} splits of {n_val} validation rows, guarantee {mode}",
                      file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                results = [one_split(model, out, n_val, 1000 * n_val + s, args.budget, args.drop, confidence,
                                     args.policies) for s in range(args.splits)]
                drops = [r[0] for r in results]
                rows.append({
                    "model": name, "val": n_val, "guarantee": mode,
                    "last_exit_acc": 100 * accuracy[-1],
                    "violations": 100 * sum(d > args.budget + 1e-9 for d in drops) / len(drops),
                    "far": 100 * sum(d > args.budget + 0.5 for d in drops) / len(drops),
                    "mean_drop": statistics.fmean(drops), "worst_drop": max(drops),
                    "speedup": statistics.fmean(r[1] for r in results),
                    "fallback": 100 * sum(r[2] for r in results) / len(results),
                    "seconds_per_split": (time.perf_counter() - t0) / len(results),
                })  # fmt: skip
    return {
        "benchmark": "bench_guarantee", "budget_pp": args.budget, "drop": args.drop, "confidence": CONFIDENCE,
        "splits": args.splits, "policies": list(args.policies), "epochs": args.epochs, "rows": rows,
        "seconds": seconds, "machine": machine_info(),
    }  # fmt: skip


COLUMNS = [
    ("model", "model", ""), ("val", "val rows", "d"), ("guarantee", "guarantee", ""),
    ("violations", "violations %", ".0f"), ("far", "> +0.5 pp %", ".0f"), ("mean_drop", "mean drop pp", ".2f"),
    ("worst_drop", "worst pp", ".2f"), ("speedup", "speedup", ".2f"), ("fallback", "never-exit %", ".0f"),
    ("seconds_per_split", "s/split", ".2f"),
]  # fmt: skip


def format_report(report: dict) -> str:
    measure = "new errors" if report["drop"] == "new_errors" else "net drop"
    head = (f"calibration budget {report['budget_pp']:g} pp ({measure}) on new data: {report['splits']} random "
            f"validation/test splits of 50,000 held-out Fashion-MNIST images; guarantee on = confidence "
            f"{report['confidence']:g} (violations should be <= {100 * (1 - report['confidence']):.0f}%); policies "
            f"{', '.join(report['policies'])}")
    accuracy = "; ".join(f"{r['model']} last exit {r['last_exit_acc']:.2f}%" for r in report["rows"][::4])
    return "\n".join([head, accuracy, format_table(report["rows"], COLUMNS)])


def main(argv=None) -> int:
    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--splits", type=int, default=25, help="random validation/test splits per setting")
    parser.add_argument("--val-sizes", default="300,5000", help="validation rows (comma-separated)")
    parser.add_argument("--budget", type=float, default=1.0, help="max_accuracy_drop in pp")
    parser.add_argument("--drop", choices=("net", "new_errors"), default="net")
    parser.add_argument("--models", default="early_exit,cascade", help="early_exit and/or cascade")
    parser.add_argument("--policies", default="uniform,per_exit,learned",
                        help="candidate families calibrate tries (comma-separated)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (cached per value)")
    parser.add_argument("--refresh", action="store_true", help="retrain instead of reading the cache")
    args = parser.parse_args(argv)
    args.val_sizes = comma_list(parser, args.val_sizes, "--val-sizes")
    args.models = [m for m in args.models.split(",") if m]
    args.policies = tuple(p for p in args.policies.split(",") if p)
    if any(m not in ("early_exit", "cascade") for m in args.models):
        parser.error(f"--models must name early_exit and/or cascade, got {args.models}")
    if args.splits < 1 or any(v < 2 for v in args.val_sizes) or not math.isfinite(args.budget):
        parser.error("--splits must be >= 1, --val-sizes >= 2 and --budget finite")
    if args.threads:
        torch.set_num_threads(args.threads)
    return finish(run(args), args, format_report)


if __name__ == "__main__":
    raise SystemExit(main())
