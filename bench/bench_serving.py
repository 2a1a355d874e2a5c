"""Serving: an open-loop Poisson load of 1-row requests against ``adaexit.Server`` (issue 12).

``python -m bench.bench_serving [--quick] [--system combination] [--load 0.5,1,2] [--seconds 10] [--clients 4]
[--batch-size 64] [--max-wait-ms 5] [--json PATH]``

Client threads submit 1-row requests at exponentially distributed intervals (open loop: a request is sent
at its scheduled time whether or not earlier ones are done; its latency counts from that time), to two
servers with the same micro-batcher settings: ``Server(adaptive)`` and ``Server(Cascade([plain]))`` - the
plain model (the system's strongest single network) as a one-node adaptive model, so both pay the same
queueing and batching. Reported per arrival rate: throughput (completed requests / s, from the first
scheduled request to the last completion), p50 / p99 latency in ms, and the mean rows per run of the first
node (how full the batches were).

Arrival rates are ``--load`` times the plain model's capacity (``batch_size`` rows / its time at
``batch_size`` rows, measured first), or ``--rates`` in requests per second. Above load 1 the plain server
cannot keep up (its queue, and latency, grow for as long as the load lasts); the adaptive one can up to its
own capacity. Systems as in :mod:`bench.bench_stream` (``--source``: the demo's trained models if cached,
else fresh untrained ones, as the output says).
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time

import torch
from torch import nn

from adaexit import Cascade, Server
from adaexit.heads import LogitsHead

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
)
from .bench_stream import SYSTEMS, load_systems

DEFAULT_LOADS = (0.5, 1.0, 2.0)
DEFAULTS = {"seconds": 10.0, "clients": 4, "rows": 2048, "chain_width": 1024}
QUICK = {"seconds": 2.0, "clients": 4, "rows": 512, "chain_width": 512}


def plain_module(model) -> nn.Module:
    """The model's strongest single network as one module: its last member's nodes, then the last head
    (an early-exit backbone without its exits, or a cascade's last network)."""
    nodes, members = model.graph(), model.node_members()
    own = [node for node, m in zip(nodes, members) if m == members[-1]]
    if len(own) == 1 and isinstance(own[0].head, LogitsHead):
        return own[0].module
    return nn.Sequential(*[node.module for node in own], own[-1].head)


def plain_capacity(plain_model, x: torch.Tensor, batch_size: int) -> float:
    """Rows per second the plain model gets through at ``batch_size`` rows per forward."""
    xb = x[:batch_size]
    with torch.inference_mode():
        times = interleaved_times({"plain": lambda: plain_model(xb)}, repeats=7, warmup=2)["plain"]
    return xb.shape[0] / (median(times) / 1e3)


def open_loop(model, x: torch.Tensor, rate: float, seconds: float, clients: int, batch_size: int,
              max_wait_ms: float, seed: int = 0) -> dict:
    """Poisson arrivals of 1-row requests at ``rate`` per second in all, from ``clients`` threads, for
    ``seconds``; returns throughput, latency percentiles and how full the first node's batches were."""
    rng = random.Random(seed)
    schedules = []
    for _ in range(clients):
        t, times = 0.0, []
        while True:
            t += rng.expovariate(rate / clients)
            if t >= seconds:
                break
            times.append(t)
        schedules.append(times)
    n = x.shape[0]
    done: list[tuple[float, float]] = []  # (scheduled, completed): list.append is atomic
    failures = []
    server = Server(model, batch_size=batch_size, max_wait_ms=max_wait_ms)
    for f in [server.submit(x[i % n : i % n + 1]) for i in range(2 * batch_size)]:  # warm-up
        f.result()
    runs0, rows0 = server.stats.runs[0], server.stats.rows_run[0]
    start = time.perf_counter() + 0.05
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for i, t in enumerate(schedules[c]):
            due = start + t
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            j = (c * 7919 + i) % n
            future = server.submit(x[j : j + 1])
            future.add_done_callback(
                lambda f, due=due: done.append((due, time.perf_counter())) if f.exception() is None
                else failures.append(f.exception())
            )

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.close()  # serves everything submitted, then joins the worker
    latencies = sorted((end - due) * 1e3 for due, end in done)
    requests = sum(len(s) for s in schedules)
    span = (max(end for _, end in done) - start) if done else float("nan")
    runs, rows = server.stats.runs[0] - runs0, server.stats.rows_run[0] - rows0
    return {
        "requests": requests,
        "completed": len(done),
        "failed": len(failures),
        "throughput": len(done) / span if done else 0.0,
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "rows_per_run": rows / runs if runs else float("nan"),
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def run(system: str = "combination", source: str = "auto", loads=DEFAULT_LOADS, rates=None,
        seconds: float = DEFAULTS["seconds"], clients: int = DEFAULTS["clients"], batch_size: int = 64,
        max_wait_ms: float = 5.0, rows: int = DEFAULTS["rows"], chain_width: int = DEFAULTS["chain_width"],
        cache=None) -> dict:
    """Measure both servers at every arrival rate; returns the JSON-ready report."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {list(SYSTEMS)}, got {system!r}")
    if seconds <= 0 or clients < 1 or batch_size < 1 or max_wait_ms < 0:
        raise ValueError("need seconds > 0, clients >= 1, batch size >= 1 and max-wait-ms >= 0")
    if rates is None and (not loads or min(loads) <= 0):
        raise ValueError(f"loads must be > 0, got {loads}")
    if rates is not None and (not rates or min(rates) <= 0):
        raise ValueError(f"rates must be > 0, got {rates}")
    loaded, data_note = load_systems([system], source, max(rows, batch_size), chain_width, cache)
    model, note, x = loaded[system]
    plain_model = Cascade([plain_module(model)], example_input=x[:1]).eval()
    capacity = plain_capacity(plain_model, x, batch_size)
    if rates is None:
        rates = [load * capacity for load in loads]
    results = []
    for i, rate in enumerate(rates):
        row = {"rate": rate, "load": rate / capacity}
        for name, server_model in (("adaptive", model), ("plain", plain_model)):
            got = open_loop(server_model, x, rate, seconds, clients, batch_size, max_wait_ms, seed=i)
            row.update({f"{name}_{key}": value for key, value in got.items()})
        results.append(row)
    return {
        "benchmark": "serving",
        "machine": machine(),
        "system": system,
        "model": f"{type(model).__name__}: {note}",
        "inputs": data_note or "random rows",
        "policy": repr(model.policy),
        "batch_size": batch_size,
        "max_wait_ms": max_wait_ms,
        "clients": clients,
        "seconds": seconds,
        "plain_capacity_rows_per_s": capacity,
        "results": results,
    }


COLUMNS = [
    ("rate", "offered req/s", ".0f"),
    ("load", "x plain cap.", ".2f"),
    ("adaptive_throughput", "adaptive req/s", ".0f"),
    ("adaptive_p50_ms", "p50 ms", ".1f"),
    ("adaptive_p99_ms", "p99 ms", ".1f"),
    ("adaptive_rows_per_run", "rows/run", ".1f"),
    ("plain_throughput", "plain req/s", ".0f"),
    ("plain_p50_ms", "p50 ms", ".1f"),
    ("plain_p99_ms", "p99 ms", ".1f"),
    ("plain_rows_per_run", "rows/run", ".1f"),
]


def format_report(report: dict) -> str:
    lines = [
        f"serving, open-loop Poisson 1-row requests on {describe_machine(report['machine'])}",
        f"{report['system']}: {report['model']}",
        f"policy: {report['policy']}",
        f"Server(batch_size={report['batch_size']}, max_wait_ms={report['max_wait_ms']:g}), {report['clients']} client "
        f"threads, {report['seconds']:g} s per rate; plain capacity {report['plain_capacity_rows_per_s']:.0f} rows/s "
        f"at batch {report['batch_size']}; rows/run = mean rows per run of the first node",
        "",
        format_table(report["results"], COLUMNS),
    ]
    failed = sum(r["adaptive_failed"] + r["plain_failed"] for r in report["results"])
    if failed:
        lines.append(f"WARNING: {failed} requests failed")
    note = contention_note(report["machine"])
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_serving", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"short runs (defaults become {QUICK})")
    parser.add_argument("--system", default="combination", choices=SYSTEMS, help="default: combination")
    parser.add_argument("--source", default="auto", choices=("auto", "demo", "fresh"),
                        help="the demo's trained models (demo), fresh untrained ones (fresh), or demo if cached (auto)")
    parser.add_argument("--cache", metavar="DIR", help="the demo's checkpoint cache (default: the demo's default)")
    parser.add_argument("--load", default=",".join(map(str, DEFAULT_LOADS)),
                        help="arrival rates as multiples of the plain model's capacity (default 0.5,1,2)")
    parser.add_argument("--rates", help="arrival rates in requests per second (instead of --load)")
    parser.add_argument("--seconds", type=float, help=f"load duration per rate and server (default {DEFAULTS['seconds']})")
    parser.add_argument("--clients", type=int, help=f"client threads (default {DEFAULTS['clients']})")
    parser.add_argument("--rows", type=int, help=f"distinct input rows the requests cycle through (default {DEFAULTS['rows']})")
    parser.add_argument("--chain-width", type=int, help=f"the chain's width (default {DEFAULTS['chain_width']})")
    parser.add_argument("--batch-size", type=int, default=64, help="the servers' batch_size (default 64)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the servers' max_wait_ms (default 5)")
    common_arguments(parser, json_help="write the report as JSON")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else DEFAULTS)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    loads = comma_list(parser, args.load, "--load", float)
    rates = comma_list(parser, args.rates, "--rates", float) if args.rates else None
    apply_threads(parser, args)
    try:
        report = run(args.system, args.source, loads, rates, batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
                     cache=args.cache, **settings)
    except ValueError as err:
        parser.error(str(err))
    return finish(report, args, format_report)


if __name__ == "__main__":
    sys.exit(main())
