"""A thread-safe serving front: requests from many threads, micro-batched across requests.

:class:`Server` puts a :class:`~adaexit.stream.Scheduler` (a queue per graph node, each node run on full
batches) behind ``submit(x) -> concurrent.futures.Future``. One background worker thread owns the
scheduler: it admits submitted requests while the rows in flight leave room, runs the node whose queue is
full (or whose oldest row has waited ``max_wait_ms`` since its request was submitted, so a lone request is
never stuck), and resolves each request's future as soon as all of its own rows are done (a row that exits
early is not held back by the slower rows of earlier requests). Between node runs it sleeps on a condition
variable until enough rows arrive to fill the first node's batch (the first request when nothing waits),
the oldest waiting row's wait expires, or the server closes: no busy loop, and no wake-up per request.

Per-request costs stay off the per-request path: the worker admits the waiting requests when they fill a
batch or the oldest one's wait is over, all in one go (one concatenation, a few tensor ops in all:
:meth:`~adaexit.stream.Scheduler.admit_many`), and takes the finished requests' outputs out in one copy
(each request gets views of its own rows of it).

A server survives its clients: a request that fails validation, or fails in a node, never changes what
later requests may be. The rows' shape, dtype and device are the model's: learnt from the first request
that *succeeds* (until then, requests of another row shape than those in flight wait for them to finish,
so rows of different shapes never meet in a node). A node that raises fails only the requests whose rows
it held (the error names the node); every other request in flight goes on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .base import AdaptiveModel
from .executor import node_failure, num_rows
from .stream import Scheduler, batch_info, prepare

_SLACK_S = 1e-4  # wake a little after a deadline, so the scheduler sees it expired


@dataclass
class _Request:
    future: Future
    x: object
    n: int
    return_info: bool
    spec: tuple | None  # (per-row shape, dtype, device) of a tensor request
    since: float  # time.monotonic() at submit: its rows' wait counts from here


def row_spec(x) -> tuple | None:
    """What rows of the same model must share: a tensor's per-row shape, dtype and device."""
    return (tuple(x.shape[1:]), x.dtype, x.device) if isinstance(x, torch.Tensor) else None


def _describe(spec: tuple) -> str:
    return f"{spec[0]} ({spec[1]}, {spec[2]})"


