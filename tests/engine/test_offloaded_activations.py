"""`offload_activations` (engine/activations.py): saved inputs go to exact-size page-locked host buffers on the
offload stream and come back with the layer's weights, checked on the simulated asynchronous device.

The simulated device runs each copy stream on its own worker thread, copies late, so a missing wait shows: the
teeth tests remove one wait each and see the step come out wrong.
"""

from __future__ import annotations

import copy
import gc
import mmap

import pytest
import torch
from families import VOCAB, build
from parity import assert_step_matches, left_padded_batch, reference_and_streamed, train_step, with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine import simulated
from hf_offload.engine.activations import ActivationOffload
from hf_offload.engine.device import DeviceOps
from hf_offload.engine.simulated import ENVIRONMENT_VARIABLE, SimulatedAsync

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 11
LAYERS = 4  # tests/families.py builds 4 decoder layers, hidden size 32
HIDDEN = 32


@pytest.fixture
def simulate(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(SEED))


def streamed_pair(family: str = "llama", **options):
    """The ordinary LoRA model and two streamed copies of it: with and without offload_activations."""
    base = build(family)
    config = OffloadConfig(device="cpu", offload_activations=True, **options)
    reference, offloaded = reference_and_streamed(base, config)
    plain = with_lora(copy.deepcopy(base))
    plain.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(plain, OffloadConfig(device="cpu", **options))
    return reference, offloaded, plain


def assert_bitwise_equal(step, other) -> None:
    loss, grads = step
    other_loss, other_grads = other
    assert torch.equal(loss, other_loss), f"loss {loss.item()!r} != {other_loss.item()!r}"
    assert grads.keys() == other_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, other_grads[name]), f"{name}: the gradients differ"


def hidden_bytes(batch) -> int:
    return batch["input_ids"].numel() * HIDDEN * 4  # (B, T, hidden) fp32: one layer's boundary input


# --- parity on the simulated device ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_offloaded_step_equals_the_ordinary_and_the_resident_streamed_step(simulate, family, prefetch):
    """fp32 on the simulated device, dropout on, two steps (the second reuses the host buffers): bit for bit the
    ordinary step and the same streamed step without offloading."""
    reference, offloaded, plain = streamed_pair(family, prefetch=prefetch)
    assert get_runtime(offloaded).ops.simulation is not None
    batch = left_padded_batch(VOCAB)
    for seed in (0, 1):
        hf_offload.reset_stats(offloaded)
        step = train_step(offloaded, batch, seed)
        assert_bitwise_equal(step, train_step(reference, batch, seed))
        assert_bitwise_equal(step, train_step(plain, batch, seed))
        stats = hf_offload.stats(offloaded)
        assert stats["bytes_to_host"] == LAYERS * hidden_bytes(batch)
        assert stats["bytes_from_host_activations"] == LAYERS * hidden_bytes(batch)
    assert get_runtime(offloaded).ops.simulation.copies > 0


def test_staged_layers_prefetch_their_activations_at_release(simulate, monkeypatch):
    """pin_memory=False: the layers' copies are staged and prefetches start at release; the activations come along."""
    reference, offloaded, _ = streamed_pair(pin_memory=False)
    assert get_runtime(offloaded).unpinned_layers() == list(range(LAYERS))
    arrived = []
    to_device = ActivationOffload.to_device
    monkeypatch.setattr(
        ActivationOffload,
        "to_device",
        lambda self, call: arrived.append(call.on_device is not None) or to_device(self, call),
    )
    batch = left_padded_batch(VOCAB)
    assert_bitwise_equal(train_step(offloaded, batch), train_step(reference, batch))
    assert arrived == [False, True, True, True]  # all but the backward's first layer were prefetched
    assert hf_offload.stats(offloaded)["bytes_from_host_activations"] == LAYERS * hidden_bytes(batch)


