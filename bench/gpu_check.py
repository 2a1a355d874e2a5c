"""GPU validation kit: one command that checks the kernels and measures the speedups on a CUDA machine
within a hard time budget, rehearsed on the CPU (issue 13).

    python -m bench.gpu_check --out DIR [--budget-s 480] [--dry-run]

Sections, in order of value (a GPU session may be cut short, so the most valuable come first):

1. ``correctness`` - every kernel of :mod:`adaexit.kernels` through its Triton kernel on device tensors
   against its ``<op>_torch`` reference on the same tensors: exact equality for partition (order and
   counts), gather, scatter and compact; for exit_gate the rule of the kernel tests
   (:func:`bench.kernel_cases.check_exit_gate`: the tolerance table, the exit mask equal away from the
   threshold). The kit's own branch sweep runs first (N = 0, 1, odd, several blocks; 2-D, NCHW,
   channels_last and ``h[:, 0]`` inputs; fp32/fp16/bf16; K from 2 to 1000, i.e. through the exit-gate
   scratch path; partition's multi-block path at R = 2 and 5), then the kernel tests' own case lists
   (:mod:`bench.kernel_cases`). Every case reseeds from its name, so a failure is reproducible alone.
2. ``host_syncs`` - ``host_sync_count()`` around early-exit forwards: one per decision point that ran,
   none under a never-exit policy; ``compact`` one, ``compact(capacity=...)`` and ``partition`` none. On
   CUDA, torch's sync debug mode also counts every synchronising call it sees (hidden ``.item()``s).
3. ``kernel_timing`` - each kernel at N = 256, 4096, 65536: median of CUDA-event times, GB/s from the
   bytes-moved model of each kernel (see the ``*_bytes`` functions), ratio to a device-to-device
   ``dst.copy_(src)`` of the same bytes and to the unfused torch baseline ``<op>_torch``.
4. ``end_to_end`` - torchvision ResNet-50 (random weights, 1000 classes, 224x224) wrapped with exits after
   layer1..3, thresholds that exit about half the rows still alive at each early exit, batch 1, 64, 256,
   1024: plain vs masked dense vs adaexit (``bench.baselines``) vs the FLOPs ideal, interleaved
   (``adaexit.cost.interleaved_times``) and timed with CUDA events; then, when ``transformers`` is
   importable, a BERT-base-sized encoder, recorded as ``skipped: <error>`` while ``adaexit.wrap`` does
   not accept it.

Budget. ``--budget-s`` counts from the start of the process. Each section gets a share of what is left
(unused time passes on) and checks it between cases; past the budget the remaining work is marked
skipped and the report is written. A watchdog thread writes the report and ends the process if a single
step overruns the budget itself. Any exception in a section is recorded with its traceback.

Report: ``DIR/report.json`` and ``DIR/report.md`` (device, driver, versions, date, the exact command line,
each section's results and a pass/fail per check). Checks of kind ``target`` (the BRIEF's performance
targets) and the end-to-end agreement checks are reported but never change the exit status. Exit status:
1 if a correctness check failed (or the correctness section raised), 2 on a usage error (no CUDA device
without ``--dry-run``), 0 otherwise.

``--dry-run`` runs the same code on the CPU through Triton's interpreter with tiny sizes (the kernel
tests' own case lists are left to the test suite, which runs them through the interpreter already).
Its timings are not performance numbers. TRITON_INTERPRET=1 must be set before the kernels are
*decorated*, and ``python -m bench.gpu_check`` imports the ``bench`` package - and through it
``adaexit.kernels`` - before this module's first line runs; so when the kernels are in the wrong mode,
the kit re-executes itself once with the variable set (or, for a GPU run, cleared). Setting
``TRITON_INTERPRET=1`` in the environment beforehand avoids that second start-up.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

import adaexit
from adaexit import ConfidencePolicy, NeverExitPolicy
from adaexit.cost import device_name, interleaved_times, sync
from adaexit.kernels import (
    CRITERIA,
    backend_for,
    compact,
    compact_torch,
    exit_gate,
    exit_gate_torch,
    gather_rows,
    gather_rows_torch,
    host_sync_count,
    interpreter_enabled,
    partition,
    partition_torch,
    scatter_rows,
    scatter_rows_torch,
    set_backend,
)
from adaexit.kernels import _layout
from adaexit.kernels._triton import HAS_TRITON, triton
from adaexit.kernels.ops import exit_gate as exit_gate_mod
from adaexit.kernels.ops import partition as partition_mod

from . import EARLY_EXIT_MODELS, format_table, machine, median, policy_for_fractions, write_json
from . import kernel_cases as kc
from .baselines import adaexit as adaexit_strategy
from .baselines import masked_dense, plain
from .profile import decision_points, make_timer

_T0_ENV = "ADAEXIT_GPU_CHECK_T0"  # the first process's start time, handed to a re-executed one
_REEXEC_ENV = "ADAEXIT_GPU_CHECK_REEXEC"
DEFAULT_BUDGET_S = 480.0

SECTIONS = ("correctness", "host_syncs", "kernel_timing", "end_to_end")
# Share of the remaining budget each section may use when it starts (unused time passes on).
SHARES = {"correctness": 0.45, "host_syncs": 0.05, "kernel_timing": 0.20, "end_to_end": 0.30}
TITLES = {
    "correctness": "Kernel correctness (Triton vs reference, same tensors)",
    "host_syncs": "Host synchronisations per decision point",
    "kernel_timing": "Kernel timing",
    "end_to_end": "Early exit end to end",
}


# ====================================================================================================
# Start-up: the budget's clock and the interpreter switch


def _process_start_time() -> float:
    """Wall-clock start of this process (Linux ``/proc``), so the budget includes the imports."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        start = boot + start_ticks / os.sysconf("SC_CLK_TCK")
        now = time.time()
        if now - 3600 < start <= now:  # sane (btime has a 1 s resolution)
            return start
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return time.time()


def _kernels_interpreted() -> bool:
    """Whether the kernels were decorated for Triton's interpreter (decided when they were imported)."""
    return type(exit_gate_mod._exit_gate_kernel).__name__ == "InterpretedFunction"


def _reexec_if_needed(dry_run: bool, t0: float) -> None:
    """Re-execute this command once with TRITON_INTERPRET as the mode needs (see the module docstring)."""
    if not HAS_TRITON or _kernels_interpreted() == dry_run:
        return
    if os.environ.get(_REEXEC_ENV):
        raise SystemExit("gpu_check: re-executed, but the kernels are still in the wrong Triton mode")
    env = dict(os.environ, **{_REEXEC_ENV: "1", _T0_ENV: repr(t0)})
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


# ====================================================================================================
# Run bookkeeping: sections, checks, the budget, writing the report


class Run:
    """The report being built, the budget and the watchdog. Every write of the report goes through
    :meth:`write` (atomic replace, under a lock shared with the watchdog)."""

    def __init__(self, args, t0: float, device: torch.device):
        self.args, self.t0, self.device = args, t0, device
        self.out = Path(args.out)
        self.hard_deadline = t0 + args.budget_s
        # stop starting new work a little before the hard deadline, to leave time to write the report
        self.soft_deadline = self.hard_deadline - min(10.0, 0.05 * args.budget_s)
        self.lock = threading.Lock()
        self.finished = False
        self.current: str | None = None
        self.report = {
            "kit": "adaexit GPU validation kit (bench/gpu_check.py)",
            "mode": "dry-run (CPU, Triton interpreter; timings are not performance numbers)"
            if args.dry_run
            else "gpu (compiled Triton kernels)",
            "dry_run": bool(args.dry_run),
            "command": shlex.join(sys.orig_argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": args.budget_s,
            "elapsed_s": None,
            "environment": {},
            "sections": {name: {"title": TITLES[name], "status": "pending", "checks": []} for name in SECTIONS},
            "correctness_passed": None,
            "exit_status": None,
        }

    def now_left(self) -> float:
        return self.soft_deadline - time.time()

    def correctness_failed(self) -> bool:
        """A correctness check failed or the section raised (whether or not it finished)."""
        sec = self.report["sections"]["correctness"]
        return sec["status"] in ("failed", "error") or any(not c["passed"] for c in list(sec["checks"]))

    def exit_status(self) -> int:
        return 1 if self.correctness_failed() else 0

    def write(self, final: bool = False) -> None:
        with self.lock:
            if self.finished:
                return
            self._write_unlocked()
            self.finished = final

    def _write_unlocked(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.t0, 1)
        status = self.report["sections"]["correctness"]["status"]
        # True: every case ran and passed; False: a case failed (or the section raised); None: not (all) run
        failed = self.correctness_failed()
        self.report["correctness_passed"] = False if failed else True if status == "passed" else None
        self.report["exit_status"] = self.exit_status()
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the main thread may be appending while the watchdog writes
            try:
                snapshot = json.loads(json.dumps(self.report, default=str))
                break
            except RuntimeError:
                time.sleep(0.05)
        else:
            snapshot = {"error": "the report could not be serialised while sections were running"}
        tmp = self.out / "report.json.tmp"
        write_json(tmp, snapshot)
        os.replace(tmp, self.out / "report.json")
        tmp = self.out / "report.md.tmp"
        tmp.write_text(format_markdown(snapshot))
        os.replace(tmp, self.out / "report.md")

    def arm_watchdog(self) -> None:
        """Past the hard deadline: mark what is running as interrupted, write the report and exit."""
        delay = self.hard_deadline - time.time()
        if delay <= 0:
            return
        timer = threading.Timer(delay, self._on_hard_deadline)
        timer.daemon = True
        timer.start()

    def _on_hard_deadline(self) -> None:
        with self.lock:
            if self.finished:
                return
            for name, sec in self.report["sections"].items():
                if name == self.current:
                    sec["status"] = "interrupted"
                    sec["reason"] = f"the hard time budget ({self.args.budget_s:g} s) ran out inside this section"
                elif sec["status"] == "pending":
                    sec["status"] = "skipped"
                    sec["reason"] = "time budget spent"
            self.report["interrupted"] = True
            try:
                self._write_unlocked()
            finally:
                print(f"gpu_check: hard time budget reached; report written to {self.out}", file=sys.stderr)
                sys.stderr.flush()
                os._exit(self.exit_status())


class Section:
    """One section's record and deadline; :meth:`check` runs one check and records its outcome."""

    def __init__(self, run: Run, name: str, deadline: float):
        self.run, self.name, self.deadline = run, name, deadline
        self.record = run.report["sections"][name]
        self.device, self.dry = run.device, run.args.dry_run
        self.skipped: list[str] = []

    def time_left(self) -> float:
        return min(self.deadline, self.run.soft_deadline) - time.time()

    def out_of_time(self) -> bool:
        return self.time_left() <= 0

    def skip(self, name: str) -> None:
        self.skipped.append(name)

    def check(self, name: str, fn: Callable[[], object], kind: str = "check", **extra) -> bool:
        """Run ``fn``; it passes unless it raises (``AssertionError`` = a mismatch, anything else = an
        error, recorded with its traceback). What ``fn`` returns (a dict) is merged into the record."""
        entry = {"name": name, "kind": kind, **extra}
        try:
            result = fn()
            entry["passed"] = True
            if isinstance(result, dict):
                entry.update(result)
        except AssertionError as err:
            entry.update(passed=False, detail=_describe_failure(err))
        except Exception as err:  # a crash in a kernel launch is a failed check, not a crashed kit
            entry.update(passed=False, detail=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=8))
        self.record["checks"].append(entry)
        return entry["passed"]


