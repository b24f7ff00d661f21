"""Layers without page-locked host memory are copied in chunks through reusable bounce buffers.

On CUDA a copy from pageable memory blocks the host and overlaps nothing; the engine stages such copies through a
few page-locked bounce buffers instead. The staging logic (chunks, reuse after the device has read a buffer) runs
on the simulated asynchronous device, where copies land late: a bounce buffer refilled too early corrupts the layer.
"""

from __future__ import annotations

import pytest
import torch
from families import VOCAB, build
from parity import assert_same_step, left_padded_batch, reference_and_streamed

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine import device, simulated
from hf_offload.engine.device import DeviceOps

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 4096  # layers of the tiny model are ~37 kB: about ten chunks each, through two buffers


@pytest.fixture
def simulate(monkeypatch):
    monkeypatch.setenv(simulated.ENVIRONMENT_VARIABLE, "11")
    monkeypatch.setattr(device, "BOUNCE_CHUNK_BYTES", CHUNK)


def test_staged_copy_delivers_every_byte():
    ops = DeviceOps(torch.device("cpu"), simulate_seed=3)
    ops.bounce_chunk_bytes = 1000
    source = torch.randint(0, 256, (10_500,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    target = torch.zeros_like(source)
    with ops.on_copy_stream():
        ops.copy_(target, source, non_blocking=False)
        ready = ops.record_event(ops.copy_stream)
    ops.wait_event(ready)
    assert torch.equal(target, source)
    assert ops.staged_bytes == source.numel()
    assert sum(b is not None for b in ops._bounces) == device.BOUNCE_BUFFERS  # reused, not one per chunk


def test_unpinned_store_is_staged_and_keeps_parity(simulate, caplog):
    with caplog.at_level("WARNING", logger="hf_offload"):
        reference, streamed = reference_and_streamed(
            build("llama"), OffloadConfig(device="cpu", prefetch=1, pin_memory=False)
        )
    assert caplog.text.count("are not in page-locked host memory (pin_memory=False)") == 1
    summary = hf_offload.summary(streamed)
    assert summary["unpinned_layers"] == [0, 1, 2, 3] and not summary["pinned"]
    batch = left_padded_batch(VOCAB)
    assert_same_step(reference, streamed, batch, seed=0)
    assert_same_step(reference, streamed, batch, seed=1)
    assert get_runtime(streamed).ops.staged_bytes >= hf_offload.stats(streamed)["bytes_to_device"] > 0


def test_without_the_wait_before_reusing_a_bounce_buffer_parity_fails(simulate, monkeypatch):
    monkeypatch.setattr(simulated, "DELAY_RANGE", (0.3, 0.3))  # copies land long after the next chunk is staged
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", pin_memory=False))
    monkeypatch.setattr(get_runtime(streamed).ops, "_host_wait", lambda event: None)
    with pytest.raises(AssertionError, match="are not close|relative gradient error"):
        assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    get_runtime(streamed).ops.synchronize()


def test_pinned_stores_are_not_staged(simulate, caplog):
    with caplog.at_level("WARNING", logger="hf_offload"):
        reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu"))
    assert "page-locked" not in caplog.text
    assert hf_offload.summary(streamed)["unpinned_layers"] == []
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert get_runtime(streamed).ops.staged_bytes == 0


def test_the_plain_cpu_stages_nothing(monkeypatch):
    monkeypatch.delenv(simulated.ENVIRONMENT_VARIABLE, raising=False)
    _, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", pin_memory=False))
    assert hf_offload.summary(streamed)["unpinned_layers"] == []
    assert not get_runtime(streamed).ops.stages_unpinned_copies


@pytest.mark.parametrize("pin_memory", [False, True])
def test_staged_prefetches_start_once_the_layer_is_enqueued(simulate, pin_memory):
    """Staging holds the host; started at acquire it would come before the layer's kernels are enqueued."""
    config = OffloadConfig(device="cpu", prefetch=1, pin_memory=pin_memory)
    _, streamed = reference_and_streamed(build("llama"), config)
    streamer = get_runtime(streamed).streamer
    events = []

    def spy(name):
        original = getattr(streamer, name)

        def call(index, *rest):
            events.append((name, index))
            return original(index, *rest)

        return call

    for name in ("acquire", "release", "_load"):
        setattr(streamer, name, spy(name))
    streamed.eval()
    with torch.no_grad():
        streamed(**left_padded_batch(VOCAB))
    for j in range(1, 4):  # what the streamer was doing when it started loading layer j
        before = [e for e in events[: events.index(("_load", j))] if e[0] != "_load"]
        # pinned: prefetched while layer j - 1 is acquired; staged: right after layer j - 1 is released
        assert before[-1] == ("acquire" if pin_memory else "release", j - 1), (j, before[-1])
    assert hf_offload.stats(streamed)["layer_reuses"] == 3  # layers 1..3 were found prefetched either way