def test_host_buffers_are_exact_page_aligned_pinned_and_reused(simulate, monkeypatch):
    pinned = []
    pin = DeviceOps.pin
    monkeypatch.setattr(DeviceOps, "pin", lambda self, host: pinned.append(host) or pin(self, host))
    _, offloaded, _ = streamed_pair()
    pinned.clear()  # the host store's layer buffers
    batch = left_padded_batch(VOCAB)
    train_step(offloaded, batch)
    activations = get_runtime(offloaded).activations
    size = hidden_bytes(batch)
    assert len(pinned) == LAYERS, "one buffer per saved boundary state, each page-locked through DeviceOps.pin"
    assert all(buffer.numel() == size for buffer in pinned), "exact size, not a power of two"
    assert all(buffer.data_ptr() % mmap.PAGESIZE == 0 for buffer in pinned)
    assert activations.buffer_bytes == LAYERS * size
    summary = hf_offload.summary(offloaded)
    assert summary["offload_activations"] and summary["activation_host_bytes"] == LAYERS * size
    assert summary["activation_unpinned_buffers"] == 0
    assert sorted(b.data_ptr() for b, _ in activations._free) == sorted(b.data_ptr() for b in pinned)
    for _ in range(2):
        train_step(offloaded, batch)
    assert len(pinned) == LAYERS, "later steps reuse the buffers"
    assert activations.buffer_bytes == LAYERS * size


def test_longer_sequences_replace_the_buffers_with_exact_larger_ones(simulate):
    _, offloaded, plain = streamed_pair()
    activations = get_runtime(offloaded).activations
    short, long = left_padded_batch(VOCAB, length=8), left_padded_batch(VOCAB, length=16)
    train_step(offloaded, short)
    assert activations.buffer_bytes == LAYERS * hidden_bytes(short)
    assert_bitwise_equal(train_step(offloaded, long), train_step(plain, long))
    assert activations.buffer_bytes == LAYERS * hidden_bytes(long)
    assert_bitwise_equal(train_step(offloaded, short), train_step(plain, short))  # in the larger buffers
    assert activations.buffer_bytes == LAYERS * hidden_bytes(long)


def test_the_backward_prefetch_brings_each_layer_back_behind_its_weights(simulate, monkeypatch):
    """prefetch=1: layer i's activations are started by the streamer's prefetch at the acquisition of layer i+1;
    only the first layer of the backward (the last one) is fetched on demand."""
    _, offloaded, _ = streamed_pair(prefetch=1)
    runtime = get_runtime(offloaded)
    order = []
    prefetch, to_device = runtime.streamer.backward_prefetch, ActivationOffload.to_device

    def spy_prefetch(layer):
        order.append(("prefetch", layer, None))
        return prefetch(layer)

    def spy_to_device(self, call):
        order.append(("to_device", call.layer, call.on_device is not None))
        return to_device(self, call)

    monkeypatch.setattr(runtime.streamer, "backward_prefetch", spy_prefetch)
    monkeypatch.setattr(ActivationOffload, "to_device", spy_to_device)
    train_step(offloaded, left_padded_batch(VOCAB))
    assert [o[:2] for o in order] == [
        ("to_device", 3),
        ("prefetch", 2),
        ("to_device", 2),
        ("prefetch", 1),
        ("to_device", 1),
        ("prefetch", 0),
        ("to_device", 0),
    ]
    arrived_prefetched = {layer: ahead for kind, layer, ahead in order if kind == "to_device"}
    assert arrived_prefetched == {3: False, 2: True, 1: True, 0: True}


def test_the_device_tensor_stays_referenced_until_its_copy_has_landed(simulate, monkeypatch):
    monkeypatch.setattr(simulated, "DELAY_RANGE", (0.3, 0.3))
    ops = DeviceOps(torch.device("cpu"))
    activations = ActivationOffload(ops, type("S", (), {"stats": type("C", (), {"bytes_to_host": 0})()})())
    source = torch.arange(6.0).view(2, 3)
    (host,), call = activations.to_host([source], layer=0)
    kept = call.saved[0]
    assert kept.source is not None and kept.source.data_ptr() == source.data_ptr()
    activations._retire_copies()
    assert kept.source is not None, "the copy has not landed, yet the device tensor was dropped"
    ops.synchronize()
    activations._retire_copies()
    assert kept.source is None
    assert torch.equal(host, source)


