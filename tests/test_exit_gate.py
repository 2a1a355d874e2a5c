"""exit_gate: the Triton kernel (through the interpreter) against the torch reference, and the
reference against hand-computed values.

Triton-vs-reference tests carry the ``interpreter`` marker and the ``triton_backend`` fixture. Both
implementations compute in fp32 from exactly converted inputs, so scores/logits are compared with the
fp32 row of the tolerance table (atol scaled with the reduction length D*S), widened only where the summed
terms are large (see ``_check``); the exit mask must match exactly on every row whose score is not within
that tolerance of the threshold.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from adaexit.kernels import CRITERIA, exit_gate, exit_gate_torch
from adaexit.kernels.ops import exit_gate as exit_gate_module
from adaexit.kernels.ops.exit_gate import COMPILE_SPECS, _collapse_spatial
from bench.kernel_cases import (
    EXIT_GATE_NONFINITE,
    EXIT_GATE_SHAPES_2D,
    EXIT_GATE_SPATIAL,
    EXIT_GATE_STRIDED,
    EXIT_GATE_WEIGHT_NONE,
    EXIT_GATE_WEIGHT_NONE_IDS,
    NONFINITE_ROWS,
    check_exit_gate,
    nonfinite_h,
)
from bench.kernel_cases import gate_for as _gate_for
from conftest import tolerance


def _check(*args, **kwargs):
    """Kernel vs reference on the same tensors (the rule is :func:`bench.kernel_cases.check_exit_gate`, shared
    with the GPU kit), with the tolerance table of conftest."""
    return check_exit_gate(*args, tolerance=tolerance, **kwargs)


# ---------------------------------------------------------------------------------------------
# the reference itself, on hand-checkable examples
# ---------------------------------------------------------------------------------------------
def test_reference_hand_checked():
    K = 5
    uniform = torch.zeros(3, K)  # weight=None: h holds the logits
    for crit, want in (("maxprob", 1 / K), ("margin", 0.0), ("entropy", 0.0)):
        logits, score, mask = exit_gate_torch(uniform, None, criterion=crit, threshold=0.5)
        torch.testing.assert_close(score, torch.full((3,), want))
        assert not mask.any()
    # two classes with p = (0.75, 0.25)
    two = torch.tensor([[math.log(3.0), 0.0]])
    H = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert exit_gate_torch(two, None, criterion="maxprob")[1].item() == pytest.approx(0.75)
    assert exit_gate_torch(two, None, criterion="margin")[1].item() == pytest.approx(0.5)
    assert exit_gate_torch(two, None, criterion="entropy")[1].item() == pytest.approx(1 - H / math.log(2))
    gate = torch.tensor([1.0, 2.0, 3.0, -1.0])
    want = 1 / (1 + math.exp(-(0.75 + 2 * 0.5 + 3 * (1 - H / math.log(2)) - 1)))
    assert exit_gate_torch(two, None, criterion="learned", gate=gate)[1].item() == pytest.approx(want)
    # a tied maximum: margin 0; a dominant class: maxprob 1, entropy score 1, exits at threshold 1
    assert exit_gate_torch(torch.tensor([[1.0, 1.0, 0.0]]), None, criterion="margin")[1].item() == 0.0
    for crit in ("maxprob", "entropy"):
        _, s, m = exit_gate_torch(torch.tensor([[200.0, 0.0, 0.0]]), None, criterion=crit, threshold=1.0)
        assert s.item() == pytest.approx(1.0) and m.item()
    # pooling and the linear layer: mean over H, W then x @ W^T + b
    h = torch.arange(24.0).reshape(1, 2, 3, 4)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    logits = exit_gate_torch(h, w, torch.tensor([0.0, 1.0, 2.0]))[0]
    torch.testing.assert_close(logits, torch.tensor([[5.5, 18.5, -10.0]]))


def test_reference_nan_inf_never_exit():
    h = torch.randn(4, 6)
    h[1, 2] = float("nan")
    h[2, 0] = float("inf")
    h[3, 5] = float("-inf")
    for crit in CRITERIA:
        _, score, mask = exit_gate_torch(h, None, criterion=crit, threshold=0.0, gate=_gate_for(crit))
        assert mask.tolist() == [True, False, False, False]
        assert score[1:].isnan().all()


@pytest.mark.cpu_only(reason="CPU tensors dispatch to the reference")
def test_cpu_dispatches_to_reference(monkeypatch, use_backend):
    use_backend("auto")

    def boom(*a, **k):
        raise AssertionError("the Triton kernel was launched for a CPU tensor")

    monkeypatch.setattr(exit_gate_module, "_launch", boom)
    h, w = torch.randn(5, 8), torch.randn(3, 8)
    for a, b in zip(exit_gate(h, w, threshold=0.5), exit_gate_torch(h, w, threshold=0.5)):
        assert torch.equal(a, b)


def test_package_does_not_shadow_op_modules():
    """``adaexit.kernels.<op>`` is the public function, ``adaexit.kernels.ops.<op>`` its module."""
    import adaexit.kernels as K

    for name in ("exit_gate", "partition", "gather_rows", "scatter_rows", "compact"):
        module = getattr(K.ops, name)
        assert module is sys.modules[f"adaexit.kernels.ops.{name}"]
        assert getattr(K, name) is getattr(module, name) and callable(getattr(K, name))
        assert getattr(K, f"{name}_torch") is getattr(module, f"{name}_torch")


_NO_TRITON_SCRIPT = """
import os, sys
sys.modules["triton"] = None  # "import triton" raises ImportError, as on a machine without triton
import torch
import adaexit.kernels as K
from adaexit.kernels import _dispatch, _triton
from adaexit.kernels import all_specs
from adaexit.kernels.ops import exit_gate as exit_gate_module, gather_rows as gather_rows_module

