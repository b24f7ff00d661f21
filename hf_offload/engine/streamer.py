"""Device slots and the prefetch schedule: which layer's bytes are on the device, and which load next.

The device holds `prefetch + 1` slots, each one byte buffer as large as the largest layer, allocated once and
reused. Loading a layer is one contiguous copy of its host buffer into a slot, enqueued on the copy stream; the
compute stream waits on the slot's `ready` event before it reads, and the copy stream waits on the slot's
`freed` event (recorded after the last kernel that reads it) before it overwrites. No host synchronisation.
With partitioned fetch the copy is this rank's chunk of the buffer, followed on the same stream by an all-gather of
the chunks of the node's ranks (Note: [Partitioned fetch] in distributed.py).

Encoded (nf4/int8) weights, linear weights and expert tensors alike: their parts arrive in the slot like any
bytes; on acquire they are decoded on the compute stream into one dense scratch buffer (allocated once, as large as
the dense form of the largest layer's encoded weights) and the parameters are bound there (a routed layer's expert
tensors: see Note: [Routed expert fetch]). One scratch is enough because one layer computes at a time; it is not
decoded again when the same layer comes back before anything else used it (the turnaround).

Schedule: acquiring layer i in direction d (+1 forward, -1 backward) starts loading i+d .. i+d*prefetch into
slots that are not in use and hold nothing in that window. Layers stay in their slot after release, so the last
layers of the forward are found again at the start of the backward (turnaround reuse).

Note: [Routed expert fetch]
With `routed=True`, a layer with expert regions (see store.py) is loaded without its experts: only the prefix
`[0, base_nbytes)`. When its experts module runs, `load_experts` copies the experts the routing picked into the
first positions of each expert tensor's place in the slot, in ascending expert order, and returns [k, ...] views of
exactly those experts: stale bytes of the slot are never part of any tensor. Expert tensors stored encoded
(nf4/int8, expert by expert) work the same way on their encoded parts: only the routed experts' encoded bytes are
copied, into the first positions of each part, and just those positions are decoded into the first positions of
the tensor's [num_experts, out, in] scratch region; the views handed out are [k, out, in] views of the decoded
scratch. The scratch remembers how many positions of each region it has decoded for the layer it holds, so a
request decodes only what it appended, and a whole-layer load (which holds every expert) decodes them all on
acquire. A second request in the same acquisition only appends (views handed out earlier stay valid for
autograd). The set is remembered per layer, so the backward prefetches base + the same experts; the recompute then
finds them in place. In the forward, the next layer's prefetch waits until this layer's experts are enqueued, so the
experts it waits for are copied first.

Note: [Slot validity]
A layer stays in its slot after release and is found there again by the next acquisition: the backward finds the
last layers of the forward, and the next forward finds the first layers the backward left. That is only right
while the layer's host bytes have not changed since they were copied. Every in-place write to them bumps a torch
version counter: the host buffer's (writes through views of it) or a packed parameter's (`load_state_dict`,
`param.copy_`, an optimizer step, in-place ops under no_grad). The slot remembers the sum of those counters when
the layer leaves it (release); an acquisition or prefetch that finds a different sum reloads the layer. Bumps
inside the layer's window are not changes of the host bytes: the parameters point into the slot then, and
`torch.nn.utils.parametrize` round trips (peft's `target_parameters` wrappers, the routed experts call) bump the
counters without writing. Writes through `.data` bypass the counters (peft's merge and unmerge do this): the
runtime calls `invalidate` after those explicitly.

Note: [Allocated outside inference mode]
Slots, the decode scratch and the views bound to parameters are made on first use and kept. The first use may be
under `torch.inference_mode()` (a sanity eval, a pipeline); tensors made there are inference tensors, which no
later training step could write into. So they are always made with inference mode off.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from .device import DeviceOps
from .distributed import FetchPartition
from .store import EncodedExperts, HostStore

# Note: [Whole-layer fallback]
# A routed layer's experts are copied once its experts call knows the routing: nothing overlaps that copy. When
# each of the layer's last WHOLE_LAYER_WINDOW routed calls (two training steps: forward and recompute) used at least
# WHOLE_LAYER_SHARE of the experts of each region, the forward loads (and prefetches) the layer whole instead, as
# expert_fetch="all" would: a few more bytes, but copied ahead, behind the previous layer's compute. The experts call
# then finds every expert in place (positions are the expert ids). The backward keeps the forward's exact set.
WHOLE_LAYER_WINDOW = 4
WHOLE_LAYER_SHARE = 0.75


@dataclass
class StreamStats:
    """Counters since the last reset; `hf_offload.stats(model)` returns them as a dict."""

    bytes_to_device: int = 0  # host->device bytes of layer weights (partitioned fetch: this rank's chunks)
    bytes_from_peers: int = 0  # partitioned fetch: layer bytes the node's other ranks all-gathered into this slot
    layer_loads: int = 0  # layer copies started
    layer_reuses: int = 0  # acquisitions served by a layer already in a slot (prefetched or turnaround)
    peak_resident_layers: int = 0  # most layers whose frozen weights were on the device at once
    experts_loaded: int = 0  # expert copies (per experts module): every expert of a whole-layer load, else routed ones
    experts_skipped: int = 0  # experts of a routed layer not copied when its experts were fetched
    bytes_to_host: int = 0  # device->host bytes of offloaded activations
    bytes_from_host_activations: int = 0  # host->device bytes of activations brought back for backward
    host_readbacks: int = 0  # device->host reads the host waited for (routed fetch: one per experts call)
    routed_whole_loads: int = 0  # routed layers prefetched whole because their recent calls used most experts

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
    experts: dict[int, list[int]] = field(default_factory=dict)  # routed layer: per region, experts here, in order
    deferred_prefetch: int | None = None  # direction of a prefetch waiting for this layer's experts (forward)
    host_version: int = -1  # the layer's host version at its copy, then at each release (Note: [Slot validity])


class Streamer:
    def __init__(
        self,
        store: HostStore,
        ops: DeviceOps,
        prefetch: int,
        routed: bool = False,
        partition: FetchPartition | None = None,
    ):
        self.store = store
        self.ops = ops
        self.prefetch = prefetch
        self.routed = routed  # see Note: [Routed expert fetch]
        self.partition = partition  # see Note: [Partitioned fetch] in distributed.py
        # Staged copies (Note: [Bounce buffers] in device.py) hold the host until the device has read each chunk:
        # started at acquire, before the layer's kernels are enqueued, the device would idle meanwhile. So with any
        # unpinned layer, prefetches start at release, once the layer's work is enqueued, and overlap it.
        self._prefetch_at_release = ops.stages_unpinned_copies and any(not p.pinned for p in store.packs)
        self.stats = StreamStats()
        self._slots: list[Slot] = []
        self._clock = 0
        self._expert_plans: dict[int, dict[int, list[int]]] = {}  # per layer: the experts its last call used
        self._expert_hits: dict[tuple[int, int], collections.deque] = {}  # (layer, region): shares of recent calls
        self._scratch: torch.Tensor | None = None  # dense form of the computing layer's encoded weights
        self._scratch_layer: int | None = None  # whose decoded weights the scratch holds
        self._scratch_experts: dict[int, int] = {}  # routed: per expert region, positions decoded in the scratch
        # Called with each layer the backward prefetches, after its weights are enqueued: the runtime starts that
        # layer's offloaded activations on the copy stream (Note: [Offloaded activations] in activations.py).
        self.backward_prefetch: Callable[[int], None] | None = None

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
            self._load(index, slot, self._expert_plans.get(index) if direction < 0 else None)
        else:
            self.stats.layer_reuses += 1
        slot.in_use = True
        self._clock += 1
        slot.last_used = self._clock
        self.ops.wait_event(slot.ready)
        pack = self.store.packs[index]
        views = slot.views.get(index)
        if views is None:
            # A routed layer's expert tensors stay bound to the host until `load_experts` binds the routed ones.
            expert_ids = pack.expert_tensor_ids if self._is_routed(pack) else set()
            with torch.inference_mode(False):  # kept across calls: see Note: [Allocated outside inference mode]
                views = [t.view_in(pack.host if id(t) in expert_ids else slot.buffer) for t in pack.tensors]
            slot.views[index] = views
        pack.bind(slot.buffer, views)
        if pack.encoded:
            self._materialize(index, slot)
        if self._prefetch_at_release or (
            self._is_routed(pack) and direction > 0 and not self._holds_all_experts(slot, pack)
        ):
            slot.deferred_prefetch = direction
        else:
            self._prefetch_after(index, direction)

    def load_experts(self, index: int, region: int, experts: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """Make `experts` (ids) of expert region `region` of the acquired layer `index` usable on the device.

        Returns the experts present in the slot in their order there (a superset of `experts`) and, per tensor of
        the region, a [len(order), ...] view of them. See Note: [Routed expert fetch].
        """
        slot = self._slot_holding(index)
        if slot is None or not slot.in_use:
            raise RuntimeError(f"hf_offload: experts of layer {index} were requested while the layer is not acquired")
        pack = self.store.packs[index]
        expert_region = pack.experts[region]
        present = slot.experts.get(region)
        if present is None:
            present = slot.experts[region] = []
            self.stats.experts_skipped += expert_region.num_experts
        missing = sorted(set(experts).difference(present))
        if missing:
            with self.ops.on_copy_stream():
                self._copy_experts(pack, slot, region, missing, start=len(present))
                ready = self.ops.record_event(self.ops.copy_stream)
            self.ops.wait_event(ready)
            present.extend(missing)
            self.stats.experts_skipped -= len(missing)
            if pack.encoded:
                self._decode_experts(index, slot)
        self._expert_plans.setdefault(index, {})[region] = sorted(experts)
        hits = self._expert_hits.setdefault((index, region), collections.deque(maxlen=WHOLE_LAYER_WINDOW))
        hits.append(len(set(experts)) / expert_region.num_experts)
        if slot.deferred_prefetch is not None:
            direction, slot.deferred_prefetch = slot.deferred_prefetch, None
            self._prefetch_after(index, direction)
        views = [expert_region.view_first(t, slot.buffer, len(present), self._scratch) for t in expert_region.tensors]
        return list(present), views

    def read_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` read back to the host through the device ops (a host sync), counted in the stats."""
        self.stats.host_readbacks += 1
        return self.ops.read_to_host(tensor)

    def release(self, index: int) -> None:
        """The compute stream has enqueued all work reading layer `index`: rebind to host, mark the slot free."""
        slot = self._slot_holding(index)
        self.store.packs[index].bind_host()
        if slot is not None:
            slot.freed = self.ops.record_event()
            slot.in_use = False
            slot.host_version = self.host_version(index)  # bumps inside the window are not host changes
            if slot.deferred_prefetch is not None:  # staged copies, or a layer that ran no experts
                direction, slot.deferred_prefetch = slot.deferred_prefetch, None
                self._prefetch_after(index, direction)

    def host_version(self, index: int) -> int:
        """The sum of the version counters of layer `index`'s host bytes (see Note: [Slot validity])."""
        pack = self.store.packs[index]
        return pack.host._version + sum(t.param._version for t in pack.tensors)

    def invalidate(self) -> None:
        """Forget which layers the slots hold (their host weights may have changed); buffers are kept."""
        for slot in self._slots:
            if not slot.in_use:
                slot.layer = None
                slot.experts = {}
        if not any(slot.in_use for slot in self._slots):
            self._scratch_layer = None

    def forget(self, layers: list[int]) -> None:
        """The host bytes of `layers` changed (an optimizer step on trainable streamed weights): slots holding them
        must be loaded again before use. Slots in use keep their layer until released."""
        changed = set(layers)
        for slot in self._slots:
            if slot.layer in changed and not slot.in_use:
                slot.layer = None
                slot.experts = {}
        if self._scratch_layer in changed:
            self._scratch_layer = None

    def close(self) -> None:
        self.ops.synchronize()
        self._slots = []
        self._scratch = None
        self._scratch_layer = None

    @property
    def slot_bytes(self) -> int:
        return sum(s.buffer.numel() for s in self._slots)

    @property
    def scratch_bytes(self) -> int:
        return 0 if self._scratch is None else self._scratch.numel()

    # --- internals -----------------------------------------------------------------------------------------------
    def _slot_holding(self, index: int) -> Slot | None:
        """The slot holding layer `index`'s current host bytes (see Note: [Slot validity]), if any."""
        for slot in self._slots:
            if slot.layer == index:
                if not slot.in_use and slot.host_version != self.host_version(index):
                    slot.layer, slot.experts = None, {}  # stale: the host bytes changed since the copy
                    if self._scratch_layer == index:
                        self._scratch_layer = None
                    return None
                return slot
        return None

    def _free_slot(self, protected: set[int]) -> Slot | None:
        if len(self._slots) < self.prefetch + 1:
            spare = self.partition.size if self.partition is not None else 0  # the last chunk's overhang
            with torch.inference_mode(False):  # see Note: [Allocated outside inference mode]
                buffer = torch.empty(self.store.max_layer_bytes + spare, dtype=torch.uint8, device=self.ops.device)
            # The caching allocator may hand out memory that kernels already queued on the compute stream still
            # read (freed there, reusable in that stream's order). The copy stream must not write it before they
            # finish: the first load into the slot waits for this event like any later one waits for `freed`.
            self._slots.append(Slot(buffer=buffer, freed=self.ops.record_event()))
            return self._slots[-1]
        candidates = [s for s in self._slots if not s.in_use and s.layer not in protected]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.layer is not None, s.last_used))

    def _materialize(self, index: int, slot: Slot) -> None:
        busy = [s.layer for s in self._slots if s.in_use and s is not slot]
        if busy:
            raise RuntimeError(
                f"hf_offload: decoder layer {index} started while layer {busy[0]} is still computing; quantized base "
                "weights decode into one scratch buffer, so decoder layers must not call each other. Please report "
                "this model."
            )
        if self._scratch is None:
            with torch.inference_mode(False):  # see Note: [Allocated outside inference mode]
                self._scratch = torch.empty(self.store.max_scratch_bytes, dtype=torch.uint8, device=self.ops.device)
        # Ordered after the previous layer's kernels on the compute stream, so overwriting the scratch is safe.
        pack, decode = self.store.packs[index], self._scratch_layer != index
        routed = self._is_routed(pack)
        pack.materialize(slot.buffer, self._scratch, decode=decode, experts=not routed)
        self._scratch_layer = index
        if decode:
            self._scratch_experts = {}
        if routed:  # the experts loaded with the layer (the backward's planned set, or all of a whole load)
            self._decode_experts(index, slot)

    def _decode_experts(self, index: int, slot: Slot) -> None:
        """Decode the encoded experts `slot` holds beyond those already in the scratch (Note: [Routed expert
        fetch]); on the compute stream, after their copy."""
        pack = self.store.packs[index]
        for region, expert_region in enumerate(pack.experts):
            present = slot.experts.get(region, [])
            done = self._scratch_experts.get(region, 0)
            if len(present) > done:
                for tensor in expert_region.tensors:
                    if isinstance(tensor, EncodedExperts):
                        tensor.decode_positions(slot.buffer, self._scratch, present[done:], start=done)
                self._scratch_experts[region] = len(present)

    def _is_routed(self, pack) -> bool:
        return self.routed and bool(pack.experts)

    def _mostly_hit(self, index: int) -> bool:
        """Whether the last routed calls of layer `index` each used most experts of every region."""
        regions = [self._expert_hits.get((index, r)) for r in range(len(self.store.packs[index].experts))]
        return all(h is not None and len(h) == WHOLE_LAYER_WINDOW and min(h) >= WHOLE_LAYER_SHARE for h in regions)

    @staticmethod
    def _holds_all_experts(slot: Slot, pack) -> bool:
        return all(len(slot.experts.get(r, ())) == region.num_experts for r, region in enumerate(pack.experts))

    def _load(self, index: int, slot: Slot, expert_plan: dict[int, list[int]] | None = None) -> None:
        """Copy layer `index` into `slot`: whole, or for a routed layer its base and the planned experts."""
        pack = self.store.packs[index]
        routed = self._is_routed(pack)
        if routed and expert_plan is None and self._mostly_hit(index):  # see Note: [Whole-layer fallback]
            routed = False
            self.stats.routed_whole_loads += 1
        nbytes = pack.base_nbytes if routed else pack.nbytes
        copy_stream = self.ops.copy_stream
        slot.experts = {} if routed else {r: list(range(region.num_experts)) for r, region in enumerate(pack.experts)}
        with self.ops.on_copy_stream():
            self.ops.wait_event(slot.freed, copy_stream)
            # Partitioned fetch gathers the part every rank loads alike: a routed layer's base, else the layer.
            gathered = 0 if self.partition is None else pack.base_nbytes if self._is_routed(pack) else nbytes
            if gathered:
                self._gather(pack, slot, gathered)
            if nbytes > gathered:
                self.ops.copy_(slot.buffer[gathered:nbytes], pack.host[gathered:nbytes], non_blocking=pack.pinned)
            for region, experts in (expert_plan or {}).items() if routed else ():
                self._copy_experts(pack, slot, region, experts, start=0)
                slot.experts[region] = list(experts)
                self.stats.experts_skipped += pack.experts[region].num_experts - len(experts)
            slot.ready = self.ops.record_event(copy_stream)
        slot.layer = index
        slot.host_version = self.host_version(index)
        slot.deferred_prefetch = None
        if self._scratch_layer == index:  # decoded from bytes that may have changed
            self._scratch_layer = None
        self.stats.layer_loads += 1
        self.stats.bytes_to_device += nbytes - gathered
        if not routed:
            self.stats.experts_loaded += sum(region.num_experts for region in pack.experts)
        occupied = sum(s.layer is not None for s in self._slots)
        self.stats.peak_resident_layers = max(self.stats.peak_resident_layers, occupied)

    def _gather(self, pack, slot: Slot, nbytes: int) -> None:
        """Enqueue this rank's chunk of the first `nbytes` of layer `pack` into `slot` and the all-gather of every
        rank's chunk (see Note: [Partitioned fetch] in distributed.py)."""
        partition = self.partition
        chunk = partition.chunk(nbytes)
        start = partition.rank * chunk
        end = min(start + chunk, nbytes)
        if end > start:
            self.ops.copy_(slot.buffer[start:end], pack.host[start:end], non_blocking=pack.pinned)
        self.ops.all_gather_(slot.buffer[: chunk * partition.size], chunk, partition.rank, partition.group)
        self.stats.bytes_to_device += max(end - start, 0)
        self.stats.bytes_from_peers += nbytes - max(end - start, 0)

    def _copy_experts(self, pack, slot: Slot, region: int, experts: list[int], start: int) -> None:
        """Enqueue (on the current stream) copies of `experts` into slot positions start, start+1, ... of `region`.

        Runs of consecutive expert ids become one copy per tensor.
        """
        expert_region = pack.experts[region]
        runs: list[tuple[int, int, int]] = []  # (first expert, first position, count)
        for position, expert in enumerate(experts, start):
            if runs and expert == runs[-1][0] + runs[-1][2] and position == runs[-1][1] + runs[-1][2]:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((expert, position, 1))
        for offset, size in (s for tensor in expert_region.tensors for s in expert_region.slices(tensor)):
            for expert, position, count in runs:
                source = offset + expert * size
                target = offset + position * size
                self.ops.copy_(
                    slot.buffer[target : target + count * size],
                    pack.host[source : source + count * size],
                    non_blocking=pack.pinned,
                )
        self.stats.experts_loaded += len(experts)
        self.stats.bytes_to_device += len(experts) * expert_region.expert_nbytes

    def _prefetch_after(self, index: int, direction: int) -> None:
        window = [index + direction * k for k in range(1, self.prefetch + 1)]
        window = [j for j in window if 0 <= j < len(self.store.packs)]
        protected = {index, *window}
        loading = True
        for j in window:
            if loading and self._slot_holding(j) is None:
                slot = self._free_slot(protected)
                if slot is None:
                    loading = False  # no slot for the rest of the window; their activations still come
                else:
                    self._load(j, slot, self._expert_plans.get(j) if direction < 0 else None)
            if direction < 0 and self.backward_prefetch is not None:
                self.backward_prefetch(j)  # offloaded activations, behind the layer's weights
