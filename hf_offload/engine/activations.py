"""`offload_activations`: the inputs a streamed layer saves for its backward wait in page-locked host memory.

Note: [Offloaded activations]
A streamed layer saves only its boundary inputs for backward (the hidden state it was called with, and any other
input that needs a gradient); at long context they are the largest thing a training step keeps on the device
(layers x tokens x hidden). With `offload_activations` they go to host memory and come back for the layer's
backward, on copy streams, so the compute stream never waits for the link:

- forward, `to_host` (before the layer computes): the compute stream records an event after the work that produced
  the input; the offload stream waits for it and copies the input into a host buffer; its event `stored` marks the
  copy done. The device tensor stays referenced here until `stored` has completed (polled with `query`, no host
  sync): freed earlier, the caching allocator could hand its memory to a kernel while the copy still reads it.
  The copy overlaps the layer's own compute. (On CUDA the tensor is also marked used by the offload stream,
  `record_stream`, so that the caching allocator does not reuse it early even if the model frees it.)
- host buffers: page-aligned host memory of the exact size (`store.page_aligned_empty`), page-locked with
  `DeviceOps.pin` like the host store's buffers, not the caching host allocator's power-of-two blocks, and reused
  across steps: a buffer returns to the free list when autograd frees the tensor saved for backward (after the
  layer's backward, or when the graph is dropped), with the events of the last copies into and out of it; the
  next copy into it waits for them on the offload stream. A request takes the smallest free buffer large enough;
  when none is, the free ones (smaller: the sequences grew) are released, after a host wait for those events, and a
  new buffer of the exact size is made.
- backward: the streamer's prefetch of layer i-1 (in backward, at the acquisition of layer i) also calls
  `prefetch(i-1)`, which starts that layer's copies back on the copy stream, behind its weights: device memory is
  allocated on the compute stream (the copy stream waits for an event recorded after the allocation, since the
  allocator may hand out memory that kernels queued there still read), the copy stream waits for `stored` and
  copies; its event `ready` is what the compute stream waits for in `to_device`, on the device. A layer not
  prefetched (prefetch=0, the first layer of the backward) is fetched by `to_device` itself.

Tensors are saved for backward through autograd (`ctx.save_for_backward` of the host tensor), so autograd decides
when they die, as for its own saved tensors (retain_graph included: a second backward fetches them again). The
records here never hold the saved host tensor, only its buffer, so that a graph kept alive after its backward (a
`loss` variable) does not keep buffers from the free list.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from ..units import format_bytes
from . import hostmem
from .device import DeviceOps
from .store import Region, page_aligned_empty

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Saved:
    """One tensor saved for backward, in host memory."""

    region: Region  # its dtype and shape at offset 0 of `buffer`
    buffer: torch.Tensor  # the host buffer (uint8) it occupies the start of
    stored: object  # event: the device->host copy into `buffer` has completed
    source: torch.Tensor | None  # the device tensor, referenced until `stored` has completed
    last_read: object = None  # event: the last host->device copy from `buffer` has completed

    @property
    def nbytes(self) -> int:
        return self.region.nbytes

    def host(self) -> torch.Tensor:
        return self.region.view_in(self.buffer)


@dataclass(eq=False)
class OffloadedCall:
    """The tensors one call of one streamed layer saved for its backward (what `to_host` returns with them)."""

    layer: int
    saved: list[_Saved]
    alive: int = 0  # saved host tensors autograd still holds
    on_device: list[torch.Tensor] | None = None  # copies on their way to the device (prefetched or fetched)
    ready: object = None  # event: those copies have completed
    released: bool = field(default=False)


class ActivationOffload:
    """Host buffers, copies and the backward prefetch of offloaded activations. See Note: [Offloaded activations]."""

    def __init__(self, ops: DeviceOps, streamer, check_host_memory: bool = True):
        self.ops = ops
        self._streamer = streamer  # its `stats` (replaced by reset_stats) count bytes_to_host and back
        self.check_host_memory = check_host_memory  # see `_check_host_memory`
        # (buffer, events of the last copies into and out of it): a buffer is free once autograd lets go of its
        # tensor, which can be before those copies have run (a graph dropped right after its forward)
        self._free: list[tuple[torch.Tensor, tuple]] = []
        self._in_flight: list[_Saved] = []  # device->host copies whose device tensor is still referenced
        self._calls: dict[int, list[OffloadedCall]] = {}  # per layer, in forward order: calls whose tensors live
        self.buffer_bytes = 0  # host bytes of all buffers made and not released (in use or free)
        self.unpinned_buffers = 0  # buffers whose page-locking failed (their copies are synchronous)
        self._warned_unpinned = False

    # --- forward ---------------------------------------------------------------------------------------------------
    def to_host(self, tensors: list[torch.Tensor], layer: int) -> tuple[list[torch.Tensor], OffloadedCall]:
        """Start copying `tensors` (inputs layer `layer` saves for backward) to host memory.

        Args:
            tensors: device tensors, as the layer is called with them.
            layer: the layer's index.

        Returns:
            The host tensors to save for backward (their values are complete once the copies have run: read them
            only through `to_device`), and the call's record, to hand to `to_device` in backward.
        """
        self._retire_copies()
        call = OffloadedCall(layer=layer, saved=[])
        sources = [tensor.detach().contiguous() for tensor in tensors]  # a strided one is copied on the compute stream
        produced = self.ops.record_event()  # after the compute-stream work that wrote `sources`
        stream = self.ops.offload_stream
        hosts = []
        for source in sources:
            region = Region(offset=0, dtype=source.dtype, shape=tuple(source.shape))
            buffer, pending = self._take(region.nbytes)
            host = region.view_in(buffer)
            with self.ops.on_stream(stream):
                self.ops.wait_event(produced, stream)
                for event in pending:  # the last copies into and out of this buffer are done with it
                    self.ops.wait_event(event, stream)
                self.ops.copy_(host, source, non_blocking=True)
                stored = self.ops.record_event(stream)
            self.ops.keep_for_stream(source, stream)  # also if the model frees it: see the Note
            saved = _Saved(region=region, buffer=buffer, stored=stored, source=source)
            self._in_flight.append(saved)
            call.saved.append(saved)
            weakref.finalize(host, self._release, call, saved)
            call.alive += 1
            hosts.append(host)
            self._streamer.stats.bytes_to_host += region.nbytes
        if call.saved:  # released when its host tensors are; a call with none has nothing to bring back
            self._calls.setdefault(layer, []).append(call)
        return hosts, call

    # --- backward --------------------------------------------------------------------------------------------------
    def prefetch(self, layer: int) -> None:
        """Start copying back the newest saved tensors of `layer` that are neither on the device nor on their way."""
        for call in reversed(self._calls.get(layer, ())):
            if call.on_device is None:
                self._fetch(call)
                return

    def to_device(self, call: OffloadedCall) -> list[torch.Tensor]:
        """The saved tensors of `call` on the device, usable on the compute stream (which waits for their copy).

        Fetched now unless `prefetch` started it. Called once per backward of the call.
        """
        self._retire_copies()
        if call.on_device is None:
            self._fetch(call)
        self.ops.wait_event(call.ready)  # on the device: the host does not wait
        tensors, call.on_device = call.on_device, None
        return tensors

    def _fetch(self, call: OffloadedCall) -> None:
        tensors = [self.ops.empty(saved.region.shape, saved.region.dtype) for saved in call.saved]
        allocated = self.ops.record_event()  # see the Note: the memory may be what queued kernels still read
        stream = self.ops.copy_stream
        with self.ops.on_stream(stream):
            self.ops.wait_event(allocated, stream)
            for saved, tensor in zip(call.saved, tensors):
                self.ops.wait_event(saved.stored, stream)
                self.ops.copy_(tensor, saved.host(), non_blocking=True)
                self._streamer.stats.bytes_from_host_activations += saved.nbytes
            call.ready = self.ops.record_event(stream)
        for saved in call.saved:
            saved.last_read = call.ready
        call.on_device = tensors

    # --- buffers ---------------------------------------------------------------------------------------------------
    def _take(self, nbytes: int) -> tuple[torch.Tensor, tuple]:
        """A free host buffer of at least `nbytes` (the smallest), or a new one of exactly `nbytes`."""
        fitting = [k for k, (buffer, _) in enumerate(self._free) if buffer.numel() >= nbytes]
        if fitting:
            return self._free.pop(min(fitting, key=lambda k: self._free[k][0].numel()))
        self._drop_free_buffers()  # all smaller than needed now: the sequences grew
        if self.check_host_memory:
            self._check_host_memory(nbytes)
        buffer = page_aligned_empty(nbytes)
        if not self.ops.pin(buffer) and self.ops.stages_unpinned_copies and nbytes:
            self.unpinned_buffers += 1
            self._warn_unpinned()
        self.buffer_bytes += nbytes
        return buffer, ()

    def _check_host_memory(self, nbytes: int) -> None:
        """Raise `HostMemoryError` when a new buffer of `nbytes` would not fit in available host memory.

        The allocation itself would succeed (the kernel overcommits) and the process be OOM-killed while the copy
        fills it, losing the run; a clear error in the first step loses only that step.
        """
        available = hostmem.available_bytes()
        if available is None or nbytes <= available:
            return
        held = self.buffer_bytes
        raise hostmem.HostMemoryError(
            f"hf_offload: offload_activations needs {format_bytes(nbytes)} more host memory for a hidden state saved "
            f"for backward ({format_bytes(held)} of such buffers exist already), but only {format_bytes(available)} "
            "is available (MemAvailable, or the cgroup limit). A step holds every layer's saved hidden state in host "
            "memory: use shorter sequences or smaller batches, turn offload_activations off, or pass "
            "check_host_memory=False to skip this check. `hf-offload plan --offload_activations` shows the host "
            "memory a sequence length needs.",
            nbytes,
            available,
        )

    def _release(self, call: OffloadedCall, saved: _Saved) -> None:
        """Autograd freed a saved host tensor: its buffer is free again (a weakref finalizer)."""
        # The device tensor stays with `_in_flight` until its copy has landed (dropping it here could be too early).
        self._free.append((saved.buffer, (saved.stored, saved.last_read)))
        call.alive -= 1
        if call.alive == 0 and not call.released:
            call.released = True
            for tensor in call.on_device or ():  # prefetched for a backward that will not come: freed now, its
                self.ops.keep_for_stream(tensor, self.ops.copy_stream)  # memory waits for the copy still writing it
            call.on_device = None
            calls = self._calls.get(call.layer, [])
            if call in calls:
                calls.remove(call)
            if not calls:
                self._calls.pop(call.layer, None)

    def _retire_copies(self) -> None:
        """Drop the device tensors whose copy to the host has completed (without waiting for the others)."""
        pending = []
        for saved in self._in_flight:
            if self.ops.query(saved.stored):
                saved.source = None
            else:
                pending.append(saved)
        self._in_flight = pending

    def _drop_free_buffers(self) -> None:
        for buffer, events in self._free:
            for event in events:  # a copy may still use it: unlocking and unmapping its pages under it is undefined
                self.ops.host_wait(event)
            self.ops.unpin(buffer)
            self.buffer_bytes -= buffer.numel()
        self._free = []

    def _warn_unpinned(self) -> None:
        if self._warned_unpinned:
            return
        self._warned_unpinned = True
        logger.warning(
            "hf_offload: offload_activations could not page-lock a host buffer for activations on %s: their copies "
            "are synchronous (the host waits for each one). Check the limit on locked memory (ulimit -l) and free "
            "host memory.",
            self.ops.device,
        )

    def close(self) -> None:
        """Release the free buffers (the caller has synchronized the device); buffers still saved by a graph are
        released with it."""
        self._in_flight = []
        self._drop_free_buffers()
        self._calls = {}
