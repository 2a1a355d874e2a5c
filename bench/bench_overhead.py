"""The fixed cost of a decision: ops per node run beyond the node's own module (issue 19).

``python -m bench.bench_overhead [--modes early_exit,cascade,stream,server] [--triton] [--json PATH] [--threads N]``

The held-out chain (4 stages of two ``Linear(512, 512)`` + ReLU, pooled-linear exits, about half of the rows
still running leaving at each of the first three exits; 64 request batches of 64 rows) is run four ways -
per-batch early exit, a two-network cascade, ``adaexit.stream`` and ``adaexit.Server`` - under the torch
profiler. Reported per mode: ops per node run beyond the node's own (every op the Python layer dispatches:
``aten::*`` and ``adaexit::*`` events with no op above them, so an op's internals count once; minus each node
module's own ops, profiled alone), host syncs per decision, and, where the kernels count them
(``adaexit.kernels.launch_count``), Triton launches per node run on the Triton path.

:func:`cuda_graph_check` is ``bench.gpu_check``'s hook for the zero-sync mode: the chain's forward with no
host sync captured in a CUDA graph, checked and timed against the syncing mode (:func:`zero_sync_forward`
builds the two calls).

Target (issue 19): <= 30 ops per node run beyond the node's own, every mode.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from adaexit import Cascade, Server, stream
from adaexit.kernels import backend_for, host_sync_count, interpreter_enabled as _interpreter, launch_count, set_backend

from . import apply_threads, common_arguments, finish, machine, node_inputs, policy_for_fractions
from .bench_stream import CHAIN_FRACTIONS, chain

TARGET_OPS = 30
MODES = ("early_exit", "cascade", "stream", "server")


def count_ops(fn, all_threads: bool = False) -> int:
    """Ops ``fn`` dispatches from Python: profiler events ``aten::*`` / ``adaexit::*`` with no op above them.

    ``all_threads``: record every thread (the Server's worker), not only the caller's."""
    fn()  # warm up (lazy initialisation is not the steady state)
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True) if all_threads else None
    with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
        fn()
    ops = 0
    for event in prof.events():
        if not event.name.startswith(("aten::", "adaexit::")):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "adaexit::")):
            parent = parent.cpu_parent
        ops += parent is None
    return ops


def held_out_chain(width: int = 512, rows: int = 4096, seed: int = 0):
    """The held-out chain and its rows, thresholds set so half of the rows still running exit at each exit."""
    model = chain(width, seed=seed)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    model.set_policy(policy_for_fractions(model, x, CHAIN_FRACTIONS))
    return model, x


def two_network_cascade(width: int = 512, rows: int = 4096, seed: int = 0):
    """A cascade of a small and a big MLP, half of the rows leaving after the small one."""
    torch.manual_seed(seed)
    small = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 10))
    big = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    model = Cascade([small, big], example_input=x[:1]).eval()
    model.set_policy(policy_for_fractions(model, x, (0.5,)))
    return model, x


def _node_calls(model) -> tuple[list[int], list]:
    """Forward hooks counting each node module's calls."""
    calls = [0] * len(model.graph())
    handles = []
    for k, node in enumerate(model.graph()):
        def hook(*_, k=k):
            calls[k] += 1
        handles.append(node.module.register_forward_hook(hook))
    return calls, handles


def runner(model, x: torch.Tensor, mode: str, batch: int = 64, batches: int = 64):
    """A call that runs ``batches`` request batches of ``batch`` rows of ``x`` through ``model`` in ``mode``."""
    requests = list(x[: batch * batches].split(batch))

    def run():
        with torch.inference_mode():
            if mode == "stream":
                deque(stream(model, requests, batch_size=batch), maxlen=0)
            elif mode == "server":
                with Server(model, batch_size=batch, max_wait_ms=1) as server:
                    futures = [server.submit(r) for r in requests]
                    for f in futures:
                        f.result()
            else:
                for r in requests:
                    model(r)

    return run


def overhead(model, x: torch.Tensor, mode: str, batch: int = 64, batches: int = 64) -> dict:
    """Ops per node run beyond the node's own, and host syncs per decision, for one mode."""
    run = runner(model, x, mode, batch, batches)
    with torch.inference_mode():
        own = [count_ops(lambda node=node, inp=inp: node.module(inp[:batch]))
               for node, inp in zip(model.graph(), node_inputs(model, x[:batch]))]
    run()
    calls, handles = _node_calls(model)
    syncs = host_sync_count()
    try:
        total = count_ops(run, all_threads=mode == "server")  # (runs twice: warm-up and profiled)
    finally:
        for h in handles:
            h.remove()
    syncs = host_sync_count() - syncs
    node_runs = sum(calls) // 2
    own_ops = sum(c // 2 * o for c, o in zip(calls, own))
    row = {"mode": mode, "node_runs": node_runs, "ops_total": total, "ops_own": own_ops,
           "ops_per_node_run": (total - own_ops) / max(1, node_runs),
           "host_syncs_per_node_run": syncs / 2 / max(1, node_runs)}
    row["target_met"] = row["ops_per_node_run"] <= TARGET_OPS
    return row


def zero_sync_forward(device: str = "cuda", batch: int = 64):
    """Hook for ``bench.gpu_check``: ``(sync_call, zero_sync_call, x)`` on ``device``: two callables of no
    argument running the held-out chain's forward on the same ``batch`` rows in the syncing mode and in the
    zero-sync mode (``model.set_execution(sync=False)``; no host sync, so it can be captured in a CUDA
    graph). Both return the logits."""
    model, x = held_out_chain(rows=max(batch, 1024))
    model = model.to(device)
    zero = held_out_chain(rows=max(batch, 1024))[0].to(device).set_execution(sync=False)
    x = x[:batch].to(device)

    def sync_call():
        with torch.inference_mode():
            return model(x)

    def zero_sync_call():
        with torch.no_grad():
            return zero(x)

    return sync_call, zero_sync_call, x


def cuda_graph_check(device, dry_run: bool = False, budget_s: float = 60.0, batch: int = 64) -> dict:
    """``bench.gpu_check``'s ``cuda_graph`` section: the held-out chain's forward in the zero-sync mode
    captured in a CUDA graph, checked against eager (both modes) and timed against the syncing mode (median
    ms of CUDA-event-timed calls). ``dry_run`` (or a device that is not CUDA): no capture, no timing; the
    two modes are run once and compared, and the zero-sync mode's host syncs counted."""
    import time

    device = torch.device(device)
    sync_call, zero_sync_call, x = zero_sync_forward(str(device), batch)
    before = host_sync_count()
    eager_zero = zero_sync_call()
    result = {"device": str(device), "batch": batch, "zero_sync_host_syncs": host_sync_count() - before}
    eager_sync = sync_call()
    result["modes_max_abs_diff"] = float((eager_zero - eager_sync).abs().max())
    if dry_run or device.type != "cuda":
        result["captured"] = False
        return result
    stream_ = torch.cuda.Stream()
    stream_.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream_):
        for _ in range(3):  # warm up on a side stream, as CUDA-graph capture requires
            zero_sync_call()
    torch.cuda.current_stream().wait_stream(stream_)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = zero_sync_call()
    graph.replay()
    torch.cuda.synchronize()
    result["captured"] = True
    result["graph_max_abs_diff"] = float((static_out - eager_zero).abs().max())

    def timed(fn, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(sorted(times)[len(times) // 2])

    deadline = time.monotonic() + budget_s
    repeats = 50
    result["sync_ms"] = timed(sync_call, repeats)
    result["zero_sync_eager_ms"] = timed(zero_sync_call, repeats) if time.monotonic() < deadline else None
    result["zero_sync_graph_ms"] = timed(graph.replay, repeats) if time.monotonic() < deadline else None
    if result["zero_sync_graph_ms"]:
        result["graph_speedup_over_sync"] = result["sync_ms"] / result["zero_sync_graph_ms"]
    result["device_name"] = torch.cuda.get_device_name(device)
    return result


def launches_per_node_run(model, x: torch.Tensor, mode: str, batch: int = 64, batches: int = 8) -> float:
    """Triton kernel launches per node run in ``mode`` (``adaexit.kernels.launch_count``); run it with the
    Triton backend (``set_backend("triton")``; on a CPU through the interpreter)."""
    run = runner(model, x, mode, batch, batches)
    calls, handles = _node_calls(model)
    before = launch_count()
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return (launch_count() - before) / max(1, sum(calls))


def run(modes=MODES, batch: int = 64, batches: int = 64, triton: bool = False) -> dict:
    """Ops per node run for each mode; with ``triton``, also Triton launches per node run (a smaller
    width and 4 batches: the interpreter is slow; launches do not depend on either)."""
    chain_model, chain_x = held_out_chain()
    cascade_model, cascade_x = two_network_cascade()
    rows = []
    for mode in modes:
        model, x = (cascade_model, cascade_x) if mode == "cascade" else (chain_model, chain_x)
        rows.append(overhead(model, x, mode, batch, batches))
        if triton:
            small, xs = two_network_cascade(64, 1024) if mode == "cascade" else held_out_chain(64, 1024)
            with set_backend("triton"):
                rows[-1]["launches_per_node_run"] = launches_per_node_run(small, xs, mode, batch, 4)
    return {"benchmark": "overhead", "machine": machine(), "results": rows}


def format_report(report: dict) -> str:
    lines = ["ops per node run beyond the node's own (held-out chain / two-network cascade, 64 batches of 64 rows)",
             f"{'mode':<12}{'node runs':>10}{'ops/run':>10}{'syncs/run':>11}{'launches/run':>14}  target <= {TARGET_OPS}"]
    for r in report["results"]:
        launches = r.get("launches_per_node_run")
        lines.append(f"{r['mode']:<12}{r['node_runs']:>10}{r['ops_per_node_run']:>10.1f}"
                     f"{r['host_syncs_per_node_run']:>11.2f}{'-' if launches is None else f'{launches:.1f}':>14}"
                     f"  {'met' if r['target_met'] else 'MISSED'}")
    lines.append("ops: aten::* / adaexit::* events with no op above them (an adaexit kernel is one op), minus the "
                 "node modules' own; launches: adaexit.kernels.launch_count on the Triton path (--triton)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    common_arguments(parser, json_help="write the report as JSON")
    parser.add_argument("--triton", action="store_true",
                        help="also count Triton launches per node run (on a CPU: TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    if args.triton and backend_for("cuda") != "triton" and not _interpreter():
        parser.error("--triton needs triton and a GPU, or TRITON_INTERPRET=1 for the interpreter")
    return finish(run(modes, triton=args.triton), args, format_report)


if __name__ == "__main__":
    sys.exit(main())
