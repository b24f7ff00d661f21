"""Routed layers whose recent calls used most experts are prefetched whole in the forward (copied ahead of use)."""

from __future__ import annotations

import copy

import pytest
import torch
from moe_families import VOCAB, build, with_expert_lora
from parity import GRAD_RTOL, LOSS_RTOL, left_padded_batch, train_step

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4


def three_steps(batch):
    base = build("qwen3_moe")
    reference = with_expert_lora(copy.deepcopy(base))
    streamed = with_expert_lora(copy.deepcopy(base))
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu", prefetch=1, expert_fetch="routed"))
    streamer = get_runtime(streamed).streamer
    forward_copies = []
    copy_experts, acquire = streamer._copy_experts, streamer.acquire
    direction = [0]

    def spy_acquire(index, d):
        direction[0] = d
        return acquire(index, d)

    def spy_copy(pack, slot, region, experts, start):
        if direction[0] > 0:
            forward_copies.append(pack.index)
        return copy_experts(pack, slot, region, experts, start)

    streamer.acquire, streamer._copy_experts = spy_acquire, spy_copy
    per_step = []
    for step in range(3):
        loss_ref, grads_ref = train_step(reference, batch, seed=step)
        hf_offload.reset_stats(streamed)
        forward_copies.clear()
        loss, grads = train_step(streamed, batch, seed=step)
        torch.testing.assert_close(loss, loss_ref, rtol=LOSS_RTOL, atol=0)
        for name, g_ref in grads_ref.items():
            assert (grads[name] - g_ref).norm() <= GRAD_RTOL * g_ref.norm(), f"step {step}, {name}"
        per_step.append((hf_offload.stats(streamed), list(forward_copies)))
    return per_step


def test_layers_whose_calls_use_most_experts_are_prefetched_whole():
    per_step = three_steps(left_padded_batch(VOCAB))  # 3 x 12 tokens, top-2 of 8: every expert is routed to
    (first, first_copies), _, (third, third_copies) = per_step
    assert first["routed_whole_loads"] == 0 and first_copies  # no history yet: experts copied on demand
    # two steps later every layer the forward loads is loaded whole, and no expert is copied on demand
    assert third["routed_whole_loads"] == LAYERS - 2  # the first two are still in the slots the backward left
    assert third_copies == []  # the reused layers hold the backward's set: every expert
    assert third["experts_skipped"] == 0


def test_layers_whose_calls_use_few_experts_stay_routed():
    batch = {k: v[:1, -2:] for k, v in left_padded_batch(VOCAB).items()}  # 2 tokens: at most 4 of 8 experts
    per_step = three_steps(batch)
    assert all(stats["routed_whole_loads"] == 0 for stats, _ in per_step)
    assert per_step[-1][0]["experts_skipped"] > 0