def test_a_second_backward_with_retain_graph_fetches_again(simulate):
    reference, offloaded, _ = streamed_pair()
    batch = left_padded_batch(VOCAB)
    grads = []
    for model in (reference, offloaded):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model(**batch).loss
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)
    assert hf_offload.stats(offloaded)["bytes_from_host_activations"] == 2 * LAYERS * hidden_bytes(batch)


def test_a_graph_dropped_without_backward_gives_its_buffers_back(simulate):
    _, offloaded, _ = streamed_pair()
    activations = get_runtime(offloaded).activations
    offloaded.train()
    batch = left_padded_batch(VOCAB)
    loss = offloaded(**batch).loss
    assert not activations._free and activations._calls
    del loss
    # The simulated copy streams hold each pending copy's tensors until the copy lands (a GPU holds no Python
    # reference): let them land, as a later step's first wait would.
    get_runtime(offloaded).ops.synchronize()
    gc.collect()  # the model's output objects may sit in reference cycles
    assert len(activations._free) == LAYERS and not activations._calls


def test_disable_releases_the_free_buffers(simulate):
    _, offloaded, _ = streamed_pair()
    activations = get_runtime(offloaded).activations
    train_step(offloaded, left_padded_batch(VOCAB))
    hf_offload.disable_layer_streaming(offloaded)
    assert activations.buffer_bytes == 0 and not activations._free


