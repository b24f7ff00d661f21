"""A simulated asynchronous device for the CPU: the CUDA schedule's copy streams on worker threads, copies late.

With `HF_OFFLOAD_SIMULATE_ASYNC` set (see `simulation_seed`), `DeviceOps` on the CPU runs everything the CUDA path
enqueues on a copy stream (the host->device `copy_stream`, the device->host `offload_stream` of offloaded
activations) on that stream's own worker thread, each copy after a random delay, and its events are real
synchronisation points. The compute stream stays the calling thread, so what it enqueues has completed when the
call returns. What a missing or misplaced wait does on a GPU then happens here too:

- a read of a slot before waiting for the event of the copy into it sees the slot's previous bytes (wrong numbers,
  which the parity tests catch): copies are held back by their delay unless someone waits for them; the same holds
  between the two copy streams (a host->device copy of an offloaded activation that did not wait for the event of
  its device->host copy reads a host buffer not yet written), and fresh device memory (`DeviceOps.empty`) is
  filled with NaN, so a read before the copy into it lands cannot pass by chance;
- a copy into a slot that was not ordered after the last read of its previous contents (the copy stream did not
  wait for the compute stream's `freed` event) raises `SimulatedHazard` when it is enqueued;
- an error in the worker is raised in the calling thread at its next wait or synchronisation.

Note: [Simulated stream order]
The compute stream keeps a clock: each event it records gets the next number, and is complete at once (the work
before it ran synchronously). The copy stream remembers the highest compute event it has waited for. A compute-side
wait on a copy event marks the bytes that event's copies wrote as read from the current compute clock on, until the
compute stream records its next event at the earliest. A later copy overwriting those bytes must have waited for
a compute event recorded after that read started; if not, on a GPU it could overwrite them while kernels still
read them. The copies an event covers are those enqueued on the copy stream since its previous event, which is how
the streamer uses the copy stream (one event after each layer's or expert set's copies). Each copy stream keeps
its own queue, worker, batch and compute clock; a copy stream waiting for another copy stream's event runs, in its
own order, a task that blocks until that event completes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
import weakref
from dataclasses import dataclass, field

import torch

ENVIRONMENT_VARIABLE = "HF_OFFLOAD_SIMULATE_ASYNC"
DEFAULT_SEED = 0
# Delay of each copy on the worker, in seconds, drawn uniformly; a wait for the copy cuts it short.
DELAY_RANGE = (0.0, 0.005)


class SimulatedHazard(RuntimeError):
    """A copy the simulated device found unordered with respect to reads of the bytes it overwrites."""


def simulation_seed() -> int | None:
    """The seed of the simulated asynchronous device, or None when it is off.

    `HF_OFFLOAD_SIMULATE_ASYNC` unset, empty or 0: off; 1: on with the default seed; any other integer: on with that
    seed.

    Raises:
        ValueError: the variable is set to something that is not an integer.
    """
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if value in ("", "0"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(
            f"`{ENVIRONMENT_VARIABLE}` should be an integer (0: off, 1: on, any other: on with that seed), but the "
            f"value passed is {value!r}. Unset it or set it to 1."
        ) from None
    return DEFAULT_SEED if number == 1 else number


@dataclass(eq=False)
class SimulatedEvent:
    stream: object
    number: int  # compute events: the compute clock; copy events: the position in the copy stream's queue
    done: threading.Event = field(default_factory=threading.Event)
    writes: list[tuple[int, int]] = field(default_factory=list)  # copy events: the byte ranges their copies wrote

    def query(self) -> bool:
        return self.done.is_set()


class SimulatedStream:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"SimulatedStream({self.name})"


class _CopyQueue:
    """One copy stream of the simulated device: its worker, its enqueue count, its open batch, its compute clock."""

    def __init__(self, rng: random.Random, delay_range: tuple[float, float]):
        self.worker = _Worker(rng, delay_range)
        self.enqueued = 0  # tasks enqueued
        self.batch: list[tuple[int, int]] = []  # byte ranges copied since the stream's last event
        self.copy_seen = 0  # the highest compute event this stream has waited for (in enqueue order)
        self.used = False  # whether any copy was enqueued on it


class SimulatedAsync:
    """The compute stream (the calling thread) and the copy streams (one worker thread each) of the simulated
    device."""

    def __init__(self, seed: int, delay_range: tuple[float, float] | None = None):
        self.seed = seed
        self.delay_range = delay_range if delay_range is not None else DELAY_RANGE
        self.compute_stream = SimulatedStream("compute")
        self.copy_stream = SimulatedStream("copy")
        self.offload_stream = SimulatedStream("offload")
        self._current = threading.local()
        self._clock = 0  # compute events recorded so far
        self._queues = {
            self.copy_stream: _CopyQueue(random.Random(seed), self.delay_range),
            self.offload_stream: _CopyQueue(random.Random(seed + 1), self.delay_range),
        }
        self._worker = self._queues[self.copy_stream].worker
        self._reads: list[tuple[int, int, int]] = []  # (start, end, compute clock at which a read began)
        self.copies = 0  # copies run on the workers
        for copy_queue in self._queues.values():
            weakref.finalize(self, copy_queue.worker.stop)

    # --- streams -----------------------------------------------------------------------------------------------
    def current_stream(self) -> SimulatedStream:
        return getattr(self._current, "stream", self.compute_stream)

    @contextlib.contextmanager
    def stream(self, stream: SimulatedStream):
        previous = self.current_stream()
        self._current.stream = stream
        try:
            yield
        finally:
            self._current.stream = previous

    # --- events --------------------------------------------------------------------------------------------------
    def record_event(self, stream: SimulatedStream | None = None, claims_copies: bool = True) -> SimulatedEvent:
        """`claims_copies=False`: an event only the host waits on (bounce buffers): the copies since the stream's
        previous event stay with its next one (see Note: [Simulated stream order])."""
        stream = stream if stream is not None else self.current_stream()
        if stream is self.compute_stream:
            self._clock += 1
            event = SimulatedEvent(stream, self._clock)
            event.done.set()  # the compute stream is the calling thread: its work so far is done
            return event
        copy_queue = self._queues[stream]
        copy_queue.enqueued += 1
        event = SimulatedEvent(stream, copy_queue.enqueued, writes=copy_queue.batch if claims_copies else [])
        if claims_copies:
            copy_queue.batch = []
        copy_queue.worker.put(copy_queue.enqueued, event.done.set, delayed=False)
        return event

    def wait_event(self, event: SimulatedEvent, stream: SimulatedStream | None = None) -> None:
        stream = stream if stream is not None else self.current_stream()
        if event.stream is stream:
            return  # in stream order already
        if stream is not self.compute_stream:
            copy_queue = self._queues[stream]
            if event.stream is self.compute_stream:  # a compute event: complete when recorded
                copy_queue.copy_seen = max(copy_queue.copy_seen, event.number)
                return
            # another copy stream's event: this stream goes on once it has completed
            source = self._queues[event.stream].worker

            def wait_for_other_stream():
                source.demand(event.number)
                event.done.wait()

            copy_queue.enqueued += 1
            copy_queue.worker.put(copy_queue.enqueued, wait_for_other_stream, delayed=False)
            return
        self.host_wait(event)
        self._reads.extend((start, end, self._clock) for start, end in event.writes)

    def host_wait(self, event: SimulatedEvent) -> None:
        """Block the calling thread until `event` has completed (`torch.cuda.Event.synchronize`)."""
        if event.stream is self.compute_stream:
            return
        worker = self._queues[event.stream].worker
        worker.demand(event.number)
        event.done.wait()
        worker.raise_pending()

    def synchronize(self) -> None:
        for copy_queue in self._queues.values():
            copy_queue.worker.demand(copy_queue.enqueued)
        for copy_queue in self._queues.values():
            done = threading.Event()
            copy_queue.enqueued += 1
            copy_queue.worker.demand(copy_queue.enqueued)
            copy_queue.worker.put(copy_queue.enqueued, done.set, delayed=False)
            done.wait()
            copy_queue.worker.raise_pending()
        self._reads = []  # a device-wide synchronisation orders every later copy after every read so far

    # --- copies --------------------------------------------------------------------------------------------------
    def copy_(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """`target.copy_(source)` in the current stream's order: later, on its worker, for a copy stream."""
        if self.current_stream() is self.compute_stream:
            target.copy_(source)
            return

        def run():
            target.data.copy_(source)  # `.data`: the version was bumped at enqueue
            self.copies += 1

        self.write_(target, run)

    def write_(self, target: torch.Tensor, task) -> None:
        """Run `task`, which writes `target` (and nothing else the device reads), in the current stream's order:
        at once on the compute stream, later on its worker for a copy stream (a copy, or a collective such as the
        all-gather of partitioned fetch). `task` must write through `.data`: the version is bumped at enqueue."""
        stream = self.current_stream()
        if stream is self.compute_stream:
            torch.autograd.graph.increment_version(target)
            task()
            return
        copy_queue = self._queues[stream]
        start = target.data_ptr()
        end = start + target.numel() * target.element_size()
        self._check_ordered_after_reads(copy_queue, start, end)
        copy_queue.batch.append((start, end))
        copy_queue.used = True
        copy_queue.enqueued += 1
        # A CUDA copy_ bumps the target's version counter when it is enqueued, not when it lands: autograd's check
        # of saved tensors (saved right after the copy is enqueued) must see the same here.
        torch.autograd.graph.increment_version(target)
        copy_queue.worker.put(copy_queue.enqueued, task, delayed=True)

    def _check_ordered_after_reads(self, copy_queue: _CopyQueue, start: int, end: int) -> None:
        # Note: [Simulated stream order]. A read that began at clock c ends at compute event c + 1 at the earliest.
        for read_start, read_end, clock in self._reads:
            if read_start < end and start < read_end and copy_queue.copy_seen <= clock:
                raise SimulatedHazard(
                    "hf_offload simulated device: a copy on the copy stream overwrites device bytes that the compute "
                    f"stream read after its event {clock}, but the copy stream only waited for compute events up to "
                    f"{copy_queue.copy_seen}: on a GPU it could overwrite them while kernels still read them."
                )
        # reads every copy stream that copies is ordered after are over; forget them
        seen = min(q.copy_seen for q in (*self._queues.values(), copy_queue) if q.used or q is copy_queue)
        self._reads = [r for r in self._reads if r[2] >= seen]


class _Worker:
    """One thread running the copy stream's tasks in order, each copy after a random delay unless demanded."""

    def __init__(self, rng: random.Random, delay_range: tuple[float, float]):
        self._rng = rng
        self._delay_range = delay_range
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._demanded = 0
        self._condition = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hf_offload-simulated-copy-stream", daemon=True)
        self._thread.start()

    def put(self, number: int, task, delayed: bool) -> None:
        self._queue.put((number, task, delayed))

    def demand(self, number: int) -> None:
        """Someone waits for task `number`: run it and everything before it without further delay."""
        with self._condition:
            self._demanded = max(self._demanded, number)
            self._condition.notify()

    def raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            number, task, delayed = item
            if delayed:
                delay = self._rng.uniform(*self._delay_range)
                with self._condition:
                    self._condition.wait_for(lambda number=number: self._demanded >= number, timeout=delay)
            try:
                task()
            except BaseException as error:  # raised in the calling thread at its next wait
                self._error = error
