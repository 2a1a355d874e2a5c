"""The kernels as torch ops (``torch.ops.adaexit.*``): ``opcheck`` on the torch path and on the Triton path
(through the interpreter), ``torch.compile(fullgraph=True)`` of every public function capturing the op itself,
autograd, the backend switch and the launch counter."""

import pytest
import torch

import adaexit.kernels as K
from adaexit.kernels import (
    compact,
    exit_gate,
    exit_gate_torch,
    gather_rows,
    launch_count,
    partition,
    scatter_rows,
    set_backend,
)
from adaexit.kernels._dispatch import requested_backend

OPS = ("exit_gate", "partition", "gather_rows", "scatter_rows", "compact")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def _cases():
    """(op name, args) of the op overloads themselves (positional, as the public functions call them)."""
    torch.manual_seed(0)
    h2, h4 = torch.randn(9, 12), torch.randn(5, 6, 3, 2)
    w, b = torch.randn(7, 12), torch.randn(7)
    x = torch.randn(10, 3, 4)
    cl = torch.randn(10, 3, 2, 2).to(memory_format=torch.channels_last)
    keep = torch.tensor([True, False, True, True, False, False, True, False, True, True])
    return [
        ("exit_gate", (h2, w, b, "maxprob", 0.3, None)),
        ("exit_gate", (h4, torch.randn(4, 6), None, "learned", 0.5, torch.tensor([1.0, 2.0, 3.0, -1.0]))),
        ("exit_gate", (h2, None, None, "entropy", 0.2, None)),
        ("partition", (torch.randint(0, 3, (20,)), 3, None)),
        ("partition", (torch.randint(0, 3, (20,)), 3, 5)),
        ("gather_rows", (x, torch.tensor([3, 0, 9, 3]), False)),
        ("gather_rows", (cl, torch.tensor([1, -1, 4]), True)),
        ("scatter_rows", (x.clone(), torch.tensor([4, 1, 7]), torch.randn(3, 3, 4), False)),
        ("scatter_rows", (x.clone(), torch.tensor([4, -1, 7]), torch.randn(3, 3, 4), True)),
        ("compact", (keep, [x, cl, torch.arange(10)], None)),
        ("compact", (keep, [x, torch.arange(10)], 4)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_cases())))
def test_opcheck(backend, case, use_backend):
    """Schema, fake (meta) implementation against the real outputs, autograd registration, AOT dispatch."""
    use_backend(backend)
    name, args = _cases()[case]
    torch.library.opcheck(getattr(torch.ops.adaexit, name).default, args)


def test_ops_are_registered():
    for name in OPS:
        assert hasattr(torch.ops.adaexit, name), f"torch.ops.adaexit.{name} is not registered"


