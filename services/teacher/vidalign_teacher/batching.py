"""Dynamic batching of DenoisingLoss calls: several callers' samples in one model run.

With ``--max-batch N`` (N > 1) the servicer hands each validated request to a
``Batcher`` instead of running it alone. One worker thread runs the model: it
takes the oldest waiting request, joins the later ones with the same batch key
(``vidalign.teacher.denoising.batch_key``: same adapter, input kind and per-sample
shape, text or not, draws, timesteps, want_grad) in arrival order while the
samples add up to at most N, runs them as one forward/backward, and hands each
caller its own rows. A request larger than N runs alone, whole.

The worker waits for company at most ``max_wait_s`` after the oldest request
arrived, less once the batch is full. While a batch runs, new requests queue and
form the next one, so a busy teacher batches without waiting; an idle one makes
a lone caller wait ``max_wait_s`` (keep it small against a model run). It cannot
know that no one else is coming: a closed-loop client's next request is not yet
admitted when the previous batch's answers leave, so counting admitted calls
would start a batch of one just before the others arrive.

Limits stay per call: each call holds its admission slot and its request bytes
until its own answer is back; a call whose client leaves or whose deadline
passes before its batch starts is dropped from the queue (the others run
without it); once its batch runs it finishes with the others. A bad request is
refused when it is validated, before it joins a batch; if a batched run fails
anyway, each of its requests is run again alone, so an error reaches only the
requests that cause it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from vidalign.errors import Unavailable
from vidalign.log import get_logger

log = get_logger("vidalign.teacher.batching")

P = TypeVar("P")
R = TypeVar("R")

CALLER_POLL_S = 0.1
"""How often a waiting caller checks that its client is still there."""


@dataclass(frozen=True)
class BatchRecord:
    """One model run: how many requests and samples, how long the oldest waited, the run's time."""

    requests: int
    samples: int
    wait_s: float
    run_s: float
    split: bool = False
    """The batched run failed and its requests were run again one by one."""


class _Item(Generic[P, R]):
    __slots__ = ("arrived", "context", "done", "error", "key", "payload", "result", "size", "state")

    def __init__(self, payload: P, key: Hashable, size: int, context: grpc.ServicerContext | None) -> None:
        self.payload = payload
        self.key = key
        self.size = size
        self.context = context
        self.arrived = time.monotonic()
        self.done = threading.Event()
        self.result: R | None = None
        self.error: BaseException | None = None
        self.state = "pending"  # -> running -> done, or pending -> dropped

    def active(self) -> bool:
        return self.context is None or self.context.is_active()


class Batcher(Generic[P, R]):
    """Joins compatible requests and runs them with ``run`` (a list of payloads in, one
    result per payload out, in order) on one worker thread."""

    def __init__(
        self,
        run: Callable[[list[P]], list[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[BatchRecord], None] | None = None,
        history: int = 1024,
    ) -> None:
        if max_batch < 1 or not max_wait_s >= 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.history: deque[BatchRecord] = deque(maxlen=history)
        """The latest model runs, oldest first (tests and benchmarks read it)."""
        self._pending: deque[_Item[P, R]] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="teacher-batcher", daemon=True)
        self._thread.start()

    # -- callers ------------------------------------------------------------------------

    def submit(self, payload: P, *, key: Hashable, size: int,
               context: grpc.ServicerContext | None = None) -> R:
        """Queue ``payload`` (``size`` samples, batched only with equal ``key``s) and block
        until its result is back; raises what its run raised."""
        item: _Item[P, R] = _Item(payload, key, size, context)
        with self._cond:
            if self._stopped:
                raise Unavailable("the teacher is shutting down; retry on another replica")
            self._pending.append(item)
            self._cond.notify_all()
        while not item.done.wait(CALLER_POLL_S):
            if item.active():
                continue
            with self._cond:
                if item.state == "pending":  # not started: leave the queue, the others go on
                    self._pending.remove(item)
                    item.state = "dropped"
                    raise Unavailable("the call ended while it waited to be batched")
            # Running: the model works for the whole batch; this call's slot stays held
            # until then, as an unbatched call's would.
            item.done.wait()
            break
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    def stop(self) -> None:
        """Refuse new requests; fail the ones still queued (UNAVAILABLE); end the worker."""
        with self._cond:
            self._stopped = True
            left = list(self._pending)
            self._pending.clear()
            for item in left:
                item.state = "dropped"
                item.error = Unavailable("the teacher stopped before this request ran; retry")
                item.done.set()
            self._cond.notify_all()
        self._thread.join(timeout=1)

    # -- the worker ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)

    def _take(self) -> list[_Item[P, R]] | None:
        """The next batch, once it is full or its oldest request has waited ``max_wait_s``;
        None once stopped."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                self._drop_inactive()
                if not self._pending:
                    self._cond.wait()
                    continue
                batch, full = self._compatible()
                now = time.monotonic()
                deadline = batch[0].arrived + self.max_wait_s
                if full or now >= deadline:
                    for item in batch:
                        self._pending.remove(item)
                        item.state = "running"
                    return batch
                self._cond.wait(deadline - now)  # an arrival (notify) or the deadline

    def _compatible(self) -> tuple[list[_Item[P, R]], bool]:
        """The oldest request and the later ones with its key that fit in ``max_batch``
        samples; and whether the batch is full (nothing more could join it)."""
        first = self._pending[0]
        batch, samples = [first], first.size
        for item in list(self._pending)[1:]:
            if item.key != first.key:
                continue
            if samples + item.size > self.max_batch:
                return batch, True  # the next compatible one does not fit: go now
            batch.append(item)
            samples += item.size
        return batch, samples >= self.max_batch

    def _drop_inactive(self) -> None:
        for item in [i for i in self._pending if not i.active()]:
            self._pending.remove(item)
            item.state = "dropped"
            item.error = Unavailable("the call ended while it waited to be batched")
            item.done.set()

    def _execute(self, batch: list[_Item[P, R]]) -> None:
        start = time.monotonic()
        wait_s = start - batch[0].arrived
        split = False
        try:
            try:
                results = self.run([item.payload for item in batch])
                for item, result in zip(batch, results, strict=True):
                    item.result = result
            except Exception as err:
                if len(batch) == 1:
                    batch[0].error = err
                else:  # find the culprit(s): each request alone, so only they fail
                    split = True
                    log.warning("batch_failed_running_alone", requests=len(batch), error=str(err))
                    for item in batch:
                        try:
                            (item.result,) = self.run([item.payload])
                        except Exception as alone:
                            item.error = alone
        except BaseException as err:  # pragma: no cover - the worker must never strand a caller
            for item in batch:
                if item.result is None and item.error is None:
                    item.error = err
            raise
        finally:
            run_s = time.monotonic() - start
            record = BatchRecord(requests=len(batch), samples=sum(i.size for i in batch),
                                 wait_s=wait_s, run_s=run_s, split=split)
            self.history.append(record)
            log.info("denoising_batch", requests=record.requests, samples=record.samples,
                     wait_ms=round(1e3 * wait_s, 2), run_ms=round(1e3 * run_s, 2), split=split)
            if self.on_batch is not None:
                try:
                    self.on_batch(record)
                except Exception:  # pragma: no cover - metrics must not fail a call
                    log.exception("batch_record_failed")
            for item in batch:
                item.state = "done"
                item.done.set()


def describe(batcher: Batcher[Any, Any] | None) -> dict[str, Any]:
    """The batching settings for the start-up log line."""
    if batcher is None:
        return {"max_batch": 1}
    return {"max_batch": batcher.max_batch, "max_wait_ms": round(1e3 * batcher.max_wait_s, 3)}
