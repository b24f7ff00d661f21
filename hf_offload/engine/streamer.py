"""Device slots and the prefetch schedule: which layer's bytes are on the device, and which load next.

The device holds `prefetch + 1` slots, each one byte buffer as large as the largest layer, allocated once and
reused. Loading a layer is one contiguous copy of its host buffer into a slot, enqueued on the copy stream; the
compute stream waits on the slot's `ready` event before it reads, and the copy stream waits on the slot's
`freed` event (recorded after the last kernel that reads it) before it overwrites. No host synchronisation.

Schedule: acquiring layer i in direction d (+1 forward, -1 backward) starts loading i+d .. i+d*prefetch into
slots that are not in use and hold nothing in that window. Layers stay in their slot after release, so the last
layers of the forward are found again at the start of the backward (turnaround reuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .device import DeviceOps
from .store import HostStore


@dataclass
class StreamStats:
    """Counters since the last reset; `hf_offload.stats(model)` returns them as a dict."""

    bytes_to_device: int = 0  # host->device bytes of layer weights
    layer_loads: int = 0  # layer copies started
    layer_reuses: int = 0  # acquisitions served by a layer already in a slot (prefetched or turnaround)
    peak_resident_layers: int = 0  # most layers whose frozen weights were on the device at once
    experts_loaded: int = 0
    experts_skipped: int = 0
    bytes_to_host: int = 0  # device->host bytes of offloaded activations
    bytes_from_host_activations: int = 0  # host->device bytes of activations brought back for backward

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Slot:
    buffer: torch.Tensor
    layer: int | None = None  # whose bytes are here (or on their way)
    in_use: bool = False
    ready: object = None  # event: the copy into this slot has completed
    freed: object = None  # event: the last kernel reading this slot has completed
    last_used: int = 0
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # per layer: its parameters in this slot


class Streamer:
    def __init__(self, store: HostStore, ops: DeviceOps, prefetch: int):
        self.store = store
        self.ops = ops
        self.prefetch = prefetch
        self.stats = StreamStats()
        self._slots: list[Slot] = []
        self._clock = 0

    # --- public ------------------------------------------------------------------------------------------------
    def acquire(self, index: int, direction: int) -> None:
        """Make layer `index` usable on the compute stream and bind its parameters to its slot."""
        slot = self._slot_holding(index)
        if slot is None:
            slot = self._free_slot(protected=set())
            if slot is None:
                raise RuntimeError(
                    f"hf_offload: no free device slot to load layer {index} (all {len(self._slots)} in use). "
                    "Decoder layers must not call each other; please report this model."
                )
            self._load(index, slot)
        else:
            self.stats.layer_reuses += 1
        slot.in_use = True
        self._clock += 1
        slot.last_used = self._clock
        self.ops.wait_event(slot.ready)
        pack = self.store.packs[index]
        views = slot.views.get(index)
        if views is None:
            views = slot.views[index] = [t.view_in(slot.buffer) for t in pack.tensors]
        pack.bind(slot.buffer, views)
        self._prefetch_after(index, direction)

    def release(self, index: int) -> None:
        """The compute stream has enqueued all work reading layer `index`: rebind to host, mark the slot free."""
        slot = self._slot_holding(index)
        self.store.packs[index].bind_host()
        if slot is not None:
            slot.freed = self.ops.record_event()
            slot.in_use = False

    def invalidate(self) -> None:
        """Forget which layers the slots hold (their host weights may have changed); buffers are kept."""
        for slot in self._slots:
            if not slot.in_use:
                slot.layer = None

    def close(self) -> None:
        self.ops.synchronize()
        self._slots = []

    @property
    def slot_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self._slots)

    # --- internals -----------------------------------------------------------------------------------------------
    def _slot_holding(self, index: int) -> Slot | None:
        for slot in self._slots:
            if slot.layer == index:
                return slot
        return None

    def _free_slot(self, protected: set[int]) -> Slot | None:
        if len(self._slots) < self.prefetch + 1:
            buffer = torch.empty(self.store.max_layer_bytes, dtype=torch.uint8, device=self.ops.device)
            # The caching allocator may hand out memory that kernels already queued on the compute stream still
            # read (freed there, reusable in that stream's order). The copy stream must not write it before they
            # finish: the first load into the slot waits for this event like any later one waits for `freed`.
            self._slots.append(Slot(buffer=buffer, freed=self.ops.record_event()))
            return self._slots[-1]
        candidates = [s for s in self._slots if not s.in_use and s.layer not in protected]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.layer is not None, s.last_used))

    def _load(self, index: int, slot: Slot) -> None:
        pack = self.store.packs[index]
        copy_stream = self.ops.copy_stream
        with self.ops.on_copy_stream():
            self.ops.wait_event(slot.freed, copy_stream)
            slot.buffer[: pack.nbytes].copy_(pack.host, non_blocking=pack.pinned)
            slot.ready = self.ops.record_event(copy_stream)
        slot.layer = index
        self.stats.layer_loads += 1
        self.stats.bytes_to_device += pack.nbytes
        occupied = sum(s.layer is not None for s in self._slots)
        self.stats.peak_resident_layers = max(self.stats.peak_resident_layers, occupied)

    def _prefetch_after(self, index: int, direction: int) -> None:
        window = [index + direction * k for k in range(1, self.prefetch + 1)]
        window = [j for j in window if 0 <= j < len(self.store.packs)]
        protected = {index, *window}
        for j in window:
            if self._slot_holding(j) is None:
                slot = self._free_slot(protected)
                if slot is None:
                    return
                self._load(j, slot)
