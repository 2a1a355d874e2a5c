"""A thread-safe serving front: requests from many threads, micro-batched across requests.

:class:`Server` puts a :class:`~adaexit.stream.Scheduler` (a queue per graph node, each node run on full
batches) behind ``submit(x) -> concurrent.futures.Future``. One background worker thread owns the
scheduler: it admits submitted requests while the rows in flight leave room, runs the node whose queue is
full (or whose oldest row has waited ``max_wait_ms``, so a lone request is never stuck), and resolves each
request's future as soon as all of its rows are done. Between node runs it sleeps on a condition variable
until a request arrives, the oldest queued row's wait expires, or the server closes: no busy loop.

A node that raises fails the futures of every request in flight at that moment (the error names the
node); the worker then starts over with an empty scheduler and keeps serving later requests.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .base import AdaptiveModel
from .executor import num_rows
from .stream import Scheduler

_SLACK_S = 1e-4  # wake a little after a deadline, so the scheduler sees it expired


@dataclass
class _Request:
    future: Future
    x: object
    n: int
    return_info: bool


class Server:
    """Serve ``model`` to many threads: ``submit(x)`` returns a future of what ``model(x)`` returns.

    Args:
        model: an :class:`~adaexit.AdaptiveModel` in ``eval()`` mode (it must not be used for training
            while the server runs).
        batch_size: rows per node run: a node runs as soon as its queue holds this many rows.
        max_wait_ms: a queue holding fewer rows runs once one of its rows has waited this long since its
            request was admitted (the latency a lone request pays on top of its compute).
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
        self._arrivals = 0  # requests submitted so far (the worker sleeps only when none came meanwhile)
        self._closed = False
        self._row_spec = None  # (per-row shape, dtype, device) of the first tensor request
        self._thread = threading.Thread(target=self._work, name="adaexit-server", daemon=True)
        self._thread.start()

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.model, self.batch_size, self.max_wait_ms, self.max_rows_in_flight)

    # -- the client side --------------------------------------------------------------------------
    def submit(self, x, return_info: bool = False) -> Future:
        """Queue the rows ``x`` (a tensor ``[n, ...]``, or what ``model`` takes); return a future of
        ``model(x)`` for them (``(output, exit_index)`` with ``return_info=True``). Thread-safe."""
        try:
            x = self.model.prepare_input(x)
        except ValueError as err:
            raise ValueError(f"Server.submit: x is not a valid input: {err}") from err
        if isinstance(x, torch.Tensor):
            spec = (tuple(x.shape[1:]), x.dtype, x.device)
            with self._cond:
                if self._row_spec is None:
                    self._row_spec = spec
            if spec != self._row_spec:
                raise ValueError(
                    f"Server.submit: x has rows of shape {spec[0]} ({spec[1]}, {spec[2]}); this server's requests "
                    f"have rows of shape {self._row_spec[0]} ({self._row_spec[1]}, {self._row_spec[2]})"
                )
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("Server.submit: the server is closed")
            self._pending.append(_Request(future, x, num_rows(x), bool(return_info)))
            self._arrivals += 1
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
                    seen = self._arrivals
                    admitted = self._admit()
                    if self._closed and not self._pending and self._scheduler.idle:
                        return
                    ended = self._closed and not self._pending  # nothing more will come: flush
                    blocked = bool(self._pending)  # requests wait for room: finish rows first
                try:
                    ran = self._scheduler.step(flush=ended, drain=blocked)
                    self._resolve()
                except Exception as err:  # a node failed: fail what is in flight, start over
                    self._fail_in_flight(err)
                    continue
                if ran or admitted:
                    continue
                with self._cond:
                    if self._closed or self._arrivals != seen:
                        continue
                    deadline = self._scheduler.deadline()
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + _SLACK_S
                    if blocked and timeout is None:  # cannot happen (rows in flight are queued); never hang
                        timeout = self.max_wait_ms / 1e3 + _SLACK_S
                    self._cond.wait(timeout)

    def _admit(self) -> bool:
        """Admit pending requests while there is room (called with the lock held)."""
        admitted = False
        while self._pending and self._scheduler.can_admit(self._pending[0].n):
            request = self._pending.popleft()
            if not request.future.set_running_or_notify_cancel():
                continue  # cancelled by its caller before it started
            try:
                self._scheduler.admit(request.x, tag=request)
            except Exception as err:
                request.future.set_exception(err)
                continue
            admitted = True
        if admitted:
            self._resolve()  # a request of 0 rows is done as soon as it is admitted
        return admitted

    def _resolve(self) -> None:
        for request, logits, exits in self._scheduler.pop_done():
            try:
                out = self.model.finish_output(logits)
            except Exception as err:
                request.future.set_exception(err)
                continue
            request.future.set_result((out, exits) if request.return_info else out)

    def _fail_in_flight(self, err: Exception) -> None:
        failed = [batch.tag for batch in self._scheduler.open]
        self._scheduler = self._new_scheduler()
        kind = ValueError if isinstance(err, ValueError) else RuntimeError
        for request in failed:
            if request is not None and not request.future.done():
                error = kind(f"Server: {str(err).removeprefix('stream: ')}")
                error.__cause__ = err
                request.future.set_exception(error)


__all__ = ["Server"]