def _calls():
    """(op name, public function call) for the fullgraph test: each call returns a tuple of tensors."""
    torch.manual_seed(1)
    h, w = torch.randn(8, 6), torch.randn(4, 6)
    x, index = torch.randn(8, 3), torch.tensor([5, 0, 2])
    route, keep = torch.tensor([1, 0, 2, 1, 0, 0, 2, 1]), torch.rand(8) < 0.5

    def scatter(out, index, src):
        return (scatter_rows(out, index, src) * 1,)

    return {
        "exit_gate": ("exit_gate", lambda: exit_gate(h, w, criterion="margin", threshold=0.1)),
        "partition": ("partition", lambda: partition(route, 3)),
        "partition_capacity": ("partition", lambda: partition(route, 3, capacity=4)),
        "gather_rows": ("gather_rows", lambda: (gather_rows(x, index),)),
        "scatter_rows": ("scatter_rows", lambda: scatter(torch.zeros(8, 3), index, x[:3])),
        "scatter_rows_padded": ("scatter_rows", lambda: (scatter_rows(torch.zeros(8, 3), index - 1, x[:3], padded=True),)),
        "compact": ("compact", lambda: compact(keep, x)),
        "compact_capacity": ("compact", lambda: compact(keep, x, capacity=6)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", list(_calls()))
def test_fullgraph_captures_the_op(backend, call, use_backend):
    """``torch.compile(fullgraph=True)`` keeps ``torch.ops.adaexit.<op>`` in the graph (no decomposed reference,
    no graph break on data-dependent checks or sizes) and equals eager."""
    use_backend(backend)
    op_name, fn = _calls()[call]
    graphs = []

    def backend_fn(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend_fn)
    got, want = compiled(), fn()
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert f"adaexit.{op_name}.default" in targets, targets
    assert not any(t.startswith("aten.") and ("sort" in t or "index_select" in t) for t in targets), targets
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_fullgraph_under_inductor():
    """The default compiler (Inductor) runs the ops too: the data-dependent kept count of ``compact`` is an
    unbacked size in the graph."""
    torch._dynamo.reset()
    keep = torch.tensor([True, False, True, False, True])
    x = torch.randn(5, 3)

    def fn(keep, x):
        kept, rows = compact(keep, x)
        return gather_rows(rows * 2, torch.zeros(1, dtype=torch.int64)), kept

    got, want = torch.compile(fn, fullgraph=True)(keep, x), fn(keep, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_gate_autograd(backend, use_backend):
    """Gradients of logits and score w.r.t. h, weight, bias and the learned gate equal the reference's."""
    use_backend(backend)
    torch.manual_seed(2)
    h = torch.randn(6, 5, 2)
    w, b = torch.randn(4, 5), torch.randn(4)
    gate = torch.tensor([1.0, -1.0, 0.5, 0.2])
    grads = []
    for fn in (exit_gate, exit_gate_torch):
        leaves = [t.clone().requires_grad_() for t in (h, w, b, gate)]
        logits, score, _ = fn(*leaves[:3], criterion="learned", threshold=0.5, gate=leaves[3])
        (logits.square().sum() + score.sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_ops_autograd(backend, use_backend):
    use_backend(backend)
    x = torch.randn(6, 3, requires_grad=True)
    index = torch.tensor([4, 4, 1, -1])
    gather_rows(x, index, padded=True).sum().backward()
    assert x.grad[:, 0].tolist() == [0, 1, 0, 0, 2, 0]
    x.grad = None
    keep = torch.tensor([False, True, False, True, True, False])
    _, rows = compact(keep, x, capacity=4)
    (rows * torch.arange(4.0)[:, None]).sum().backward()
    assert x.grad[:, 0].tolist() == [0, 0, 0, 1, 2, 0]
    # scatter_rows mutates: a differentiable call runs the reference, gradients flow to src
    src = torch.randn(2, 3, requires_grad=True)
    out = scatter_rows(torch.zeros(6, 3), torch.tensor([5, 0]), src)
    out.sum().backward()
    assert src.grad.tolist() == [[1.0] * 3] * 2


# ---------------------------------------------------------------------------------------------
# backend switching and the launch counter
# ---------------------------------------------------------------------------------------------
def test_set_backend_plain_call_and_context():
    start = requested_backend()
    with set_backend("torch"):
        assert requested_backend() == "torch" and K.backend_for("cpu") == "torch"
        with set_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "torch"
    assert requested_backend() == start
    switch = set_backend("torch")  # a plain call lasts until changed
    try:
        assert requested_backend() == "torch"
    finally:
        set_backend(switch.previous)
    assert requested_backend() == start


def test_no_environment_read_per_call(monkeypatch, use_backend):
    """Changing ADAEXIT_BACKEND after import changes nothing: the backend is read once."""
    use_backend("auto")
    monkeypatch.setenv("ADAEXIT_BACKEND", "triton")
    assert K.backend_for("cpu") == "torch"


@pytest.mark.interpreter
def test_launch_count(use_backend):
    """Each Triton launch is counted under the op whose kernel it is; the torch path launches nothing."""
    use_backend("triton")
    x, route = torch.randn(20, 4), torch.randint(0, 2, (20,))
    before = {op: launch_count(op) for op in OPS}
    total = launch_count()
    exit_gate(x, torch.randn(3, 4))
    order, _ = partition(route, 2)
    rows = gather_rows(x, order)
    scatter_rows(torch.empty_like(x), order, rows)
    compact(route == 0, x, x)  # partition's kernel once, gather_rows' kernel per tensor
    delta = {op: launch_count(op) - before[op] for op in OPS}
    assert delta == {"exit_gate": 1, "partition": 2, "gather_rows": 3, "scatter_rows": 1, "compact": 0}
    assert launch_count() - total == 7
    use_backend("torch")
    total = launch_count()
    exit_gate(x, torch.randn(3, 4))
    compact(route == 0, x)
    assert launch_count() == total


def test_profiler_sees_the_ops():
    """Under the profiler the public functions call the ops, so a trace names ``adaexit::<op>``."""
    x, route = torch.randn(12, 4), torch.randint(0, 2, (12,))
    with torch.profiler.profile() as prof:
        exit_gate(x, torch.randn(3, 4))
        order, _ = partition(route, 2)
        scatter_rows(torch.empty_like(x), order, gather_rows(x, order))
        compact(route == 0, x)
    names = {event.key for event in prof.key_averages()}
    assert {f"adaexit::{op}" for op in OPS} <= names, sorted(names)


def test_one_bytes_model_per_op():
    """``adaexit.kernels.ops.<op>.bytes_moved``: the one model every benchmark and the GPU kit use."""
    from adaexit.kernels.ops import compact as compact_op
    from adaexit.kernels.ops import exit_gate as exit_gate_op
    from adaexit.kernels.ops import gather_rows as gather_op
    from adaexit.kernels.ops import partition as partition_op
    from adaexit.kernels.ops import scatter_rows as scatter_op

    # one block: routes read, order and counts written
    assert partition_op.bytes_moved(torch.zeros(256, dtype=torch.int64), 2) == 256 * 8 + 256 * 8 + 2 * 8
    # several blocks: histogram + scan + scatter, each stated in kernels/ops/partition.py
    n, nb = 65536, 65536 // partition_op._BLOCK
    hist, scan, scatter = n * 8 + 4 * nb * 2, 4 * nb * 2 + 8 * nb * 2 + 16, n * 8 + 8 * nb * 2 + 8 * n
    assert partition_op.bytes_moved(torch.zeros(n, dtype=torch.int64), 2) == hist + scan + scatter
    # 1024 fp16 per row fits one column chunk: rows read and written, the index once
    x, index = torch.zeros(300, 1024, dtype=torch.float16), torch.zeros(100, dtype=torch.int64)
    assert gather_op.bytes_moved(x, index) == scatter_op.bytes_moved(x[:100], index) == 2 * 100 * 2048 + 100 * 8
    h, w = torch.zeros(4, 8, 3, dtype=torch.float16), torch.zeros(10, 8)
    assert exit_gate_op.bytes_moved(h, w, torch.zeros(10)) == 4 * 8 * 3 * 2 + 10 * 8 * 4 + 40 + 4 * 10 * 4 + 16 + 4
    keep, rows = torch.zeros(10, dtype=torch.bool), torch.zeros(10, 8)
    assert compact_op.bytes_moved(keep, rows, kept=4) < compact_op.bytes_moved(keep, rows, kept=4, capacity=10)
