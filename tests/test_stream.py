"""adaexit.stream: cross-batch re-batching gives every batch what model(batch) gives; nothing is lost or
duplicated; memory stays bounded; nodes run on full batches; a failing node is named."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import adaexit
from adaexit import ConfidencePolicy, PatiencePolicy
from adaexit.stream import Scheduler
from helpers import randn_inputs, small_combination, small_early_exit
from helpers import skipping_cascade as skipping_cascade_of

DIM, CLASSES = 12, 4


def early_exit(policy=None):
    return small_early_exit(DIM, CLASSES, policy)


def combination(policy=None):
    """MLP -> 3-exit early-exit MLP -> bigger MLP: whole networks (source nodes) and carried stages."""
    return small_combination(DIM, CLASSES, policy)


def skipping_cascade():
    """A cascade whose routing policy sends rows to any later network (route 2 skips a network)."""
    return skipping_cascade_of(DIM, CLASSES)


MODELS = {
    "early_exit": early_exit,
    "patience": lambda: early_exit(PatiencePolicy(1)),
    "combination": combination,
    "skipping_cascade": skipping_cascade,
    "d2nn_hierarchy": lambda: adaexit.hierarchy_d2nn(DIM, CLASSES).eval(),
    "d2nn_chain": lambda: adaexit.chain_d2nn(DIM, CLASSES).eval(),
    "d2nn_high_low": lambda: adaexit.high_low_d2nn(DIM, CLASSES).eval(),
}


def batches_of(sizes, seed=0):
    return [randn_inputs(n, DIM, seed=seed + i, scale=3) for i, n in enumerate(sizes)]


def per_batch(model, batches):
    with torch.no_grad():
        return [model(x, return_info=True) for x in batches]


def assert_streams_like_per_batch(model, batches, **kwargs):
    streamed = list(adaexit.stream(model, batches, return_info=True, **kwargs))
    assert len(streamed) == len(batches)
    for x, (out, got), (ref, info) in zip(batches, streamed, per_batch(model, batches)):
        assert out.shape == ref.shape == (x.shape[0], CLASSES)
        assert isinstance(got, adaexit.ExitInfo)
        assert torch.equal(got.exit_index, info.exit_index)
        assert (got.exit_counts, got.rows_run) == (info.exit_counts, info.rows_run)
        if isinstance(info, adaexit.ExitInfo):  # (a D2NN's own info is its Rollout: FLOPs counted otherwise)
            assert got.rows_decided == info.rows_decided
            assert got.flops == pytest.approx(info.flops) and got.full_flops == pytest.approx(info.full_flops)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_stream_equals_per_batch(name):
    model = MODELS[name]()
    batches = batches_of([16, 16, 7, 0, 1, 33, 16, 2])
    assert_streams_like_per_batch(model, batches, batch_size=16)
    assert_streams_like_per_batch(model, batches)  # default batch size: the first batch's


@pytest.mark.parametrize("name", ["early_exit", "combination", "skipping_cascade", "d2nn_hierarchy"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 40), min_size=0, max_size=8),
    batch_size=st.integers(1, 48),
    bound=st.one_of(st.none(), st.integers(1, 64)),
    wait=st.sampled_from([None, 0.0]),
)
def test_stream_property_random_batch_sequences(name, sizes, batch_size, bound, wait):
    model = MODELS[name]()
    assert_streams_like_per_batch(
        model, batches_of(sizes, seed=len(sizes)), batch_size=batch_size, max_rows_in_flight=bound, max_wait_ms=wait
    )


def test_empty_input_and_empty_batches():
    model = early_exit()
    assert list(adaexit.stream(model, [])) == []
    outs = list(adaexit.stream(model, batches_of([0, 0])))
    assert [tuple(o.shape) for o in outs] == [(0, CLASSES), (0, CLASSES)]


def test_rows_in_flight_stay_bounded_and_nodes_run_full():
    model = combination()
    scheduler = Scheduler(model, batch_size=16, max_rows_in_flight=48)
    batches = batches_of([8] * 40)
    peak, finished = 0, []
    with torch.no_grad():
        for x in batches:
            while not scheduler.can_admit(x.shape[0]):
                scheduler.step(drain=True)
                finished += list(scheduler.pop_done())
            scheduler.admit(model.prepare_input(x))
            peak = max(peak, scheduler.in_flight)
            while scheduler.step():
                finished += list(scheduler.pop_done())
        while scheduler.step(flush=True):
            finished += list(scheduler.pop_done())
    assert len(finished) == len(batches) and scheduler.idle
    assert peak <= 48
    stats = scheduler.stats
    assert stats.rows_run[0] == 8 * 40  # every row ran the first node exactly once
    # node runs are full batches except where the bound or the end of the input forced a partial one
    assert stats.mean_rows_per_run[0] >= 16
    assert sum(stats.rows_run[1:]) < sum(stats.runs[1:]) * 16 * 2


def _last_stage_rows_per_run(model, batches, batch_size, **kwargs) -> float:
    rows = []
    hook = model.stages[-1].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        for _ in adaexit.stream(model, batches, batch_size=batch_size, **kwargs):
            pass
    finally:
        hook.remove()
    return sum(rows) / len(rows)


def test_stream_default_bound_lets_a_deep_node_fill():
    """An eighth of the rows reach the last stage: it fills only with about 8 batches in flight. stream()'s
    default bound (16 batches) lets it run on full batches; a 4-batch bound runs it on partial ones."""
    from bench.bench_stream import CHAIN_FRACTIONS, chain
    from bench import policy_for_fractions

    model = chain(width=16)
    x = randn_inputs(48 * 16, 16, seed=0)
    model.set_policy(policy_for_fractions(model, x, CHAIN_FRACTIONS))
    batches = list(x.split(16))
    full = _last_stage_rows_per_run(model, batches, 16)
    partial = _last_stage_rows_per_run(model, batches, 16, max_rows_in_flight=4 * 16)
    assert full >= 0.75 * 16 > partial


def test_a_batch_larger_than_the_bound_is_admitted_alone():
    model = early_exit()
    assert_streams_like_per_batch(model, batches_of([3, 100, 5]), batch_size=4, max_rows_in_flight=8)


class Failing(nn.Module):
    """Works for the first ``calls`` calls, then raises."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("boom")
        return self.inner(x)