assert not _triton.HAS_TRITON and not _dispatch.HAS_TRITON
assert K.backend_for("cpu") == "torch"
# the kernels are defined anyway, as plain functions (triton.jit is the identity), and listed for the report
assert callable(exit_gate_module._exit_gate_kernel) and callable(gather_rows_module._gather_rows_kernel)
assert len(all_specs()) > 0

h, w = torch.randn(6, 8), torch.randn(3, 8)
for a, b in zip(K.exit_gate(h, w, threshold=0.5), K.exit_gate_torch(h, w, threshold=0.5)):
    assert torch.equal(a, b)
route = torch.tensor([1, 0, 1, 0, 0, 1])
order, counts = K.partition(route, 2)
assert order.tolist() == [1, 3, 4, 0, 2, 5] and counts.tolist() == [3, 3]
x, index = torch.randn(6, 4), torch.tensor([5, 0])
assert torch.equal(K.gather_rows(x, index), x[index])
out = torch.zeros(6, 4)
K.scatter_rows(out, index, x[:2])
assert torch.equal(out[index], x[:2])
kept, x_kept = K.compact(route == 0, x)
assert kept.tolist() == [1, 3, 4] and torch.equal(x_kept, x[[1, 3, 4]])

try:  # asking for the kernels without triton: a clear error
    with K.set_backend("triton"):
        K.exit_gate(h, w)
except RuntimeError as e:
    assert "install triton" in str(e), e
else:
    raise AssertionError("backend triton ran without triton")
