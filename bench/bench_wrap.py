"""Wrapped torchvision models at batch 64 and 256 on CPU: plain vs masked dense vs adaexit vs the FLOPs ideal
(issue 10).

``python -m bench.bench_wrap [--quick] [--models resnet50,mobilenet_v3_large,vit_s_16] [--batches 64,256]
[--px 224] [--repeats 5] [--threads N] [--json PATH]``

Each model is wrapped with ``adaexit.wrap`` at two exits chosen by ``adaexit.wrappers.candidate_exits`` /
``pick_exits`` at about 1/3 and 2/3 of its FLOPs (measured at the benchmark's image size), with the default
heads (pooled linear, fused; a ViT's class token). The policy's thresholds are set on the benchmark's
inputs so that about half of the rows exit at the first exit and half of the rest at the second
(50% / 25% / 25%; :func:`bench.policy_for_fractions`). Weights are random (torchvision's initialisation,
10 classes; BatchNorm statistics re-estimated on other random inputs so that exit scores differ between
rows): speed is measured, not accuracy. Per model and batch size, interleaved medians of:

* ``plain``: the model itself (its stages and tail, :func:`bench.baselines.plain`), the reference;
* ``masked_dense``: every stage and exit for every row, each row's output selected by the policy;
* ``adaexit``: the wrapped model's sparse eval forward;

and the FLOPs ideal (``info.ideal_speedup``: reference FLOPs over the FLOPs of the work that had to run).

Models: ``resnet50``, ``mobilenet_v3_large``, ``efficientnet_b0`` (torchvision), and ``vit_s_16``: a
ViT-S/16 (12 layers, 6 heads, width 384, MLP 1536; DeiT-S's shape) built with
``torchvision.models.VisionTransformer``, because ``vit_b_16`` at 224 px (17.6 GFLOPs per image) makes a
batch of 256 take minutes on a 2-core CPU (``vit_b_16`` is accepted too). ``--quick`` runs the same
families at tiny sizes (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torchvision

import adaexit
from adaexit.wrappers import candidate_exits, pick_exits

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
    policy_for_fractions,
)
from .baselines import adaexit as adaexit_strategy, masked_dense, plain

MODELS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_s_16", "vit_b_16")
DEFAULT_MODELS = ("resnet50", "mobilenet_v3_large", "vit_s_16")
DEFAULTS = {"batches": (64, 256), "px": 224, "repeats": 5}
QUICK = {"batches": (8, 16), "px": 32, "repeats": 2}
FRACTIONS = (0.5, 0.25)  # exits 0 and 1; the model's own output takes the remaining 25%
STRATEGIES = ("plain", "masked_dense", "adaexit")


def build_model(name: str, px: int, quick: bool = False, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """``(model in eval mode, description)``: random weights, 10 classes, inputs of ``px`` pixels."""
    torch.manual_seed(seed)
    if name in ("vit_s_16", "vit_b_16"):
        if quick:  # a ViT of the same structure, tiny: 8 px patches, 6 layers of width 32
            patch, layers, heads, width = 8, 6, 2, 32
        elif name == "vit_s_16":
            patch, layers, heads, width = 16, 12, 6, 384
        else:
            patch, layers, heads, width = 16, 12, 12, 768
        model = torchvision.models.VisionTransformer(
            image_size=px, patch_size=patch, num_layers=layers, num_heads=heads, hidden_dim=width,
            mlp_dim=4 * width, num_classes=10,
        )
        what = f"VisionTransformer(patch {patch}, {layers} layers, {heads} heads, width {width}, MLP {4 * width})"
    elif name in MODELS:
        model = torchvision.models.get_model(name, num_classes=10)
        what = f"torchvision.models.{name}"
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if recalibrate_batchnorm(model, torch.randn(16, 3, px, px, generator=torch.Generator().manual_seed(seed + 1))):
        what += " (BatchNorm statistics re-estimated on random inputs)"
    return model.eval(), f"{what}, random weights, {px}x{px} px"


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Re-estimate BatchNorm running statistics on ``x`` (one train-mode pass, cumulative averages); the
    weights stay random. With torchvision's initial statistics (mean 0, variance 1) a random CNN's deep
    features are nearly the same for every input (MobileNetV3's exit scores differ by 1e-8), so no threshold
    could split the rows; re-estimated, they differ between rows as a trained model's do. Returns whether
    the model has BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    if norms:
        model.train()(x)
    return bool(norms)


def setup(name: str, batch: int, px: int, quick: bool = False, seed: int = 0, device="cpu") -> dict:
    """The wrapped model (exits at ~1/3 and ~2/3 of the FLOPs, thresholds for 50% / 25% / 25%), the inputs,
    the strategies and what the sparse run did; built on the CPU, then run on ``device`` (bench.gpu_check:
    cuda)."""
    model, what = build_model(name, px, quick, seed)
    x = torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(seed))
    cuts = candidate_exits(model, x[:1], split_large=0.25)
    exits = pick_exits(cuts)
    fractions = {c.name: c.flops_fraction for c in cuts}
    wrapped = adaexit.wrap(model, exits=exits, example_input=x[:1]).eval().to(device)
    x = x.to(device)
    wrapped.set_policy(policy_for_fractions(wrapped, x, FRACTIONS))
    with torch.inference_mode():
        _, info = wrapped(x, return_info=True)
    runs = {"plain": plain(wrapped), "masked_dense": masked_dense(wrapped), "adaexit": adaexit_strategy(wrapped)}
    return {
        "model": wrapped, "x": x, "info": info, "description": what, "exits": exits,
        "exit_flops_fractions": [fractions[e] for e in exits],
        "calls": {s: (lambda run=run: run(x)) for s, run in runs.items()},
    }


def measure(name: str, batch: int, px: int, repeats: int, quick: bool = False, device="cpu") -> dict:
    """One (model, batch) cell: the strategies timed interleaved; medians, speedups over plain, the FLOPs ideal."""
    cell = setup(name, batch, px, quick, device=device)
    times = interleaved_times(cell["calls"], repeats=repeats, warmup=1, device=device)
    ms = {s: median(times[s]) for s in STRATEGIES}
    info = cell["info"]
    speedup = {s: ms["plain"] / ms[s] for s in STRATEGIES}
    return {
        "model": name,
        "description": cell["description"],
        "batch": batch,
        "exits": cell["exits"],
        "exit_flops_fractions": cell["exit_flops_fractions"],
        "policy": repr(cell["model"].policy),
        "exit_counts": info.exit_counts,
        "rows_run": info.rows_run,
        **{f"{s}_ms": ms[s] for s in STRATEGIES},
        "masked_dense_speedup": speedup["masked_dense"],
        "adaexit_speedup": speedup["adaexit"],
        "flops_ideal": info.ideal_speedup,
        "adaexit_over_ideal": speedup["adaexit"] / info.ideal_speedup,
        "repeats": len(times["plain"]),
    }


def run(models=DEFAULT_MODELS, batches=DEFAULTS["batches"], px: int = DEFAULTS["px"],
        repeats: int = DEFAULTS["repeats"], quick: bool = False) -> dict:
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if repeats < 1 or px < 1 or not batches or min(batches) < 4:
        raise ValueError("need repeats >= 1, px >= 1 and batch sizes >= 4")
    rows = [measure(name, batch, px, repeats, quick) for name in models for batch in batches]
    return {
        "benchmark": "wrap",
        "machine": machine(),
        "quick": quick,
        "px": px,
        "weights": "random (torchvision's initialisation, 10 classes; BatchNorm statistics re-estimated on random "
                   "inputs): speed, not accuracy",
        "target_exit_fractions": list(FRACTIONS),
        "results": rows,
    }


COLUMNS = [
    ("model", "model", ""),
    ("batch", "batch", "d"),
    ("plain_ms", "plain ms", ".1f"),
    ("masked_dense_ms", "masked ms", ".1f"),
    ("adaexit_ms", "adaexit ms", ".1f"),
    ("masked_dense_speedup", "masked x", ".2f"),
    ("adaexit_speedup", "adaexit x", ".2f"),
    ("flops_ideal", "FLOPs ideal x", ".2f"),
    ("adaexit_over_ideal", "adaexit/ideal", ".2f"),
]


def format_report(report: dict) -> str:
    quick = " (--quick: tiny sizes, numbers mean nothing)" if report["quick"] else ""
    lines = [
        f"adaexit.wrap on torchvision models, {report['px']} px{quick}",
        f"machine: {describe_machine(report['machine'])}",
        f"weights: {report['weights']}; thresholds for {report['target_exit_fractions']} of the rows at exits 0 / 1",
        "",
    ]
    seen = set()
    for row in report["results"]:
        if row["model"] in seen:
            continue
        seen.add(row["model"])
        exits = ", ".join(f"{e} ({100 * f:.0f}% of FLOPs)" for e, f in zip(row["exits"], row["exit_flops_fractions"]))
        lines.append(f"{row['model']}: {row['description']}; exits {exits}")
    lines += ["", format_table(report["results"], COLUMNS), ""]
    lines += [f"{r['model']} @ {r['batch']}: exits per exit {r['exit_counts']}, rows per stage {r['rows_run']}"
              for r in report["results"]]
    note = contention_note(report["machine"])
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_wrap", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny models and inputs, a smoke test (defaults: {QUICK})")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--batches", help="batch sizes, comma-separated (default 64,256)")
    parser.add_argument("--px", type=int, help="image size (default 224)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per cell (default 5)")
    common_arguments(parser, json_help="write the report as JSON")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else DEFAULTS)
    if args.batches is not None:
        settings["batches"] = tuple(comma_list(parser, args.batches, "--batches"))
    for key in ("px", "repeats"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    apply_threads(parser, args)
    try:
        report = run(models, quick=args.quick, **settings)
    except ValueError as err:
        parser.error(str(err))
    return finish(report, args, format_report)


if __name__ == "__main__":
    sys.exit(main())