class Server:
    """Serve ``model`` to many threads: ``submit(x)`` returns a future of what ``model(x)`` returns.

    Args:
        model: an :class:`~adaexit.AdaptiveModel` in ``eval()`` mode (it must not be used for training
            while the server runs).
        batch_size: rows per node run: a node runs as soon as its queue holds this many rows.
        max_wait_ms: a queue holding fewer rows runs once one of its rows has waited this long since its
            request was submitted (the latency a lone request pays on top of its compute).
        max_rows_in_flight: bound on rows admitted and not yet returned (default ``4 * batch_size``); a
            request larger than the bound is admitted alone.

    Use it as a context manager, or call :meth:`close`. Futures' callbacks run on the worker thread:
    keep them short.

    Example::

        with adaexit.Server(model, batch_size=64, max_wait_ms=5) as server:
            future = server.submit(x)          # from any thread; x: [n, ...] rows
            logits = future.result()           # == model(x)
    """

    def __init__(self, model: AdaptiveModel, batch_size: int = 64, max_wait_ms: float = 5.0,
                 max_rows_in_flight: int | None = None):
        if not isinstance(model, AdaptiveModel):
            raise ValueError(f"Server: model must be an adaexit AdaptiveModel, got {type(model).__name__}")
        if model.training:
            raise ValueError("Server: the model is in training mode; call model.eval() first")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Server: batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ValueError(f"Server: max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        if max_rows_in_flight is not None and (
            isinstance(max_rows_in_flight, bool) or not isinstance(max_rows_in_flight, int) or max_rows_in_flight < 1
        ):
            raise ValueError(f"Server: max_rows_in_flight must be an integer >= 1, got {max_rows_in_flight!r}")
        self.model = model
        self.batch_size, self.max_wait_ms, self.max_rows_in_flight = batch_size, float(max_wait_ms), max_rows_in_flight
        self._scheduler = self._new_scheduler()
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()  # submitted, not yet admitted
        self._pending_rows = 0  # their rows (a 0-row request counts 1: it must wake an idle worker too)
        self._wake_rows = 1  # pending rows at which submit wakes the sleeping worker
        self._closed = False
        self._row_spec = None  # (per-row shape, dtype, device): from the first request that succeeded
        self._flight_spec = None  # that of the requests in flight while the row spec is not known yet
        self._thread = threading.Thread(target=self._work, name="adaexit-server", daemon=True)
        self._thread.start()

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.model, self.batch_size, self.max_wait_ms, self.max_rows_in_flight)

    # -- the client side --------------------------------------------------------------------------
    def submit(self, x, return_info: bool = False) -> Future:
        """Queue the rows ``x`` (a tensor ``[n, ...]``, or what ``model`` takes); return a future of
        ``model(x)`` for them (``(output, info)`` with ``return_info=True``, ``info`` the request's
        :class:`~adaexit.ExitInfo`). Thread-safe. A request refused here changes nothing for later ones."""
        x = prepare(self.model, x, "Server.submit: x")
        spec = row_spec(x)
        known = self._row_spec
        if spec is not None and known is not None and spec != known:
            raise ValueError(
                f"Server.submit: x has rows of shape {_describe(spec)}; this model's rows (from its first "
                f"successful request) have shape {_describe(known)}"
            )
        future: Future = Future()
        n = num_rows(x)
        with self._cond:
            if self._closed:
                raise RuntimeError("Server.submit: the server is closed")
            self._pending.append(_Request(future, x, n, bool(return_info), spec, time.monotonic()))
            self._pending_rows += max(n, 1)
            if self._pending_rows >= self._wake_rows:  # (fewer rows change nothing before the deadline)
                self._cond.notify()
        return future

    def close(self) -> None:
        """Stop accepting requests, finish every request already submitted, and join the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:  # (a future's callback may close the server)
            self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self):
        """The scheduler's :class:`~adaexit.stream.StreamStats` (node runs and rows run) since the start or
        the last failure."""
        return self._scheduler.stats

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the worker -------------------------------------------------------------------------------
    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    try:
                        admitted = self._admit() if self._admission_due() else False
                    except Exception as err:  # (a bug: fail what is in flight rather than leave the worker dead)
                        self._fail_in_flight(err)
                        admitted = False
                    if self._closed and not self._pending and self._scheduler.idle:
                        return
                    ended = self._closed and not self._pending  # nothing more will come: flush
                    blocked = admitted is None  # requests wait for room: finish rows first
                try:
                    ran = self._scheduler.step(flush=ended, drain=blocked)
                    self._resolve()
                except Exception as err:  # a node failed: fail the requests whose rows it held
                    self._fail_in_flight(err)
                    continue
                if ran or admitted:
                    continue
                with self._cond:
                    if self._closed or (not blocked and self._admission_due()):  # (due meanwhile)
                        continue
                    deadline = self._scheduler.deadline()
                    if self._pending:  # (not admitted yet: their wait counts all the same)
                        oldest = self._pending_deadline()
                        deadline = oldest if deadline is None else min(deadline, oldest)
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + _SLACK_S
                    # a request wakes us when its rows would fill the first node's batch; with nothing
                    # waiting (no deadline), the first request does
                    self._wake_rows = 1 if deadline is None or blocked else self._rows_to_fill()
                    if blocked and timeout is None:  # cannot happen (rows in flight are queued); never hang
                        timeout = self.max_wait_ms / 1e3 + _SLACK_S
                    self._cond.wait(timeout)

    def _rows_to_fill(self) -> int:
        return max(1, self.batch_size - self._scheduler.queued[0])

    def _admission_due(self) -> bool:
        """Whether to admit the pending requests now (lock held): when they fill the first node's batch,
        the oldest one's wait is over, or the server closes. Admitting them only then admits a whole
        batch's requests at once, not the first of them alone (what wakes an idle worker)."""
        if not self._pending:
            return False
        return (self._closed or self._pending_rows >= self._rows_to_fill() or not self._pending[0].n
                or time.monotonic() >= self._pending_deadline())

    def _pending_deadline(self) -> float:
        """When the oldest waiting request's wait is over (lock held; some request waits)."""
        return self._pending[0].since + self.max_wait_ms / 1e3

    def _admit(self) -> bool | None:
        """Admit the pending requests that fit, all at once (called with the lock held); whether any
        was, ``None`` when some wait for room. Until a request has succeeded, one of another row shape
        than those in flight waits for them to finish."""
        scheduler, taken, rows = self._scheduler, [], 0
        while self._pending:
            request = self._pending[0]
            n = request.n
            if not (scheduler.can_admit(rows + n) and (not taken or rows + n <= scheduler.capacity)):
                break  # (only a request alone may exceed the bound)
            if request.spec is not None:
                if self._row_spec is not None and request.spec != self._row_spec:  # learnt since submit
                    self._pop()
                    if request.future.set_running_or_notify_cancel():
                        request.future.set_exception(ValueError(
                            f"Server.submit: x has rows of shape {_describe(request.spec)}; this model's rows "
                            f"(from its first successful request) have shape {_describe(self._row_spec)}"))
                    continue
                if self._row_spec is None:
                    if scheduler.idle and not taken:
                        self._flight_spec = None
                    if self._flight_spec not in (None, request.spec):
                        break  # wait for the requests in flight
                    self._flight_spec = request.spec
            self._pop()
            if request.future.set_running_or_notify_cancel():  # (else cancelled by its caller)
                taken.append(request)
                rows += n
        if not taken:
            return None if self._pending else False
        try:
            scheduler.admit_many([r.x for r in taken], taken, since=min(r.since for r in taken))
        except Exception:  # one at a time: only the requests at fault fail
            for request in taken:
                try:
                    scheduler.admit(request.x, tag=request, since=request.since)
                except Exception as err:
                    request.future.set_exception(err)
        self._resolve()  # a request of 0 rows is done as soon as it is admitted
        return None if self._pending else True

    def _pop(self) -> _Request:
        request = self._pending.popleft()
        self._pending_rows -= max(request.n, 1)
        return request

    def _resolve(self) -> None:
        for request, logits, visits in self._scheduler.pop_done(in_order=False):  # each as soon as it is done
            if request is None or request.future.done():
                continue
            if isinstance(logits, Exception):  # a node failed on some of its rows
                error = type(logits)(f"Server: {str(logits).removeprefix('stream: ')}")
                error.__cause__ = logits.__cause__
                request.future.set_exception(error)
                continue
            try:
                out = self.model.finish_output(logits)
                result = (out, batch_info(self.model, self._scheduler, request.x, visits)) if request.return_info else out
            except Exception as err:
                request.future.set_exception(err)
                continue
            if request.spec is not None and self._row_spec is None and request.n:
                self._row_spec = request.spec  # the model ran rows of this shape: they are its rows
            request.future.set_result(result)

    def _fail_in_flight(self, err: Exception) -> None:
        """A node failed: the scheduler already failed the requests whose rows it held; they resolve (with
        the error) once their other rows are out. Anything else (a bug in the scheduler): fail everything
        in flight and start over."""
        if err is self._scheduler.last_failure:  # (a batch keeps its first error: identity there would miss)
            self._resolve()
            return
        failed = [batch.tag for batch in self._scheduler.open]
        self._scheduler = self._new_scheduler()
        for request in failed:
            if request is not None and not request.future.done():
                request.future.set_exception(node_failure(f"Server: {str(err).removeprefix('stream: ')}", err,
                                                          getattr(err, "node", None)))


__all__ = ["Server"]
