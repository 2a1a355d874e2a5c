"""adaexit.Server: requests from many threads get what model(x) gives for their rows; a lone request is
not stuck; a failing node fails the requests in flight, names the node, and the server keeps serving;
close() finishes what was submitted and joins the worker; bad arguments are named."""

import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from torch import nn

import adaexit
from adaexit import ConfidencePolicy, Server
from adaexit.stream import Scheduler
from helpers import randn_inputs, small_combination, small_early_exit

DIM, CLASSES = 12, 4

MODELS = {
    "early_exit": lambda: small_early_exit(DIM, CLASSES),
    "cascade": lambda: small_combination(DIM, CLASSES),
    "d2nn": lambda: adaexit.hierarchy_d2nn(DIM, CLASSES).eval(),
}


def requests_of(thread: int, count: int):
    sizes = [1 + (7 * thread + 3 * i) % 5 for i in range(count)]  # 1..5 rows, varied per thread
    return [randn_inputs(n, DIM, seed=100 * thread + i, scale=3) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("name", list(MODELS))
def test_concurrent_requests_equal_model(name):
    model = MODELS[name]()
    threads, per_thread = 4, 12
    inputs = [requests_of(t, per_thread) for t in range(threads)]
    with torch.no_grad():
        expected = [[model(x, return_info=True) for x in xs] for xs in inputs]
    got = [[None] * per_thread for _ in range(threads)]
    start = threading.Barrier(threads)

    with Server(model, batch_size=8, max_wait_ms=2) as server:
        def client(t):
            start.wait()
            futures = [server.submit(x, return_info=True) for x in inputs[t]]
            for i, f in enumerate(futures):
                got[t][i] = f.result(timeout=60)

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert server.stats.runs[0] >= 1
    for t in range(threads):
        for i, ((out, got_info), (ref, info)) in enumerate(zip(got[t], expected[t])):
            assert isinstance(got_info, adaexit.ExitInfo)
            exits = got_info.exit_index
            assert out.shape == ref.shape == (inputs[t][i].shape[0], CLASSES)
            assert torch.equal(exits, info.exit_index), (t, i)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # without return_info the result is what model(x) returns
    with Server(model, batch_size=4, max_wait_ms=1) as server:
        x = inputs[0][0]
        torch.testing.assert_close(server.submit(x).result(timeout=60), expected[0][0][0], rtol=1e-5, atol=1e-6)


def test_requests_are_batched_across_requests():
    """1-row requests submitted together run the first node on full batches, not one row at a time."""
    model = small_early_exit(DIM, CLASSES)
    server = Server(model, batch_size=16, max_wait_ms=10_000)  # only full batches (or close) run nodes
    futures = [server.submit(randn_inputs(1, DIM, seed=i, scale=3)) for i in range(32)]
    server.close()  # the rows left in partial queues run now
    for f in futures:
        assert f.result(timeout=60).shape == (1, CLASSES)
    stats = server.stats
    assert stats.rows_run[0] == 32 and stats.runs[0] <= 2  # two runs of 16, or one of 32 if closed first


def test_a_lone_request_completes_after_max_wait():
    """A request smaller than batch_size runs once its rows waited max_wait_ms (not when more arrive)."""
    model = small_combination(DIM, CLASSES, ConfidencePolicy("maxprob", [2.0] * 4))  # rows visit all 5 nodes
    with Server(model, batch_size=1024, max_wait_ms=50) as server:
        start = time.monotonic()
        out = server.submit(randn_inputs(1, DIM)).result(timeout=30)  # stuck forever without the timer
        elapsed = time.monotonic() - start
        assert out.shape == (1, CLASSES)
        assert elapsed >= 0.05  # it did wait for a fuller batch first
        stats = server.stats
        assert stats.runs == [1] * 5


def test_the_wait_counts_from_admission_not_per_node():
    """A row that waited max_wait_ms at one node does not wait again at the next: a lone request pays
    max_wait_ms once, whatever the depth of the graph."""
    model = small_early_exit(DIM, CLASSES, ConfidencePolicy("maxprob", [2.0, 2.0]))  # never exits early
    scheduler = Scheduler(model, batch_size=64, max_wait_ms=300)  # (a wide window: a loaded CI machine)
    with torch.inference_mode():
        scheduler.admit(randn_inputs(1, DIM))
        assert not scheduler.step()  # not full, not expired
        assert scheduler.deadline() is not None
        time.sleep(max(0.0, scheduler.deadline() - time.monotonic()) + 0.005)
        assert scheduler.step() and scheduler.step() and scheduler.step()  # three nodes, back to back
        assert [tag for tag, _, _ in scheduler.pop_done()] == [None]
    assert scheduler.deadline() is None and scheduler.idle


@pytest.mark.parametrize("sizes", [[1, 3, 0, 1, 2], [2, 0], [0, 2], [3, 0, 0]])
def test_admit_many_keeps_each_batch_its_own(sizes):
    """Batches admitted together (one concatenation, as a Server admits the requests waiting) come out one
    by one in order, each equal to model(batch), 0-row batches and several sizes mixed (as many rows as
    batches, too: each row still belongs to its own batch); an admission that fails (rows that do not
    concatenate, or too many) changes nothing."""
    model = small_combination(DIM, CLASSES)
    xs = [randn_inputs(n, DIM, seed=i, scale=3) for i, n in enumerate(sizes)]
    scheduler = Scheduler(model, batch_size=4, max_rows_in_flight=8)
    with torch.inference_mode():
        with pytest.raises(RuntimeError):  # torch.cat: rows of two shapes
            scheduler.admit_many([randn_inputs(1, DIM), randn_inputs(1, DIM + 1)], tags=["a", "b"])
        with pytest.raises(RuntimeError, match="no room"):
            scheduler.admit_many(xs + [randn_inputs(9 - sum(sizes), DIM)])  # 9 rows > 8
        assert scheduler.idle and scheduler.next_id == 0 and sum(scheduler.queued) == 0
        scheduler.admit_many(xs, tags=list(range(len(xs))))
        assert scheduler.queued[0] == sum(sizes) and len(scheduler.queues[0]) == 1  # one part for all of them
        while scheduler.step(flush=True):
            pass
        done = list(scheduler.pop_done())
        expected = [model(x, return_info=True) for x in xs]
        infos = [scheduler.exit_trace(visits) for _, _, visits in done]
    assert [tag for tag, _, _ in done] == list(range(len(xs))) and scheduler.idle
    for (_, out, _), trace, x, (ref, info) in zip(done, infos, xs, expected):
        assert out.shape == (x.shape[0], CLASSES)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(trace.exit_index, info.exit_index)


def test_pop_done_out_of_order_gives_each_batch_once_as_soon_as_it_is_done():
    """A server's request is done when its own rows are: pop_done(in_order=False) gives a batch whose rows
    exited early although one ahead of it still runs (in_order, the default, waits for that one), and never
    gives a batch twice."""
    model = small_early_exit(DIM, CLASSES)
    x = randn_inputs(64, DIM, seed=3, scale=3)
    with torch.inference_mode():
        _, info = model(x, return_info=True)
        deep, deep2 = (info.exit_index > 0).nonzero()[:2, 0].tolist()
        shallow = int((info.exit_index == 0).nonzero()[0])
        scheduler = Scheduler(model, batch_size=3)
        rows = [x[deep : deep + 1], x[shallow : shallow + 1], x[deep2 : deep2 + 1]]
        scheduler.admit_many(rows, tags=["deep", "shallow", "deep2"])
        assert scheduler.step()  # node 0 on the three rows: the shallow one exits
        assert list(scheduler.pop_done()) == []  # in order: behind the deep one
        first = list(scheduler.pop_done(in_order=False))
        assert [tag for tag, _, _ in first] == ["shallow"] and not scheduler.idle
        while scheduler.step(flush=True):
            pass
        second = list(scheduler.pop_done(in_order=False))  # (their slots are not contiguous: a gather)
        assert [tag for tag, _, _ in second] == ["deep", "deep2"] and scheduler.idle
        torch.testing.assert_close(first[0][1], model(x[shallow : shallow + 1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second[0][1], model(x[deep : deep + 1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(second[1][1], model(x[deep2 : deep2 + 1]), rtol=1e-5, atol=1e-6)
        exits = [int(scheduler.exit_trace(visits).exit_index) for _, _, visits in first + second[:1]]
        assert exits[0] == 0 < exits[1]


def test_a_full_batch_runs_without_waiting_for_max_wait():
    """The worker sleeps between arrivals, but requests that fill the first node's batch wake it: they run
    at once, not after max_wait_ms (here a minute)."""
    model = small_early_exit(DIM, CLASSES, ConfidencePolicy("maxprob", [0.0, 0.0]))  # every row exits first
    with Server(model, batch_size=8, max_wait_ms=60_000) as server:
        for rounds in range(3):
            futures = []
            for i in range(8):
                futures.append(server.submit(randn_inputs(1, DIM, seed=i)))
                time.sleep(0.01)  # the worker admits this one and goes back to sleep
            for f in futures:
                assert f.result(timeout=30).shape == (1, CLASSES)
        assert server.stats.rows_run[0] == 24


class Switch(nn.Module):
    """Raises while ``fail`` is set."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.fail = inner, False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("boom")
        return self.inner(x)


def test_a_failing_node_fails_the_requests_in_flight_and_the_server_keeps_serving():
    model = small_early_exit(DIM, CLASSES, ConfidencePolicy("maxprob", [2.0, 2.0]))  # rows reach every node
    model.stages[2] = switch = Switch(model.stages[2])
    with Server(model, batch_size=4, max_wait_ms=1) as server:
        switch.fail = True
        futures = [server.submit(randn_inputs(2, DIM, seed=i)) for i in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match=r"Server: .*node 2 \(stage 2\) failed.*boom"):
                f.result(timeout=30)
        switch.fail = False
        x = randn_inputs(3, DIM, seed=9)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(server.submit(x).result(timeout=30), expected, rtol=1e-5, atol=1e-6)


def test_close_finishes_submitted_requests_and_joins_the_worker():
    model = small_early_exit(DIM, CLASSES)
    server = Server(model, batch_size=1000, max_wait_ms=60_000)  # nothing would run before close
    futures = [server.submit(randn_inputs(2, DIM, seed=i)) for i in range(5)]
    server.close()
    assert not server._thread.is_alive() and server.closed
    assert all(f.done() and f.result().shape == (2, CLASSES) for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(randn_inputs(1, DIM))
    server.close()  # twice is harmless


def test_empty_and_cancelled_requests():
    model = small_early_exit(DIM, CLASSES)
    with Server(model, batch_size=4, max_wait_ms=1) as server:
        assert server.submit(torch.zeros(0, DIM)).result(timeout=30).shape == (0, CLASSES)
    server = Server(model, batch_size=1000, max_wait_ms=60_000)
    with server._cond:  # hold the worker off while the request is cancelled
        cancelled = server.submit(randn_inputs(1, DIM))
        assert cancelled.cancel()
    kept = server.submit(randn_inputs(1, DIM))
    server.close()
    assert cancelled.cancelled() and kept.result().shape == (1, CLASSES)


def test_bad_arguments_are_named():
    model = small_early_exit(DIM, CLASSES)
    with pytest.raises(ValueError, match="model must be an adaexit AdaptiveModel"):
        Server(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="training mode"):
        Server(small_early_exit(DIM, CLASSES).train())
    for kwargs, name in [({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
                         ({"max_wait_ms": -1}, "max_wait_ms"), ({"max_wait_ms": None}, "max_wait_ms"),
                         ({"max_rows_in_flight": 0}, "max_rows_in_flight")]:
        with pytest.raises(ValueError, match=name):
            Server(model, **kwargs)
    with Server(model, batch_size=4, max_wait_ms=1) as server:
        with pytest.raises(ValueError, match="Server.submit: x "):
            server.submit("not a tensor")
        with pytest.raises(ValueError, match="Server.submit: x "):
            server.submit(torch.tensor(1.0))
        first = server.submit(randn_inputs(1, DIM))
        assert isinstance(first, Future)
        first.result(timeout=30)  # the model ran rows of shape (DIM,): those are its rows now
        with pytest.raises(ValueError, match=r"Server.submit: x has rows of shape \(5,\).*first successful"):
            server.submit(torch.zeros(2, 5))


def test_a_bad_first_request_does_not_fix_the_row_shape():
    """Issue 22: a first request of the wrong shape fails (in the model) without deciding what later requests
    may be; valid requests submitted right behind it are served, and only then is the row shape known."""
    model = small_early_exit(DIM, CLASSES)
    with Server(model, batch_size=4, max_wait_ms=1) as server:
        bad = server.submit(torch.zeros(3, DIM + 2))
        good = [server.submit(randn_inputs(2, DIM, seed=i)) for i in range(3)]
        with pytest.raises(RuntimeError, match=r"Server: node 0 \(stage 0\) failed on 3 rows"):
            bad.result(timeout=30)
        with torch.no_grad():
            for i, f in enumerate(good):
                torch.testing.assert_close(f.result(timeout=30), model(randn_inputs(2, DIM, seed=i)), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="first successful"):
            server.submit(torch.zeros(1, DIM + 2))
        assert server.submit(randn_inputs(1, DIM)).result(timeout=30).shape == (1, CLASSES)


class Poisoned(nn.Module):
    """Raises on a sub-batch that holds a row whose first feature is above 1e6."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if bool((x[:, 0] > 1e6).any()):
            raise RuntimeError("poisoned row")
        return self.inner(x)


def test_a_failing_node_fails_only_the_batches_whose_rows_it_held():
    """A node that fails loses the rows it held: their batches fail; a batch waiting in another queue at that
    moment finishes with its true output."""
    model = small_early_exit(DIM, CLASSES, ConfidencePolicy("maxprob", [2.0, 2.0]))  # rows reach every node
    model.stages[0] = Poisoned(model.stages[0])
    x = randn_inputs(1, DIM)
    poison = randn_inputs(2, DIM, seed=1)
    poison[:, 0] = 1e7
    scheduler = Scheduler(model, batch_size=2)
    with torch.inference_mode():
        scheduler.admit(x, tag="good")
        assert scheduler.step(flush=True)  # node 0 on the good row: it waits at node 1 (not a full batch)
        scheduler.admit(poison, tag="poison")
        with pytest.raises(RuntimeError, match=r"stream: node 0 \(stage 0\) failed on 2 rows: poisoned") as err:
            scheduler.step()  # node 0 on the poisoned rows
        # the Server tells a node failure (whose rows are failed) from a bug by this identity, not by the
        # batches' errors (a batch keeps its first error when its rows fail in several runs)
        assert scheduler.last_failure is err.value and err.value.node == 0
        while scheduler.step(flush=True):
            pass
        done = list(scheduler.pop_done())
        ref = model(x)
    assert [tag for tag, _, _ in done] == ["good", "poison"]
    torch.testing.assert_close(done[0][1], ref)
    assert isinstance(done[1][1], RuntimeError) and scheduler.idle


def test_readme_stream_and_server_example_runs():
    """README's stream / Server block runs as written, continuing its usage example (here on a small model)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "adaexit.Server(" in b)
    model = small_early_exit(DIM, CLASSES)
    x = randn_inputs(8, DIM, scale=3)
    namespace = {"adaexit": adaexit, "ee": model, "x": x, "val_loader": [(x[:5], None), (x[5:], None)]}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    with torch.no_grad():
        torch.testing.assert_close(namespace["logits"], model(x[:1]), rtol=1e-5, atol=1e-6)
        assert torch.equal(namespace["predictions"], model(x[5:]).argmax(1))
