"""Profiler: where a sparse forward spends its time, per stage and per kernel, and host syncs counted.

``python -m bench.profile [--device cuda|cpu] [--system early_exit|cascade] [--batch 256] [--json PATH]``

On an NVIDIA GPU every region is timed with CUDA events (no host sync inside the forward); on the CPU
the same code path is timed with ``time.perf_counter``. Reported:

* the device name and the timer used;
* per stage (each node's module), per exit-head feature block, and per kernel call site - exit gate,
  partition, gather, scatter - the calls per forward and the median milliseconds per forward;
* host syncs per forward (``adaexit.kernels._dispatch.host_sync_count()`` before/after) against the
  decision points that ran (the executor promises one sync per decision point, none elsewhere);
* compaction bandwidth: :func:`adaexit.kernels.compact` of the first decision point's surviving rows
  (with its one sync, and the static-capacity variant with none) against a device-to-device
  ``dst.copy_(src)`` of the same bytes, under compact's one bytes-moved model
  (:func:`adaexit.kernels.ops.compact.bytes_moved`).

Regions are found without touching the library: forward hooks time the node modules, and the kernels come
from a ``torch.profiler`` trace of the same forwards (every kernel is a torch op: ``adaexit::<op>``; host syncs
are ``adaexit::to_host``). The profiler's own overhead is inside the times.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict

import torch

import adaexit.executor as _executor
from adaexit.base import AdaptiveModel
from adaexit.kernels import compact
from adaexit.kernels._dispatch import host_sync_count
from adaexit.kernels.ops.compact import bytes_moved as compact_bytes

from . import (
    EARLY_EXIT_MODELS,
    apply_threads,
    cascade_networks,
    cnn_classifier,
    common_arguments,
    contention_note,
    describe_machine,
    describe_run,
    finish,
    format_table,
    machine,
    policy_for_fractions,
    sync,
)

# ----------------------------------------------------------------------------------------------------
# Timers


class Timer:
    """Times named regions on one device. ``region(name)`` (or ``start``/``stop``) marks a region;
    :meth:`collect` waits for the device once and returns ``{name: [ms, ...]}`` in call order, then
    forgets them. Subclasses say how a point in time is marked and how two marks become milliseconds."""

    kind = "abstract"

    def __init__(self):
        self._open: dict[str, list] = defaultdict(list)
        self._done: list[tuple[str, object, object]] = []

    def _mark(self):
        raise NotImplementedError

    def _elapsed_ms(self, a, b) -> float:
        raise NotImplementedError

    def _wait(self) -> None:
        pass

    def start(self, name: str) -> None:
        self._open[name].append(self._mark())

    def stop(self, name: str) -> None:
        if not self._open[name]:
            raise ValueError(f"Timer.stop({name!r}) without a matching start")
        a = self._open[name].pop()
        self._done.append((name, a, self._mark()))

    @contextlib.contextmanager
    def region(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def collect(self) -> dict[str, list[float]]:
        self._wait()
        out: dict[str, list[float]] = defaultdict(list)
        for name, a, b in self._done:
            out[name].append(self._elapsed_ms(a, b))
        self._done = []
        return dict(out)


class HostTimer(Timer):
    """Host wall clock (``time.perf_counter``): exact for CPU tensors, where work runs synchronously."""

    kind = "host perf_counter"

    def _mark(self):
        return time.perf_counter()

    def _elapsed_ms(self, a, b) -> float:
        return (b - a) * 1e3


class CudaTimer(Timer):
    """CUDA events on the current stream: the GPU's own clock, no host sync until :meth:`collect`."""

    kind = "CUDA events"

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def _mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b)

    def _wait(self) -> None:
        sync(self.device)


def make_timer(device: torch.device | str) -> Timer:
    """CUDA events for a CUDA device, the host clock otherwise."""
    device = torch.device(device)
    return CudaTimer(device) if device.type == "cuda" else HostTimer()


# ----------------------------------------------------------------------------------------------------
# Instrumentation

KERNELS = ("exit_gate", "partition", "gather_rows", "scatter_rows", "compact")


