"""The cost of a decision (issue 19): ops per node run beyond the node's own, counted by the torch profiler,
for early exit, cascade, stream and Server; host syncs per forward in the syncing and zero-sync modes; the
zero-sync forward compiles with ``torch.compile(fullgraph=True)`` and equals eager and the syncing mode."""

import pytest
import torch

from adaexit import ConfidencePolicy, PatiencePolicy
from adaexit.kernels import host_sync_count
from bench.bench_overhead import TARGET_OPS, held_out_chain, launches_per_node_run, overhead, two_network_cascade
from helpers import randn_inputs, skipping_cascade, small_combination, small_early_exit

DIM, CLASSES = 12, 4


@pytest.mark.parametrize("mode", ["early_exit", "cascade", "stream", "server"])
def test_ops_per_node_run_beyond_the_nodes_own(mode):
    """Each adaexit kernel is one op (torch.ops.adaexit.*, seen by the profiler); everything else the
    Python layer dispatches counts one by one."""
    model, x = two_network_cascade(width=64, rows=512) if mode == "cascade" else held_out_chain(width=64, rows=512)
    row = overhead(model, x, mode, batch=32, batches=8)
    assert row["node_runs"] >= 8
    assert 0 < row["ops_per_node_run"] <= TARGET_OPS, row
    assert row["host_syncs_per_node_run"] <= 1.0, row


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["early_exit", "cascade", "stream", "server"])
def test_triton_launches_per_node_run(triton_backend, mode):
    """On the Triton path (the interpreter here) a node run launches a handful of kernels: gate, partition,
    the gathers and the scatter."""
    model, x = two_network_cascade(width=16, rows=64) if mode == "cascade" else held_out_chain(width=16, rows=64)
    launches = launches_per_node_run(model, x, mode, batch=16, batches=2)
    assert 1 <= launches <= TARGET_OPS


MODELS = {
    "early_exit": lambda: small_early_exit(DIM, CLASSES, ConfidencePolicy("maxprob", [0.4, 0.45])),
    "patience": lambda: small_early_exit(DIM, CLASSES, PatiencePolicy(1)),
    "combination": lambda: small_combination(DIM, CLASSES, None),
    "skipping_cascade": lambda: skipping_cascade(DIM, CLASSES),  # a node fed by two predecessors (merge)
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero_sync_mode_reads_nothing_from_the_device_and_equals_the_syncing_mode(name):
    model = MODELS[name]()
    x = randn_inputs(33, DIM, scale=3)
    with torch.no_grad():
        before = host_sync_count()
        ref, info = model(x, return_info=True)
        decisions = sum(1 for r in info.rows_decided[:-1] if r)
        assert host_sync_count() - before <= max(1, decisions)  # <= 1 per decision (+0 for the info)
        model.set_execution(sync=False)
        before = host_sync_count()
        out = model(x)
        assert host_sync_count() == before  # zero syncs per forward
        got, got_info = model(x, return_info=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_info.exit_index, info.exit_index)
    assert got_info.exit_counts == info.exit_counts and got_info.rows_decided[-1] == info.rows_decided[-1]
    assert sum(got_info.exit_counts) == x.shape[0]


def test_zero_sync_forward_compiles_fullgraph_and_equals_eager():
    model = MODELS["early_exit"]().set_execution(sync=False)
    x = randn_inputs(16, DIM, scale=3)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_zero_sync_mode_handles_an_empty_batch():
    model = MODELS["early_exit"]().set_execution(sync=False)
    with torch.no_grad():
        assert model(torch.zeros(0, DIM)).shape == (0, CLASSES)


@pytest.mark.interpreter
def test_zero_sync_mode_on_the_triton_path(triton_backend):
    model = MODELS["patience"]()
    x = randn_inputs(20, DIM, scale=3)
    with torch.no_grad():
        ref = model(x)
        model.set_execution(sync=False)
        before = host_sync_count()
        out = model(x)
        assert host_sync_count() == before
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cuda_graph_hook_dry_run():
    """bench.gpu_check's hook for the zero-sync mode: on a CPU (dry run) it runs both modes once and counts
    the zero-sync mode's host syncs."""
    from bench.bench_overhead import cuda_graph_check

    result = cuda_graph_check("cpu", dry_run=True, batch=16)
    assert result["zero_sync_host_syncs"] == 0 and result["captured"] is False
    assert result["modes_max_abs_diff"] < 1e-4