def _describe_failure(err: AssertionError) -> str:
    """The assertion's message, or (a bare ``assert``) the source line that failed."""
    text = str(err).strip()
    if text:
        return text[:2000]
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"assertion failed at {Path(frame.filename).name}:{frame.lineno}: {frame.line}"


def _finish_status(sec: Section) -> None:
    rec = sec.record
    failed = [c for c in rec["checks"] if c.get("kind") != "target" and not c["passed"]]
    if sec.skipped:
        rec["skipped_for_budget"] = {"count": len(sec.skipped), "first": sec.skipped[:10]}
    if failed:
        rec["status"] = "failed"
    elif sec.skipped:
        rec["status"] = "incomplete"
        rec.setdefault("reason", f"time budget: {len(sec.skipped)} item(s) skipped")
    else:
        rec["status"] = "passed"


def _seed(name: str) -> None:
    """Reseed from a case's name: each case draws the same numbers whatever ran before it."""
    torch.manual_seed(zlib.crc32(name.encode()))


@contextmanager
def _env(**values):
    """Set environment variables for the duration (``None`` removes one); restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _exact_fp32_matmul():
    """The references' fp32 ``F.linear`` in full fp32 (no TF32), as the tolerance table assumes."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


# ====================================================================================================
# Environment


def _version(distribution: str) -> str:
    """The installed version, read from the package metadata (importing transformers takes seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver_version() -> tuple[str, str]:
    """``(driver version, where it came from)``: nvidia-smi if present, else the CUDA runtime torch uses."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0], "nvidia-smi"
        except (OSError, subprocess.SubprocessError):
            pass
    if torch.version.cuda:
        return f"n/a (CUDA runtime {torch.version.cuda})", "torch.version.cuda"
    return "n/a", "none"


def _backend_name(device: torch.device) -> str:
    try:
        return backend_for(device)
    except RuntimeError as err:  # ADAEXIT_BACKEND=triton where Triton cannot run
        return f"none ({err})"


