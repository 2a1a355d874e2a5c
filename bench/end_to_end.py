"""End to end: plain vs masked dense vs batch-1 loop vs adaexit, for early exit and for the cascade,
at batch sizes from 1 to 1024 (issue 6).

``python -m bench.end_to_end [--json PATH] [--batch-sizes 1,8,64,256,1024] [--source auto|demo|fresh]``

Models. With ``--source auto`` (default) the demo's trained networks are used when the demo has left
them in its checkpoint cache, calibrated as the demo does (see :func:`demo_systems`); otherwise fresh,
*untrained* models of the demo's architectures (:mod:`adaexit.apps.fashion_mnist.models`) are built and their thresholds
set so that fixed fractions of the rows exit at each exit - speed, not accuracy, is measured then, and
the output says so.
Inputs are Fashion-MNIST test images when the dataset is installed, random images otherwise.

Method. At each batch size the plain model, masked dense and adaexit run interleaved (A B C A B C ...)
and medians are reported. The batch-1 loop's time does not depend on the batch size per row, so it is
measured once per system on a small sample of rows and reported as ``batch size x ms per row``. The
ideal speedup is the FLOPs ratio of the work that had to run (``info.ideal_speedup``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import (
    apply_threads,
    cascade_networks,
    cnn_early_exit,
    comma_list,
    common_arguments,
    contention_note,
    describe_machine,
    finish,
    format_table,
    interleaved_times,
    machine,
    median,
    policy_for_fractions,
)
from .baselines import adaexit, batch1_loop, masked_dense, plain

DEFAULT_BATCH_SIZES = (1, 8, 64, 256, 1024)
EARLY_EXITING = 0.75  # fresh models: share of the rows leaving at the early exits (split evenly); the last takes the rest
CASCADE_FRACTIONS = (0.5, 0.25)


# ----------------------------------------------------------------------------------------------------
# Models and data


def load_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` Fashion-MNIST test images (normalised like the demo's) or, without the dataset, random ones."""
    try:
        from adaexit.data import load_fashion_mnist

        x, _ = load_fashion_mnist("test")
        if x.dim() == 3:
            x = x.unsqueeze(1)
        reps = -(-n // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].float(), "Fashion-MNIST test images"
    except (ImportError, ValueError, OSError, FileNotFoundError):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, 1, 28, 28, generator=gen), "random 1x28x28 images (Fashion-MNIST not found)"


def demo_systems(cache=None, seed: int | None = None, epochs: int | None = None,
                 train_batch_size: int | None = None, val_size: int | None = None, budget: float | None = None):
    """The demo's trained networks from its checkpoint cache, calibrated as the demo does, or ``None``.

    Reads the cache of ``python -m adaexit demo`` with its default settings (or the ones given): the
    checkpoint names come from :func:`adaexit.apps.fashion_mnist.recipe.checkpoint_paths`; the networks are
    rebuilt and loaded by :func:`adaexit.apps.fashion_mnist.recipe.load_checkpoint`. Nothing is trained here: if any checkpoint is
    missing, ``None``. The policies are then calibrated like the demo's, with
    :func:`adaexit.calibration.calibrate` on the same validation split at ``budget`` percentage points.
    Systems: ``early_exit`` (the wide CNN's exits), ``cascade`` (MLP -> small CNN -> wide CNN) and
    ``combination`` (MLP -> small CNN -> the wide early-exit CNN).
    """
    try:
        from adaexit.apps.fashion_mnist import demo, recipe
        from adaexit.calibration import calibrate
        from adaexit.cascade import Cascade
        from adaexit.data import load_fashion_mnist, train_val_split
        from adaexit.apps.fashion_mnist.models import plain_network
    except ImportError:
        return None
    # unspecified settings are the demo's own defaults, so its default cache is found
    defaults = demo.add_arguments(argparse.ArgumentParser()).parse_args([])
    seed = defaults.seed if seed is None else seed
    epochs = defaults.epochs if epochs is None else epochs
    train_batch_size = defaults.train_batch_size if train_batch_size is None else train_batch_size
    val_size = defaults.val_size if val_size is None else val_size
    budget = defaults.budget if budget is None else budget
    try:
        configs = recipe.net_configs(epochs, False, train_batch_size)
        cache = Path(cache).expanduser() if cache else recipe.default_cache()
        x_all, y_all = load_fashion_mnist("train")
        x_train, y_train, x_val, y_val = train_val_split(x_all, y_all, val_size, seed=seed)
        paths = recipe.checkpoint_paths(configs, cache, x_train, y_train, seed)  # as the demo names them
        if not all(path.is_file() for path in paths.values()):
            return None
        nets = {cfg.name: recipe.load_checkpoint(cfg, paths[cfg.name])[0] for cfg in configs}
    except (AttributeError, KeyError, TypeError, ValueError, OSError, RuntimeError):
        return None  # the demo's cache layout is not what this reader expects
    wide = nets["wide_cnn"]
    systems = {
        "early_exit": wide,
        "cascade": Cascade([nets["mlp"], nets["small_cnn"], plain_network(wide)]),
        "combination": Cascade([nets["mlp"], nets["small_cnn"], wide]),
    }
    out = {}
    for name, system in systems.items():
        system.eval()
        result = calibrate(system, (x_val, y_val), max_accuracy_drop=budget, cost="flops", progress=False,
                           drop=defaults.drop_measure)
        system.eval()
        best = result.best
        out[name] = (
            system,
            f"trained by the demo (cache {cache}), calibrated on its validation split at <= {budget:g} pp: "
            f"{best.kind}/{best.criterion}, validation drop {best.accuracy_drop_pp:.2f} pp",
        )
    return out


