"""Cross-batch re-batching: ``adaexit.stream`` vs the per-batch executor vs the plain model (issue 12).

``python -m bench.bench_stream [--quick] [--batch-sizes 1,8,64,256] [--systems chain,early_exit,cascade,combination]
[--source auto|demo|fresh] [--json PATH]``

The same rows are split into request batches of ``b`` rows and run three ways: the plain model (the
strongest single network) batch by batch, the adaptive model batch by batch (``model(batch)``: later nodes
run on the batch's survivors only), and ``adaexit.stream(model, batches, batch_size=b)`` (a queue per node:
every node runs on ``b`` rows regrouped across batches). Reported per system and request batch size:

* measured speedup over the plain model (wall clock of the whole pass, medians of interleaved rounds);
* the **measured-work ideal**: the plain model's time over the time of the work that must run - each
  node's module and router alone at ``b`` rows (:func:`bench.node_work`, timed in the same rounds),
  weighted by the fraction of the rows that reach the node - i.e. every node at full batch, no
  scheduling cost;
* the FLOPs ideal (``info.ideal_speedup``), and measured / measured-work ideal.

Systems: ``chain`` is a synthetic chain of 4 equal-cost MLP stages (random weights) whose thresholds make
half of the rows still running exit at each exit (time is about proportional to FLOPs there);
``early_exit`` / ``cascade`` / ``combination`` are the demo's systems on Fashion-MNIST test images: with
``--source auto`` (default) the demo's trained, calibrated networks when its checkpoint cache holds them
(:func:`bench.end_to_end.demo_systems`), otherwise fresh UNTRAINED models of the demo's architectures with
thresholds set to fixed exit fractions (the output says which).

Targets (issues 12, 19): stream >= 0.9 x the measured-work ideal at request batch 8 to 256; on the chain,
>= 0.8 x the FLOPs ideal at batch 64.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque

import torch
from torch import nn

from adaexit import Cascade, EarlyExitNet, ExitHead, stream

from . import (
    apply_threads,
    comma_list,
    common_arguments,
    contention_note,
    describe_machine,
    finish,
    format_table,
    interleaved_times,
    machine,
    median,
    node_work,
    policy_for_fractions,
)
from .baselines import adaexit, plain

DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
SYSTEMS = ("chain", "early_exit", "cascade", "combination")
CHAIN_FRACTIONS = (0.5, 0.25, 0.125)  # half of the rows still running exit at each exit
COMBINATION_FRACTIONS = (0.5, 0.25, 0.05, 0.05, 0.05)  # fresh combination: MLP, small CNN, the wide CNN's exits
TARGET_WORK_RATIO = 0.9
TARGET_CHAIN_FLOPS_RATIO = 0.8  # issue 19 (held-out chain, batch 64)
#: default and --quick settings: most rows per pass, fewest rows, request batches per pass, seconds per cell
#: (default: issue 19's held-out chain, two Linear(512, 512) per stage, and 64 request batches a pass: 64 of 64 rows)
DEFAULTS = {"rows": 4096, "min_rows": 512, "batches": 64, "cell_seconds": 3.0, "chain_width": 512}
QUICK = {"rows": 1024, "min_rows": 128, "batches": 8, "cell_seconds": 1.0, "chain_width": 512}


# ----------------------------------------------------------------------------------------------------
# Systems


def chain(width: int = 512, stages: int = 4, num_classes: int = 10, seed: int = 0) -> EarlyExitNet:
    """``stages`` equal-cost MLP stages (two ``Linear(width, width)`` + ReLU each) with a pooled-linear exit
    head after each; the input is ``width`` features. Random weights (speed, not accuracy)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        body = [nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
                for _ in range(stages)]
        model = EarlyExitNet(body, [ExitHead(width, num_classes) for _ in body])
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def chain_system(rows: int, width: int = 512, seed: int = 0):
    model = chain(width, seed=seed)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    model.set_policy(policy_for_fractions(model, x, CHAIN_FRACTIONS))
    note = (f"synthetic chain: 4 equal-cost stages of two Linear({width}, {width}) + ReLU, random weights; "
            f"thresholds set so {'/'.join(f'{f:.1%}' for f in CHAIN_FRACTIONS)} of the rows exit at exits 0-2")
    return model, note, x


def _fresh_combination(calibration: torch.Tensor):
    """An untrained combination MLP -> small CNN -> early-exit wide CNN, thresholds at fixed fractions
    (``end_to_end.fresh_systems`` builds the other two systems); ``None`` without the demo's zoo."""
    try:
        from adaexit.apps.fashion_mnist.models import mlp, small_cnn, wide_cnn
    except ImportError:
        return None
    torch.manual_seed(1)
    model = Cascade([mlp(), small_cnn(), wide_cnn()], example_input=calibration[:1]).eval()
    model.set_policy(policy_for_fractions(model, calibration, COMBINATION_FRACTIONS))
    return model, (f"fresh UNTRAINED models (adaexit.apps.fashion_mnist.models: mlp -> small_cnn -> wide_cnn with exits); thresholds "
                   f"set so about {'/'.join(f'{f:.0%}' for f in COMBINATION_FRACTIONS)} of the rows exit at the "
                   "first exits")