def environment(device: torch.device) -> dict:
    driver, source = _driver_version()
    info = {
        "device_name": device_name(device),
        "driver_version": driver,
        "driver_version_source": source,
        "cuda_runtime": torch.version.cuda or "n/a",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "adaexit": adaexit.__version__,
        "torchvision": _version("torchvision"),
        "transformers": _version("transformers"),
        "kernel_backend": _backend_name(device),
        "triton_interpreter": interpreter_enabled(),
        "machine": machine(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["compute_capability"] = f"sm_{props.major}{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["multiprocessors"] = props.multi_processor_count
        info["cudnn"] = str(torch.backends.cudnn.version())
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
        info["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    return info


# ====================================================================================================
# 1. Correctness: cases
#
# A case is ``(kernel, name, tier, thunk)``. The thunk builds its tensors on the device (only when it runs),
# raises AssertionError on a mismatch and returns the branches it reached (tags; the report counts them).
# Tier 0 runs before tier 1: the kit's branch sweep of every kernel first, then the exit-gate tests' own
# lists, whose many odd shapes each compile a kernel variant (about a second each) - the part a short GPU
# session can afford to lose.


def _case(cases, kernel, name, tier, fn):
    cases.append((kernel, name, tier, fn))


def _feature(layout: str, n: int, d: int, hw, dtype, device) -> torch.Tensor:
    """Exit-gate input ``h`` in one of the layouts the kit sweeps."""
    if layout == "2d":
        return torch.randn(n, d).to(device, dtype)
    if layout == "nchw":
        return torch.randn(n, d, *hw).to(device, dtype)
    if layout == "channels_last":
        return torch.randn(n, d, *hw).to(device, dtype).to(memory_format=torch.channels_last)
    if layout == "cls_token":  # h[:, 0] of [N, L, D]: strided rows
        return torch.randn(n, 5, d).to(device, dtype)[:, 0]
    raise ValueError(layout)


def _exit_gate_tags(h: torch.Tensor, weight, n: int, K: int) -> list[str]:
    """The kernel branches a launch reaches, from the kernel's own block rule (``_blocks``)."""
    spatial = h.dim() > 2 and math.prod(h.shape[2:]) > 1
    S = math.prod(h.shape[2:]) if spatial else 1
    block_n, _, block_k, _, _, _ = exit_gate_mod._blocks(max(n, 1), K, S, spatial)
    tags = [f"exit_gate {str(h.dtype).replace('torch.', '')}"]
    tags.append(
        "exit_gate N=0" if n == 0 else "exit_gate N=1" if n == 1 else "exit_gate N odd" if n % 2 else "exit_gate N even"
    )
    if n > block_n:
        tags.append("exit_gate several row blocks")
    if K > block_k:
        tags.append("exit_gate several class tiles")
    if K >= 1000:
        tags.append("exit_gate K >= 1000")
    if spatial and K > block_k and n > 0:
        tags.append("exit_gate scratch path (spatial, several class tiles)")
    if spatial:
        tags.append(
            "exit_gate channels_last"
            if h.is_contiguous(memory_format=torch.channels_last) and h.dim() == 4 and not h.is_contiguous()
            else "exit_gate spatial (NC*)"
        )
    else:
        tags.append(
            "exit_gate 2-D" if h.stride(-1) == 1 and h.stride(0) == h.shape[1] else "exit_gate strided 2-D view"
        )
    if weight is not None and not spatial and h.dtype == torch.float16 and weight.dtype == torch.float16 and n > 0:
        tags.append("exit_gate fp16 tensor-core dot")
    return tags


def _gate_case(
    cases,
    name,
    make_h,
    K,
    *,
    bias=True,
    criterion="maxprob",
    w_dtype=None,
    w_scale=None,
    weight_none=False,
    threshold=None,
    nonfinite_rows=(),
    device="cpu",
    tier=0,
):
    """An exit_gate case: ``make_h()`` builds ``h`` on the device; a random ``[K, D]`` weight and bias."""

    def run():
        h = make_h()
        d = h.shape[1]
        weight = b = None
        if not weight_none:
            scale = w_scale if w_scale is not None else 3 / math.sqrt(d)
            weight = (torch.randn(K, d) * scale).to(device, w_dtype or h.dtype)
            b = torch.randn(K).to(device) if bias else None
        kc.check_exit_gate(h, weight, b, criterion=criterion, threshold=threshold, nonfinite_rows=nonfinite_rows)
        return {"tags": _exit_gate_tags(h, weight, h.shape[0], K if not weight_none else d)}

    _case(cases, "exit_gate", name, tier, run)


def exit_gate_cases(device, full: bool) -> list:
    cases: list = []
    dev = device

    def add(name, make_h, K, tier=0, **kwargs):
        _gate_case(cases, name, make_h, K, device=dev, tier=tier, **kwargs)

    def randn(*shape, scale=1.0, dtype=torch.float32):
        return lambda: (torch.randn(*shape) * scale).to(dev, dtype)

    def feature(layout, n, d, hw, dtype):
        return lambda: _feature(layout, n, d, hw, dtype, dev)

    # the kit's branch sweep: dtype x layout x K (x N on a GPU; a covering diagonal in the dry run)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    layouts = ["2d", "nchw", "channels_last", "cls_token"]
    d2, dc, hw = (768, 256, (7, 7)) if full else (24, 12, (3, 4))
    ks = (2, 10, 100, 1000) if full else (2, 10, 130)  # > 64 classes: several class tiles (scratch if spatial)
    ns = (1, 4097) if full else (1, 5, 17)
    i = 0
    for di, dtype in enumerate(dtypes):
        for li, layout in enumerate(layouts):
            combos = [(k, n) for k in ks for n in ns] if full else [(ks[(di + li) % 3], ns[(di + 2 * li) % 3])]
            for K, n in combos:
                crit = CRITERIA[i % len(CRITERIA)]
                i += 1
                d = d2 if layout in ("2d", "cls_token") else dc
                make = feature(layout, n, d, hw, dtype)
                add(f"sweep {str(dtype)[6:]} {layout} N={n} D={d} K={K} {crit}", make, K, criterion=crit)
    for layout in ("2d", "nchw"):
        add(f"sweep empty batch {layout}", feature(layout, 0, 12, (2, 2), torch.float32), 5)
    for crit in CRITERIA:  # NaN/Inf rows never exit (GPU min/max drop NaNs: the kernel checks explicitly)
        make = lambda: kc.nonfinite_h((8, 10, 3), dev)  # noqa: E731
        add(f"sweep non-finite rows {crit}", make, 100, criterion=crit, threshold=0.0, nonfinite_rows=kc.NONFINITE_ROWS)
    if not full:
        return cases

    # GPU-sized cases: ResNet-50-like feature maps through the scratch path, many row blocks, bf16 compute
    for name, make, K in [
        ("resnet layer3 fp16 channels_last [64,1024,14,14]",
         feature("channels_last", 64, 1024, (14, 14), torch.float16), 1000),
        ("resnet layer1 fp32 [16,256,56,56]", feature("nchw", 16, 256, (56, 56), torch.float32), 1000),
        ("bert CLS bf16 h[:, 0] of [4097,5,768]", feature("cls_token", 4097, 768, None, torch.bfloat16), 2),
        ("bf16 compute [70,256]", randn(70, 256, dtype=torch.bfloat16), 1000),
    ]:  # fmt: skip
        add(f"{name} K={K}", make, K, criterion="entropy")

    # the kernel tests' own case lists (tests/test_exit_gate.py), on the device, with the tests' scalings
    for N, D, K in kc.EXIT_GATE_SHAPES_2D:
        for has_bias in (True, False):
            add(
                f"tests 2d N={N} D={D} K={K} bias={has_bias}",
                randn(N, D),
                K,
                1,
                bias=has_bias,
                criterion=CRITERIA[(N + D + K) % 4],
            )
    for crit in CRITERIA:
        for K in (10, 200):
            add(f"tests criteria {crit} K={K}", randn(40, 24, scale=2.0), K, 1, criterion=crit, w_scale=1 / 3)
    for shape, K in kc.EXIT_GATE_SPATIAL:
        add(f"tests spatial {shape} K={K}", randn(*shape), K, 1, criterion=CRITERIA[K % 4], w_scale=1.0)
    for K in (10, 100):
        make = feature("channels_last", 9, 20, (4, 3), torch.float32)
        add(f"tests channels_last K={K}", make, K, 1, criterion="entropy", w_scale=1.0)
    make = lambda: torch.randn(5, 6, 4, 7).to(dev)[..., 1:4]  # noqa: E731
    add("tests non-collapsible spatial", make, 10, 1, bias=False, criterion="margin", w_scale=1.0)
    for sname, make in kc.EXIT_GATE_STRIDED.items():
        add(f"tests strided h {sname}", lambda m=make: m(dev), 70, 1, w_scale=0.25)
    for h_dtype, w_dtype in (
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
        (torch.float32, torch.float16),
    ):
        for shape in ((21, 40), (21, 40, 3, 3)):
            name = f"tests fp16 inputs h={h_dtype} w={w_dtype} {shape}"
            add(name, randn(*shape, dtype=h_dtype), 70, 1, criterion="entropy", w_dtype=w_dtype, w_scale=0.25)
    for shape, sid in zip(kc.EXIT_GATE_WEIGHT_NONE, kc.EXIT_GATE_WEIGHT_NONE_IDS):
        add(f"tests weight=None {sid}", randn(*shape, scale=3.0), None, 1, weight_none=True, criterion="entropy")
    for crit in CRITERIA:
        for shape, K in kc.EXIT_GATE_NONFINITE:
            make = lambda s=shape: kc.nonfinite_h(s, dev)  # noqa: E731
            add(f"tests non-finite rows {shape} K={K} {crit}", make, K, 1, weight_none=K is None, criterion=crit,
                threshold=0.0, nonfinite_rows=kc.NONFINITE_ROWS)  # fmt: skip
    add("tests large logits", randn(20, 32, scale=1000.0), 150, 1, bias=False, criterion="entropy", w_scale=1.0)
    for second in (1, 20, 150):

        def tied(second=second):
            logits = torch.randn(3, 200)
            logits[:, 5] = 10.0
            logits[:, second] = 10.0
            return logits.to(dev)

        add(
            f"tests tied maximum (second at {second})",
            tied,
            None,
            1,
            weight_none=True,
            criterion="margin",
            threshold=0.5,
        )
    add("tests large batch many classes", randn(70, 300), 1000, 1, w_scale=0.1)
    return cases


def _partition_case(cases, name, make_route, num_routes, blocks=None, tags=()):
    def run():
        with kc.partition_blocks(blocks):
            route = make_route()
            order, counts = partition(route, num_routes)
            ref_order, ref_counts = partition_torch(route, num_routes)
        assert order.device == route.device and counts.device == route.device, "outputs left the device"
        assert torch.equal(counts, ref_counts), f"counts {counts.tolist()} != reference {ref_counts.tolist()}"
        assert torch.equal(order, ref_order), f"order differs from the reference at {_first_diff(order, ref_order)}"
        n = route.numel()
        single = (blocks or {}).get("_SINGLE_BLOCK", partition_mod._SINGLE_BLOCK)
        block = (blocks or {}).get("_BLOCK", partition_mod._BLOCK)
        scan = (blocks or {}).get("_SCAN_BLOCK", partition_mod._SCAN_BLOCK)
        path = ["partition single block"] if 0 < n <= single else []
        if n > single:
            path.append(f"partition multi-block R={num_routes}")
            if triton.cdiv(n, block) > scan:
                path.append("partition several scan chunks")
        return {"tags": path + list(tags)}

    _case(cases, "partition", name, 0, run)


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    idx = torch.nonzero(a.reshape(-1) != b.reshape(-1))
    if idx.numel() == 0:
        return "nowhere (dtype or layout)"
    i = int(idx[0])
    return f"flat index {i} ({a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()}; {idx.numel()} differ)"


def partition_cases(device, full: bool) -> list:
    cases: list = []
    dev = device
    tiny = kc.TINY_PARTITION_BLOCKS
    if full:
        for n in kc.PARTITION_SIZES + [65537, 1_100_001]:  # 1.1M rows: more blocks than one scan chunk
            for r in kc.NUM_ROUTES:
                for pattern in kc.ROUTE_PATTERNS:
                    if n > 4097 and (pattern not in ("random", "all_last") or r not in (2, 5)):
                        continue
                    _partition_case(
                        cases,
                        f"N={n} R={r} {pattern}",
                        lambda n=n, r=r, p=pattern: kc.make_route(n, r, p, device=dev),
                        r,
                    )
                    if n <= 100:
                        _partition_case(
                            cases,
                            f"tiny blocks N={n} R={r} {pattern}",
                            lambda n=n, r=r, p=pattern: kc.make_route(n, r, p, device=dev),
                            r,
                            tiny,
                        )
        for dtype in kc.ROUTE_DTYPES:
            for blocks, label in ((None, ""), (tiny, "tiny blocks ")):
                _partition_case(
                    cases,
                    f"{label}route dtype {dtype}",
                    lambda dt=dtype: kc.make_route(100, 2, "random", dt, dev),
                    2,
                    blocks,
                    tags=["partition narrow route dtype"],
                )
        _partition_case(cases, "non-contiguous route", lambda: torch.randint(0, 3, (200,)).to(dev)[::2], 3)
        return cases
    # dry run: each path once or twice, R = 2 and 5 on the multi-block path
    for n, r, pattern, blocks in [
        (0, 2, "random", None),
        (1, 2, "random", None),
        (7, 5, "alternating", None),
        (4097, 5, "random", None),  # the real constants' multi-block path
        (100, 2, "random", tiny),  # 7 blocks, 2 scan chunks
        (100, 5, "descending", tiny),
        (33, 3, "all_but_one", tiny),
    ]:
        label = "tiny blocks " if blocks else ""
        _partition_case(
            cases,
            f"{label}N={n} R={r} {pattern}",
            lambda n=n, r=r, p=pattern: kc.make_route(n, r, p, device=dev),
            r,
            blocks,
        )
    _partition_case(
        cases,
        "tiny blocks route dtype bool",
        lambda: kc.make_route(100, 2, "random", torch.bool, dev),
        2,
        tiny,
        tags=["partition narrow route dtype"],
    )
    _partition_case(cases, "non-contiguous route", lambda: torch.randint(0, 3, (40,)).to(dev)[::2], 3)
    return cases


def _row_kernel_tag(module, layout_dense: bool, layout: str) -> str:
    if layout == "four_strided_dims":
        return f"{module} more than 3 strided dims (fallback)"
    return f"{module} dense-rows kernel" if layout_dense else f"{module} strided-rows kernel"


def _gather_case(cases, name, make_x, make_index, tag):
    def run():
        x = make_x()
        index = make_index(x.shape[0])
        out = gather_rows(x, index)
        ref = gather_rows_torch(x, index)
        assert out.shape == ref.shape and out.dtype == ref.dtype, (
            f"{tuple(out.shape)} {out.dtype} vs {tuple(ref.shape)} {ref.dtype}"
        )
        assert out.device == x.device, "output left the device"
        assert torch.equal(out, ref), f"rows differ from x[index] at {_first_diff(out, ref)}"
        return {"tags": [tag]}

    _case(cases, "gather_rows", name, 0, run)


def _twin(t: torch.Tensor):
    """An independent copy of ``t`` with the same strides and storage offset (``clone`` would make a sliced
    view contiguous), and the copy of its whole base, to check that nothing outside the view was written."""
    base = t._base if t._base is not None else t
    copy = base.clone()  # a fresh base is dense: clone keeps its strides
    view = copy.as_strided(t.size(), t.stride(), t.storage_offset() - base.storage_offset())
    return view, copy


def _scatter_case(cases, name, make, tag):
    def run():
        out, index, src = make()
        out_k, base_k = _twin(out)
        out_r, base_r = _twin(out)
        result = scatter_rows(out_k, index, src)
        scatter_rows_torch(out_r, index, src)
        assert result is out_k, "scatter_rows must return out"
        assert torch.equal(out_k, out_r), f"out differs from the reference at {_first_diff(out_k, out_r)}"
        assert torch.equal(base_k, base_r), "memory outside out's view was written"
        return {"tags": [tag]}

    _case(cases, "scatter_rows", name, 0, run)


def gather_scatter_cases(device, full: bool) -> list:
    cases: list = []
    dev = device
    L, P = kc.LAYOUTS, kc.INDEX_PATTERNS
    if full:
        gather_layouts, gather_patterns, dtype_layouts = (
            list(L),
            list(P),
            ["1d", "row345", "channels_last", "sliced_last"],
        )
        pairs, scatter_patterns, dtypes = kc.SCATTER_PAIRS, kc.SCATTER_INDEX_PATTERNS, kc.ROW_DTYPES
    else:
        gather_layouts = ["row5", "channels_last", "cls_token", "sliced_last", "four_strided_dims", "wide"]
        gather_patterns, dtype_layouts = ["reversed"], ["row5"]
        pairs = [
            ("row5", "row5"),
            ("channels_last", "channels_last"),
            ("channels_last", "row345"),
            ("cls_token", "row5"),
            ("sliced_last", "sliced_last"),
            ("four_strided_dims", "four_strided_dims"),
        ]
        scatter_patterns, dtypes = ["reversed"], [torch.float16, torch.bfloat16, torch.bool, torch.int64]
    for layout in gather_layouts:
        make, dense = L[layout]
        for pattern in gather_patterns:
            _gather_case(
                cases,
                f"{layout} index {pattern}",
                lambda mk=make: mk(9, torch.float32, dev),
                lambda m, p=pattern: P[p](m, dev),
                _row_kernel_tag("gather_rows", dense, layout),
            )
    for dtype in dtypes:
        for layout in dtype_layouts:
            for index_dtype in (torch.int64, torch.int32):
                make, dense = L[layout]
                _gather_case(
                    cases,
                    f"{layout} {dtype} index {index_dtype}",
                    lambda mk=make, dt=dtype: mk(11, dt, dev),
                    lambda m, it=index_dtype: torch.randint(0, m, (13,), dtype=it).to(dev),
                    _row_kernel_tag("gather_rows", dense, layout),
                )
    if full:
        for shape in kc.MANY_ROW_BLOCK_SHAPES:
            _gather_case(
                cases,
                f"many row blocks {shape}",
                lambda s=shape: kc.rand(s, torch.float32, dev),
                lambda m: torch.randperm(m).to(dev),
                "gather_rows several row tiles",
            )
        _gather_case(
            cases,
            "large fp16 [65537, 1024], half the rows",
            lambda: torch.randn(65537, 1024, device=dev).half(),
            lambda m: torch.randperm(m, device=dev)[: m // 2].sort().values,
            "gather_rows several row tiles",
        )

    def scatter_maker(out_layout, src_layout, pattern, m=9, dtype=torch.float32, index_dtype=torch.int64):
        def make():
            index = (P[pattern](m) if pattern else torch.randperm(m)[:6]).to(index_dtype).to(dev)
            out, src = kc.scatter_case(out_layout, src_layout, m, index, dtype, dev)
            return out, index, src

        return make

    for out_layout, src_layout in pairs:
        if L[out_layout][0](1, torch.float32).shape[1:] != L[src_layout][0](1, torch.float32).shape[1:]:
            continue  # layouts with different row shapes
        dense = L[out_layout][1] and (out_layout == src_layout or {out_layout, src_layout} == {"cls_token", "row5"})
        for pattern in scatter_patterns:
            _scatter_case(
                cases,
                f"out {out_layout} src {src_layout} index {pattern}",
                scatter_maker(out_layout, src_layout, pattern),
                _row_kernel_tag("scatter_rows", dense, out_layout),
            )
    for dtype in dtypes:
        for layout in dtype_layouts:
            for index_dtype in (torch.int64, torch.int32):
                _scatter_case(
                    cases,
                    f"{layout} {dtype} index {index_dtype}",
                    scatter_maker(layout, layout, None, 11, dtype, index_dtype),
                    _row_kernel_tag("scatter_rows", L[layout][1], layout),
                )
    if full:

        def many():
            index = torch.randperm(1500)[:1100].to(dev)
            return torch.zeros(1500, dtype=torch.int64, device=dev), index, torch.arange(1100, device=dev)

        def large():
            index = torch.randperm(65537, device=dev)[:32768].sort().values
            return torch.randn(65537, 1024, device=dev).half(), index, torch.randn(32768, 1024, device=dev).half()

        _scatter_case(cases, "many row blocks int64 [1500]", many, "scatter_rows several row tiles")
        _scatter_case(cases, "large fp16 [65537, 1024], half the rows", large, "scatter_rows several row tiles")
    return cases


def _compact_case(cases, name, make, capacities, blocks=None, tags=()):
    def run():
        keep, tensors = make()
        with kc.partition_blocks(blocks):
            for capacity in capacities:
                got = compact(keep, *tensors, capacity=capacity)
                ref = compact_torch(keep, *tensors, capacity=capacity)
                assert len(got) == len(ref), "different number of outputs"
                for i, (g, r) in enumerate(zip(got, ref)):
                    what = "kept_index" if i == 0 else f"tensors[{i - 1}]"
                    assert g.dtype == r.dtype and g.shape == r.shape, (
                        f"capacity={capacity}: {what} is {g.dtype} {tuple(g.shape)}, "
                        f"reference {r.dtype} {tuple(r.shape)}"
                    )
                    assert torch.equal(g, r), f"capacity={capacity}: {what} differs at {_first_diff(g, r)}"
        n = keep.shape[0]
        single = (blocks or {}).get("_SINGLE_BLOCK", partition_mod._SINGLE_BLOCK)
        extra = ["compact static capacity"] if any(c is not None for c in capacities) else []
        return {"tags": extra + (["compact multi-block partition"] if n > single else []) + list(tags)}

    _case(cases, "compact", name, 0, run)


def compact_cases(device, full: bool) -> list:
    cases: list = []
    dev = device
    sizes, patterns = (kc.COMPACT_SIZES, kc.KEEP_PATTERNS) if full else ([0, 7, 33], ["random", "none", "all_but_one"])
    for n in sizes:
        for pattern in patterns:
            caps = [None, *kc.capacities(n)] if full or pattern == "random" else [None]
            _compact_case(
                cases,
                f"N={n} {pattern}",
                lambda n=n, p=pattern: (kc.make_keep(n, p, dev), kc.make_tensors(n, dev)),
                caps,
            )
    if full:
        for n in (5000, 70000):
            _compact_case(
                cases,
                f"N={n} random (multi-block partition)",
                lambda n=n: ((torch.rand(n) < 0.3).to(dev), [torch.randn(n, 3).to(dev)]),
                [None, 1000],
            )
    else:
        _compact_case(
            cases,
            "N=33 random, tiny partition blocks",
            lambda: (kc.make_keep(33, "random", dev), kc.make_tensors(33, dev)),
            [None, 11],
            kc.TINY_PARTITION_BLOCKS,
        )
    return cases


#: branches the correctness section must reach (each by at least one passing case), per mode
REQUIRED_TAGS = [
    "exit_gate float32",
    "exit_gate float16",
    "exit_gate bfloat16",
    "exit_gate N=0",
    "exit_gate N=1",
    "exit_gate N odd",
    "exit_gate several row blocks",
    "exit_gate several class tiles",
    "exit_gate scratch path (spatial, several class tiles)",
    "exit_gate 2-D",
    "exit_gate spatial (NC*)",
    "exit_gate channels_last",
    "exit_gate strided 2-D view",
    "exit_gate fp16 tensor-core dot",
    "partition single block",
    "partition multi-block R=2",
    "partition multi-block R=5",
    "partition several scan chunks",
    "gather_rows dense-rows kernel",
    "gather_rows strided-rows kernel",
    "gather_rows more than 3 strided dims (fallback)",
    "scatter_rows dense-rows kernel",
    "scatter_rows strided-rows kernel",
    "compact static capacity",
    "compact multi-block partition",
]
REQUIRED_TAGS_FULL = ["exit_gate K >= 1000", "gather_rows several row tiles", "scatter_rows several row tiles"]


def correctness(sec: Section) -> None:
    device, full = sec.device, not sec.dry
    rec = sec.record
    sec.check(
        f"dispatch: the Triton kernels run on {device.type} tensors",
        lambda: _assert_backend(device, full),
    )
    builders = [partition_cases, gather_scatter_cases, compact_cases, exit_gate_cases]  # cheapest to compile first
    cases = sorted((case for build in builders for case in build(device, full)), key=lambda case: case[2])
    rec["cases_planned"] = len(cases)
    with _exact_fp32_matmul():
        for kernel, name, _, fn in cases:
            full_name = f"{kernel}: {name}"
            if sec.out_of_time():
                sec.skip(full_name)
                continue
            _seed(full_name)
            sec.check(full_name, fn, kernel=kernel)
    # per kernel summary and branch coverage
    summary: dict = {}
    covered: dict = {}
    for c in rec["checks"]:
        k = c.get("kernel")
        if k is None:
            continue
        s = summary.setdefault(k, {"kernel": k, "passed": 0, "failed": 0, "skipped": 0})
        s["passed" if c["passed"] else "failed"] += 1
        for tag in c.get("tags", []) if c["passed"] else []:
            covered[tag] = covered.get(tag, 0) + 1
    for name in sec.skipped:
        k = name.split(":", 1)[0]
        summary.setdefault(k, {"kernel": k, "passed": 0, "failed": 0, "skipped": 0})["skipped"] += 1
    rec["results"] = list(summary.values())
    rec["coverage"] = dict(sorted(covered.items()))
    required = REQUIRED_TAGS + (REQUIRED_TAGS_FULL if full else [])
    missing = [t for t in required if t not in covered]
    if not sec.skipped:  # with cases skipped for time a branch may legitimately be missing
        sec.check("every kernel branch reached by a passing case", lambda: _assert_none_missing(missing))
    else:
        rec["coverage_missing"] = missing


def _assert_backend(device, full):
    backend = backend_for(device)
    assert backend == "triton", f"ops dispatch to {backend!r} on {device}"
    assert _kernels_interpreted() != full, (
        "the kernels run in Triton's interpreter, not compiled" if full else "the dry run's kernels are not interpreted"
    )
    return {"backend": backend, "interpreter": _kernels_interpreted()}


def _assert_none_missing(missing):
    assert not missing, f"not reached: {missing}"


# ====================================================================================================
# 2. Host synchronisations


def _torch_syncs(device: torch.device, fn: Callable[[], object]) -> tuple[int | None, list[str]]:
    """``(synchronising calls torch saw, where)`` while ``fn`` runs; ``(None, [])`` off CUDA."""
    if device.type != "cuda":
        fn()
        return None, []
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), [f"{Path(w.filename).name}:{w.lineno}" for w in syncs[:5]]


def host_syncs(sec: Section) -> None:
    device = sec.device
    n = 16 if sec.dry else 64
    _, build = EARLY_EXIT_MODELS["tiny"]
    model = build(0).to(device).eval()
    _seed("host_syncs")
    x = torch.randn(n, 1, 28, 28).to(device)
    policies = {
        "fractions (0.5, 0.25): two decisions": (policy_for_fractions(model, x, [0.5, 0.25]), 2),
        "every row exits at the first exit: one decision": (ConfidencePolicy("maxprob", [-1.0, 0.0]), 1),
        "never exit: no decision": (NeverExitPolicy(), 0),
    }
    rows = []
    for label, (policy, want) in policies.items():
        if sec.out_of_time():
            sec.skip(f"forward: {label}")
            continue
        model.set_policy(policy)
        if not sec.dry:  # warm-up: kernels compiled, cuDNN's choices made (the interpreter compiles nothing)
            with torch.inference_mode():
                model(x)

        current: dict = {}

        def measure(policy_label=label, want=want, current=current):
            out = {}

            def forward():
                before = host_sync_count()
                with torch.inference_mode():
                    _, info = model(x, return_info=True)
                out["syncs"], out["info"] = host_sync_count() - before, info

            torch_count, where = _torch_syncs(device, forward)
            points = decision_points(model, out["info"])
            row = {
                "case": f"early-exit forward, {policy_label}",
                "host_syncs": out["syncs"],
                "decision_points": points,
                "torch_detected_syncs": torch_count,
                "torch_sync_sites": where,
                "exit_counts": list(out["info"].exit_counts),
            }
            rows.append(row)
            current.update(row)
            assert points == want, f"{points} decision points ran, the case expects {want}"
            assert out["syncs"] == points, f"{out['syncs']} host syncs for {points} decision points"
            return {"host_syncs": out["syncs"], "decision_points": points}

        sec.check(f"one host sync per decision point: {label}", measure)
        if device.type == "cuda":
            sec.check(f"torch sees no other synchronising call: {label}", lambda r=current: _assert_torch_syncs(r))

    keep = (torch.rand(n) < 0.5).to(device)
    feats = torch.randn(n, 8).to(device)
    ops = {
        "compact(keep, x)": (lambda: compact(keep, feats), 1),
        "compact(keep, x, capacity=n)": (lambda: compact(keep, feats, capacity=n), 0),
        "partition(route, 2)": (lambda: partition(keep.long(), 2), 0),
    }
    for label, (fn, want) in ops.items():
        if sec.out_of_time():
            sec.skip(label)
            continue
        if not sec.dry:
            fn()  # warm-up: compiled

        current = {}

        def measure(fn=fn, label=label, want=want, current=current):
            box = {}

            def call():
                before = host_sync_count()
                fn()
                box["syncs"] = host_sync_count() - before

            torch_count, where = _torch_syncs(device, call)
            row = {
                "case": label,
                "host_syncs": box["syncs"],
                "expected": want,
                "torch_detected_syncs": torch_count,
                "torch_sync_sites": where,
            }
            rows.append(row)
            current.update(row)
            assert box["syncs"] == want, f"{box['syncs']} host syncs, expected {want}"
            return {"host_syncs": box["syncs"]}

        sec.check(f"{label}: {want} host sync(s)", measure)
        if device.type == "cuda":
            sec.check(f"torch sees no other synchronising call: {label}", lambda r=current: _assert_torch_syncs(r))
    sec.record["results"] = rows


def _assert_torch_syncs(row: dict):
    """Every synchronising call torch's sync debug mode saw is one the library counted (``to_host``)."""
    seen, counted = row.get("torch_detected_syncs"), row.get("host_syncs")
    assert seen is not None and counted is not None, "no measurement (the forward failed)"
    assert seen == counted, (
        f"torch saw {seen} synchronising calls for {counted} counted host syncs at {row.get('torch_sync_sites')}"
    )


# ====================================================================================================
# 3. Kernel timing: workloads and their bytes-moved models
#
# Each model restates the comment in the kernel's file: the bytes it reads from and writes to memory,
# counting data a program re-reads from L2 once. Small N fits in L2 (50 MB on an H100/H200), so GB/s there
# can exceed DRAM bandwidth - for the kernel and the copy alike, which is why the copy ratio is reported.

ROW = 1024  # fp16 features per row for the row-moving kernels: 2 KiB rows
TIMING_SIZES = {"gpu": (256, 4096, 65536), "dry": (16, 64)}
E2E_BATCHES = {"gpu": (1, 64, 256, 1024), "dry": (1, 8)}


def exit_gate_bytes(n: int, d: int, s: int, k: int, h_size: int, w_size: int, bias: bool) -> int:
    """exit_gate (kernels/ops/exit_gate.py): read ``h`` once (``N*D*S*h.element_size()``), the weight once
    (later programs hit L2) and the bias; write fp32 logits ``N*K*4``, the fp32 score ``N*4`` and the mask
    ``N``. The scratch path's pooled rows (``N*D*4``) stay in L2/L1 and are not counted."""
    return n * d * s * h_size + k * d * w_size + (k * 4 if bias else 0) + n * k * 4 + n * 4 + n


def partition_bytes(n: int, num_routes: int, route_size: int) -> int:
    """partition (kernels/ops/partition.py). One block: read the routes, write ``order`` (8 B a row) and
    ``counts``. Several blocks: histogram (read routes, write ``4*blocks*R``), scan (read ``4*blocks*R``,
    write ``8*blocks*R + 8*R``), scatter (read routes and ``8*blocks*R``, write ``order``)."""
    if n == 0:
        return 0
    r = num_routes
    if n <= partition_mod._SINGLE_BLOCK:
        return n * route_size + 8 * n + 8 * r
    nb = triton.cdiv(n, partition_mod._BLOCK)
    return (n * route_size + 4 * nb * r) + (4 * nb * r + 8 * nb * r + 8 * r) + (n * route_size + 8 * nb * r + 8 * n)


def rows_bytes(rows: int, row_elems: int, elem_size: int, index_size: int = 8) -> int:
    """gather_rows / scatter_rows (kernels/ops/gather_rows.py, scatter_rows.py): read and write ``rows`` rows
    once; the index is read once per column chunk of the program tile."""
    _, block_cols = _layout.tile_shape(row_elems, elem_size)
    chunks = triton.cdiv(row_elems, block_cols) if row_elems else 0
    return 2 * rows * row_elems * elem_size + rows * index_size * chunks


def compact_bytes(n: int, kept: int, row_elems: int, elem_size: int, capacity: int | None) -> int:
    """compact (kernels/ops/compact.py, no kernel of its own): ``~keep`` (read and write ``N`` bools),
    partition of that uint8 route into 2 routes, then a gather of the kept rows. ``capacity=None`` reads
    the kept count back (8 B); ``capacity=c`` instead builds ``kept_index`` on the device (a ``c``-slot
    fill and ~5 int64 passes over ``m = min(c, N)`` slots) and writes ``c`` rows, ``c - kept`` of them zeros."""
    moved = 2 * n + partition_bytes(n, 2, 1)
    if capacity is None:
        return moved + 8 + rows_bytes(kept, row_elems, elem_size)
    m = min(capacity, n)
    return (
        moved
        + 8 * capacity
        + 5 * 8 * m
        + rows_bytes(kept, row_elems, elem_size)
        + (capacity - kept) * row_elems * elem_size
    )


def _timing_workloads(n: int, device, dry: bool) -> dict:
    """name -> (kernel call, torch baseline call, bytes moved, description). Tensors made on the device."""
    row = 32 if dry else ROW
    d2, (c, hw), k4 = (24, (8, (2, 2)), 130) if dry else (768, (256, (7, 7)), 1000)
    gen = torch.Generator(device=device).manual_seed(n)

    def randn(*shape, dtype=torch.float16):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    out: dict = {}
    h2, w2, b2 = randn(n, d2), randn(10, d2) / math.sqrt(d2), randn(10, dtype=torch.float32)
    out["exit_gate 2-D"] = (
        lambda: exit_gate(h2, w2, b2, threshold=0.5),
        lambda: exit_gate_torch(h2, w2, b2, threshold=0.5),
        exit_gate_bytes(n, d2, 1, 10, 2, 2, True),
        f"fp16 h [N, {d2}], fp16 weight, K=10 (a BERT-sized CLS head)",
    )
    h4 = randn(n, c, *hw).to(memory_format=torch.channels_last)
    w4, b4 = randn(k4, c) / math.sqrt(c), randn(k4, dtype=torch.float32)
    out["exit_gate 4-D"] = (
        lambda: exit_gate(h4, w4, b4, threshold=0.5),
        lambda: exit_gate_torch(h4, w4, b4, threshold=0.5),
        exit_gate_bytes(n, c, math.prod(hw), k4, 2, 2, True),
        f"fp16 channels_last h [N, {c}, {hw[0]}, {hw[1]}], K={k4} (scratch path)",
    )
    route = torch.randint(0, 2, (n,), device=device, generator=gen)
    out["partition"] = (
        lambda: partition(route, 2),
        lambda: partition_torch(route, 2),
        partition_bytes(n, 2, 8),
        "int64 routes, R=2",
    )
    keep = torch.rand(n, device=device, generator=gen) < 0.5
    kept = int(keep.sum())
    index = torch.nonzero(keep).view(-1)  # sorted, like the survivors of a decision
    x = randn(n, row)
    out["gather_rows"] = (
        lambda: gather_rows(x, index),
        lambda: gather_rows_torch(x, index),
        rows_bytes(kept, row, 2),
        f"fp16 rows of {row}, about half the rows (sorted index)",
    )
    dst, src = randn(n, row), randn(kept, row)
    out["scatter_rows"] = (
        lambda: scatter_rows(dst, index, src),
        lambda: scatter_rows_torch(dst, index, src),
        rows_bytes(kept, row, 2),
        f"fp16 rows of {row} into [N, {row}], about half the rows",
    )
    out["compact"] = (
        lambda: compact(keep, x),
        lambda: compact_torch(keep, x),
        compact_bytes(n, kept, row, 2, None),
        f"fp16 rows of {row}, about half kept (one host sync)",
    )
    out["compact static"] = (
        lambda: compact(keep, x, capacity=kept),
        lambda: compact_torch(keep, x, capacity=kept),
        compact_bytes(n, kept, row, 2, kept),
        f"fp16 rows of {row}, capacity = kept rows (no host sync)",
    )
    return out


def _event_times(
    fns: dict, timer, device, cell_budget_s: float, min_repeats: int, max_repeats: int, warmup: int
) -> tuple:
    """Median ms of each of ``fns``, interleaved and rotated round by round, timed by ``timer`` (CUDA events
    on a GPU). One timed round sizes the repeats to the cell's budget. Returns ``(medians, repeats)``."""
    names = list(fns)
    for _ in range(warmup):  # Triton compiles on the first call
        for name in names:
            fns[name]()
    sync(device)
    start = time.perf_counter()
    for name in names:
        with timer.region(name):
            fns[name]()
    sync(device)
    round_s = time.perf_counter() - start
    first = timer.collect()
    repeats = int(max(min_repeats, min(max_repeats, cell_budget_s / max(round_s, 1e-6))))
    for r in range(repeats - 1):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            with timer.region(name):
                fns[name]()
    times = timer.collect()
    return {name: median(first.get(name, []) + times.get(name, [])) for name in names}, repeats


def kernel_timing(sec: Section) -> None:
    device, dry = sec.device, sec.dry
    sizes = TIMING_SIZES["dry" if dry else "gpu"]
    timer = make_timer(device)
    sec.record["timer"] = timer.kind
    sec.record["bytes_models"] = {
        name: " ".join(fn.__doc__.split())
        for name, fn in (
            ("exit_gate", exit_gate_bytes),
            ("partition", partition_bytes),
            ("gather_rows / scatter_rows", rows_bytes),
            ("compact", compact_bytes),
        )
    }
    rows = []
    sec.record["results"] = rows
    cells = len(sizes) * 7
    done = 0
    for n in sizes:
        try:
            workloads = _timing_workloads(n, device, dry)
        except Exception as err:  # e.g. out of memory: recorded, the other sizes still run
            sec.check(f"N={n}: workloads built", lambda e=err: _raise(e))
            continue
        for name, (kernel, baseline, moved, what) in workloads.items():
            if sec.out_of_time():
                sec.skip(f"{name} N={n}")
                continue
            cell_budget = max(0.05, sec.time_left() / max(1, cells - done))
            done += 1
            src = torch.empty(max(1, moved // 2), dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            fns = {"kernel": kernel, "torch": baseline, "copy": lambda d=dst, s=src: d.copy_(s)}

            def measure(fns=fns, name=name, n=n, moved=moved, what=what, budget=cell_budget):
                # dry run: no compilation to warm up, and its times mean nothing: as few calls as possible
                ms, repeats = _event_times(
                    fns, timer, device, budget, 1 if dry else 5, 2 if dry else 200, 0 if dry else 2
                )
                gbps = {k: moved / (v * 1e-3) / 1e9 if v > 0 else None for k, v in ms.items()}
                row = {
                    "kernel": name,
                    "N": n,
                    "workload": what,
                    "bytes_moved": moved,
                    "repeats": repeats,
                    "kernel_ms": ms["kernel"],
                    "kernel_GBps": gbps["kernel"],
                    "copy_ms": ms["copy"],
                    "copy_GBps": gbps["copy"],
                    "torch_ms": ms["torch"],
                    "fraction_of_copy_bw": ms["copy"] / ms["kernel"] if ms["kernel"] > 0 else None,
                    "speedup_vs_torch": ms["torch"] / ms["kernel"] if ms["kernel"] > 0 else None,
                }
                rows.append(row)
                return {"kernel_ms": row["kernel_ms"]}

            sec.check(f"{name} N={n}: runs and is timed", measure)
            del src, dst
        del workloads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # The BRIEF's GPU targets at the largest N, reported, never part of the exit status: compaction at >= 80%
    # of copy bandwidth, and the exit gate at >= 80% of its roofline - with K = 10 classes the 2-D gate is
    # memory-bound, so its roofline is the copy bandwidth too.
    if not dry:
        for row in rows:
            if row["N"] != max(sizes):
                continue
            if row["kernel"] in ("gather_rows", "scatter_rows", "compact", "compact static", "exit_gate 2-D"):
                frac = row["fraction_of_copy_bw"]
                sec.check(
                    f"target: {row['kernel']} at >= 80% of device-to-device copy bandwidth (N={row['N']})",
                    lambda f=frac: _assert_target(f, 0.8),
                    kind="target",
                    value=frac,
                )


def _raise(err):
    raise err


def _assert_target(value, target):
    assert value is not None and value >= target, f"{value if value is None else round(value, 3)} < {target}"


# ====================================================================================================
# 4. End to end


def _resnet(device, dry: bool):
    """ResNet-50 (random weights, 1000 classes) at 224x224, or for the dry run a tiny ResNet-like model
    (torchvision's ResNet class with one BasicBlock per stage, 10 classes) at 32x32."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    if dry:
        model, size, what = (
            ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10),
            32,
            "tiny ResNet (1 BasicBlock/stage, 10 classes), 32x32",
        )
    else:
        model, size, what = (
            torchvision.models.resnet50(weights=None, num_classes=1000),
            224,
            "torchvision ResNet-50, random weights, 1000 classes, 224x224",
        )
    return model.eval().to(device), size, what


STRATEGIES = {"plain": plain, "masked_dense": masked_dense, "adaexit": adaexit_strategy}


def _measure_model(
    sec: Section, label: str, model, x: torch.Tensor, batches, timer, later_cells: int, strategies=STRATEGIES
) -> list:
    """Per batch size: adaexit's exits and predictions against masked dense's, then plain / masked dense /
    adaexit timed interleaved (``interleaved_times``: rotating order, host ms) inside ``timer`` regions
    (CUDA events on a GPU). ``later_cells``: batch cells of later models, which share the section's time.
    ``strategies``: name -> factory(model) of a ``run(x, return_exit_index=False)`` (``bench.baselines``).

    A strategy that cannot be built or run on this model (the BERT part, while the Hugging Face wrap is
    young) is recorded in the rows as unavailable; the others are still measured."""
    device = x.device
    runs, unavailable = {}, {}
    for name, factory in strategies.items():
        try:
            runs[name] = factory(model)
        except Exception as err:
            unavailable[name] = f"{type(err).__name__}: {err}"
    rows = []
    for j, b in enumerate(batches):
        if sec.out_of_time():
            sec.skip(f"{label} batch {b}")
            continue
        cell_budget = max(0.1, sec.time_left() / (len(batches) - j + later_cells))
        xb = x[:b]
        row = {"model": label, "batch": b}
        if unavailable:
            row["unavailable"] = dict(unavailable)

        def agree(xb=xb, row=row):
            with torch.inference_mode():
                output, info = model(xb, return_info=True)
            logits = getattr(output, "logits", output)  # a wrapped Hugging Face model keeps its output type
            row.update(exit_counts=list(info.exit_counts), ideal_speedup=info.ideal_speedup)
            assert logits.shape[0] == b and int((info.exit_index >= 0).sum()) == b, "a row got no exit"
            assert sum(info.exit_counts) == b, f"exit counts {info.exit_counts} do not add up to {b}"
            assert "masked_dense" in runs, f"masked dense unavailable: {unavailable.get('masked_dense')}"
            md_logits, md_exit = runs["masked_dense"](xb, return_exit_index=True)
            # Both run the same policy; rows whose score sits within rounding of a threshold may differ (a
            # sub-batch can get another convolution algorithm), hence 99%, not 100%.
            exits_differ = int((info.exit_index != md_exit).sum())
            preds_differ = int((logits.argmax(1) != md_logits.argmax(1)).sum())
            row.update(exit_agreement=1 - exits_differ / b, prediction_agreement=1 - preds_differ / b)
            assert exits_differ <= 0.01 * b and preds_differ <= 0.01 * b, (
                f"adaexit vs masked dense: {exits_differ} of {b} rows exit elsewhere, {preds_differ} predict otherwise"
            )
            return {"rows_exiting_elsewhere": exits_differ, "rows_predicting_otherwise": preds_differ}

        sec.check(f"{label} batch {b}: adaexit's exits and predictions match masked dense", agree, kind="agreement")

        def timed(xb=xb, row=row, budget=cell_budget):
            assert runs, f"no strategy runs on this model: {unavailable}"
            calls = {}
            for name, run in runs.items():

                def call(name=name, run=run):
                    with timer.region(name):
                        run(xb)

                calls[name] = call
            if not sec.dry:  # a warm-up round (cuDNN and Triton pick or compile kernels per shape), not timed
                for call in calls.values():
                    call()
                sync(device)
                timer.collect()
            one = interleaved_times(calls, repeats=1, warmup=0, device=device)  # also sizes the repeats
            host = {k: list(v) for k, v in one.items()}
            if not sec.dry:  # the dry run's times mean nothing: one round
                round_s = sum(v for t in one.values() for v in t) / 1e3
                repeats = int(max(3, min(30, budget / max(round_s, 1e-6)))) - 1
                more = interleaved_times(calls, repeats=repeats, warmup=0, device=device, budget_s=budget, rotate=True)
                host = {k: host[k] + more[k] for k in calls}
            ms = {k: median(v) for k, v in timer.collect().items()}
            row.update({f"{k}_ms": v for k, v in ms.items()})
            row.update({f"{k}_host_ms": median(v) for k, v in host.items()})
            row["repeats"] = len(next(iter(host.values())))
            base = ms.get("plain")
            for k in ms:
                row[f"{k}_speedup"] = base / ms[k] if base and ms[k] > 0 else None
            ideal, speedup = row.get("ideal_speedup"), row.get("adaexit_speedup")
            row["adaexit_over_ideal"] = speedup / ideal if ideal and speedup else None
            return {"adaexit_speedup": speedup}

        sec.check(f"{label} batch {b}: timed", timed)
        rows.append(row)
    return rows


def end_to_end(sec: Section) -> None:
    device, dry = sec.device, sec.dry
    batches = E2E_BATCHES["dry" if dry else "gpu"]
    timer = make_timer(device)
    results: dict = {"timer": timer.kind, "batches": list(batches)}
    sec.record["results"] = results
    bert_cells = len(batches) if importlib.util.find_spec("transformers") is not None else 0
    results["resnet"] = _resnet_part(sec, device, dry, batches, timer, bert_cells)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the ResNet's activations went with its frame
    results["bert"] = _bert(sec, device, dry, batches, timer)


def _resnet_part(sec: Section, device, dry: bool, batches, timer, later_cells: int) -> dict:
    """ResNet-50 (dry run: tiny) with exits after layer1..3; about half of the rows still alive exit at
    each early exit (fractions 1/2, 1/4, 1/8 of the batch; the last exit takes the remaining 1/8)."""
    out: dict = {}
    exits = ["layer1", "layer2", "layer3"]
    try:
        model, size, what = _resnet(device, dry)
        ee = adaexit.wrap(model, exits=exits).eval()
        _seed("end_to_end resnet")
        x = torch.randn(max(batches), 3, size, size).to(device)
        fractions = (0.5, 0.25, 0.125)
        ee.set_policy(policy_for_fractions(ee, x, fractions))
        out.update(model=what, exits=exits, target_exit_fractions=list(fractions), policy=repr(ee.policy), status="ran")
        out["rows"] = _measure_model(sec, "resnet", ee, x, batches, timer, later_cells)
    except Exception as err:  # recorded; the BERT part still runs
        out.update(status=f"failed: {type(err).__name__}: {err}", traceback=traceback.format_exc(limit=10))
        sec.check("resnet: built, wrapped and measured", lambda e=err: _raise(e))
    return out


def _bert(sec: Section, device, dry: bool, batches, timer) -> dict:
    """A BERT-base-sized encoder (hidden 768, 12 layers, sequence length 128) with exits after layers 3 and
    7, when ``transformers`` is importable and ``adaexit.wrap`` accepts it; otherwise ``skipped: <error>``."""
    exits = ["bert.encoder.layer.3", "bert.encoder.layer.7"]
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except Exception as err:  # ImportError, or a broken install
        return {"status": f"skipped: transformers is not importable ({type(err).__name__}: {err})"}
    seq = 16 if dry else 128
    if dry:  # the same 12 layers (so the same exit names), tiny widths
        config = BertConfig(
            hidden_size=32,
            num_hidden_layers=12,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=1000,
            max_position_embeddings=64,
            num_labels=2,
        )
    else:
        config = BertConfig(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            num_labels=2,
        )
    out: dict = {
        "model": f"BertForSequenceClassification, random weights, hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, sequence length {seq}",
        "exits": exits,
    }
    try:
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).eval().to(device)
    except Exception as err:
        out["status"] = f"skipped: building the model failed ({type(err).__name__}: {err})"
        return out
    try:
        ee = adaexit.wrap(model, exits=exits)
    except Exception as err:
        out["status"] = f"skipped: {type(err).__name__}: {err}"
        return out
    try:
        _seed("end_to_end bert")
        ids = torch.randint(0, config.vocab_size, (max(batches), seq)).to(device)  # full length: no padding
        ee.eval()
        ee.set_policy(policy_for_fractions(ee, ids, (0.5, 0.25)))
        out.update(policy=repr(ee.policy), status="ran")
        # plain = the Hugging Face model itself; masked dense from every exit's logits (the graph's nodes
        # take the wrapper's token batches, not bare ids, so the graph-walking variant does not apply)
        strategies = {
            "plain": lambda _: _hf_plain(model),
            "masked_dense": lambda m: masked_dense(m, via="exit_logits"),
            "adaexit": adaexit_strategy,
        }
        out["rows"] = _measure_model(sec, "bert", ee, ids, batches, timer, 0, strategies)
    except Exception as err:  # wrap accepted the model but running it failed: recorded, never fatal
        out.update(status=f"failed: {type(err).__name__}: {err}", traceback=traceback.format_exc(limit=10))
    return out


def _hf_plain(model):
    """The plain forward of a Hugging Face classifier on ``input_ids``, as a ``bench.baselines`` strategy."""

    def run(x: torch.Tensor, return_exit_index: bool = False):
        with torch.inference_mode():
            logits = model(input_ids=x).logits
        if return_exit_index:
            raise ValueError("the plain model has no exits")
        return logits

    return run


# ====================================================================================================
# Markdown


def _fmt(value, spec=".3g"):
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _status_word(sec: dict) -> str:
    return sec.get("status", "pending").upper()


def format_markdown(report: dict) -> str:
    env = report.get("environment", {})
    verdict = report.get("sections", {}).get("correctness", {}).get("status", "pending").upper()
    lines = [
        f"# adaexit GPU check: {env.get('device_name', '?')}",
        "",
        f"- mode: {report.get('mode')}",
        f"- date: {report.get('date')}",
        f"- command: `{report.get('command')}`",
        f"- budget: {report.get('budget_s')} s, elapsed: {report.get('elapsed_s')} s"
        + (" (interrupted by the hard budget)" if report.get("interrupted") else ""),
        f"- correctness: {verdict} (exit status {report.get('exit_status')})",
        "",
        "| | |",
        "|---|---|",
    ]
    for key in (
        "device_name",
        "compute_capability",
        "gpu_memory_gib",
        "driver_version",
        "cuda_runtime",
        "cudnn",
        "torch",
        "triton",
        "adaexit",
        "torchvision",
        "transformers",
        "kernel_backend",
        "triton_interpreter",
    ):
        if key in env:
            lines.append(f"| {key} | {env[key]} |")
    for i, name in enumerate(SECTIONS, 1):
        sec = report.get("sections", {}).get(name, {})
        lines += ["", f"## {i}. {sec.get('title', name)}: {_status_word(sec)}"]
        for key in ("reason", "elapsed_s"):
            if sec.get(key) is not None:
                lines.append(f"- {key.replace('_', ' ')}: {sec[key]}")
        if sec.get("skipped_for_budget"):
            lines.append(f"- skipped for time: {sec['skipped_for_budget']['count']} item(s)")
        if sec.get("traceback"):
            lines += ["", "```", sec["traceback"].rstrip(), "```"]
        checks = sec.get("checks", [])
        if checks:
            passed = sum(1 for c in checks if c["passed"])
            lines.append(f"- checks: {passed} passed, {len(checks) - passed} not passed, of {len(checks)}")
        lines += _section_markdown(name, sec)
        bad = [c for c in checks if not c["passed"]]
        if bad:
            lines += ["", "Not passed:", ""]
            for c in bad[:40]:
                detail = str(c.get("detail", "")).replace("\n", " ")[:300]
                lines.append(f"- [{c.get('kind', 'check')}] {c['name']}: {detail}")
            if len(bad) > 40:
                lines.append(f"- ... and {len(bad) - 40} more (report.json)")
    return "\n".join(lines) + "\n"


def _table(rows, columns) -> list[str]:
    return ["", "```", format_table(rows, columns), "```"] if rows else []


def _section_markdown(name: str, sec: dict) -> list[str]:
    if name == "correctness":
        out = _table(
            sec.get("results", []),
            [
                ("kernel", "kernel", "s"),
                ("passed", "passed", "d"),
                ("failed", "failed", "d"),
                ("skipped", "skipped", "d"),
            ],
        )
        if sec.get("coverage"):
            out += [
                "",
                "Branches reached (passing cases): " + ", ".join(f"{k} ({v})" for k, v in sec["coverage"].items()),
            ]
        if sec.get("coverage_missing"):
            out += ["", f"Not reached (cases skipped for time): {sec['coverage_missing']}"]
        return out
    if name == "host_syncs":
        return _table(
            sec.get("results", []),
            [
                ("case", "case", "s"),
                ("host_syncs", "host syncs", "d"),
                ("decision_points", "decision points", "d"),
                ("torch_detected_syncs", "torch-detected", "d"),
            ],
        )
    if name == "kernel_timing":
        out = [f"- timer: {sec.get('timer', '-')}; ms = median; GB/s from the bytes-moved models below"]
        out += _table(
            sec.get("results", []),
            [
                ("kernel", "kernel", "s"),
                ("N", "N", "d"),
                ("bytes_moved", "bytes", "d"),
                ("kernel_ms", "ms", ".4f"),
                ("kernel_GBps", "GB/s", ".1f"),
                ("copy_ms", "copy ms", ".4f"),
                ("copy_GBps", "copy GB/s", ".1f"),
                ("fraction_of_copy_bw", "of copy", ".2f"),
                ("torch_ms", "torch ms", ".4f"),
                ("speedup_vs_torch", "vs torch x", ".2f"),
            ],
        )
        for model in sec.get("bytes_models", {}).values():
            out.append(f"- bytes moved by {model}")
        return out
    if name == "end_to_end":
        res = sec.get("results", {})
        out = [f"- timer: {res.get('timer', '-')}; speedups (x) over plain; ideal = FLOPs ratio (info.ideal_speedup)"]
        for part in ("resnet", "bert"):
            p = res.get(part)
            if not p:
                continue
            out += [
                "",
                f"**{part}**: " + "; ".join(x for x in (p.get("model"), f"status: {p.get('status', '-')}") if x),
            ]
            if p.get("policy"):
                out.append(f"policy: `{p['policy']}`")
            out += _table(
                p.get("rows", []),
                [
                    ("batch", "batch", "d"),
                    ("plain_ms", "plain ms", ".2f"),
                    ("masked_dense_ms", "masked ms", ".2f"),
                    ("adaexit_ms", "adaexit ms", ".2f"),
                    ("masked_dense_speedup", "masked x", ".2f"),
                    ("adaexit_speedup", "adaexit x", ".2f"),
                    ("ideal_speedup", "ideal x", ".2f"),
                    ("adaexit_over_ideal", "adaexit/ideal", ".2f"),
                    ("exit_agreement", "exits agree", ".3f"),
                ],
            )
            for row in p.get("rows", []):
                if row.get("exit_counts"):
                    out.append(f"- batch {row['batch']}: exits per exit {row['exit_counts']}")
        return out
    return []


# ====================================================================================================
# Main


RUNNERS = {
    "correctness": correctness,
    "host_syncs": host_syncs,
    "kernel_timing": kernel_timing,
    "end_to_end": end_to_end,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="where report.json and report.md are written")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"hard time budget for the whole command, from process start (default {DEFAULT_BUDGET_S:g})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code on the CPU through Triton's interpreter, tiny sizes (a rehearsal)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    if not __debug__:
        parser.error("run without python -O: the checks are assert statements")
    t0 = float(os.environ.get(_T0_ENV) or _PROCESS_START)
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {args.out}: {err}")
    cuda = torch.cuda.is_available()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not cuda:
        run = Run(args, t0, torch.device("cpu"))
        run.report["environment"] = environment(torch.device("cpu"))
        for sec in run.report["sections"].values():
            sec.update(status="skipped", reason="no CUDA device (torch.cuda.is_available() is False); use --dry-run")
        run.write(final=True)
        print(f"gpu_check: no CUDA device; rehearse with --dry-run. Report: {run.out}", file=sys.stderr)
        return 2
    _reexec_if_needed(args.dry_run, t0)

    run = Run(args, t0, device)
    with set_backend("triton"):
        run.report["environment"] = environment(device)
    run.arm_watchdog()
    saved_threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops on a shared CPU: one thread, as the test suite does
        # numpy under the interpreter warns on the NaN/Inf rows the non-finite cases feed in on purpose
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    try:
        with set_backend("triton"):  # the kernels, never the references, on every device
            for i, name in enumerate(SECTIONS):
                sec_record = run.report["sections"][name]
                left = run.now_left()
                if left <= 0:
                    sec_record.update(status="skipped", reason="time budget spent before the section started")
                    continue
                share = SHARES[name] / sum(SHARES[s] for s in SECTIONS[i:])
                sec = Section(run, name, time.time() + left * share)
                run.current = name
                started = time.time()
                print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
                try:
                    RUNNERS[name](sec)
                    _finish_status(sec)
                except Exception:
                    sec_record.update(status="error", traceback=traceback.format_exc())
                finally:
                    sec_record["elapsed_s"] = round(time.time() - started, 1)
                    run.current = None
                print(
                    f"gpu_check: {name}: {sec_record['status']} ({sec_record['elapsed_s']} s)",
                    file=sys.stderr,
                    flush=True,
                )
                run.write()
    finally:
        torch.set_num_threads(saved_threads)
        run.write(final=True)
    status = run.exit_status()
    print(f"gpu_check: report written to {run.out}/report.json and report.md; exit status {status}", file=sys.stderr)
    return status


_PROCESS_START = _process_start_time()

if __name__ == "__main__":
    sys.exit(main())
