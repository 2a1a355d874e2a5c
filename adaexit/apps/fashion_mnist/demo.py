"""``python -m adaexit demo``: train, calibrate and measure adaptive inference on Fashion-MNIST (CPU).

The flow:

1. **Data.** Fashion-MNIST from local IDX files (:mod:`adaexit.data`); a stratified validation split
   (5000 images, fixed seed) is held out of the 60000 training images. Nothing is downloaded.
2. **Train** (cached; :mod:`.recipe`): a wide early-exit CNN (its exits trained jointly with
   :class:`~adaexit.training.MultiExitLoss`), then an MLP and a small CNN distilled from it
   (:mod:`.models`). Checkpoints go to ``--cache`` under keys covering the recipe, the code, the seed
   and the data; a rerun with the same settings and code loads them and skips training.
3. **Pick the strongest single network** -- the most accurate one *on the validation split* (every
   network alone, no exits): the reference for accuracy and speed.
4. **Calibrate** three adaptive systems on the validation split with
   :func:`adaexit.calibrate`, which evaluates hundreds of candidate policies (uniform and
   per-exit confidence thresholds, learned gates), then deploy the cheapest candidate whose *new-error
   rate* -- images the system's last exit (the strongest network) classifies correctly and the system
   does not -- is within ``--budget`` percentage points (``calibrate(..., drop="new_errors")``; see
   its docstring for why this, and not the net accuracy difference, is what the demo bounds:
   validation is a split of the training images, easier than the test set, and the net rule
   collects lucky fixes there; ``--drop-measure net`` bounds the net drop instead). The systems:

   * ``early_exit``: the wide CNN with its early exits;
   * ``cascade``: MLP -> small CNN -> wide CNN (whole networks; Bolukbasi et al.'s network selection
     as a chain);
   * ``combination``: MLP -> small CNN -> the wide *early-exit* CNN (a cascade whose last network
     exits early too).

5. **Measure on the test set** at ``--batch-size`` (256): accuracy, FLOPs per example, and wall-clock
   time of a full pass over the 10000 test images in batches (models in eval mode, under
   ``torch.inference_mode``; the median of ``--repeats`` passes, systems interleaved so that load from
   other processes hits them alike); speedup = the strongest network's time / the system's time.

Nothing is assumed: every number in the table is measured in the run that prints it. The
``"best"`` entry of ``results.json`` is the adaptive system and mode (per batch or streamed) that ran the
validation images fastest (so the test set is never used to choose), with its *measured* test numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ...base import AdaptiveModel
from ...stream import stream
from ...calibration import calibrate
from ...calibration.calibrate import DROP_MEASURES
from ...cascade import Cascade
from ...cost import count_flops, interleaved_times, machine_info
from ...data import load_fashion_mnist, train_val_split
from ...reports import plot_exits, plot_system_frontiers
from ...training import evaluate
from ..common import log as _log
from .models import plain_network
from .recipe import default_cache, net_configs, train_all

TARGET_SPEEDUP = 6.0  # the brief's target for the main job (measured wall-clock, batch 256)
TARGET_DROP_PP = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (``python -m adaexit demo --help``)."""
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="directory with the Fashion-MNIST IDX files (default: "
                             "/usr/share/datasets/fashion-mnist from `apt-get install dataset-fashion-mnist`)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="write DIR/results.json and the PNG plots (frontier.png, exits.png) here")
    parser.add_argument("--cache", metavar="DIR", default=None,
                        help=f"checkpoint cache; a rerun with the same settings skips training "
                             f"(default: {default_cache()})")
    parser.add_argument("--retrain", action="store_true", help="ignore cached checkpoints (and overwrite them)")
    parser.add_argument("--epochs", type=int, default=8,
                        help="training epochs of the wide CNN; the MLP and small CNN get twice as many (default: 8)")
    parser.add_argument("--train-batch-size", type=int, default=128, help="training batch size (default: 128)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of the measurements (default: 256)")
    parser.add_argument("--budget", type=float, default=TARGET_DROP_PP,
                        help="accuracy budget for calibration, percentage points below the last exit (default: 0.5)")
    parser.add_argument("--drop-measure", choices=DROP_MEASURES, default="new_errors",
                        help="what the budget bounds on validation: 'new_errors' (images the strongest network "
                             "gets right and the system gets wrong; conservative, the default) or 'net' "
                             "(accuracy difference, calibrate's own rule)")
    parser.add_argument("--cost", choices=("flops", "latency"), default="flops",
                        help="cost model the calibration minimises (default: flops)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed passes over the test set per system; the median is reported (default: 5)")
    parser.add_argument("--val-size", type=int, default=5000,
                        help="validation images held out of train (default: 5000)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, usually the number of cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the shuffling")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny end-to-end run for CI: small subsets, a few training steps, tiny networks")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


