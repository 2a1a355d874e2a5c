"""Cost models: FLOPs per example (``torch.utils.flop_counter``) and measured latency per stage."""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .executor import num_rows, take_rows


@contextmanager
def eval_mode(*modules):
    """Temporarily put modules (and every submodule) in eval mode, restoring each flag afterwards.

    Counting FLOPs on one row needs it: BatchNorm cannot run a one-row batch in train mode.
    """
    flags = [(m, m.training) for module in modules if isinstance(module, nn.Module) for m in module.modules()]
    for module in modules:
        if isinstance(module, nn.Module):
            module.eval()
    try:
        yield modules[0] if len(modules) == 1 else modules
    finally:
        for m, training in flags:
            m.training = training


@torch.no_grad()
def count_flops(fn: Callable, *args) -> int:
    """FLOPs (2 x multiply-adds of matmuls and convolutions) of ``fn(*args)``, in eval mode."""
    with eval_mode(fn), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@torch.no_grad()
def chain_flops(
    stages: Sequence[nn.Module],
    heads: Sequence[nn.Module | None],
    example: torch.Tensor,
    reads_input: Sequence[bool] | None = None,
):
    """Per-example FLOPs of each stage and each head of a chain, measured on ``example[:1]``.

    Stage ``k`` reads stage ``k - 1``'s output, or the original input where ``reads_input[k]`` (a
    cascade's whole networks). A ``None`` head costs 0. Returns ``(stage_flops, head_flops)``.
    """
    x = take_rows(example, torch.arange(1, device=example.device))
    h = x
    stage_flops, head_flops = [], []
    for k, (stage, head) in enumerate(zip(stages, heads)):
        if reads_input is not None and reads_input[k]:
            h = x
        stage_flops.append(float(count_flops(stage, h)))
        with eval_mode(stage):
            h = stage(h)
        head_flops.append(float(count_flops(head, h)) if head is not None else 0.0)
    return stage_flops, head_flops


def device_name(device: torch.device | str = "cpu") -> str:
    """A human name for ``device``: the GPU's name, or the CPU model from ``/proc/cpuinfo``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What every measurement carries: the device and its name, cores and threads, versions, load."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work on ``device`` (no-op on CPU), so host timers measure it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def module_device(module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer; None if it has neither (or is no module)."""
    for tensors in (getattr(module, "parameters", None), getattr(module, "buffers", None)):
        for t in tensors() if tensors is not None else ():
            return t.device
    return None


@torch.no_grad()
def time_call(fn: Callable, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of ``fn(*args)`` (CUDA-synchronised on GPU tensors)."""
    device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
    for _ in range(warmup):
        fn(*args)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    budget_s: float | None = None,
    rotate: bool = False,
) -> dict[str, list[float]]:
    """Milliseconds of each ``fns[name]()`` call over ``repeats`` rounds, the functions interleaved
    (A B C A B C ...) so a noisy shared machine slows them all alike; ``rotate`` also rotates the order
    every round (A B C, B C A, ...). ``budget_s`` stops early (after at least 3 timed rounds)."""
    names = list(fns)

    def order(r: int) -> list[str]:
        k = r % len(names) if rotate and names else 0
        return names[k:] + names[:k]

    for r in range(warmup):
        for name in order(r):
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    start_all = time.perf_counter()
    for r in range(repeats):
        for name in order(warmup + r):
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
        if budget_s is not None and r >= 2 and time.perf_counter() - start_all > budget_s:
            break
    return times


@torch.no_grad()
def chain_latency(
    stages: Sequence[nn.Module],
    heads: Sequence[nn.Module | None],
    batch: torch.Tensor,
    repeats: int = 10,
    reads_input: Sequence[bool] | None = None,
):
    """Measured per-example milliseconds of each stage and each head at ``batch``'s batch size
    (``reads_input`` as in :func:`chain_flops`).

    Returns ``(stage_ms, head_ms)``: median time of the call divided by the batch size.
    """
    n = max(1, num_rows(batch))
    h = batch
    stage_ms, head_ms = [], []
    with eval_mode(*stages, *[head for head in heads if head is not None]):  # timing must not update BatchNorm
        for k, (stage, head) in enumerate(zip(stages, heads)):
            if reads_input is not None and reads_input[k]:
                h = batch
            stage_ms.append(time_call(stage, h, repeats=repeats) / n)
            h = stage(h)
            if head is None:
                head_ms.append(0.0)
                continue
            # eval mode runs the head's fused gate where it has one
            gate = getattr(head, "gate", None)
            run_head = (lambda t, g=gate: g(t, "maxprob", 2.0)) if callable(gate) else head
            head_ms.append(time_call(run_head, h, repeats=repeats) / n)
    return stage_ms, head_ms