def load_systems(names, source: str = "auto", rows: int = 4096, chain_width: int = 512, cache=None,
                 calibration_rows: int = 1024) -> tuple[dict, str]:
    """``name -> (model, note, inputs)`` for the systems asked for, and a note on the demo's inputs."""
    from .end_to_end import demo_systems, fresh_systems, load_inputs

    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    if source not in ("auto", "demo", "fresh"):
        raise ValueError(f"source must be 'auto', 'demo' or 'fresh', got {source!r}")
    out, data_note = {}, ""
    if "chain" in names:
        out["chain"] = chain_system(rows, chain_width)
    demo_names = [n for n in names if n != "chain"]
    if demo_names:
        x, data_note = load_inputs(rows)
        systems = demo_systems(cache) if source in ("auto", "demo") else None
        if systems is None:
            if source == "demo":
                raise ValueError("--source demo: no cached demo models found; run `python -m adaexit demo` first")
            calibration = x[:calibration_rows]  # fresh models' thresholds: set on (up to) the timed rows
            systems = fresh_systems(calibration)
            if "combination" in demo_names:
                combination = _fresh_combination(calibration)
                if combination is not None:
                    systems["combination"] = combination
        for name in demo_names:
            if name in systems:
                model, note = systems[name]
                out[name] = (model.eval(), note, x[:rows])
    return {name: out[name] for name in names if name in out}, data_note


# ----------------------------------------------------------------------------------------------------
# Measurement


def rows_for(batch: int, rows: int, min_rows: int, batches: int) -> int:
    """Rows in one timed pass at request batch ``batch``: ``batches`` requests, within [min_rows, rows]."""
    return max(batch, min(rows, max(min_rows, batches * batch)))


def measure(model, x: torch.Tensor, batch: int, rows: int, min_rows: int, batches: int, cell_seconds: float) -> dict:
    """One request batch size: the three passes and each node's work at full batch, interleaved."""
    n = rows_for(batch, min(rows, x.shape[0]), min_rows, batches)
    xs = x[:n]
    requests = list(xs.split(batch))
    with torch.inference_mode():
        _, info = model(xs, return_info=True)
    plain_run, per_batch_run = plain(model), adaexit(model)
    calls = {
        "plain": lambda: [plain_run(r) for r in requests],
        "per_batch": lambda: [per_batch_run(r) for r in requests],
        "stream": lambda: deque(stream(model, requests, batch_size=batch), maxlen=0),
    }
    work = node_work(model, xs[:batch], [batch] * len(info.rows_run))
    for k, call in enumerate(work):
        if info.rows_run[k]:
            calls[f"node{k}"] = call
    with torch.inference_mode():
        first = interleaved_times(calls, repeats=1, warmup=1)
        round_s = sum(t for v in first.values() for t in v) / 1e3
        repeats = int(max(3, min(30, cell_seconds / max(round_s, 1e-6))))
        times = interleaved_times(calls, repeats=repeats, warmup=0)
    ms = {name: median(t) for name, t in times.items()}
    # the work that must run, every node at full batch: node k runs on rows_run[k] rows, batch rows at a time
    work_ms = sum(ms[f"node{k}"] * r / batch for k, r in enumerate(info.rows_run) if r)
    row = {
        "batch": batch,
        "rows": n,
        "repeats": repeats,
        "exit_counts": list(info.exit_counts),
        "reach": [r / n for r in info.rows_run],
        "plain_ms": ms["plain"],
        "per_batch_ms": ms["per_batch"],
        "stream_ms": ms["stream"],
        "work_ms": work_ms,
        "node_ms_at_batch": [ms.get(f"node{k}") for k in range(len(info.rows_run))],
        "per_batch_speedup": ms["plain"] / ms["per_batch"],
        "stream_speedup": ms["plain"] / ms["stream"],
        "work_ideal": ms["plain"] / work_ms,
        "flops_ideal": info.ideal_speedup,
    }
    row["stream_over_work_ideal"] = row["stream_speedup"] / row["work_ideal"]
    row["per_batch_over_work_ideal"] = row["per_batch_speedup"] / row["work_ideal"]
    row["stream_over_flops_ideal"] = row["stream_speedup"] / row["flops_ideal"]
    return row


