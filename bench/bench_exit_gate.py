"""Microbenchmark: fused ``exit_gate`` vs an unfused torch exit head.

Run: ``pytest bench/bench_exit_gate.py --benchmark-only -q`` (add ``--benchmark-json=out.json`` to keep
the numbers; ``--benchmark-disable`` runs each once, as a smoke test). ``exit_gate`` dispatches as users
get it: the torch reference on CPU, the Triton kernel on CUDA. The baseline is the plain unfused head a
user would write (pool, ``F.linear``, ``softmax``, ``max``, compare), built on :func:`exit_gate_torch`'s
own pooling/linear semantics so it cannot drift.

Each result's ``extra_info`` carries the device name, the dtype, the bytes moved under the op's one model
(:func:`adaexit.kernels.ops.exit_gate.bytes_moved`: read h, weight, bias once; write fp32 logits, fp32 score
and the mask) and the GB/s that median time implies, plus (for ``exit_gate``) the speedup over the baseline measured
in the same run. GPU numbers exist only when this is run on a GPU.
"""


import pytest
import torch
import torch.nn.functional as F

from adaexit.cost import device_name, sync
from adaexit.kernels import exit_gate
from adaexit.kernels.ops.exit_gate import bytes_moved

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
DEVICE_NAME = device_name(DEVICE)

CASES = {
    "N256_D512_K10": ((256, 512), 10),
    "N256_D512_K1000": ((256, 512), 1000),
    "N256_C64_8x8_K10": ((256, 64, 8, 8), 10),
}
THRESHOLD = 0.5
_BASELINE_MEDIAN_S: dict = {}


def unfused_exit_head(h, weight, bias, threshold):
    """What a user writes without adaexit: pool -> linear -> softmax -> max -> compare."""
    x = h.float()
    if x.dim() > 2:
        x = x.flatten(2).mean(dim=2)
    logits = F.linear(x, weight.float(), bias.float())
    score = torch.softmax(logits, dim=1).max(dim=1).values
    return logits, score, score >= threshold


@pytest.mark.parametrize("impl", ["torch_unfused", "exit_gate"])  # baseline first: speedup needs it
@pytest.mark.parametrize("case", list(CASES))
def test_bench_exit_gate(benchmark, case, impl):
    shape, K = CASES[case]
    torch.manual_seed(0)
    h = torch.randn(shape, device=DEVICE).to(DTYPE)
    weight = (torch.randn(K, shape[1], device=DEVICE) / shape[1] ** 0.5).to(DTYPE)
    bias = torch.randn(K, device=DEVICE)

    if impl == "exit_gate":

        def fn():
            out = exit_gate(h, weight, bias, criterion="maxprob", threshold=THRESHOLD)
            sync(DEVICE)
            return out

    else:

        def fn():
            out = unfused_exit_head(h, weight, bias, THRESHOLD)
            sync(DEVICE)
            return out

    benchmark.group = f"exit_gate {case}"
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=3)
    if benchmark.disabled:  # --benchmark-disable: one call as a smoke test, nothing timed
        return
    median = benchmark.stats.stats.median
    nbytes = bytes_moved(h, weight, bias)
    benchmark.extra_info.update(
        device=DEVICE_NAME,
        backend="triton" if DEVICE == "cuda" else "torch reference",
        dtype=str(DTYPE),
        shape=list(shape),
        classes=K,
        bytes_moved=nbytes,
        bytes_model=" ".join(bytes_moved.__doc__.split()),
        median_ms=median * 1e3,
        gbps=nbytes / median / 1e9,
    )
    if impl == "torch_unfused":
        _BASELINE_MEDIAN_S[case] = median
    elif case in _BASELINE_MEDIAN_S:
        benchmark.extra_info["speedup_vs_torch_unfused"] = _BASELINE_MEDIAN_S[case] / median