@contextlib.contextmanager
def instrument(model, timer: Timer, counts: dict):
    """Time every node module and exit-head feature block of ``model``'s sparse path (forward hooks, removed
    on exit) and record the kernels from a profiler trace: every kernel is a torch op, so the trace names
    each call ``adaexit::<op>`` wherever it is made (executor, stream, heads, wrappers), and host syncs
    ``adaexit::to_host``. Yields a dict that holds, once the block ends, ``{op: ms}`` summed over the block
    (device time on CUDA, host time on the CPU); ``counts[name]`` counts the calls. Nothing of the library is
    replaced.
    """
    if not isinstance(model, AdaptiveModel):
        raise ValueError(f"profile: model must be an adaexit AdaptiveModel, got {type(model).__name__}")
    handles = []

    def hook(module, name):
        def pre(_module, _inputs):
            counts[name] += 1
            timer.start(name)

        def post(_module, _inputs, _output):
            timer.stop(name)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    cuda = timer.kind.startswith("CUDA")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    op_ms: dict[str, float] = {}
    try:
        for i, node in enumerate(model.graph()):
            hook(node.module, f"stage {i}")
            features = getattr(node.head, "features", None)
            if features is not None and not isinstance(features, torch.nn.Identity):
                hook(features, f"head {i} features")
        with torch.profiler.profile(activities=activities) as prof:
            yield op_ms
    finally:
        for handle in handles:
            handle.remove()
    for event in prof.events():
        if not event.name.startswith("adaexit::"):
            continue
        name = event.name.split("::", 1)[1]
        name = "host_sync" if name == "to_host" else name
        counts[name] += 1
        us = event.device_time_total if cuda and name != "host_sync" else event.cpu_time_total
        op_ms[name] = op_ms.get(name, 0.0) + us / 1e3


def _kind(name: str) -> str:
    if name.startswith("stage"):
        return "stage"
    if name.startswith("head"):
        return "head"
    if name == "host_sync":
        return "sync"
    if name == "forward":
        return "total"
    return "kernel"


def decision_points(model, info) -> int:
    """Decision points that ran: nodes with successors whose router decided on at least one row."""
    nodes = model.graph()
    decided = getattr(info, "rows_decided", None)
    if decided is None:  # EarlyExitNet's info: a node decided if it ran and its policy needed its head
        policy = model.policy
        decided = [r if policy.needs_head(k) else 0 for k, r in enumerate(info.rows_run)]
    return sum(1 for node, rows in zip(nodes, decided) if rows and node.successors)


# ----------------------------------------------------------------------------------------------------
# Compaction bandwidth


def _median_ms(fn, timer: Timer, repeats: int) -> float:
    fn()  # warm-up (and Triton compilation on first use)
    for _ in range(repeats):
        with timer.region("x"):
            fn()
    return statistics.median(timer.collect()["x"])


