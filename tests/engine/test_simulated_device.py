"""The simulated asynchronous device (engine/simulated.py): the CUDA schedule, with late copies, on the CPU.

A representative slice of the parity suite runs under it (dense, prefetch 0/1/2, activation offload, eval then
train, nf4, routed MoE, nf4 experts), and the teeth tests show that it catches a missing wait: parity fails, or a
hazard is raised.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from families import VOCAB, build
from moe_families import VOCAB as MOE_VOCAB
from moe_families import build as build_moe
from moe_families import with_expert_lora
from parity import (
    assert_same_step,
    assert_step_matches,
    eval_logits,
    left_padded_batch,
    reference_and_streamed,
    train_step,
)

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine import simulated
from hf_offload.engine.device import DeviceOps
from hf_offload.engine.simulated import ENVIRONMENT_VARIABLE, SimulatedAsync, SimulatedHazard, simulation_seed

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 7


@pytest.fixture
def simulate(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(SEED))


def assert_simulated(model):
    runtime = get_runtime(model)
    assert hf_offload.summary(model)["simulated_async_seed"] == SEED
    assert runtime.ops.simulation.copies > 0, "no copy ran on the simulated copy stream"


# --- the switch ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "seed"), [(None, None), ("", None), ("0", None), ("1", 0), ("42", 42)])
def test_environment_variable_switches_the_simulation(monkeypatch, value, seed):
    if value is None:
        monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, value)
    assert simulation_seed() == seed
    ops = DeviceOps(torch.device("cpu"))
    assert (ops.simulation is None) == (seed is None)


def test_a_bad_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(ValueError, match=f"`{ENVIRONMENT_VARIABLE}` should be an integer"):
        simulation_seed()


def test_summary_says_when_the_simulation_is_off(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    _, streamed = reference_and_streamed(build("llama"))
    assert hf_offload.summary(streamed)["simulated_async_seed"] is None


# --- the mechanism ------------------------------------------------------------------------------------------------
def test_copies_land_late_and_events_are_synchronisation_points():
    sim = SimulatedAsync(seed=SEED, delay_range=(0.5, 0.5))
    target, source = torch.zeros(8), torch.arange(8.0)
    with sim.stream(sim.copy_stream):
        sim.copy_(target, source)
        ready = sim.record_event()
    assert not ready.query() and torch.equal(target, torch.zeros(8)), "the copy landed at once"
    sim.wait_event(ready)  # the compute stream waits: the copy is demanded and lands
    assert ready.query() and torch.equal(target, source)
    assert sim.copies == 1


def test_copies_run_on_another_thread_in_stream_order():
    sim = SimulatedAsync(seed=SEED, delay_range=(0.0, 0.002))
    threads, target = [], torch.zeros(1)
    with sim.stream(sim.copy_stream):
        for value in range(20):
            sim.copy_(target, torch.full((1,), float(value)))
        sim._worker.put(10**9, lambda: threads.append(threading.current_thread()), delayed=False)
    sim.synchronize()
    assert float(target) == 19.0
    assert threads and threads[0] is not threading.current_thread()


def test_a_copy_not_ordered_after_a_read_is_a_hazard():
    sim = SimulatedAsync(seed=SEED)
    slot = torch.zeros(16)
    with sim.stream(sim.copy_stream):
        sim.copy_(slot, torch.ones(16))
        ready = sim.record_event()
    sim.wait_event(ready)  # the compute stream reads the slot from here on ...
    freed = sim.record_event()  # ... until here
    with sim.stream(sim.copy_stream), pytest.raises(SimulatedHazard, match="overwrites device bytes"):
        sim.copy_(slot[4:8], torch.full((4,), 2.0))  # no wait for `freed`
    sim.wait_event(freed, sim.copy_stream)
    with sim.stream(sim.copy_stream):
        sim.copy_(slot[4:8], torch.full((4,), 2.0))  # ordered after the read: fine
    sim.synchronize()
    assert slot[4:8].eq(2).all() and slot[:4].eq(1).all()


def test_an_error_on_the_copy_stream_is_raised_at_the_next_wait():
    sim = SimulatedAsync(seed=SEED)
    with sim.stream(sim.copy_stream):
        sim.copy_(torch.zeros(2), torch.zeros(3))  # shapes that do not broadcast
        ready = sim.record_event()
    with pytest.raises(RuntimeError, match="size"):
        sim.wait_event(ready)


# --- the parity slice, under the simulation ------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_dense_eval_then_train_matches_under_simulation(simulate, prefetch):
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=prefetch))
    batch = left_padded_batch(VOCAB)
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
    assert_same_step(reference, streamed, batch, seed=0)
    assert_same_step(reference, streamed, batch, seed=1)
    assert_simulated(streamed)


def test_activation_offload_matches_under_simulation(simulate):
    config = OffloadConfig(device="cpu", prefetch=1, offload_activations=True)
    reference, streamed = reference_and_streamed(build("qwen2"), config)
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert hf_offload.stats(streamed)["bytes_to_host"] > 0
    assert_simulated(streamed)


def test_nf4_store_matches_the_synchronous_cpu_under_simulation(simulate, monkeypatch):
    config = OffloadConfig(device="cpu", base_weight_dtype="nf4")
    _, streamed = reference_and_streamed(build("llama"), config)
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    _, synchronous = reference_and_streamed(build("llama"), config)
    assert get_runtime(synchronous).ops.simulation is None
    batch = left_padded_batch(VOCAB)
    assert_step_matches(train_step(synchronous, batch), streamed, batch)
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(synchronous, batch), rtol=1e-5, atol=1e-6)
    assert_simulated(streamed)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_routed_moe_matches_under_simulation(simulate, prefetch):
    base = build_moe("qwen3_moe")
    batch = {k: v[:2, -5:] for k, v in left_padded_batch(MOE_VOCAB).items()}
    reference = with_expert_lora(copy.deepcopy(base))
    reference_step = train_step(reference, batch)
    streamed = with_expert_lora(copy.deepcopy(base))
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu", expert_fetch="routed", prefetch=prefetch))
    assert_step_matches(reference_step, streamed, batch)
    assert_step_matches(reference_step, streamed, batch)
    stats = hf_offload.stats(streamed)
    assert stats["experts_skipped"] > 0
    assert_simulated(streamed)


@pytest.mark.parametrize("expert_fetch", ["routed", "all"])
def test_quantized_experts_match_the_synchronous_cpu_under_simulation(simulate, monkeypatch, expert_fetch):
    """nf4 experts: routed copies of encoded experts land late; each decode must wait for its copy."""
    base = build_moe("qwen3_moe")
    batch = {k: v[:2, -5:] for k, v in left_padded_batch(MOE_VOCAB).items()}
    config = OffloadConfig(device="cpu", base_weight_dtype="nf4", expert_fetch=expert_fetch)
    models = {}
    for simulated_run in (True, False):
        if not simulated_run:
            monkeypatch.delenv(ENVIRONMENT_VARIABLE)
        models[simulated_run] = hf_offload.enable_layer_streaming(with_expert_lora(copy.deepcopy(base)), config)
    streamed, synchronous = models[True], models[False]
    assert get_runtime(synchronous).ops.simulation is None
    for _ in range(2):
        assert_step_matches(train_step(synchronous, batch), streamed, batch)
    assert (hf_offload.stats(streamed)["experts_skipped"] > 0) == (expert_fetch == "routed")
    assert_simulated(streamed)


# --- teeth: remove one wait and the simulation catches it ---------------------------------------------------------
def test_without_the_compute_wait_for_copies_parity_fails(simulate, monkeypatch):
    """The compute stream reads slots without waiting for their copies: it computes with stale bytes."""
    monkeypatch.setattr(simulated, "DELAY_RANGE", (0.3, 0.3))  # every copy lands long after the read
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=1))
    ops = get_runtime(streamed).ops
    wait_event = ops.wait_event

    def compute_never_waits(event, stream=None):
        if stream is ops.copy_stream:
            wait_event(event, stream)

    monkeypatch.setattr(ops, "wait_event", compute_never_waits)
    batch = left_padded_batch(VOCAB)
    with pytest.raises(AssertionError, match="are not close|relative gradient error"):
        assert_same_step(reference, streamed, batch)
    ops.synchronize()


def test_without_the_copy_wait_for_freed_slots_a_hazard_is_raised(simulate, monkeypatch):
    """The copy stream overwrites a slot without waiting for the compute stream to be done reading it."""
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=1))
    ops = get_runtime(streamed).ops
    wait_event = ops.wait_event

    def copy_never_waits(event, stream=None):
        if stream is not ops.copy_stream:
            wait_event(event, stream)

    monkeypatch.setattr(ops, "wait_event", copy_never_waits)
    with pytest.raises(SimulatedHazard, match="overwrites device bytes"):
        train_step(streamed, left_padded_batch(VOCAB))


def test_the_same_model_passes_with_every_wait_in_place(simulate, monkeypatch):
    """The teeth tests' setup, waits intact: it is the removed wait that fails them."""
    monkeypatch.setattr(simulated, "DELAY_RANGE", (0.3, 0.3))
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=1))
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert_simulated(streamed)