print("ok")
"""


@pytest.mark.cpu_only(reason="without triton only the CPU references run")
def test_imports_and_references_work_without_triton():
    """Without triton the package imports (kernels defined through the stand-ins of ``kernels/_triton.py``)
    and every op runs its torch reference. In a subprocess: this process has imported triton already."""
    env = {k: v for k, v in os.environ.items() if k != "ADAEXIT_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok"


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(h=torch.randn(4), weight=torch.randn(3, 4)), "h must be"),
        (dict(h=torch.randn(2, 4), weight=torch.randn(3, 5)), "weight must be"),
        (dict(h=torch.randn(2, 4), weight=torch.randn(3, 4), bias=torch.randn(4)), "bias must be"),
        (dict(h=torch.randn(2, 4), weight=None, bias=torch.randn(4)), "bias given with weight=None"),
        (dict(h=torch.randn(2, 4), weight=torch.randn(1, 4)), "K >= 2"),
        (dict(h=torch.randn(2, 1), weight=None), "K >= 2"),
        (dict(h=torch.randn(2, 4), weight=torch.randn(3, 4), criterion="top5"), "unknown criterion"),
        (dict(h=torch.randn(2, 4), weight=torch.randn(3, 4), criterion="learned"), "needs gate"),
        (dict(h=torch.randn(2, 4), weight=None, criterion="learned", gate=torch.ones(3)), "gate must be"),
        (dict(h=torch.randn(2, 4), weight=None, criterion="learned", gate=torch.ones(2, 2)), "gate must be"),
        (dict(h=torch.randn(2, 4), weight=None, gate=torch.ones(4)), "gate is only used"),
        (dict(h=torch.randn(2, 4).long(), weight=None), "h must be float"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_errors(kwargs, match, backend, use_backend):
    use_backend(backend)
    kwargs = dict(kwargs)  # the parametrize dict is shared between the two backends
    h = kwargs.pop("h")
    weight = kwargs.pop("weight")
    for fn in (exit_gate, exit_gate_torch):
        with pytest.raises(ValueError, match=match):
            fn(h, weight, **kwargs)


# ---------------------------------------------------------------------------------------------
# kernel vs reference (interpreter)
# ---------------------------------------------------------------------------------------------
SHAPES_2D = EXIT_GATE_SHAPES_2D  # (N, D, K), shared with the GPU kit


@pytest.mark.interpreter
@pytest.mark.parametrize("N, D, K", SHAPES_2D)
@pytest.mark.parametrize("has_bias", [True, False])
def test_2d_sweep(triton_backend, N, D, K, has_bias):
    crit = CRITERIA[(N + D + K) % 4]  # every criterion appears across the sweep
    h = torch.randn(N, D)
    w = torch.randn(K, D) / math.sqrt(D) * 3
    b = torch.randn(K) if has_bias else None
    _check(h, w, b, criterion=crit)


@pytest.mark.interpreter
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("K", [10, 200])
def test_criteria(triton_backend, criterion, K):
    h = torch.randn(40, 24) * 2
    w = torch.randn(K, 24) / 3
    _check(h, w, torch.randn(K), criterion=criterion)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape, K", EXIT_GATE_SPATIAL)
def test_spatial(triton_backend, shape, K):
    h = torch.randn(shape)
    w = torch.randn(K, shape[1])
    _check(h, w, torch.randn(K), criterion=CRITERIA[K % 4])


@pytest.mark.interpreter
@pytest.mark.parametrize("K", [10, 100])
def test_channels_last(triton_backend, K):
    h = torch.randn(9, 20, 4, 3).to(memory_format=torch.channels_last)
    collapsed, S, stride_s = _collapse_spatial(h)
    assert collapsed.data_ptr() == h.data_ptr() and S == 12 and stride_s == 20  # no copy
    _check(h, torch.randn(K, 20), torch.randn(K), criterion="entropy")


@pytest.mark.interpreter
def test_non_collapsible_spatial_falls_back(triton_backend):
    h = torch.randn(5, 6, 4, 7)[..., 1:4]  # W sliced: H and W no longer form one strided run
    collapsed, S, _ = _collapse_spatial(h)
    assert S == 12 and collapsed.is_contiguous() and collapsed.data_ptr() != h.data_ptr()
    _check(h, torch.randn(10, 6), None, criterion="margin")


@pytest.mark.interpreter
@pytest.mark.parametrize("make", list(EXIT_GATE_STRIDED.values()), ids=list(EXIT_GATE_STRIDED))
def test_strided_h(triton_backend, make):
    h = make()
    w = torch.randn(70, 40) / 4
    _check(h, w, torch.randn(70))


@pytest.mark.interpreter
def test_strided_weight(triton_backend):
    h = torch.randn(13, 24)
    w = torch.randn(24, 20).t()  # [K, D] view with stride_wd != 1
    _check(h, w, torch.randn(20), criterion="margin")


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "h_dtype, w_dtype", [(torch.float16, torch.float16), (torch.float16, torch.float32), (torch.float32, torch.float16)]
)
@pytest.mark.parametrize("spatial", [False, True])
def test_fp16_inputs(triton_backend, h_dtype, w_dtype, spatial):
    # fp16 h with fp16 weight on 2D input takes the fp16 tensor-core dot path (exact products).
    h = torch.randn((21, 40, 3, 3) if spatial else (21, 40)).to(h_dtype)
    w = (torch.randn(70, 40) / 4).to(w_dtype)
    _check(h, w, torch.randn(70).to(w_dtype), criterion="entropy")


@pytest.mark.interpreter
@pytest.mark.parametrize("spatial", [False, True])
def test_bf16_inputs_loaded_and_converted(triton_backend, spatial):
    # The kernel converts bf16 to fp32 right after each load and never does bf16 arithmetic, so the
    # interpreter's bf16 arithmetic bug cannot reach it: this checks the load + conversion path.
    h = torch.randn((9, 24, 2, 3) if spatial else (9, 24)).to(torch.bfloat16)
    w = torch.randn(10, 24).to(torch.bfloat16)
    _check(h, w, torch.randn(10).to(torch.bfloat16))
    # weight=None: bf16 logits copied to fp32 exactly
    logits = exit_gate(h, None)[0]
    assert torch.equal(logits, exit_gate_torch(h, None)[0])


@pytest.mark.interpreter
def test_bf16_compute_needs_gpu(triton_backend):
    if not torch.cuda.is_available():
        pytest.skip(
            "bf16 *compute* comparisons are GPU-only: the Triton interpreter computes bf16 arithmetic "
            "wrongly (silently); the bf16 load/convert path is covered by test_bf16_inputs_loaded_and_converted"
        )
    h = torch.randn(70, 256, device="cuda").to(torch.bfloat16)
    w = torch.randn(1000, 256, device="cuda").to(torch.bfloat16) / 16
    _check(h, w, torch.randn(1000, device="cuda"), criterion="entropy")


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", EXIT_GATE_WEIGHT_NONE, ids=EXIT_GATE_WEIGHT_NONE_IDS)
def test_weight_none(triton_backend, shape):
    h = torch.randn(shape) * 3
    out, _ = _check(h, None, criterion="entropy")
    assert out[0].shape == (shape[0], shape[1])


@pytest.mark.interpreter
@pytest.mark.parametrize("spatial", [False, True])
def test_empty_batch(triton_backend, spatial):
    h = torch.randn((0, 6, 2, 2) if spatial else (0, 6))
    for fn in (exit_gate, exit_gate_torch):
        logits, score, mask = fn(h, torch.randn(5, 6), torch.randn(5), criterion="margin", threshold=0.3)
        assert logits.shape == (0, 5) and logits.dtype == torch.float32
        assert score.shape == (0,) and score.dtype == torch.float32
        assert mask.shape == (0,) and mask.dtype == torch.bool


@pytest.mark.interpreter
@pytest.mark.parametrize("criterion", CRITERIA)
def test_all_exit_and_none_exit(triton_backend, criterion):
    h = torch.randn(20, 16)
    w = torch.randn(10, 16)
    gate = _gate_for(criterion)
    assert exit_gate(h, w, criterion=criterion, threshold=0.0, gate=gate)[2].all()
    assert not exit_gate(h, w, criterion=criterion, threshold=1.5, gate=gate)[2].any()
    assert not exit_gate(h, w, criterion=criterion, threshold=float("nan"), gate=gate)[2].any()


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN rows
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("shape, K", EXIT_GATE_NONFINITE)
def test_nan_inf_rows_never_exit(triton_backend, criterion, shape, K):
    h = nonfinite_h(shape)  # NaN / +Inf / -Inf in rows NONFINITE_ROWS = (1, 4, 6)
    w = None if K is None else torch.randn(K, shape[1])
    out, _ = _check(h, w, criterion=criterion, threshold=0.0, nonfinite_rows=NONFINITE_ROWS)
    finite_rows = [r for r in range(shape[0]) if r not in NONFINITE_ROWS]
    assert out[2][finite_rows].all()


@pytest.mark.interpreter
def test_large_logits_stable(triton_backend):
    h = torch.randn(20, 32) * 1000  # logits ~1e4: a naive exp overflows
    out, _ = _check(h, torch.randn(150, 32), criterion="entropy")
    assert torch.isfinite(out[1]).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("second", [1, 20, 150])  # same tile, next tile, a later tile
def test_tied_maximum_margin_zero(triton_backend, second):
    logits = torch.randn(3, 200)
    logits[:, 5] = 10.0
    logits[:, second] = 10.0
    out, _ = _check(logits, None, criterion="margin", threshold=0.5)
    assert torch.equal(out[1], torch.zeros(3))
    # top-2 in a different tile from top-1
    logits = torch.randn(3, 200)
    logits[:, 190] = 9.0
    logits[:, second] = 8.0
    _check(logits, None, criterion="margin")


@pytest.mark.interpreter
def test_large_batch_many_classes(triton_backend):
    # one targeted larger case: several row blocks x 16 class tiles
    h = torch.randn(70, 300)
    w = torch.randn(1000, 300) / 10
    _check(h, w, torch.randn(1000), criterion="maxprob")


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_80 / sm_90
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = """
import json
from adaexit.kernels._compile import compile_spec
from adaexit.kernels.ops.exit_gate import COMPILE_SPECS
rows = []
for spec in COMPILE_SPECS:
    for arch in (80, 90):
        r = compile_spec(spec, arch)
        rows.append(dict(label=spec.label, arch=arch, registers=r.registers, spills=r.spills, shared=r.shared))
print(json.dumps(rows))
"""


@pytest.mark.compile
def test_exit_gate_compile_sm80_sm90():
    pytest.importorskip("triton", reason="ahead-of-time compilation needs triton (and its ptxas)")
    # This session runs with TRITON_INTERPRET=1, where @triton.jit yields interpreter functions that
    # cannot be compiled: compile in a fresh interpreter-free process.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * len(COMPILE_SPECS) > 0, "exit_gate lists no representative launches"
    for row in rows:
        assert row["spills"] == 0, f"{row['label']} spills on sm_{row['arch']}: {row}"
        assert 0 < row["registers"] <= 255