@torch.inference_mode()
def compaction_bandwidth(h: torch.Tensor, keep: torch.Tensor, timer: Timer, repeats: int = 20) -> dict:
    """``compact(keep, h)`` (one sync; and the static-capacity variant, none) vs ``dst.copy_(src)``
    of the same bytes. GB/s from compact's bytes-moved model, per variant."""
    kept = int(keep.sum())
    row_bytes = h[0].numel() * h.element_size() if h.shape[0] else 0
    moved = {"compact": compact_bytes(keep, h, kept=kept), "compact_static": compact_bytes(keep, h, kept=kept, capacity=kept)}
    moved["copy"] = moved["compact"]
    src = torch.empty(max(1, moved["copy"] // 2), dtype=torch.uint8, device=h.device)  # read + write = the bytes
    dst = torch.empty_like(src)
    results = {
        "rows": int(h.shape[0]),
        "kept": kept,
        "row_shape": list(h.shape[1:]),
        "dtype": str(h.dtype).replace("torch.", ""),
        "row_bytes": row_bytes,
        "bytes_moved": moved["compact"],
        "compact_ms": _median_ms(lambda: compact(keep, h), timer, repeats),
        "compact_static_ms": _median_ms(lambda: compact(keep, h, capacity=kept), timer, repeats),
        "copy_ms": _median_ms(lambda: dst.copy_(src), timer, repeats),
    }
    for key in ("compact", "compact_static", "copy"):
        ms = results[f"{key}_ms"]
        results[f"{key}_GBps"] = moved[key] / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")
    copy = results["copy_GBps"]
    results["compact_over_copy"] = results["compact_GBps"] / copy if copy > 0 else float("nan")
    results["compact_static_over_copy"] = results["compact_static_GBps"] / copy if copy > 0 else float("nan")
    return results


# ----------------------------------------------------------------------------------------------------
# The profile


@torch.inference_mode()
def profile_model(model, x: torch.Tensor, repeats: int = 10, compaction_repeats: int = 20) -> dict:
    """Profile ``model``'s sparse eval forward on ``x`` (both already on the device to profile).

    Returns the report dict (see the module docstring); :func:`format_report` prints it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = x.device
    model.eval()
    timer = make_timer(device)
    _, info = model(x, return_info=True)  # warm-up: FLOP counts cached, kernels compiled
    per_forward: list[dict[str, float]] = []
    syncs: list[int] = []
    counts: dict[str, int] = defaultdict(int)
    with instrument(model, timer, counts) as op_ms:
        for _ in range(repeats):
            before = host_sync_count()
            with timer.region("forward"):
                model(x)
            syncs.append(host_sync_count() - before)
            times = timer.collect()
            per_forward.append({name: sum(values) for name, values in times.items()})
    forward_ms = statistics.median(t["forward"] for t in per_forward)
    names = sorted({n for t in per_forward for n in t} | set(op_ms), key=lambda n: (n != "forward", _kind(n) != "stage", n))
    regions = []
    for name in names:
        # hooks: the median over forwards; the trace's ops: their mean per forward
        ms = op_ms[name] / repeats if name in op_ms else statistics.median(t.get(name, 0.0) for t in per_forward)
        regions.append(
            {
                "name": name,
                "kind": _kind(name),
                "calls_per_forward": (counts[name] / repeats) if name != "forward" else 1.0,
                "ms_per_forward": ms,
                "share": ms / forward_ms if forward_ms else float("nan"),
            }
        )
    accounted = sum(r["ms_per_forward"] for r in regions if r["kind"] in ("stage", "head", "kernel"))
    report = {
        "machine": machine(device),
        "timer": timer.kind,
        "batch": int(x.shape[0]),
        "repeats": repeats,
        "model": type(model).__name__,
        "policy": repr(model.policy),
        "exit_counts": list(info.exit_counts),
        "rows_run": list(info.rows_run),
        "decision_points": decision_points(model, info),
        "host_syncs_per_forward": syncs[0] if len(set(syncs)) == 1 else syncs,
        "partition_calls_per_forward": counts["partition"] / repeats,
        "forward_ms": forward_ms,
        "other_ms": forward_ms - accounted,  # the executor's Python, torch.full/cat, policy glue
        "regions": regions,
    }
    report["syncs_equal_decision_points"] = report["host_syncs_per_forward"] == report["decision_points"]
    # Compaction of the first decision point's survivors, on what the executor really moves there:
    # the features for a "carry" successor (a backbone stage), the input rows for a "source" one.
    nodes = model.graph()
    h = nodes[0].module(x)
    _, route, _ = model.route(0, nodes[0], h, model.policy.init_state(x.shape[0], device))
    keep = route != 0 if route is not None else None
    if keep is not None and nodes[0].successors and bool(keep.any()):
        carried = h if nodes[nodes[0].successors[0]].takes == _executor.CARRY else x
        report["compaction"] = compaction_bandwidth(carried, keep, timer, compaction_repeats)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"profile: {report['model']} at batch {report['batch']}, {report['repeats']} forwards, timer: {report['timer']}",
        f"device: {describe_machine(report['machine'])}",
        describe_run(report),
        f"forward: {report['forward_ms']:.3f} ms (median); not in a stage or kernel: {report['other_ms']:.3f} ms",
        f"host syncs per forward: {report['host_syncs_per_forward']} (decision points that ran: "
        f"{report['decision_points']}; {'equal' if report['syncs_equal_decision_points'] else 'NOT EQUAL'})",
        "",
        format_table(
            report["regions"],
            [
                ("name", "region", ""),
                ("kind", "kind", ""),
                ("calls_per_forward", "calls/forward", ".1f"),
                ("ms_per_forward", "ms/forward", ".3f"),
                ("share", "share", ".1%"),
            ],
        ),
    ]
    c = report.get("compaction")
    if c:
        lines += [
            "",
            f"compaction: {c['kept']} of {c['rows']} rows of {c['row_shape']} {c['dtype']} "
            f"({c['row_bytes']} B/row, {c['bytes_moved'] / 1e6:.2f} MB moved, compact's bytes model)",
            format_table(
                [
                    {"op": op, "ms": c[f"{key}_ms"], "GBps": c[f"{key}_GBps"], "r": c[f"{key}_over_copy"] if key != "copy" else 1.0}
                    for op, key in (
                        ("compact (1 host sync)", "compact"),
                        ("compact static capacity (0 syncs)", "compact_static"),
                        ("dst.copy_(src), same bytes", "copy"),
                    )
                ],
                [("op", "op", ""), ("ms", "ms", ".4f"), ("GBps", "GB/s", ".1f"), ("r", "vs copy", ".0%")],
            ),
        ]
    note = contention_note(report["machine"]) if report["machine"]["device"] == "cpu" else None
    if note:
        lines += ["", note]
    return "\n".join(lines)


def build_system(system: str, batch: int, model: str = "isotropic", tiny: bool = False, seed: int = 0):
    """The model and inputs to profile, with thresholds set so about 50% / 25% / 25% of the rows exit
    at each exit: an early-exit CNN of :data:`bench.EARLY_EXIT_MODELS` (``model``), or a cascade of
    three CNNs. ``tiny`` shrinks everything (8x8 inputs, a few channels) for tests."""
    gen = torch.Generator().manual_seed(seed)
    size = 8 if tiny else 28
    x = torch.randn(batch, 1, size, size, generator=gen)
    if system == "early_exit":
        name = "tiny" if tiny else model
        if name not in EARLY_EXIT_MODELS:
            raise ValueError(f"model must be one of {list(EARLY_EXIT_MODELS)}, got {model!r}")
        net = EARLY_EXIT_MODELS[name][1](seed)
    elif system == "cascade":
        from adaexit.cascade import Cascade

        if tiny:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nets = [cnn_classifier((4,)), cnn_classifier((4, 8)), cnn_classifier((8, 8))]
        else:
            nets = cascade_networks(seed=seed)
        net = Cascade([n.eval() for n in nets], example_input=x[:1])
    else:
        raise ValueError(f"system must be 'early_exit' or 'cascade', got {system!r}")
    net.set_policy(policy_for_fractions(net, x, [0.5, 0.25][: net.num_exits - 1]))
    return net.eval(), x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (CUDA events) or cpu (host timers); default: cuda when available")
    parser.add_argument("--system", default="early_exit", choices=("early_exit", "cascade"))
    parser.add_argument("--model", default="isotropic", choices=[m for m in EARLY_EXIT_MODELS if m != "tiny"],
                        help="the early-exit CNN (default: isotropic, as in bench.bench_early_exit)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10, help="profiled forwards (default 10)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on 8x8 inputs (smoke tests)")
    common_arguments(parser, threads_help="torch threads on CPU (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    apply_threads(parser, args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    model, x = build_system(args.system, args.batch, args.model, tiny=args.tiny)
    model, x = model.to(device), x.to(device)
    report = profile_model(model, x, repeats=args.repeats, compaction_repeats=5 if args.tiny else 20)
    report["system"] = args.system
    return finish(report, args, format_report)


if __name__ == "__main__":
    sys.exit(main())
