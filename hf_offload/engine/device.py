"""Everything that differs between the CPU and an accelerator, in one place.

torch's CPU build raises on streams, events and page-locked memory, so the engine never calls them directly: it
asks a `DeviceOps`. On the CPU the same packing, slot and binding code runs; only the asynchrony is absent
(copies complete immediately, events are no-ops), unless the simulated asynchronous device is on
(`HF_OFFLOAD_SIMULATE_ASYNC`, see simulated.py): then each copy stream is a worker thread whose copies land late,
and events are real synchronisation points.

Streams: the compute stream (the caller's current one), the copy stream (host->device: layer weights, and
offloaded activations coming back for backward) and the offload stream (device->host: activations saved for
backward, see activations.py), so that copies in both directions overlap each other and the compute.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import weakref

import torch

from .simulated import SimulatedAsync, simulation_seed

logger = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE

# Note: [Bounce buffers]
# A copy from pageable host memory cannot be asynchronous: CUDA stages it through its own small pinned buffer and
# the host waits until it is done, so nothing overlaps it. A layer whose host buffer could not be page-locked
# (registration failed, or pin_memory=False) is instead copied in chunks through a few page-locked bounce buffers
# of our own: the host copies a chunk into the next bounce buffer (after waiting, on that buffer's event, until the
# device has read its previous chunk) and enqueues an asynchronous copy from it on the copy stream. The host works
# at memory speed while the device copies and computes; with two buffers, the host fills one while the link drains
# the other.
BOUNCE_BUFFERS = 2
BOUNCE_CHUNK_BYTES = 8 << 20


def resolve_device(requested: torch.device | str | None) -> torch.device:
    """The device layers compute on: the requested one, else the current accelerator, else the CPU."""
    if requested is not None:
        device = torch.device(requested)
    elif torch.accelerator.is_available():
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")
    if device.type not in ("cpu", "meta"):
        _check_available(device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


def _check_available(device: torch.device) -> None:
    """Refuse a device this process does not have, before anything is built for it."""
    try:
        module = torch.get_device_module(device.type)
    except (RuntimeError, AttributeError, ValueError):
        module = None
    if device.type == "mps":
        available = torch.backends.mps.is_available()
        count = 1 if available else 0
    else:
        available = bool(module is not None and getattr(module, "is_available", lambda: False)())
        count = module.device_count() if available and hasattr(module, "device_count") else int(available)
    if not available:
        raise ValueError(
            f"`device` should be a device this process has, but the value passed is {str(device)!r} and no "
            f"{device.type} device is available here. Pass device=None (the accelerator if there is one, else the "
            "CPU) or 'cpu', or install a torch build for that device."
        )
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"`device` should be one of the {count} {device.type} device(s) of this process, but the value passed is "
            f"{str(device)!r}. Check CUDA_VISIBLE_DEVICES or pass another index."
        )


CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the device only reads the memory


class DeviceOps:
    """Streams, events, page-locking and RNG state for one compute device."""

    def __init__(self, device: torch.device, simulate_seed: int | None = None):
        """`simulate_seed`: on the CPU, run the simulated asynchronous device with this seed (default: from
        `HF_OFFLOAD_SIMULATE_ASYNC`, see `simulated.simulation_seed`)."""
        self.device = device
        self.is_cpu = device.type == "cpu"
        # The device's torch module (torch.cuda, torch.xpu, ...): they share the Stream/Event/stream() API.
        self._module = None if self.is_cpu else torch.get_device_module(device.type)
        seed = simulate_seed if simulate_seed is not None else simulation_seed() if self.is_cpu else None
        self.simulation = SimulatedAsync(seed) if self.is_cpu and seed is not None else None
        # comms stream: host->device layer copies run here, overlapping the compute stream's kernels.
        if self.simulation is not None:
            self.copy_stream = self.simulation.copy_stream
        else:
            self.copy_stream = None if self.is_cpu else self._module.Stream(device=device)
        # offload stream: device->host copies of activations (created on first use: most runs never offload)
        self._offload_stream = None
        # data_ptr -> finalizer that unregisters it; see `pin`.
        self._registered: dict[int, weakref.finalize] = {}
        self.readbacks = 0  # device-to-host reads the schedule waited for (see `read_to_host`)
        # Note: [Bounce buffers]
        self.bounce_chunk_bytes = BOUNCE_CHUNK_BYTES
        self._bounces: list[torch.Tensor | None] = [None] * BOUNCE_BUFFERS
        self._bounce_done: list[object] = [None] * BOUNCE_BUFFERS  # event: the device finished reading bounce k
        self._next_bounce = 0
        self.staged_bytes = 0  # bytes copied through bounce buffers

    # --- streams and events -------------------------------------------------------------------------------------
    def compute_stream(self):
        if self.simulation is not None:
            return self.simulation.compute_stream
        return None if self.is_cpu else self._module.current_stream(self.device)

    def on_copy_stream(self):
        """Context in which copies are enqueued on the copy stream (a no-op on the CPU)."""
        if self.simulation is not None:
            return self.simulation.stream(self.copy_stream)
        if self.is_cpu:
            return contextlib.nullcontext()
        return self._module.stream(self.copy_stream)

    @property
    def offload_stream(self):
        """The stream device->host copies of activations run on (None on the CPU)."""
        if self.simulation is not None:
            return self.simulation.offload_stream
        if self._offload_stream is None and not self.is_cpu:
            self._offload_stream = self._module.Stream(device=self.device)
        return self._offload_stream

    def on_stream(self, stream):
        """Context in which work is enqueued on `stream`, one of this device's streams (a no-op on the CPU)."""
        if self.simulation is not None:
            return self.simulation.stream(stream)
        if self.is_cpu or stream is None:
            return contextlib.nullcontext()
        return self._module.stream(stream)

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor on this device, allocated on the current stream, its values undefined.

        On the simulated device its values are NaN (integers: all bits set), as stale as uninitialised device
        memory can be: a read before the copy into it has landed cannot give the right numbers by chance.
        """
        with torch.inference_mode(False):
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        if self.simulation is not None and tensor.numel():
            tensor.view(-1).view(torch.uint8).fill_(255)  # all-ones bits: NaN in every floating dtype
        return tensor

    def keep_for_stream(self, tensor: torch.Tensor, stream) -> None:
        """Tell the caching allocator that `stream` uses `tensor`, allocated on another stream: when it is freed,
        its memory is not reused before the work `stream` has enqueued by then has completed (CUDA's
        `record_stream`; nothing to do on the CPU and the simulated device, whose memory is not reused early)."""
        if not self.is_cpu and stream is not None and tensor.device.type == self.device.type:
            tensor.record_stream(stream)

    def query(self, event) -> bool:
        """Whether `event` has completed, without waiting (True for the CPU's None events)."""
        return event is None or bool(event.query())

    def host_wait(self, event) -> None:
        """Block the calling thread until `event` has completed (a host synchronisation; None: nothing to wait)."""
        self._host_wait(event)

    def copy_(self, target: torch.Tensor, source: torch.Tensor, non_blocking: bool) -> None:
        """`target.copy_(source)` enqueued on the current stream.

        `non_blocking`: `source` is page-locked, the copy is asynchronous. Otherwise, on an accelerator (and the
        simulated device), a host byte buffer is staged through page-locked bounce buffers (see Note: [Bounce
        buffers]) so that the copy still overlaps compute.
        """
        if not non_blocking and self.stages_unpinned_copies and _is_byte_vector(source) and _is_byte_vector(target):
            self._staged_copy(target, source)
        else:
            self._copy_now(target, source, non_blocking)

    def all_gather_(self, output: torch.Tensor, chunk: int, rank: int, group) -> None:
        """Fill `output` (a byte vector of `chunk` x the group's size) in place with every rank's chunk, this rank's
        being `output[rank * chunk : (rank + 1) * chunk]`, enqueued on the current stream (see Note: [Partitioned
        fetch] in distributed.py). NCCL orders the collective after the current stream's work and that stream
        after the collective; gloo on the CPU runs it at once, the simulated device on the copy stream's worker."""
        gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor

        def run():
            data = output.data  # see SimulatedAsync.write_: the version is bumped where it is enqueued
            gather(data, data[rank * chunk : (rank + 1) * chunk], group=group)

        if self.simulation is not None:
            self.simulation.write_(output, run)
        else:
            gather(output, output[rank * chunk : (rank + 1) * chunk], group=group)

    @property
    def stages_unpinned_copies(self) -> bool:
        """Whether copies from pageable host memory go through bounce buffers (accelerators, simulated device)."""
        return not self.is_cpu or self.simulation is not None

    def _copy_now(self, target: torch.Tensor, source: torch.Tensor, non_blocking: bool) -> None:
        if self.simulation is not None:
            self.simulation.copy_(target, source)
        else:
            target.copy_(source, non_blocking=non_blocking)

    def _staged_copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """See Note: [Bounce buffers]."""
        chunk = self.bounce_chunk_bytes
        for start in range(0, source.numel(), chunk):
            k = self._next_bounce
            self._next_bounce = (k + 1) % BOUNCE_BUFFERS
            if self._bounces[k] is None:
                with torch.inference_mode(False):
                    self._bounces[k] = torch.empty(chunk, dtype=torch.uint8, pin_memory=not self.is_cpu)
            self._host_wait(self._bounce_done[k])  # the device has finished reading its previous contents
            n = min(chunk, source.numel() - start)
            bounce = self._bounces[k][:n]
            bounce.copy_(source[start : start + n])
            self._copy_now(target[start : start + n], bounce, non_blocking=True)
            self._bounce_done[k] = self._record_internal_event()
        self.staged_bytes += source.numel()

    def _host_wait(self, event) -> None:
        """Block the calling thread until `event` has completed."""
        if event is None:
            return
        if self.simulation is not None:
            self.simulation.host_wait(event)
        else:
            event.synchronize()

    def _record_internal_event(self):
        if self.simulation is not None:
            return self.simulation.record_event(claims_copies=False)
        return self.record_event(self._module.current_stream(self.device))

    def record_event(self, stream=None):
        """An event marking everything enqueued so far on `stream` (default: the current stream)."""
        if self.simulation is not None:
            return self.simulation.record_event(stream)
        if self.is_cpu:
            return None
        event = self._module.Event()
        event.record(stream if stream is not None else self.compute_stream())
        return event

    def wait_event(self, event, stream=None) -> None:
        """Make `stream` (default: the current stream) wait for `event` on the device, without a host sync."""
        if event is None:
            return
        if self.simulation is not None:
            self.simulation.wait_event(event, stream)
        elif not self.is_cpu:
            (stream if stream is not None else self.compute_stream()).wait_event(event)

    def synchronize(self) -> None:
        if self.simulation is not None:
            self.simulation.synchronize()
        elif not self.is_cpu:
            self._module.synchronize(self.device)

    def use_stream(self, stream):
        """Context in which this thread computes on `stream` (a compute stream of another thread) and this device.

        Streams and the current device are per thread: a helper thread starts on the default stream of device 0.
        """
        if self.is_cpu or stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self._module.device(self.device))
        stack.enter_context(self._module.stream(stream))
        return stack

    def free_memory(self) -> int | None:
        """Free bytes on the device (None on the CPU: host memory is counted by hostmem)."""
        if self.is_cpu:
            return None
        free, _ = self._module.mem_get_info(self.device)
        return int(free)

    # --- small transfers the schedule needs -------------------------------------------------------------------------
    def read_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (small, on this device) in host memory, once the compute stream has produced it.

        A host synchronisation: the caller needs the values to decide what to copy. Counted in `readbacks`, so
        tests can check how often the schedule waits for the device.
        """
        self.readbacks += 1
        if self.is_cpu:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = self.record_event()
        event.synchronize()
        return host

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A small host tensor on this device, without blocking the host (staged through page-locked memory)."""
        if self.is_cpu:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    # --- page-locked host memory ----------------------------------------------------------------------------------
    def pin(self, host: torch.Tensor) -> bool:
        """Page-lock `host` in place. Returns whether it is now pinned.

        The caching host allocator behind `pin_memory()` rounds every block up to a power of two, which can
        nearly double host memory for a store of many layer-sized buffers. Registering memory we already own
        costs exactly its size. CUDA locks whole pages, and a page can be registered only once: a buffer that
        shares a page with another registered buffer fails, so the store allocates page-aligned buffers
        (`store.page_aligned_empty`) and the whole pages they own are registered here.
        The registration is undone by `unpin`, or when `host` is garbage-collected: memory freed while still
        registered would stay locked until the process exits.
        """
        if self.simulation is not None:
            return True  # the simulated device takes its buffers as page-locked, as CUDA would
        if self.is_cpu or host.numel() == 0 or self.device.type != "cuda":
            return False
        ptr = host.data_ptr()
        size = host.numel() * host.element_size()
        storage = host.untyped_storage()
        storage_end = storage.data_ptr() + storage.nbytes()
        if ptr % PAGE_SIZE == 0:
            size = min(-(-size // PAGE_SIZE) * PAGE_SIZE, storage_end - ptr)
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))
        if err != 0:  # a read-only mapping (the node's shared host store) registers only as read-only
            _clear_pending_cuda_error(self.device)
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, CUDA_HOST_REGISTER_READ_ONLY))
        if err != 0:
            _clear_pending_cuda_error(self.device)
            # the runtime warns once, for all layers, and lists them in summary()
            logger.debug("cudaHostRegister failed (error %s); this layer's copies are staged", err)
            return False
        finalizer = weakref.finalize(host, _host_unregister, ptr)
        finalizer.atexit = False  # at exit the driver releases everything; CUDA may already be shutting down
        self._registered[ptr] = finalizer
        return True

    def unpin(self, host: torch.Tensor) -> None:
        finalizer = self._registered.pop(host.data_ptr(), None)
        if finalizer is not None:
            finalizer()  # unregisters once; the finalizer is dead afterwards

    # --- RNG state, for replaying dropout in the recompute ----------------------------------------------------------
    def get_rng_state(self):
        cpu_state = torch.get_rng_state()
        device_state = None if self.is_cpu else self._module.get_rng_state(self.device)
        return cpu_state, device_state

    @contextlib.contextmanager
    def replay_rng(self, state):
        """Run the body with the RNG state of `state`, leaving the caller's RNG untouched afterwards."""
        cpu_state, device_state = state
        devices = [] if self.is_cpu else [self.device.index]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if not self.is_cpu else "cuda"):
            torch.set_rng_state(cpu_state)
            if device_state is not None:
                self._module.set_rng_state(device_state, self.device)
            yield

    def memory_allocated_peak(self) -> int | None:
        if self.is_cpu:
            return None
        return self._module.max_memory_allocated(self.device)


def _is_byte_vector(tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.uint8 and tensor.dim() == 1 and tensor.is_contiguous()


def _host_unregister(ptr: int) -> None:
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != 0:
        _clear_pending_cuda_error(None)
        logger.warning("cudaHostUnregister failed (error %s)", err)


def _clear_pending_cuda_error(device: torch.device | None) -> None:
    """Consume the error a failed CUDA runtime call leaves pending in this thread.

    The CUDA runtime reports an error again from the next `cudaGetLastError`, which torch calls after every
    kernel launch: a failed cudaHostRegister would make some unrelated later kernel raise. torch exposes no
    `cudaGetLastError`; a tiny kernel launch runs torch's own check, which consumes the pending error.
    """
    with contextlib.suppress(RuntimeError):
        torch.empty(1, device=device if device is not None else "cuda").fill_(0)
