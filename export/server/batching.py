"""Server-side batching: concurrent requests to one signature share a model call.

Each (model, version, signature) gets a :class:`SignatureBatcher`: a queue and
a thread that forms batches and runs them, one at a time; one
:class:`BatchScheduler` per server bounds how many batches run at once across
all of them (``num_batch_threads``). A batch closes when it holds
``max_batch_size`` rows or ``batch_timeout_micros`` after its first request
arrived, and is formed only once one of the ``num_batch_threads`` slots is free,
so batches grow under load; formed batches run on the scheduler's pool of
``num_batch_threads`` threads, so one signature can run several batches at once
(as TF Serving's shared batch scheduler does). The batching options (size,
timeout, queue bound, padding) are per batcher: the scheduler's by default, or a
model version's own (``--enable_per_model_batching_parameters``, see
:func:`export.server.config.load_per_model_batching_parameters`), while the
``num_batch_threads`` slots stay the server's, shared by every model (as in TF
Serving, whose per-model parameters add queues to the one shared scheduler).
A model call made while a batch runs (a composite servable calling the models
it is built on, whatever their options) runs at once,
unbatched, inside that batch: it already holds a slot, and waiting for another
one could deadlock once every slot is held by such a batch. So a composite is
batched where requests enter it, and its inner models see the merged batch. Inputs are concatenated along
dimension 0 (optionally right-padding variable-length dimensions, at most
``max_padding_ratio`` apart, see :class:`export.server.config.BatchingOptions`),
the model runs once, and every output is split back by rows. A model whose outputs cannot be split by rows
(e.g. a scalar output) is detected on the first merged batch and served
unbatched from then on.

Example::

    >>> import numpy as np, tensorflow as tf
    >>> from export.server.config import BatchingOptions
    >>> from export.server.servable import PythonServable, Signature
    >>> class Double(PythonServable):
    ...     signatures = {"serving_default": Signature.of("serving_default",
    ...         {"x": tf.TensorSpec([None], tf.float32)}, {"y": tf.TensorSpec([None], tf.float32)})}
    ...     def compute(self, signature, inputs):
    ...         return {"y": inputs["x"] * 2}
    >>> scheduler = BatchScheduler(BatchingOptions(max_batch_size=8))
    >>> servable = Double("double"); servable.attach_batching(scheduler)
    >>> servable.run("serving_default", {"x": np.ones(3, np.float32)})["y"].tolist()
    [2.0, 2.0, 2.0]
    >>> servable.close(); scheduler.close()
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Dict, List, Mapping, Optional

import grpc
import numpy as np

from export.server.config import BatchingOptions
from export.server.errors import ServingError

logger = logging.getLogger(__name__)


def _pad_kind(dtype: np.dtype) -> str:
    if dtype == object or dtype.kind in "SU":
        return "string"
    if dtype.kind == "b":
        return "bool"
    if dtype.kind in "iu":
        return "int"
    return "float"


class _Task:
    __slots__ = ("inputs", "rows", "enqueued", "done", "outputs", "error")

    def __init__(self, inputs: Mapping[str, np.ndarray], rows: int):
        self.inputs, self.rows = inputs, rows
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.outputs: Optional[Dict[str, np.ndarray]] = None
        self.error: Optional[BaseException] = None


class BatchScheduler:
    """Creates per-signature batchers; at most ``num_batch_threads`` batches run at once.

    Args:
        options: :class:`BatchingOptions`.
        metrics: optional ``ServingMetrics``; each model call records its row count.
    """

    def __init__(self, options: BatchingOptions, metrics=None):
        self.options = options
        self.metrics = metrics
        self._slots = threading.BoundedSemaphore(options.num_batch_threads)
        self._local = threading.local()
        # Exactly one worker per slot: a batch is submitted only after taking a slot, so it never waits here.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            options.num_batch_threads, thread_name_prefix="tfrec-batch", initializer=self.mark_batch_thread)

    def mark_batch_thread(self) -> None:
        """Declare the calling thread one that runs batches (see :meth:`on_batch_thread`)."""
        self._local.batch_thread = True

    def on_batch_thread(self) -> bool:
        """Whether the calling thread runs a batch; model calls made there are not batched again."""
        return getattr(self._local, "batch_thread", False)

    def batcher(self, servable, signature, options: Optional[BatchingOptions] = None) -> Optional["SignatureBatcher"]:
        """A batcher for ``signature`` of ``servable``, or ``None`` if it cannot be batched.

        Batchable means every input has a known rank >= 1 and a free (``None``) first dimension.
        ``options`` (default the scheduler's) set its batch size, timeout, queue bound and
        padding; their ``num_batch_threads`` is ignored (the slots are the scheduler's).
        """
        for spec in signature.inputs.values():
            if spec.shape.rank is None or spec.shape.rank == 0 or spec.shape[0] is not None:
                return None
        return SignatureBatcher(self, servable, signature, options)

    def close(self) -> None:
        """Stop the batch threads (each batcher finishes its queue first, ``SignatureBatcher.close``)."""
        self._pool.shutdown(wait=True)


class SignatureBatcher:
    """The queue of one (model, version, signature); see the module docstring."""

    def __init__(self, scheduler: BatchScheduler, servable, signature, options: Optional[BatchingOptions] = None):
        self._scheduler, self._servable, self._signature = scheduler, servable, signature
        self._options: BatchingOptions = options if options is not None else scheduler.options
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._queued_rows = 0
        self._closed = False
        self._running = 0  # batches submitted to the pool and not finished
        self._splittable = True
        self._thread = threading.Thread(
            target=self._loop, name=f"tfrec-batcher-{servable.name}-{servable.version}-{signature.name}", daemon=True
        )
        self._thread.start()

    # --- request side ---------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run ``inputs`` (validated) as part of a batch; blocks until its rows are computed."""
        rows = {np.shape(v)[0] for v in inputs.values()}
        if len(rows) != 1 or not self._splittable:
            return self._servable.run_unbatched(self._signature, inputs)
        if self._scheduler.on_batch_thread():  # an inner call of a running batch: it holds the slot already
            self._record(next(iter(rows)))
            return self._servable.run_unbatched(self._signature, inputs)
        task = _Task(inputs, rows.pop())
        if task.rows == 0:
            return self._servable.run_unbatched(self._signature, inputs)
        if task.rows > self._options.max_batch_size:  # runs alone, see BatchingOptions
            self._record(task.rows)
            return self._servable.run_unbatched(self._signature, inputs)
        with self._cond:
            if self._closed:
                raise ServingError.unavailable(f"model {self._servable.name} version {self._servable.version} is unloading")
            limit = self._options.max_enqueued_batches * self._options.max_batch_size
            if self._queued_rows + task.rows > limit:
                raise ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"The batch scheduling queue of {self._servable.name}/{self._signature.name} is full "
                    f"({self._options.max_enqueued_batches} batches)",
                )
            self._queue.append(task)
            self._queued_rows += task.rows
            self._cond.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def close(self) -> None:
        """Finish every queued and running request, then stop the scheduling thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            while self._running:
                self._cond.wait()

    # --- scheduling side ------------------------------------------------------------
    def _loop(self) -> None:
        self._scheduler.mark_batch_thread()  # it runs batches itself once the pool is shut down
        timeout = self._options.batch_timeout_micros / 1e6
        max_rows = self._options.max_batch_size
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                deadline = self._queue[0].enqueued + timeout
                while not self._closed and self._queued_rows < max_rows:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            self._scheduler._slots.acquire()  # form the batch only when a slot is free
            with self._cond:
                batch = self._take_batch()
                self._running += 1
            try:  # requests arriving meanwhile form the next batch, which may run alongside
                self._scheduler._pool.submit(self._process, batch)
            except RuntimeError:  # the pool is shut down (server stopping): run here
                self._process(batch)

    def _compatible(self, first: _Task, task: _Task) -> bool:
        pad = self._options.pad_variable_length_inputs
        for name, spec in self._signature.inputs.items():
            a, b = first.inputs[name].shape, task.inputs[name].shape
            if len(a) != len(b):
                return False
            for axis in range(1, len(a)):
                if a[axis] != b[axis] and not (pad and spec.shape[axis] is None):
                    return False
        return True

    def _padded_lengths(self, task: _Task) -> List[int]:
        """Lengths of ``task``'s dimensions that padding may change (the signature's ``None`` dims)."""
        return [task.inputs[name].shape[axis] for name, spec in self._signature.inputs.items()
                for axis in range(1, len(spec.shape)) if spec.shape[axis] is None]

    def _take_batch(self) -> List[_Task]:
        first = self._queue.popleft()
        batch, rows, rest = [first], first.rows, collections.deque()
        ratio = self._options.max_padding_ratio if self._options.pad_variable_length_inputs else 0
        low = high = self._padded_lengths(first) if ratio else None
        while self._queue:
            task = self._queue.popleft()
            fits = rows + task.rows <= self._options.max_batch_size and self._compatible(first, task)
            if fits and ratio:  # the batch's longest row at most `ratio` times its shortest, per padded dim
                lengths = self._padded_lengths(task)
                new_low = [min(a, b) for a, b in zip(low, lengths)]
                new_high = [max(a, b) for a, b in zip(high, lengths)]
                fits = all(h <= ratio * max(lo, 1) for lo, h in zip(new_low, new_high))
            if fits:
                batch.append(task)
                rows += task.rows
                if ratio:
                    low, high = new_low, new_high
            else:
                rest.append(task)
        self._queue = rest
        self._queued_rows -= rows
        return batch

    def _merge(self, batch: List[_Task]) -> Dict[str, np.ndarray]:
        merged = {}
        for name in self._signature.inputs:
            arrays = [task.inputs[name] for task in batch]
            target = tuple(max(a.shape[axis] for a in arrays) for axis in range(1, arrays[0].ndim))
            padded = []
            for array in arrays:
                if array.shape[1:] != target:
                    fill = self._options.pad_value(_pad_kind(array.dtype))
                    out = np.full((array.shape[0],) + target, fill, dtype=array.dtype)
                    out[tuple(slice(0, n) for n in array.shape)] = array
                    array = out
                padded.append(array)
            merged[name] = np.concatenate(padded, axis=0)
        return merged

    def _process(self, batch: List[_Task]) -> None:
        try:
            if len(batch) == 1:
                self._record(batch[0].rows)
                self._run_alone(batch[0])
                return
            total = sum(task.rows for task in batch)
            try:
                outputs = self._servable.run_unbatched(self._signature, self._merge(batch))
            except ServingError:
                # One request's content can fail a whole batch (e.g. an op rejecting a
                # value): rerun alone so each request gets its own answer or error.
                for task in batch:
                    self._run_alone(task)
                return
            bad = [k for k, v in outputs.items() if np.ndim(v) == 0 or np.shape(v)[0] != total]
            if bad:
                logger.warning(
                    "outputs %s of %s/%s do not have one row per input row; serving it unbatched",
                    bad, self._servable.name, self._signature.name,
                )
                self._splittable = False
                for task in batch:
                    self._run_alone(task)
                return
            self._record(total)
            offset = 0
            for task in batch:
                task.outputs = {k: v[offset : offset + task.rows] for k, v in outputs.items()}
                offset += task.rows
        except BaseException as err:  # noqa: BLE001 - every waiting request must be released
            for task in batch:
                if task.outputs is None and task.error is None:
                    task.error = ServingError.from_exception(err)
        finally:
            self._finish(batch)

    def _run_alone(self, task: _Task) -> None:
        try:
            task.outputs = self._servable.run_unbatched(self._signature, task.inputs)
        except BaseException as err:  # noqa: BLE001
            task.error = ServingError.from_exception(err)

    def _finish(self, batch: List[_Task], error: Optional[BaseException] = None) -> None:
        for task in batch:
            if error is not None:
                task.error = error
            task.done.set()
        self._scheduler._slots.release()
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def _record(self, rows: int) -> None:
        if self._scheduler.metrics is not None:
            self._scheduler.metrics.record_batch(self._servable.name, self._signature.name, rows)
