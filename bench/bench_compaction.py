"""Compaction micro-benchmarks: adaexit ``compact`` / ``gather_rows`` / ``scatter_rows`` / ``partition``
against the usual PyTorch idioms (``torch.nonzero`` + ``index_select``, boolean masking, stable sort).

Run: ``pytest bench/bench_compaction.py --benchmark-only -q`` (functions are named ``test_*`` so that pytest
collects them with the default ``python_functions``). The adaexit ops dispatch as in production:
the torch reference on CPU, the Triton kernels on CUDA (``ADAEXIT_BENCH_DEVICE=cuda`` or a visible GPU).

Workload: N in {256, 4096} rows of D = 512 fp32 features, about half of them kept.
Bytes moved (for GB/s): each op's one model, ``adaexit.kernels.ops.<op>.bytes_moved`` (the kept rows read
and written once plus the index for gather / scatter; routes, histograms and ``order`` for partition; compact's
partition + gather), the same for an op and the baselines of its group.
``--benchmark-disable`` runs each once, as a smoke test.
Set ``ADAEXIT_BENCH_THREADS=1`` on a busy CPU machine (OpenMP workers waiting for a core dominate otherwise).
``extra_info`` holds: device name, bytes moved, GB/s at the median, and the speedup over the baseline of the
group (``nonzero`` + ``index_select`` for compact, ``index_select`` for gather, ``out[index] = src`` for scatter,
a stable sort for partition), timed interleaved in the same test on the same inputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from adaexit.cost import device_name, interleaved_times, sync
from adaexit.kernels import compact, gather_rows, partition, scatter_rows
from adaexit.kernels.ops import compact as compact_op
from adaexit.kernels.ops import gather_rows as gather_op
from adaexit.kernels.ops import partition as partition_op
from adaexit.kernels.ops import scatter_rows as scatter_op
from bench import describe_machine, machine, median

D = 512
SIZES = [256, 4096]
DEVICE = os.environ.get("ADAEXIT_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if os.environ.get("ADAEXIT_BENCH_THREADS"):  # e.g. 1 on a shared machine: idle OpenMP threads cost ms
    torch.set_num_threads(int(os.environ["ADAEXIT_BENCH_THREADS"]))


def measure(benchmark, bytes_moved: int, fn, baseline=None) -> None:
    """Time ``fn`` with pytest-benchmark, each call followed by ``sync`` (CUDA launches are asynchronous),
    and fill extra_info: device, machine, bytes moved, GB/s at the median and, when a baseline is given, the
    speedup over it from interleaved timing (fn, baseline, fn, baseline, ...: fair on a noisy machine)."""
    benchmark(lambda: (fn(), sync(DEVICE)))
    if benchmark.disabled:  # --benchmark-disable: one call as a smoke test, nothing timed
        return
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=device_name(DEVICE), machine=describe_machine(machine(DEVICE)),
        bytes_moved=bytes_moved, gbps=bytes_moved / med / 1e9, median_ms=med * 1e3,
    )  # fmt: skip
    if baseline is not None:
        times = interleaved_times({"adaexit": fn, "baseline": baseline}, repeats=20, warmup=3, device=DEVICE)
        benchmark.extra_info["speedup_vs_baseline"] = median(times["baseline"]) / median(times["adaexit"])


def workload(n: int):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, D, generator=g).to(DEVICE)
    keep = (torch.rand(n, generator=g) < 0.5).to(DEVICE)
    kept_index = torch.nonzero(keep).flatten()
    return x, keep, kept_index


def compact_bytes(keep, x, capacity=None) -> int:
    """The bytes-moved model of ``compact(keep, x, capacity=capacity)`` (the op's own)."""
    return compact_op.bytes_moved(keep, x, kept=int(keep.sum()), capacity=capacity)


# ---------------------------------------------------------------- baselines (what public code does)
def baseline_nonzero_index_select(keep, x):
    idx = torch.nonzero(keep).flatten()
    return idx, x.index_select(0, idx)


def baseline_boolean_mask(keep, x):
    return x[keep]


# ---------------------------------------------------------------- compact
@pytest.mark.benchmark(group="compact", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_compact_adaexit(benchmark, n):
    x, keep, kept_index = workload(n)
    baseline = lambda: baseline_nonzero_index_select(keep, x)  # noqa: E731
    measure(benchmark, compact_bytes(keep, x), lambda: compact(keep, x), baseline)


@pytest.mark.benchmark(group="compact", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_compact_adaexit_static_capacity(benchmark, n):
    x, keep, kept_index = workload(n)
    baseline = lambda: baseline_nonzero_index_select(keep, x)  # noqa: E731
    measure(benchmark, compact_bytes(keep, x, n // 2), lambda: compact(keep, x, capacity=n // 2), baseline)


@pytest.mark.benchmark(group="compact", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_compact_baseline_nonzero_index_select(benchmark, n):
    x, keep, kept_index = workload(n)
    measure(benchmark, compact_bytes(keep, x), lambda: baseline_nonzero_index_select(keep, x))


@pytest.mark.benchmark(group="compact", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_compact_baseline_boolean_mask(benchmark, n):
    x, keep, kept_index = workload(n)
    baseline = lambda: baseline_nonzero_index_select(keep, x)  # noqa: E731
    measure(benchmark, compact_bytes(keep, x), lambda: baseline_boolean_mask(keep, x), baseline)


# ---------------------------------------------------------------- gather / scatter
@pytest.mark.benchmark(group="gather_rows", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_gather_rows_adaexit(benchmark, n):
    x, keep, kept_index = workload(n)
    baseline = lambda: x.index_select(0, kept_index)  # noqa: E731
    measure(benchmark, gather_op.bytes_moved(x, kept_index), lambda: gather_rows(x, kept_index), baseline)


@pytest.mark.benchmark(group="gather_rows", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_gather_rows_baseline_index_select(benchmark, n):
    x, keep, kept_index = workload(n)
    measure(benchmark, gather_op.bytes_moved(x, kept_index), lambda: x.index_select(0, kept_index))


@pytest.mark.benchmark(group="scatter_rows", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_scatter_rows_adaexit(benchmark, n):
    x, keep, kept_index = workload(n)
    src = x.index_select(0, kept_index)
    out = torch.empty_like(x)

    def baseline():
        out[kept_index] = src

    measure(benchmark, scatter_op.bytes_moved(src, kept_index), lambda: scatter_rows(out, kept_index, src), baseline)


@pytest.mark.benchmark(group="scatter_rows", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_scatter_rows_baseline_index_put(benchmark, n):
    x, keep, kept_index = workload(n)
    src = x.index_select(0, kept_index)
    out = torch.empty_like(x)

    def baseline():
        out[kept_index] = src

    measure(benchmark, scatter_op.bytes_moved(src, kept_index), baseline)


# ---------------------------------------------------------------- partition
@pytest.mark.benchmark(group="partition", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_partition_adaexit(benchmark, n):
    x, keep, kept_index = workload(n)
    route = (~keep).to(torch.int64)
    measure(benchmark, partition_op.bytes_moved(route, 2), lambda: partition(route, 2), lambda: torch.sort(route, stable=True))


@pytest.mark.benchmark(group="partition", max_time=0.2, min_rounds=10)
@pytest.mark.parametrize("n", SIZES)
def test_partition_baseline_stable_sort(benchmark, n):
    x, keep, kept_index = workload(n)
    route = (~keep).to(torch.int64)
    measure(benchmark, partition_op.bytes_moved(route, 2), lambda: torch.sort(route, stable=True))
