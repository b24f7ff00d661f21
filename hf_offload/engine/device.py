"""Everything that differs between the CPU and an accelerator, in one place.

torch's CPU build raises on streams, events and page-locked memory, so the engine never calls them directly: it
asks a `DeviceOps`. On the CPU the same packing, slot and binding code runs; only the asynchrony is absent
(copies complete immediately, events are no-ops).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import weakref

import torch

logger = logging.getLogger(__name__)

PAGE_SIZE = mmap.PAGESIZE


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


class DeviceOps:
    """Streams, events, page-locking and RNG state for one compute device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cpu = device.type == "cpu"
        # The device's torch module (torch.cuda, torch.xpu, ...): they share the Stream/Event/stream() API.
        self._module = None if self.is_cpu else torch.get_device_module(device.type)
        # comms stream: host->device layer copies run here, overlapping the compute stream's kernels.
        self.copy_stream = None if self.is_cpu else self._module.Stream(device=device)
        # data_ptr -> finalizer that unregisters it; see `pin`.
        self._registered: dict[int, weakref.finalize] = {}

    # --- streams and events -------------------------------------------------------------------------------------
    def compute_stream(self):
        return None if self.is_cpu else self._module.current_stream(self.device)

    def on_copy_stream(self):
        """Context in which copies are enqueued on the copy stream (a no-op on the CPU)."""
        if self.is_cpu:
            return contextlib.nullcontext()
        return self._module.stream(self.copy_stream)

    def record_event(self, stream=None):
        """An event marking everything enqueued so far on `stream` (default: the current stream)."""
        if self.is_cpu:
            return None
        event = self._module.Event()
        event.record(stream if stream is not None else self.compute_stream())
        return event

    def wait_event(self, event, stream=None) -> None:
        """Make `stream` (default: the current stream) wait for `event` on the device, without a host sync."""
        if event is None or self.is_cpu:
            return
        (stream if stream is not None else self.compute_stream()).wait_event(event)

    def synchronize(self) -> None:
        if not self.is_cpu:
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
        if self.is_cpu or host.numel() == 0 or self.device.type != "cuda":
            return False
        ptr = host.data_ptr()
        size = host.numel() * host.element_size()
        storage = host.untyped_storage()
        storage_end = storage.data_ptr() + storage.nbytes()
        if ptr % PAGE_SIZE == 0:
            size = min(-(-size // PAGE_SIZE) * PAGE_SIZE, storage_end - ptr)
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))
        if err != 0:
            _clear_pending_cuda_error(self.device)
            logger.warning("cudaHostRegister failed (error %s); this layer's copies will be synchronous", err)
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