def fresh_systems(calibration: torch.Tensor) -> dict:
    """Untrained models of the demo's architectures, thresholds set to fixed exit fractions."""
    from adaexit.cascade import Cascade

    try:
        from adaexit.apps.fashion_mnist.models import mlp, plain_network, small_cnn, wide_cnn

        torch.manual_seed(0)
        early = wide_cnn()
        nets = [mlp(), small_cnn(), plain_network(wide_cnn())]
        arch = "adaexit.apps.fashion_mnist.models: wide_cnn; cascade mlp -> small_cnn -> wide_cnn"
    except ImportError:  # the demo's zoo is not there: the benchmark's own CNNs
        early = cnn_early_exit()
        nets = cascade_networks()
        arch = "bench CNNs"
    early.eval()
    cascade = Cascade(nets, example_input=calibration[:1]).eval()
    early_fractions = [EARLY_EXITING / (early.num_exits - 1)] * (early.num_exits - 1)
    early.set_policy(policy_for_fractions(early, calibration, early_fractions))
    cascade.set_policy(policy_for_fractions(cascade, calibration, CASCADE_FRACTIONS))
    note = (
        f"fresh UNTRAINED models ({arch}); thresholds set so about "
        f"{'/'.join(f'{f:.0%}' for f in early_fractions)} of the rows exit at the early exits"
    )
    return {"early_exit": (early, note), "cascade": (cascade, note)}


# ----------------------------------------------------------------------------------------------------
# Measurement


def _loop_ms_per_row(model, x: torch.Tensor, rows: int) -> float:
    run = batch1_loop(model)
    sample = x[:rows]
    run(sample[:2])  # warm-up
    times = interleaved_times({"loop": lambda: run(sample)}, repeats=3, warmup=0, device=sample.device)["loop"]
    return median([ms / sample.shape[0] for ms in times])


def measure_system(model, x: torch.Tensor, batch_sizes, loop_rows: int, cell_budget_s: float) -> list[dict]:
    """One row per batch size: median ms of each strategy, speedups over plain and the ideal."""
    runs = {"plain": plain(model), "masked_dense": masked_dense(model), "adaexit": adaexit(model)}
    loop_row_ms = _loop_ms_per_row(model, x, loop_rows)
    results = []
    for b in batch_sizes:
        xb = x[:b]
        with torch.inference_mode():
            _, info = model(xb, return_info=True)
        calls = {name: (lambda r=run, v=xb: r(v)) for name, run in runs.items()}
        # one timed pass sizes the number of rounds
        first = interleaved_times(calls, repeats=1, warmup=0, device=xb.device)
        round_s = sum(ms for t in first.values() for ms in t) / 1e3
        repeats = int(max(3, min(30, cell_budget_s / max(round_s, 1e-6))))
        times = interleaved_times(calls, repeats=repeats, warmup=0, device=xb.device)
        ms = {name: median(t) for name, t in times.items()}
        ms["batch1_loop"] = loop_row_ms * b
        row = {
            "batch": b,
            "repeats": repeats,
            "exit_counts": list(info.exit_counts),
            "ideal_speedup": info.ideal_speedup,
        }
        for name, value in ms.items():
            row[f"{name}_ms"] = value
            row[f"{name}_speedup"] = ms["plain"] / value
        row["adaexit_over_ideal"] = row["adaexit_speedup"] / info.ideal_speedup
        results.append(row)
    return results