# -- small helpers ----------------------------------------------------------------------------------
def _subset(x, y, n, seed):
    if n >= x.shape[0]:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


# -- measurement ------------------------------------------------------------------------------------
@torch.inference_mode()
def predict(model: nn.Module, batches) -> tuple[torch.Tensor, dict]:
    """Eval-mode predictions over ``batches``; for adaptive models also exit counts and FLOPs spent."""
    preds, counts, flops, full = [], None, 0.0, 0.0
    for xb in batches:
        if isinstance(model, AdaptiveModel):
            logits, info = model(xb, return_info=True)
            c = torch.tensor(info.exit_counts, dtype=torch.long)
            counts = c if counts is None else counts + c
            flops += info.flops
            full += info.full_flops
        else:
            logits = model(xb)
        if logits.shape[0] != xb.shape[0]:
            raise RuntimeError(f"{type(model).__name__} returned {logits.shape[0]} rows for {xb.shape[0]} inputs")
        preds.append(logits.argmax(1))
    extra = {}
    if counts is not None:
        extra = {"exit_counts": counts.tolist(), "flops": flops, "full_flops": full}
    return torch.cat(preds), extra


def per_batch(fn, batches):
    """One pass over ``batches``, one call of ``fn`` per batch (the per-batch executor, or a plain net)."""
    def run():
        for xb in batches:
            fn(xb)
    return run


def streamed(system, batches, batch_size: int):
    """One pass over ``batches`` through :func:`adaexit.stream` (rows regrouped across batches)."""
    def run():
        for _ in stream(system, batches, batch_size=batch_size):
            pass
    return run


