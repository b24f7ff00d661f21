"""One refusal path: every model that cannot be streamed gets `UnsupportedModelError`, before anything changes.

Each case goes through the three ways in (the Python API, the plugin that adds LoRA first, the Trainer) and checks
that the model is exactly as it was: no adapters injected, no forward replaced, the same parameter objects.
"""

from __future__ import annotations

import pytest
import torch
from faces import tiny_args
from families import build

import hf_offload
from hf_offload import LayerStreamingPlugin, OffloadConfig, OffloadTrainer, UnsupportedModelError


def _encoder_decoder():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8))


def _no_layer_list():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


def _dispatched_by_accelerate():
    from accelerate import cpu_offload

    model = build("llama")
    cpu_offload(model, execution_device=torch.device("cpu"))
    return model


def _meta_weights_in_a_layer():
    model = build("llama")
    layer = model.model.layers[1]
    layer.mlp.up_proj.weight = torch.nn.Parameter(torch.empty_like(layer.mlp.up_proj.weight, device="meta"))
    return model


def _meta_weights_outside_the_layers():
    model = build("llama")
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight, device="meta"))
    return model


def _weights_shared_across_layers():
    model = build("llama")
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    return model


CASES = {
    "encoder-decoder": (_encoder_decoder, "T5ForConditionalGeneration is an encoder-decoder model"),
    "no layer list": (_no_layer_list, "cannot find the decoder layers of Sequential"),
    "dispatched by accelerate": (_dispatched_by_accelerate, "device_map"),
    "meta weights in a layer": (_meta_weights_in_a_layer, r"meta device \(model.layers.1.mlp.up_proj.weight\)"),
    "meta weights outside the layers": (_meta_weights_outside_the_layers, r"meta device \(lm_head.weight\)"),
    "weights shared across layers": (_weights_shared_across_layers, "shared by decoder layers 0 and 1.*its own copy"),
}


def _snapshot(model: torch.nn.Module):
    forwards = {name: "forward" in vars(m) for name, m in model.named_modules()}
    return type(model), forwards, [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]


@pytest.mark.parametrize("entry", ["enable_layer_streaming", "plugin", "trainer"])
@pytest.mark.parametrize("case", list(CASES))
def test_unstreamable_model_is_refused_before_anything_changes(case, entry, tmp_path):
    make, message = CASES[case]
    model = make()
    if entry == "enable_layer_streaming" and case not in ("encoder-decoder", "no layer list"):
        model.requires_grad_(False)  # frozen, so only the refusal under test can stop it
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match=message):
        if entry == "enable_layer_streaming":
            hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
        elif entry == "plugin":
            LayerStreamingPlugin().prepare_model(model, device="cpu")
        else:
            OffloadTrainer(model=model, args=tiny_args(tmp_path, layer_streaming=True))
    assert _snapshot(model) == before
    assert not hf_offload.is_streaming(model)


def test_fully_trainable_model_is_refused_with_the_way_out():
    model = build("llama")
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="nothing to stream.*get_peft_model"):
        hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    assert _snapshot(model) == before


def test_a_streamable_model_passes_every_check():
    assert hf_offload.is_streaming(LayerStreamingPlugin().prepare_model(build("llama"), device="cpu"))
