"""Everything that differs between the CPU and an accelerator, in one place.

torch's CPU build raises on streams, events and page-locked memory, so the engine never calls them directly: it
asks a `DeviceOps`. On the CPU the same packing, slot and binding code runs; only the asynchrony is absent
(copies complete immediately, events are no-ops).
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def resolve_device(requested: torch.device | str | None) -> torch.device:
    """The device layers compute on: the requested one, else the current accelerator, else the CPU."""
    if requested is not None:
        device = torch.device(requested)
    elif torch.accelerator.is_available():
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


class DeviceOps:
    """Streams, events, page-locking and RNG state for one compute device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.is_cpu = device.type == "cpu"
        # The device's torch module (torch.cuda, torch.xpu, ...): they share the Stream/Event/stream() API.
        self._module = None if self.is_cpu else torch.get_device_module(device.type)
        # comms stream: host->device layer copies run here, overlapping the compute stream's kernels.
        self.copy_stream = None if self.is_cpu else self._module.Stream(device=device)

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

    # --- page-locked host memory ----------------------------------------------------------------------------------
    def pin(self, host: torch.Tensor) -> bool:
        """Page-lock `host` in place. Returns whether it is now pinned.

        The caching host allocator behind `pin_memory()` rounds every block up to a power of two, which can
        nearly double host memory for a store of many layer-sized buffers. Registering memory we already own
        costs exactly its size.
        """
        if self.is_cpu or host.numel() == 0:
            return False
        if self.device.type == "cuda":
            err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
            if int(err) != 0:
                logger.warning("cudaHostRegister failed (error %s); this layer's copies will be synchronous", err)
                return False
            return True
        return False

    def unpin(self, host: torch.Tensor) -> None:
        if self.device.type == "cuda" and host.numel():
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())

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
