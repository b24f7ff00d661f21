"""The host-memory check: estimate what the store needs before packing, stop clearly when it cannot fit."""

from __future__ import annotations

import copy

import pytest
import torch
from families import build
from parity import with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.engine import hostmem
from hf_offload.engine.hostmem import LayerNeed, peak_bytes


def test_peak_counts_what_is_held_before_old_tensors_are_freed():
    # anonymous weights: each layer's old tensors are freed once it is packed
    assert peak_bytes([LayerNeed(100, 100, 0)] * 4) == 100
    assert peak_bytes([LayerNeed(25, 100, 40)] * 4) == 65
    # weights on the GPU or memory-mapped from the checkpoint: nothing comes back, the whole store is new
    assert peak_bytes([LayerNeed(100, 0, 0)] * 4) == 400


def test_available_bytes_reads_this_machine():
    available = hostmem.available_bytes()
    assert available is None or 0 < available < 1 << 50


def test_memory_mapped_weights_free_nothing_when_packed(tmp_path):
    from transformers import AutoModelForCausalLM

    base = build("llama")
    base.save_pretrained(tmp_path)
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # safetensors, memory-mapped
    mappings = hostmem.file_mappings()
    for model, expected in ((base, "all"), (mapped, "none")):
        params = list(model.model.layers[0].parameters())
        total = sum(p.numel() * p.element_size() for p in params)
        assert hostmem.freed_bytes(params, mappings) == (total if expected == "all" else 0)


def unstreamable_here(monkeypatch, available: int):
    monkeypatch.setattr(hostmem, "available_bytes", lambda: available)


def test_a_store_that_cannot_fit_stops_before_anything_is_packed(monkeypatch):
    model = with_lora(build("llama"))
    # Pretend the frozen weights sit on an accelerator: the whole store is new host memory.
    monkeypatch.setattr(hostmem, "freed_bytes", lambda params, mappings: 0)
    store_bytes = 4 * sum(
        -(-p.numel() * p.element_size() // 64) * 64
        for p in model.get_base_model().model.layers[0].parameters()
        if not p.requires_grad
    )
    unstreamable_here(monkeypatch, store_bytes // 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(hf_offload.HostMemoryError) as info:
        hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    assert (info.value.needed, info.value.available) == (store_bytes, store_bytes // 2)
    message = str(info.value)
    assert f"needs {store_bytes / 1e3:.2f} kB" in message and f"only {store_bytes // 2 / 1e3:.2f} kB" in message
    assert "base_weight_dtype='nf4' would need" in message and "(fits)" in message
    assert "check_host_memory=False" in message
    assert not hf_offload.is_streaming(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # the dtype it suggests does fit; and the check can be switched off
    hf_offload.enable_layer_streaming(copy.deepcopy(model), OffloadConfig(device="cpu", base_weight_dtype="nf4"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", check_host_memory=False))
    assert hf_offload.summary(model)["host_store_bytes"] == store_bytes


def test_anonymous_weights_need_only_a_layer_of_headroom(monkeypatch):
    model = with_lora(build("llama"))
    layer_bytes = sum(p.numel() * 4 for p in model.get_base_model().model.layers[0].parameters() if not p.requires_grad)
    unstreamable_here(monkeypatch, 2 * layer_bytes)  # far less than the 4-layer store
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))


@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_the_check_counts_quantized_experts_as_the_store_packs_them(monkeypatch, dtype):
    """An MoE's experts are quantized expert by expert: the estimate is the store actually built, plus one expert's
    fp32 copy while it is quantized, not the dense experts."""
    from moe_families import build as build_moe
    from moe_families import with_expert_lora

    base = build_moe("qwen3_moe")
    built = hf_offload.enable_layer_streaming(
        with_expert_lora(copy.deepcopy(base)), OffloadConfig(device="cpu", base_weight_dtype=dtype)
    )
    store_bytes = hf_offload.summary(built)["host_store_bytes"]
    monkeypatch.setattr(hostmem, "freed_bytes", lambda params, mappings: 0)  # the whole store is new memory
    unstreamable_here(monkeypatch, 1)
    with pytest.raises(hf_offload.HostMemoryError) as info:
        hf_offload.enable_layer_streaming(with_expert_lora(copy.deepcopy(base)), OffloadConfig(base_weight_dtype=dtype))
    experts = base.model.layers[0].mlp.experts
    one_expert = max(p[0].numel() * 4 for p in experts.parameters())
    linear = max(m.weight.numel() * 4 for m in base.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    assert store_bytes <= info.value.needed <= store_bytes + max(one_expert, linear)
