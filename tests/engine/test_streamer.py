"""The streamer's schedule: which layers load when, slot reuse, and the turnaround."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_offload.engine.device import DeviceOps
from hf_offload.engine.store import HostStore
from hf_offload.engine.streamer import Streamer


def _streamer(n_layers: int, prefetch: int) -> tuple[Streamer, nn.ModuleList]:
    layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(n_layers)])
    for p in layers.parameters():
        p.requires_grad = False
    store = HostStore.build(layers, pin=lambda t: False, show_progress=False)
    return Streamer(store, DeviceOps(torch.device("cpu")), prefetch), layers


def _loads(streamer: Streamer, order: list[int], direction: int) -> list[int]:
    """Layer loads (in order) while acquiring and releasing `order` in `direction`."""
    loaded: list[int] = []
    original = streamer._load

    def spy(index, slot, *rest):
        loaded.append(index)
        original(index, slot, *rest)

    streamer._load = spy
    for i in order:
        streamer.acquire(i, direction)
        streamer.release(i)
    streamer._load = original
    return loaded


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_forward_then_backward_schedule(prefetch):
    n = 6
    streamer, _ = _streamer(n, prefetch)
    assert _loads(streamer, list(range(n)), +1) == list(range(n))  # each layer once, prefetched ahead
    window = prefetch + 1
    backward = _loads(streamer, list(reversed(range(n))), -1)
    # the last `window` layers are still on the device at the turnaround: not loaded again
    assert backward == list(reversed(range(n - window)))
    assert streamer.stats.peak_resident_layers == window
    assert len(streamer._slots) == window


def test_bound_weights_live_in_a_slot_only_while_acquired():
    streamer, layers = _streamer(3, prefetch=1)
    host_ptr = layers[1].weight.untyped_storage().data_ptr()
    streamer.acquire(1, +1)
    slot_ptrs = {s.buffer.untyped_storage().data_ptr() for s in streamer._slots}
    assert layers[1].weight.untyped_storage().data_ptr() in slot_ptrs
    assert torch.equal(layers[1].weight, streamer.store.packs[1].tensors[0].view_in(streamer.store.packs[1].host))
    streamer.release(1)
    assert layers[1].weight.untyped_storage().data_ptr() == host_ptr


def test_invalidate_forces_a_reload():
    streamer, layers = _streamer(3, prefetch=1)
    _loads(streamer, [0, 1, 2], +1)
    with torch.no_grad():
        layers[2].weight.add_(1.0)  # a change of the host weights (load_state_dict, merge_adapter)
    streamer.invalidate()
    assert _loads(streamer, [2], -1) == [2, 1]
    streamer.acquire(2, -1)
    assert torch.equal(layers[2].weight, streamer.store.packs[2].tensors[0].view_in(streamer.store.packs[2].host))
    streamer.release(2)