def time_passes(passes: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Wall-clock seconds of each one-pass function: median (and all) of ``repeats``.

    Passes are interleaved, in an order rotating every round (:func:`adaexit.cost.interleaved_times`), so
    a burst of load from other processes does not land on one system only.
    """
    with torch.inference_mode():
        times = interleaved_times(passes, repeats, warmup, rotate=True)
    out = {}
    for name, ms in times.items():
        ts = [t / 1e3 for t in ms]
        s = sorted(ts)
        out[name] = {"median_s": s[len(s) // 2], "min_s": s[0], "max_s": s[-1], "all_s": ts}
    return out


# -- the table --------------------------------------------------------------------------------------
def format_table(rows: list[dict], strongest: str) -> str:
    head = (f"{'model':<22} {'test acc %':>10} {'drop pp':>8} {'ms/pass':>9} {'speedup':>8} "
            f"{'MFLOPs/img':>10} {'FLOPs ratio':>11}  exits (% of test images)")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = " (reference)" if r["name"] == strongest else ""
        exits = ""
        if r.get("exit_fractions"):
            exits = " ".join(f"{100 * f:.1f}" for f in r["exit_fractions"])
        lines.append(
            f"{r['name'] + mark:<22} {100 * r['accuracy']:10.2f} {r['accuracy_drop_pp']:8.2f} "
            f"{1e3 * r['time_s']:9.1f} {r['speedup']:7.2f}x {r['flops_per_example'] / 1e6:10.3f} "
            f"{r['flops_ratio']:10.2f}x  {exits}"
        )
    return "\n".join(lines)


def _exit_names(model, member_names: dict[int, str]) -> list[str]:
    """A label per exit of an adaptive system (``member_names``: ``id(network) -> name``)."""
    if isinstance(model, Cascade):
        names = []
        members = model.node_members()
        for k, m in enumerate(members):
            net = member_names.get(id(model.models[m]), f"model{m}")
            stage = sum(1 for j in members[:k] if j == m)
            names.append(f"{net}.exit{stage}" if members.count(m) > 1 else net)
        return names
    net = member_names.get(id(model), type(model).__name__)
    return [f"{net}.exit{k}" for k in range(model.num_exits)]


# -- the run ----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args`` (see :func:`add_arguments`); returns the exit status."""
    t_start = time.perf_counter()
    for name in ("epochs", "batch_size", "train_batch_size", "repeats", "val_size"):
        value = getattr(args, name)
        if value is None or int(value) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.budget >= 0:
        raise ValueError(f"--budget must be >= 0 percentage points, got {args.budget}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    machine = machine_info()
    _log(f"[demo] {machine['device_name']}, {machine['cpu_cores']} cores, torch threads {machine['torch_threads']}")

    # 1. data ---------------------------------------------------------------------------------------
    try:
        x_all, y_all = load_fashion_mnist("train", args.data)
        x_test, y_test = load_fashion_mnist("test", args.data)
    except FileNotFoundError as err:
        print(f"adaexit demo: Fashion-MNIST not found.\n{err}", file=sys.stderr)
        return 2
    if not 0 < args.val_size < x_all.shape[0]:
        raise ValueError(f"--val-size must be between 1 and {x_all.shape[0] - 1}, got {args.val_size}")
    x_train, y_train, x_val, y_val = train_val_split(x_all, y_all, args.val_size, seed=args.seed)
    if args.smoke:  # CI: small subsets so the whole path runs in seconds
        x_train, y_train = _subset(x_train, y_train, 1024, args.seed)
        x_val, y_val = _subset(x_val, y_val, 512, args.seed + 1)
        x_test, y_test = _subset(x_test, y_test, 512, args.seed + 2)
    _log(f"[demo] data: {x_train.shape[0]} train, {x_val.shape[0]} validation, {x_test.shape[0]} test images")

    # 2. train (cached) -------------------------------------------------------------------------------
    cache = Path(args.cache).expanduser() if args.cache else default_cache()
    configs = net_configs(args.epochs, args.smoke, args.train_batch_size)
    nets, records = train_all(configs, (x_train, y_train), cache, args.seed, args.retrain, progress)
    train_seconds = sum(r.get("train_seconds", 0.0) for r in records.values() if not r["cached"])
    train_cpu = sum(r.get("train_cpu_seconds", 0.0) for r in records.values() if not r["cached"])
    wide = nets["wide_cnn"]
    singles = {"mlp": nets["mlp"], "small_cnn": nets["small_cnn"], "wide_cnn": plain_network(wide)}
    member_names = {id(net): name for name, net in {**nets, **singles}.items()}
    for m in list(nets.values()) + list(singles.values()):
        m.eval()

    # 3. the strongest single network, chosen on validation ----------------------------------------
    bs = args.batch_size
    val_batches = [x_val[i : i + bs] for i in range(0, x_val.shape[0], bs)]
    test_batches = [x_test[i : i + bs] for i in range(0, x_test.shape[0], bs)]
    val_acc = {}
    for name, net in singles.items():
        preds, _ = predict(net, val_batches)
        val_acc[name] = float((preds == y_val).double().mean())
    wide_exit_acc = evaluate(wide, x_val, y_val, batch_size=bs)
    _log("[demo] validation accuracy of the wide CNN's exits: "
         + ", ".join(f"{100 * a:.2f}%" for a in wide_exit_acc))
    strongest = max(val_acc, key=lambda n: (val_acc[n], n == "wide_cnn"))
    _log("[demo] validation accuracy of the single networks: "
         + ", ".join(f"{n} {100 * a:.2f}%" for n, a in val_acc.items()) + f" -> reference: {strongest}")

    # 4. calibrate the adaptive systems on validation -------------------------------------------------
    systems = {
        "early_exit": wide,
        "cascade": Cascade([nets["mlp"], nets["small_cnn"], singles["wide_cnn"]]),
        "combination": Cascade([nets["mlp"], nets["small_cnn"], wide]),
    }
    calibrations, selections = {}, {}
    for name, system in systems.items():
        system.eval()
        _log(f"[demo] calibrating {name} on {x_val.shape[0]} validation images (budget {args.budget:g} pp)")
        result = calibrate(system, (x_val, y_val), max_accuracy_drop=args.budget, cost=args.cost,
                           progress=progress, batch_size=bs, drop=args.drop_measure)
        system.eval()
        calibrations[name], selections[name] = result, result.best
        p = result.best
        _log(f"[demo]   {name}: {p.kind}/{p.criterion}, validation: net drop {p.accuracy_drop_pp:.2f} pp, "
             f"new errors {p.new_errors_pp:.2f} pp, expected speedup {p.speedup:.2f}x ({args.cost})")
        _log(result.families_table())

    # 5. measure on the test set ----------------------------------------------------------------------
    example = x_test[:1]
    flops = {name: float(count_flops(net, example)) for name, net in singles.items()}
    results: dict[str, dict] = {}
    test_right = {}
    for name, net in singles.items():
        preds, _ = predict(net, test_batches)
        test_right[name] = preds == y_test
        results[name] = {"kind": "single", "accuracy": float(test_right[name].double().mean()),
                         "flops_per_example": flops[name]}
    for name, system in systems.items():
        preds, extra = predict(system, test_batches)
        n = x_test.shape[0]
        right, ref_right = preds == y_test, test_right[strongest]
        results[name] = {
            "kind": "adaptive",
            "accuracy": float(right.double().mean()),
            "new_errors_pp": 100.0 * float((ref_right & ~right).double().mean()),
            "fixed_pp": 100.0 * float((~ref_right & right).double().mean()),
            "flops_per_example": extra["flops"] / n,
            "exit_counts": extra["exit_counts"],
            "exit_fractions": [c / n for c in extra["exit_counts"]],
            "exit_names": _exit_names(system, member_names),
            "policy": {"drop_measure": args.drop_measure, **selections[name].to_dict()},
        }
    # the streaming mode: the same policies, rows regrouped across the test batches (adaexit.stream)
    for name, system in systems.items():
        with torch.inference_mode():
            preds = torch.cat([logits.argmax(1) for logits in stream(system, test_batches, batch_size=bs)])
        right = preds == y_test
        results[f"{name} (stream)"] = {
            **results[name],
            "mode": "stream",
            "accuracy": float(right.double().mean()),
            "new_errors_pp": 100.0 * float((test_right[strongest] & ~right).double().mean()),
            "same_predictions_as_per_batch": float((preds == predict(system, test_batches)[0]).double().mean()),
        }
        results[name]["mode"] = "per-batch"
    _log(f"[demo] timing {args.repeats} passes over {x_test.shape[0]} test images at batch {bs} "
         f"({torch.get_num_threads()} threads)")
    passes = {name: per_batch(net, test_batches) for name, net in {**singles, **systems}.items()}
    passes.update({f"{name} (stream)": streamed(system, test_batches, bs) for name, system in systems.items()})
    timings = time_passes(passes, args.repeats)
    ref = results[strongest]
    t_ref = timings[strongest]["median_s"]
    for name, r in results.items():
        r["time_s"] = timings[name]["median_s"]
        r["time_all_s"] = timings[name]["all_s"]
        r["speedup"] = t_ref / r["time_s"]
        r["flops_ratio"] = ref["flops_per_example"] / r["flops_per_example"]
        r["accuracy_drop_pp"] = 100.0 * (ref["accuracy"] - r["accuracy"])
    rows = [{"name": n, **r} for n, r in results.items()]
    table = format_table(rows, strongest)

    # "best": chosen on validation, reported on test: every system (each within the budget there) in both
    # modes, timed on the validation images; the fastest wins. (The largest expected FLOPs speedup is not the
    # fastest here: the cheap networks run far below the wide CNN's FLOP rate on a CPU.)
    val_passes = {}
    for name, system in systems.items():
        val_passes[name] = per_batch(system, val_batches)
        val_passes[f"{name} (stream)"] = streamed(system, val_batches, bs)
    val_times = time_passes(val_passes, repeats=args.repeats)
    best_name = min(val_times, key=lambda n: val_times[n]["median_s"])
    best_system = best_name.removesuffix(" (stream)")
    mode = "stream" if best_name.endswith(" (stream)") else "per-batch"
    best = results[best_name]
    total_seconds = time.perf_counter() - t_start
    summary = {
        "system": best_system,
        "mode": mode,
        "selected_by": "the fastest system and mode on the validation split (each calibrated within the budget there)",
        "validation_seconds": {name: t["median_s"] for name, t in val_times.items()},
        "accuracy": best["accuracy"],
        "accuracy_drop_pp": best["accuracy_drop_pp"],
        "speedup": best["speedup"],
        "flops_ratio": best["flops_ratio"],
        "reference": strongest,
        "reference_accuracy": ref["accuracy"],
        "batch_size": bs,
        "meets_target": bool(best["speedup"] >= TARGET_SPEEDUP and best["accuracy_drop_pp"] <= TARGET_DROP_PP),
    }
    print(f"\nFashion-MNIST test set ({x_test.shape[0]} images), batch {bs}, {torch.get_num_threads()} CPU "
          f"threads ({machine['device_name']}); time = median of {args.repeats} full passes")
    print(table)
    print(f"\nbest (chosen on validation): {best_name}: {best['speedup']:.2f}x measured wall-clock speedup "
          f"over {strongest} at {best['accuracy_drop_pp']:+.2f} pp accuracy drop "
          f"(target: >= {TARGET_SPEEDUP:g}x at <= {TARGET_DROP_PP:g} pp: "
          f"{'met' if summary['meets_target'] else 'NOT met'})")
    trained = [n for n, r in records.items() if not r["cached"]]
    print(f"training: {train_seconds:.1f} s wall, {train_cpu:.1f} s CPU "
          f"({'trained ' + ', '.join(trained) if trained else 'all checkpoints cached'}); "
          f"whole command: {total_seconds:.1f} s")

    if args.out:
        out = Path(args.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        # calibration speedups are over each system's last exit; in FLOPs they convert exactly
        scales = {n: (ref["flops_per_example"] / c.full_cost if args.cost == "flops" else 1.0)
                  for n, c in calibrations.items()}
        measured = {n: results[f"{n} (stream)" if mode == "stream" else n] for n in systems}
        plot_system_frontiers(out / "frontier.png", calibrations, measured,
                              val_acc[strongest], ref["accuracy"], args.budget, args.cost, scales,
                              selections, target=TARGET_SPEEDUP,
                              title="Fashion-MNIST: accuracy vs speedup (circles: calibrated policies)")
        plot_exits(out / "exits.png", measured)
        plots = {"frontier": "frontier.png", "exits": "exits.png"}
        payload = {
            "best": summary,
            "results": results,
            "reference": strongest,
            "validation_accuracy_single": val_acc,
            "validation_accuracy_wide_exits": wide_exit_acc,
            "calibration": {n: c.to_dict() for n, c in calibrations.items()},
            "training": {n: {k: v for k, v in r.items()} for n, r in records.items()},
            "timing": {"train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
                       "total_seconds": time.perf_counter() - t_start},
            "machine": {**machine, "load_average_end": machine_info().get("load_average_1min")},
            "settings": {k: v for k, v in vars(args).items() if k != "func"},
            "data": {"train": x_train.shape[0], "validation": x_val.shape[0], "test": x_test.shape[0],
                     "source": str(args.data or "default")},
            "plots": plots,
            "table": table,
        }
        with open(out / "results.json", "w") as f:
            json.dump(_clean(payload), f, indent=2, allow_nan=False)
        _log(f"[demo] wrote {out / 'results.json'}" + (f" and {', '.join(plots.values())}" if plots else ""))
    return 0


def _clean(obj):
    """JSON-safe copy: non-finite floats become null, tensors and paths plain values."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m adaexit.apps.fashion_mnist.demo``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="adaexit demo", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
