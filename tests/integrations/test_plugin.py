"""LayerStreamingPlugin (options, LoRA, environment round trip) and OffloadAccelerator in a plain accelerate loop."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from faces import run_example, tiny_t5
from families import VOCAB, build
from parity import left_padded_batch
from peft import get_peft_model

import hf_offload
from hf_offload import LayerStreamingPlugin, OffloadAccelerator, UnsupportedModelError
from hf_offload.integrations.plugin import ENV_VAR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prefetch=-1), "`prefetch` should be a non-negative integer"),
        (dict(lora_r=0), "`lora_r` should be a positive integer"),
        (dict(lora_alpha=-2), "`lora_alpha` should be a positive number"),
        (dict(lora_dropout=1.5), r"`lora_dropout` should be in \[0, 1\)"),
        (dict(lora_target_modules=" , "), "`lora_target_modules` should be 'all-linear' or"),
        (dict(default_optim="adamw_quantum"), "`default_optim` should be a TrainingArguments `optim` name"),
        (dict(offload_activations="yes"), "`offload_activations` should be True or False"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        LayerStreamingPlugin(**options)


def test_environment_round_trip_and_bad_environment():
    plugin = LayerStreamingPlugin(prefetch=2, lora_r=8, lora_target_modules="q_proj,v_proj", save_merged=True)
    assert LayerStreamingPlugin.from_env(plugin.to_env()) == plugin
    assert LayerStreamingPlugin.from_env({}) is None
    assert plugin.target_modules() == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=f"{ENV_VAR} .* does not hold valid layer-streaming settings"):
        LayerStreamingPlugin.from_env({ENV_VAR: '{"prefetch": "many"}'})
    with pytest.raises(ValueError, match=ENV_VAR):
        LayerStreamingPlugin.from_env({ENV_VAR: "not json"})


def test_prepare_model_adds_lora_to_a_plain_model_and_keeps_a_peft_model():
    plugin = LayerStreamingPlugin(lora_r=4, lora_alpha=8)
    streamed = plugin.prepare_model(build("llama"), device="cpu")
    assert hf_offload.is_streaming(streamed)
    assert streamed.peft_config["default"].r == 4
    names = {n for n, p in streamed.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    assert any("mlp.down_proj.lora_A" in n for n in names), "all-linear should reach the MLP too"
    assert not any("lm_head" in n for n in names)
    assert plugin.prepare_model(streamed) is streamed  # already streamed: unchanged

    own = get_peft_model(build("llama"), LayerStreamingPlugin(lora_r=2).lora_config())
    assert plugin.prepare_model(own, device="cpu") is own
    assert own.peft_config["default"].r == 2  # the model's own adapter is trained as it is


def test_unstreamable_model_is_refused_before_it_is_changed():
    model = tiny_t5()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        LayerStreamingPlugin().prepare_model(model, device="cpu")
    assert not hasattr(model, "peft_config")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def _loop(accelerator, model, steps=3):
    """A plain accelerate training loop; returns its losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer = accelerator.prepare(optimizer)
    batch = left_padded_batch(VOCAB)
    losses = []
    model.train()
    for step in range(steps):
        torch.manual_seed(step)
        loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_offload_accelerator_loop_matches_plain_accelerate_loop():
    plugin = LayerStreamingPlugin(lora_r=4, lora_alpha=8, lora_dropout=0.1)
    base = build("llama")

    torch.manual_seed(11)
    plain = get_peft_model(copy.deepcopy(base), plugin.lora_config())
    plain_accelerator = Accelerator(cpu=True)
    plain = plain_accelerator.prepare_model(plain)
    expected = _loop(plain_accelerator, plain)

    accelerator = OffloadAccelerator(cpu=True, layer_streaming_plugin=plugin)
    torch.manual_seed(11)  # same LoRA initialisation as above
    model = accelerator.prepare_model(copy.deepcopy(base))
    assert hf_offload.is_streaming(model)
    hf_offload.reset_stats(model)
    losses = _loop(accelerator, model)

    assert losses == expected
    layers = hf_offload.summary(model)["layers"]
    assert hf_offload.stats(model)["layer_loads"] >= 3 * layers  # every step streamed every layer


def test_offload_accelerator_refuses_an_optimizer_that_would_miss_the_adapters():
    accelerator = OffloadAccelerator(cpu=True)
    model = build("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="Prepare the model first"):
        accelerator.prepare(model, optimizer)
    assert not hf_offload.is_streaming(model)
    with pytest.raises(ValueError, match="device_placement"):
        accelerator.prepare_model(model, device_placement=True)


def test_offload_accelerator_takes_the_launcher_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(prefetch=0, lora_r=2).to_env()[ENV_VAR])
    assert OffloadAccelerator(cpu=True).layer_streaming_plugin == LayerStreamingPlugin(prefetch=0, lora_r=2)
    with pytest.raises(TypeError, match="LayerStreamingPlugin"):
        OffloadAccelerator(cpu=True, layer_streaming_plugin={"prefetch": 1})


def test_plain_loop_example_trains_and_saves_an_adapter(tiny_model_dir, tmp_path, monkeypatch, capsys):
    argv = ["--model", tiny_model_dir, "--output-dir", str(tmp_path / "out"), "--steps", "2", "--lora_r", "4"]
    run_example("plain_loop.py", argv, monkeypatch)
    out = capsys.readouterr().out
    assert "step   2  loss" in out and "host->device so far" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
