"""Benchmarks and the profiler for adaexit (``python -m bench.<name>``; pytest-benchmark for ``bench_*.py``).

Shared pieces live here: the benchmark models (built fresh, so speed can be measured without training),
a policy whose thresholds make a chosen fraction of the rows exit at each exit, interleaved timing with
medians, the machine description every result carries, a plain-text table, and the scripts' common
command line (``--json``, ``--threads``) and ending (print the report, write its JSON). Device names,
machine descriptions and timing come from :mod:`adaexit.cost` (``device_name``, ``machine_info``,
``interleaved_times``, ``sync``); nothing here re-implements them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable, Sequence

import torch
from torch import nn

from adaexit import ConfidencePolicy, EarlyExitNet, ExitHead
from adaexit.executor import SOURCE
from adaexit.cost import device_name, interleaved_times, machine_info, sync  # noqa: F401 (re-exported)
from adaexit.kernels import exit_gate_torch

# ----------------------------------------------------------------------------------------------------
# Models


def conv_block(cin: int, cout: int, *, pool: bool = False, stride: int = 1) -> nn.Sequential:
    """Two 3x3 conv + BN + ReLU layers, optionally followed by a 2x2 max-pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def cnn_early_exit(
    widths: Sequence[int] = (32, 64, 128), in_channels: int = 1, num_classes: int = 10, seed: int = 0
) -> EarlyExitNet:
    """A VGG-style CNN for 28x28 images split into ``len(widths)`` stages, a pooled-linear exit head
    after each. Stage ``k`` is a :func:`conv_block` of width ``widths[k]``; all but the last halve the
    resolution. Randomly initialised with ``seed`` (benchmarks measure speed, not accuracy)."""
    if not widths:
        raise ValueError("cnn_early_exit: widths must name at least one stage")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        stages, cin = [], in_channels
        for k, width in enumerate(widths):
            stages.append(conv_block(cin, width, pool=k + 1 < len(widths)))
            cin = width
        heads = [ExitHead(width, num_classes) for width in widths]
        model = EarlyExitNet(stages, heads)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def isotropic_early_exit(
    width: int = 64, num_stages: int = 3, in_channels: int = 1, num_classes: int = 10, seed: int = 0
) -> EarlyExitNet:
    """An isotropic CNN (a stride-2 stem, then constant width and resolution, as in ConvMixer-style
    networks) split into ``num_stages`` stages of two 3x3 conv + BN + ReLU layers each (the stem is in
    stage 0), a pooled-linear exit head after each. Its time per FLOP is about the same in every stage
    on CPU, so the FLOPs ideal speedup is a fair yardstick for the executor. Randomly initialised."""
    if num_stages < 1 or width < 1:
        raise ValueError(f"isotropic_early_exit: need num_stages >= 1 and width >= 1, got {num_stages}, {width}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        stages = [conv_block(in_channels, width, stride=2)]
        stages += [conv_block(width, width) for _ in range(num_stages - 1)]
        model = EarlyExitNet(stages, [ExitHead(width, num_classes) for _ in stages])
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def cnn_classifier(widths: Sequence[int], in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A whole CNN (one network of a cascade): conv blocks, global average pool, linear classifier."""
    layers: list[nn.Module] = []
    cin = in_channels
    for k, width in enumerate(widths):
        layers.append(conv_block(cin, width, pool=k + 1 < len(widths)))
        cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def cascade_networks(num_classes: int = 10, seed: int = 0) -> list[nn.Module]:
    """Three CNNs of increasing cost (roughly 1 : 4 : 16 in FLOPs) for a cascade benchmark."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        nets = [
            cnn_classifier((8, 16), num_classes=num_classes),
            cnn_classifier((16, 32, 64), num_classes=num_classes),
            cnn_classifier((32, 64, 128), num_classes=num_classes),
        ]
    finally:
        torch.random.set_rng_state(gen_state)
    return [net.eval() for net in nets]


def _demo_wide_cnn(seed: int) -> EarlyExitNet:
    from adaexit.apps.fashion_mnist.models import wide_cnn

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return wide_cnn().eval()
    finally:
        torch.random.set_rng_state(gen_state)


#: The early-exit CNNs the benchmarks and the profiler can run: name -> (description, builder(seed)).
EARLY_EXIT_MODELS = {
    "isotropic": (
        "isotropic CNN: stride-2 stem, 3 stages of two 3x3 convs, 64 channels at 14x14, pooled-linear heads",
        lambda seed: isotropic_early_exit(64, seed=seed),
    ),
    "pyramid": (
        "VGG-style CNN: stages of 32/64/128 channels at 28/14/7 px with max-pooling, pooled-linear heads",
        lambda seed: cnn_early_exit((32, 64, 128), seed=seed),
    ),
    "demo": ("adaexit.apps.fashion_mnist.models.wide_cnn (the demo's architecture, untrained), conv exit heads", _demo_wide_cnn),
    "tiny": ("tiny VGG-style CNN (4/8/8 channels), for smoke tests", lambda seed: cnn_early_exit((4, 8, 8), seed=seed)),
}


# ----------------------------------------------------------------------------------------------------
# A policy with a known exit pattern


def _split_threshold(scores: torch.Tensor, count: int, slack: int) -> float:
    """A threshold such that about ``count`` of ``scores`` are ``>=`` it, placed in the widest gap between
    consecutive sorted scores within ``count +- slack``, so tiny numeric differences (a sub-batch
    computing a row's features at a different batch size) cannot move a row across it."""
    ordered = torch.sort(scores.double(), descending=True).values
    n = ordered.shape[0]
    if n == 0 or count <= 0:
        return 2.0  # above any confidence: the exit is disabled
    if count >= n:
        return float(ordered[-1]) / 2.0 if float(ordered[-1]) > 0 else -1.0
    best, best_gap = count, -1.0
    for j in range(max(1, count - slack), min(n - 1, count + slack) + 1):
        gap = float(ordered[j - 1] - ordered[j])  # j rows above the split
        if gap > best_gap:
            best, best_gap = j, gap
    return float((ordered[best - 1] + ordered[best]) / 2)


@torch.no_grad()
def policy_for_fractions(
    model, x: torch.Tensor, fractions: Sequence[float], criterion: str = "maxprob", slack: float = 0.02
) -> ConfidencePolicy:
    """A :class:`~adaexit.ConfidencePolicy` under which about ``fractions[k]`` of the rows of ``x`` exit at
    exit ``k`` (the last exit takes the rest). Works on any model of the calibration protocol.

    The thresholds are set exit by exit on the rows still alive, each in the widest score gap within
    ``slack`` (a fraction of the rows) of its target, so the exit pattern is stable on ``x``.
    """
    num_exits = model.num_exits
    fractions = [float(f) for f in fractions]
    if len(fractions) != num_exits - 1:
        raise ValueError(f"fractions: need {num_exits - 1} values (one per early exit), got {len(fractions)}")
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to at most 1, got {fractions}")
    was_training = model.training
    model.eval()
    all_logits = model.exit_logits(x)
    model.train(was_training)
    n = x.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k in range(num_exits - 1):
        _, score, _ = exit_gate_torch(all_logits[k].float(), None, criterion=criterion, threshold=2.0)
        score = score.cpu()
        finite = alive & torch.isfinite(score)
        target = round(fractions[k] * n)
        t = _split_threshold(score[finite], target, max(1, int(slack * n)))
        thresholds.append(t)
        alive &= ~(score >= t)
    return ConfidencePolicy(criterion, thresholds)


# ----------------------------------------------------------------------------------------------------
# The work that had to run


def node_inputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """What each node of ``model``'s graph reads when every row of ``x`` runs it: ``x`` for the first
    node and for nodes that read the input (a cascade's networks), the preceding node's output for the
    others (graphs of the calibration protocol: early exit, cascades and their combinations)."""
    inputs, h = [], x
    with torch.inference_mode():
        for k, node in enumerate(model.graph()):
            inputs.append(x if k == 0 or node.takes == SOURCE else h)
            h = node.module(inputs[-1])
    return inputs


def node_work(model, x: torch.Tensor, rows: Sequence[int]) -> list[Callable[[], object] | None]:
    """Per node ``k``, a call that does node ``k``'s work on ``rows[k]`` rows: its module and its router
    (exit head, gate and decision, as the executor calls it) on that many rows of its input, laid out
    densely beforehand (no partition, gather, scatter or scheduling); ``None`` where ``rows[k]`` is 0.

    Timed at the sub-batch sizes a sparse run gave (``info.rows_run``), their sum is the work that run
    had to do; timed at the full batch size and weighted by the fraction of rows that reach each node,
    the measured-work ideal (the time of the work that must run, every node at full batch). Run the
    calls under ``torch.inference_mode()``, as the executor runs."""
    nodes, inputs = model.graph(), node_inputs(model, x)
    calls: list[Callable[[], object] | None] = []
    for k, (node, count) in enumerate(zip(nodes, rows)):
        if not count:
            calls.append(None)
            continue
        if count > x.shape[0]:
            raise ValueError(f"node_work: node {k} needs {count} rows, x has {x.shape[0]}")
        inp = inputs[k][:count].clone()
        state = model.init_state(count, x.device)

        def call(k=k, node=node, inp=inp, state=state):
            return model.route(k, node, node.module(inp), dict(state))

        calls.append(call)
    return calls


# ----------------------------------------------------------------------------------------------------
# Timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ----------------------------------------------------------------------------------------------------
# Reporting


machine = machine_info  # what every result carries (one definition, in adaexit.cost)


def contention_note(info: dict) -> str | None:
    """A warning when other processes compete for the cores: with torch's default OpenMP spin-waiting,
    every parallel op then waits for a descheduled thread, and timings swing by large factors."""
    load, cores = info.get("load_average_1min"), info.get("cpu_cores") or 1
    if load is None or load <= cores:
        return None
    return (
        f"WARNING: shared machine (load average {load} on {cores} cores): timings are noisy; "
        "OMP_WAIT_POLICY=PASSIVE or --threads 1 makes them far more stable"
    )


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when asked (``None`` keeps torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# The scripts' command line and ending


def common_arguments(
    parser: argparse.ArgumentParser,
    json_help: str = "also write the report as JSON",
    threads_help: str = "torch threads (default: torch's choice)",
) -> argparse.ArgumentParser:
    """Add the options every ``python -m bench.<script>`` takes: ``--json PATH`` and ``--threads N``."""
    parser.add_argument("--json", metavar="PATH", help=json_help)
    parser.add_argument("--threads", type=int, help=threads_help)
    return parser


def comma_list(parser: argparse.ArgumentParser, text: str, flag: str, kind: type = int) -> list:
    """``"64,256"`` -> ``[64, 256]`` (of ``kind``: int or float); anything else is a usage error naming ``flag``."""
    try:
        return [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        parser.error(f"{flag} must be comma-separated {what}, got {text!r}")


def apply_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """:func:`set_threads` from ``--threads``; a bad value is a usage error (``parser.error``)."""
    try:
        set_threads(args.threads)
    except ValueError as err:
        parser.error(str(err))


def write_json(path, report: dict) -> None:
    """Write ``report`` to ``path`` as indented JSON."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def finish(report: dict, args: argparse.Namespace, format_report: Callable[[dict], str]) -> int:
    """A script's ending: print ``format_report(report)``, write the JSON when ``--json`` asked for it;
    returns the exit status (0)."""
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0


def describe_run(report: dict) -> str:
    """The report line saying what the sparse run did: its policy, exits per exit and rows per stage."""
    return f"policy: {report['policy']}; exits per exit {report['exit_counts']}, rows per stage {report['rows_run']}"


def describe_machine(info: dict) -> str:
    line = (
        f"{info['device_name']} ({info['device']}), {info['cpu_cores']} CPU cores, {info['torch_threads']} torch "
        f"threads, OMP_WAIT_POLICY={info.get('omp_wait_policy', 'default')}, torch {info['torch']}"
    )
    if "load_average_1min" in info:
        line += f", load average {info['load_average_1min']}"
    return line


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: ``columns`` are ``(key, header, format spec)``; a missing value prints ``-``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and value != value):
                line.append("-")
            else:
                line.append(format(value, spec))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for j, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