def run(
    batch_sizes=DEFAULT_BATCH_SIZES,
    source: str = "auto",
    loop_rows: int = 32,
    cell_budget_s: float = 2.0,
    calibration_rows: int = 1024,
    cache=None,
) -> dict:
    """Measure every system at every batch size; returns the JSON-ready report."""
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    if calibration_rows < 1:
        raise ValueError(f"calibration rows must be >= 1, got {calibration_rows}")
    if source not in ("auto", "demo", "fresh"):
        raise ValueError(f"source must be 'auto', 'demo' or 'fresh', got {source!r}")
    x, data_note = load_inputs(max(batch_sizes + [calibration_rows]))
    systems = demo_systems(cache) if source in ("auto", "demo") else None
    if systems is None:
        if source == "demo":
            raise ValueError("--source demo: no cached demo models found; run `python -m adaexit demo` first")
        systems = fresh_systems(x[:calibration_rows])
    report = {"benchmark": "end_to_end", "machine": machine(), "inputs": data_note, "loop_rows": loop_rows, "systems": {}}
    for name, (model, note) in systems.items():
        model.eval()
        report["systems"][name] = {
            "model": f"{type(model).__name__}: {note}",
            "policy": repr(model.policy),
            "results": measure_system(model, x, batch_sizes, loop_rows, cell_budget_s),
        }
    return report


COLUMNS = [
    ("batch", "batch", "d"),
    ("plain_ms", "plain ms", ".2f"),
    ("masked_dense_ms", "masked ms", ".2f"),
    ("batch1_loop_ms", "batch-1 loop ms", ".1f"),
    ("adaexit_ms", "adaexit ms", ".2f"),
    ("masked_dense_speedup", "masked x", ".2f"),
    ("batch1_loop_speedup", "loop x", ".2f"),
    ("adaexit_speedup", "adaexit x", ".2f"),
    ("ideal_speedup", "ideal x", ".2f"),
    ("adaexit_over_ideal", "adaexit/ideal", ".2f"),
]


def format_report(report: dict) -> str:
    lines = [
        f"end to end on {describe_machine(report['machine'])}",
        f"inputs: {report['inputs']}; speedups (x) are over the plain model; batch-1 loop = batch x "
        f"(ms per row over {report['loop_rows']} rows)",
    ]
    for name, system in report["systems"].items():
        lines += ["", f"{name}: {system['model']}", f"policy: {system['policy']}", format_table(system["results"], COLUMNS)]
    note = contention_note(report["machine"])
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="comma-separated (default 1,8,64,256,1024)")
    parser.add_argument("--source", default="auto", choices=("auto", "demo", "fresh"),
                        help="the demo's trained models (demo), fresh untrained ones (fresh), or demo if cached (auto)")
    parser.add_argument("--loop-rows", type=int, default=32, help="rows the batch-1 loop is timed on")
    parser.add_argument("--cell-seconds", type=float, default=2.0, help="time budget per (system, batch size)")
    parser.add_argument("--cache", metavar="DIR", help="the demo's checkpoint cache (default: the demo's default)")
    parser.add_argument("--calibration-rows", type=int, default=1024,
                        help="rows the fresh models' thresholds are set on (default 1024)")
    common_arguments(parser, json_help="write the report as JSON")
    args = parser.parse_args(argv)
    sizes = comma_list(parser, args.batch_sizes, "--batch-sizes")
    if args.loop_rows < 1:
        parser.error("--loop-rows must be >= 1")
    apply_threads(parser, args)
    try:
        report = run(sizes, args.source, args.loop_rows, args.cell_seconds, args.calibration_rows, args.cache)
    except ValueError as err:
        parser.error(str(err))
    return finish(report, args, format_report)


if __name__ == "__main__":
    sys.exit(main())