def test_a_failing_node_is_named_and_nothing_half_done_is_yielded():
    model = early_exit(ConfidencePolicy("maxprob", [2.0, 2.0]))  # never exits early: rows reach every node
    model.stages[2] = Failing(model.stages[2], calls=1)
    got = []
    with pytest.raises(RuntimeError, match=r"node 2 \(stage 2\) failed.*boom"):
        for out in adaexit.stream(model, batches_of([4, 4, 4, 4]), batch_size=4):
            got.append(out)
    assert len(got) == 1 and got[0].shape == (4, CLASSES)  # only the batch that really finished


def test_bad_arguments():
    model = early_exit()
    with pytest.raises(ValueError, match="batch_size"):
        list(adaexit.stream(model, batches_of([2]), batch_size=0))
    with pytest.raises(ValueError, match="AdaptiveModel"):
        list(adaexit.stream(nn.Linear(2, 2), batches_of([2])))
    with pytest.raises(ValueError, match="training mode"):
        list(adaexit.stream(early_exit().train(), batches_of([2])))


def test_a_dataloader_of_inputs_and_labels_gets_a_message_saying_what_to_do():
    """Issue 22: stream(model, loader) with a DataLoader of (x, y) says to pass the inputs only."""
    model = early_exit()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(randn_inputs(8, DIM), torch.zeros(8)), batch_size=4)
    with pytest.raises(ValueError, match=r"stream: batch 0 is a list of 2 items.*\(inputs, labels\).*x for x, _ in loader"):
        list(adaexit.stream(model, loader))
    assert len(list(adaexit.stream(model, (x for x, _ in loader)))) == 2