def test_offload_without_simulation_on_the_plain_cpu(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    reference, offloaded, plain = streamed_pair()
    assert get_runtime(offloaded).ops.simulation is None
    batch = left_padded_batch(VOCAB)
    assert_bitwise_equal(train_step(offloaded, batch), train_step(plain, batch))


def test_full_finetune_with_offloaded_activations_trains_like_ordinary(simulate):
    """Full fine-tuning under the simulated device: three optimizer steps with gradient accumulation."""
    from test_full_finetune import assert_trains_like_ordinary

    _, streamed = assert_trains_like_ordinary(build("llama"), offload_activations=True)
    assert hf_offload.stats(streamed)["bytes_to_host"] > 0


def test_routed_moe_with_offloaded_activations(simulate):
    from moe_families import VOCAB as MOE_VOCAB
    from moe_families import build as build_moe
    from moe_families import with_expert_lora

    base = build_moe("qwen3_moe")
    batch = {k: v[:2, -5:] for k, v in left_padded_batch(MOE_VOCAB).items()}
    reference = with_expert_lora(copy.deepcopy(base))
    reference_step = train_step(reference, batch)
    streamed = with_expert_lora(copy.deepcopy(base))
    streamed.load_state_dict(reference.state_dict())
    config = OffloadConfig(device="cpu", expert_fetch="routed", offload_activations=True)
    hf_offload.enable_layer_streaming(streamed, config)
    for _ in range(2):
        assert_step_matches(reference_step, streamed, batch)
    assert hf_offload.stats(streamed)["bytes_from_host_activations"] > 0


# --- the simulator's second copy stream -----------------------------------------------------------------------------
def test_a_copy_stream_waiting_for_the_offload_stream_reads_what_it_wrote():
    sim = SimulatedAsync(seed=SEED, delay_range=(0.3, 0.3))
    device, host, back = torch.arange(4.0), torch.zeros(4), torch.zeros(4)
    with sim.stream(sim.offload_stream):
        sim.copy_(host, device)
        stored = sim.record_event()
    with sim.stream(sim.copy_stream):
        sim.wait_event(stored)
        sim.copy_(back, host)
        ready = sim.record_event()
    sim.wait_event(ready)
    assert torch.equal(back, device)


def test_without_that_wait_the_copy_reads_the_stale_host_buffer():
    sim = SimulatedAsync(seed=SEED, delay_range=(0.3, 0.3))
    device, host, back = torch.arange(4.0), torch.zeros(4), torch.full((4,), -1.0)
    with sim.stream(sim.offload_stream):
        sim.copy_(host, device)
    with sim.stream(sim.copy_stream):
        sim.copy_(back, host)
        ready = sim.record_event()
    sim.wait_event(ready)
    assert torch.equal(back, torch.zeros(4))
    sim.synchronize()


def test_fresh_device_memory_of_the_simulated_device_is_nan(simulate):
    ops = DeviceOps(torch.device("cpu"))
    assert ops.empty((2, 3), torch.float32).isnan().all()
    assert ops.empty((4,), torch.bfloat16).isnan().all()


# --- teeth: remove one wait and the simulation catches it ---------------------------------------------------------
def _activation_events(runtime, monkeypatch) -> tuple[set, set]:
    """Events of the activation copies, as they are made: (ready: host->device done, stored: device->host done)."""
    ready, stored = set(), set()
    fetch, to_host = ActivationOffload._fetch, ActivationOffload.to_host

    def spy_fetch(self, call):
        fetch(self, call)
        ready.add(id(call.ready))

    def spy_to_host(self, tensors, layer):
        hosts, call = to_host(self, tensors, layer)
        stored.update(id(saved.stored) for saved in call.saved)
        return hosts, call

    monkeypatch.setattr(ActivationOffload, "_fetch", spy_fetch)
    monkeypatch.setattr(ActivationOffload, "to_host", spy_to_host)
    return ready, stored


@pytest.mark.parametrize("removed", ["none", "compute waits for the copy back", "copy back waits for the copy out"])
def test_removing_a_wait_of_the_activation_copies_breaks_the_step(simulate, monkeypatch, removed):
    monkeypatch.setattr(simulated, "DELAY_RANGE", (0.3, 0.3))  # every copy lands long after it is enqueued
    reference, offloaded, _ = streamed_pair(prefetch=1)
    runtime = get_runtime(offloaded)
    ops = runtime.ops
    ready, stored = _activation_events(runtime, monkeypatch)
    wait_event = ops.wait_event

    def without_one_wait(event, stream=None):
        if removed == "compute waits for the copy back" and stream is None and id(event) in ready:
            return
        if removed == "copy back waits for the copy out" and stream is ops.copy_stream and id(event) in stored:
            return
        wait_event(event, stream)

    monkeypatch.setattr(ops, "wait_event", without_one_wait)
    batch = left_padded_batch(VOCAB)
    if removed == "none":
        assert_step_matches(train_step(reference, batch), offloaded, batch)
        assert ready and stored
    else:
        with pytest.raises(AssertionError, match="are not close|relative gradient error"):
            assert_step_matches(train_step(reference, batch), offloaded, batch)
    ops.synchronize()


def test_a_buffer_that_would_not_fit_in_host_memory_stops_with_a_clear_error(simulate, monkeypatch):
    from hf_offload.engine import hostmem

    _, offloaded, _ = streamed_pair()
    batch = left_padded_batch(VOCAB)
    monkeypatch.setattr(hostmem, "available_bytes", lambda: hidden_bytes(batch) - 1)
    offloaded.train()
    with pytest.raises(hostmem.HostMemoryError, match="offload_activations needs .* more host memory"):
        offloaded(**batch).loss.backward()
    get_runtime(offloaded).ops.synchronize()


def test_check_host_memory_false_skips_that_check(simulate, monkeypatch):
    from hf_offload.engine import hostmem

    reference, offloaded, _ = streamed_pair(check_host_memory=False)
    monkeypatch.setattr(hostmem, "available_bytes", lambda: 0)
    batch = left_padded_batch(VOCAB)
    assert_bitwise_equal(train_step(offloaded, batch), train_step(reference, batch))


def test_a_strided_saved_input_round_trips(simulate):
    """A saved input that is not contiguous is made contiguous before the compute-stream event the copy waits for."""
    ops = DeviceOps(torch.device("cpu"))
    stats = type("S", (), {"stats": type("C", (), {"bytes_to_host": 0, "bytes_from_host_activations": 0})()})()
    activations = ActivationOffload(ops, stats)
    source = torch.arange(24.0).view(4, 6).t()  # strided
    (host,), call = activations.to_host([source], layer=0)
    (back,) = activations.to_device(call)
    assert torch.equal(back, source) and back.is_contiguous()
