"""Routed expert fetch reads the routing back to the host once per experts call, through the device ops."""

from __future__ import annotations

import pytest
import torch
from moe_families import VOCAB, build
from parity import left_padded_batch, train_step, with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_one_host_readback_per_routed_experts_call(family):
    model = with_lora(build(family), lora_dropout=0.0)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", expert_fetch="routed"))
    runtime = get_runtime(model)
    calls = []
    load_experts = runtime.streamer.load_experts

    def counted(*args):  # one per routed experts call
        calls.append(args[0])
        return load_experts(*args)

    runtime.streamer.load_experts = counted
    readbacks = runtime.ops.readbacks
    train_step(model, left_padded_batch(VOCAB))
    model.eval()
    with torch.no_grad():
        model(**left_padded_batch(VOCAB))
    layers = len(runtime.store.packs)
    assert len(calls) == 3 * layers  # forward, recompute, eval forward
    assert hf_offload.stats(model)["host_readbacks"] == len(calls)
    assert runtime.ops.readbacks - readbacks == len(calls)


def test_whole_layer_fetch_reads_nothing_back():
    model = with_lora(build("qwen3_moe"), lora_dropout=0.0)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", expert_fetch="all"))
    train_step(model, left_padded_batch(VOCAB))
    assert hf_offload.stats(model)["host_readbacks"] == 0 and get_runtime(model).ops.readbacks == 0


def test_out_of_range_expert_ids_are_refused():
    model = with_lora(build("qwen3_moe"), lora_dropout=0.0)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", expert_fetch="routed"))
    group = get_runtime(model).routed_experts.groups[0]
    hidden = torch.zeros(2, 32)
    with pytest.raises(RuntimeError, match=r"routed to expert ids outside 0\.\.7"):
        group.entry(hidden, torch.tensor([[0, 8], [1, 2]]), torch.ones(2, 2))


def test_int32_expert_ids_are_accepted():
    model = with_lora(build("qwen3_moe"), lora_dropout=0.0)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", expert_fetch="routed"))
    streamer = get_runtime(model).streamer
    group = get_runtime(model).routed_experts.groups[0]
    hidden = torch.randn(2, 32)
    index, weights = torch.tensor([[0, 5], [1, 5]]), torch.full((2, 2), 0.5)
    streamer.acquire(0, +1)
    try:
        with torch.no_grad():
            as_int64 = group.entry(hidden, index, weights)
            as_int32 = group.entry(hidden, index.int(), weights)
    finally:
        streamer.release(0)
    torch.testing.assert_close(as_int32, as_int64, rtol=0, atol=0)