def targets(name: str, results: list[dict]) -> dict:
    out = {}
    for row in results:
        if 8 <= row["batch"] <= 256:
            out[f"b{row['batch']}: stream/work-ideal>={TARGET_WORK_RATIO}"] = row["stream_over_work_ideal"] >= TARGET_WORK_RATIO
        if name == "chain" and row["batch"] == 64:
            out[f"b64: stream/FLOPs-ideal>={TARGET_CHAIN_FLOPS_RATIO}"] = (
                row["stream_over_flops_ideal"] >= TARGET_CHAIN_FLOPS_RATIO
            )
    return out


def run(batch_sizes=DEFAULT_BATCH_SIZES, systems=SYSTEMS, source: str = "auto", rows: int = DEFAULTS["rows"],
        min_rows: int = DEFAULTS["min_rows"], batches: int = DEFAULTS["batches"],
        cell_seconds: float = DEFAULTS["cell_seconds"], chain_width: int = DEFAULTS["chain_width"],
        cache=None) -> dict:
    """Measure every system at every request batch size; returns the JSON-ready report."""
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    if min(rows, min_rows, batches, chain_width) < 1:
        raise ValueError("rows, min-rows, batches and chain-width must be >= 1")
    total = max(rows, max(batch_sizes))
    loaded, data_note = load_systems(list(systems), source, total, chain_width, cache)
    report = {"benchmark": "stream", "machine": machine(), "inputs": data_note, "systems": {}}
    for name, (model, note, x) in loaded.items():
        results = [measure(model, x, b, total, min_rows, batches, cell_seconds) for b in batch_sizes]
        report["systems"][name] = {
            "model": f"{type(model).__name__}: {note}",
            "policy": repr(model.policy),
            "results": results,
            "targets": targets(name, results),
        }
    return report


COLUMNS = [
    ("batch", "batch", "d"),
    ("rows", "rows", "d"),
    ("plain_ms", "plain ms", ".1f"),
    ("per_batch_ms", "per-batch ms", ".1f"),
    ("stream_ms", "stream ms", ".1f"),
    ("per_batch_speedup", "per-batch x", ".2f"),
    ("stream_speedup", "stream x", ".2f"),
    ("work_ideal", "work ideal x", ".2f"),
    ("flops_ideal", "FLOPs ideal x", ".2f"),
    ("stream_over_work_ideal", "stream/work", ".2f"),
    ("per_batch_over_work_ideal", "per-batch/work", ".2f"),
]


def format_report(report: dict) -> str:
    lines = [
        f"stream vs per-batch executor vs plain on {describe_machine(report['machine'])}",
        "speedups (x) over the plain model on the same rows in request batches of `batch` rows; work ideal = plain "
        "time / time of each node's work alone at `batch` rows weighted by the rows reaching it (same rounds)",
    ]
    if report["inputs"]:
        lines.append(f"demo systems' inputs: {report['inputs']}")
    for name, system in report["systems"].items():
        reach = system["results"][-1]["reach"]
        lines += ["", f"{name}: {system['model']}", f"policy: {system['policy']}",
                  "rows reaching each node: " + " / ".join(f"{r:.1%}" for r in reach),
                  format_table(system["results"], COLUMNS)]
        if system["targets"]:
            lines.append("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in system["targets"].items()))
    note = contention_note(report["machine"])
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_stream", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"small passes and short cells (defaults become {QUICK})")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="request batch sizes, comma-separated (default 1,8,64,256)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {','.join(SYSTEMS)}")
    parser.add_argument("--source", default="auto", choices=("auto", "demo", "fresh"),
                        help="the demo's trained models (demo), fresh untrained ones (fresh), or demo if cached (auto)")
    parser.add_argument("--cache", metavar="DIR", help="the demo's checkpoint cache (default: the demo's default)")
    parser.add_argument("--rows", type=int, help=f"most rows per timed pass (default {DEFAULTS['rows']})")
    parser.add_argument("--min-rows", type=int, help=f"fewest rows per timed pass (default {DEFAULTS['min_rows']})")
    parser.add_argument("--batches", type=int, help=f"request batches per pass (default {DEFAULTS['batches']})")
    parser.add_argument("--cell-seconds", type=float, help=f"time budget per (system, batch) (default {DEFAULTS['cell_seconds']})")
    parser.add_argument("--chain-width", type=int, help=f"the chain's width (default {DEFAULTS['chain_width']})")
    common_arguments(parser, json_help="write the report as JSON")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else DEFAULTS)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    sizes = comma_list(parser, args.batch_sizes, "--batch-sizes")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    apply_threads(parser, args)
    try:
        report = run(sizes, systems, args.source, cache=args.cache, **settings)
    except ValueError as err:
        parser.error(str(err))
    return finish(report, args, format_report)


if __name__ == "__main__":
    sys.exit(main())
