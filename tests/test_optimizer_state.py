"""optimizer_state_report: adapter optimizer state against fp32 AdamW on full fine-tuning of the same model."""

from __future__ import annotations

import torch
from families import VOCAB, build
from parity import left_padded_batch, train_step, with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.optimizer_state import adamw8bit_state_bytes


def test_8bit_adamw_estimate_matches_the_measured_state_and_the_factor_is_against_fp32_adamw():
    import bitsandbytes as bnb

    model = with_lora(build("llama"), r=64)  # some adapters above bitsandbytes' 4096-value threshold, some below
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype="nf4"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.numel() >= 4096 for p in trainable} == {True, False}
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-3)

    estimated = hf_offload.optimizer_state_report(model, optimizer)
    train_step(model, left_padded_batch(VOCAB))
    optimizer.step()
    measured = hf_offload.optimizer_state_report(model, optimizer)
    assert (estimated["source"], measured["source"]) == ("estimated (bitsandbytes 8-bit AdamW)", "measured")
    assert estimated["optimizer_state_bytes"] == measured["optimizer_state_bytes"]

    total = sum(p.numel() for p in build("llama").parameters())  # quantized weights still count as parameters
    assert measured["total_parameters"] == total
    assert measured["full_finetune_optimizer_state_bytes"] == 8 * total  # two fp32 moments
    assert measured["optimizer_state_factor"] == 8 * total / measured["optimizer_state_bytes"]
    adapters = sum(p.numel() for p in trainable)
    assert measured["training_state_bytes"] == 8 * adapters + measured["optimizer_state_bytes"]  # fp32 w + g
    assert measured["training_state_factor"] == 16 * total / measured["training_state_bytes"]


def test_state_estimate_for_large_adapters_is_about_two_bytes_per_value():
    assert adamw8bit_state_bytes(1 << 20) == 2 * (1 << 20) + 8 * (1 << 12)
    assert adamw8bit_state_bytes(100) == 800  # small tensors keep fp32 state


def test_torch_adamw_state_is_measured():
    model = with_lora(build("llama"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    report = hf_offload.optimizer_state_report(model, optimizer)
    adapters = report["trainable_parameters"]
    assert report["source"] == "estimated (two fp32 moments per parameter)"
    assert report["optimizer_state_bytes"] == 8 * adapters
    train_step(model, left_padded_batch(VOCAB))
    optimizer.step()
    report = hf_offload.optimizer_state_report(model, optimizer)
    steps = len(optimizer.state) * 4  # torch keeps one fp32 step counter per parameter
    assert report["source"] == "measured" and report["optimizer_state_bytes"] == 8 * adapters + steps
