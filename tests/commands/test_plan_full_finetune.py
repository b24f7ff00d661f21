"""`hf-offload plan --full_finetune`: host bytes of masters, gradients, optimizer state and compute copy."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from families import FAMILIES, LLAMA_70B, VOCAB
from parity import left_padded_batch

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.commands.cli import main
from hf_offload.commands.plan import PlanError, make_plan
from hf_offload.engine.host_optimizer import HostAdamW
from hf_offload.engine.trainable import training_host_bytes


def test_70b_full_finetune_needs_about_18_bytes_per_layer_parameter(llama_70b, capsys):
    """18 bytes per parameter, plus 12 for HostAdamW's copies when it steps layers during backward (the default)."""
    assert main(["plan", str(llama_70b), "--full_finetune", "--json", "--host_mem", "1000"]) == 0
    plan = json.loads(capsys.readouterr().out)
    terms = plan["host_terms"]
    layer_params = terms["compute_copy"] / 2  # bf16 (alignment padding is negligible here)
    assert terms["fp32_masters"] == pytest.approx(4 * layer_params, rel=1e-3)
    assert terms["gradients"] == pytest.approx(4 * layer_params, rel=1e-3)
    assert terms["optimizer_state"] == pytest.approx(8 * layer_params, rel=1e-3)
    assert terms["early_step_backups"] == pytest.approx(12 * layer_params, rel=1e-3)
    assert plan["host_bytes"] == sum(terms.values()) == pytest.approx(30 * layer_params, rel=1e-3)
    args = ["plan", str(llama_70b), "--full_finetune", "--no-early_layer_steps", "--json", "--host_mem", "1000"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert "early_step_backups" not in plan["host_terms"]
    assert plan["host_bytes"] == pytest.approx(18 * layer_params, rel=1e-3)
    assert plan["grad_bytes_to_host"] == terms["compute_copy"]
    assert plan["gpu_terms"]["adapters_and_optimizer"] == 0
    assert plan["gpu_terms"]["resident_grads_adamw"] > 0
    assert not plan["fits_host"]  # ~1.2 TB of host memory
    assert plan["advice"][0].startswith("host memory") and "no base_weight_dtype fits" in plan["advice"][0]

    assert main(["plan", str(llama_70b), "--full_finetune"]) == 0
    out = capsys.readouterr().out
    assert "fp32_masters" in out and "optimizer_state" in out and "of gradients to the host" in out


def test_full_finetune_plan_refuses_a_quantized_store(llama_70b, capsys):
    with pytest.raises(PlanError, match="--full_finetune.*--base_weight_dtype"):
        make_plan(transformers.LlamaConfig(**{k: v for k, v in LLAMA_70B.items() if k != "model_type"}),
                  full_finetune=True, base_weight_dtype="nf4")  # fmt: skip
    assert main(["plan", str(llama_70b), "--full_finetune", "--base_weight_dtype", "nf4"]) == 2


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("bits", [32, 8])
def test_plan_host_bytes_match_a_training_step_within_10_percent(bits):
    """A bf16 model after one streamed step of HostAdamW stepping layers during backward: the host tensors it holds
    (store, masters, gradients, moments, the early steps' copies). With 8-bit state, a llama wide enough that most
    of its projections get 8-bit moments."""
    name, kwargs = FAMILIES["llama"]
    if bits == 8:
        kwargs = dict(kwargs, hidden_size=64, intermediate_size=128)
    config = getattr(transformers, name)(**kwargs)
    plan = make_plan(config, dtype=torch.bfloat16, full_finetune=True, host_optimizer_bits=bits)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(0)
    model = hf_offload.enable_layer_streaming(
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16),
        OffloadConfig(device="cpu", full_finetune=True),
    )
    runtime = get_runtime(model)
    layer_params = [t.param for tensors in runtime.trainable.layers for t in tensors]
    optimizer = HostAdamW(model.parameters(), lr=1e-3, step_during_backward=lambda: True, state_bits=bits)
    model(**left_padded_batch(VOCAB)).loss.backward()
    optimizer.step()
    assert optimizer.layers_stepped_during_backward == len(runtime.trainable.layers)
    measured = {
        "compute_copy": runtime.store.nbytes,
        "fp32_masters": runtime.trainable.master_bytes,
        "gradients": _tensor_bytes(p.grad for p in layer_params),
        "optimizer_state": _tensor_bytes(v for p in layer_params for k, v in optimizer.state[p].items() if k != "step"),
        "early_step_backups": _tensor_bytes(
            t for p in layer_params for t in (optimizer._backups_of[p][0], *optimizer._backups_of[p][1].values())
        ),
    }
    optimizer.close()
    for term, value in measured.items():
        assert abs(plan["host_terms"][term] - value) <= 0.10 * value, (term, plan["host_terms"][term], value)
    total = sum(measured.values())
    assert abs(plan["host_bytes"] - total) <= 0.10 * total


def test_plan_counts_8bit_host_optimizer_state(llama_70b, capsys):
    """--host_optimizer_bits 8: about 2 bytes of moments per parameter (uint8 codes and an fp32 absmax per 256
    values) instead of 8, in the state and in the early steps' copies."""
    args = ["plan", str(llama_70b), "--full_finetune", "--json", "--host_mem", "1000"]
    assert main([*args, "--host_optimizer_bits", "8"]) == 0
    terms = json.loads(capsys.readouterr().out)["host_terms"]
    layer_params = terms["compute_copy"] / 2
    assert terms["optimizer_state"] == pytest.approx(2 * (1 + 4 / 256) * layer_params, rel=1e-3)
    assert terms["early_step_backups"] == terms["gradients"] + terms["optimizer_state"]
    assert main([*args, "--host_optimizer_bits", "16"]) == 2
    assert "32 (fp32 AdamW moments) or 8" in capsys.readouterr().err
    assert main(["plan", str(llama_70b), "--host_optimizer_bits", "8"]) == 2
    assert "add --full_finetune" in capsys.readouterr().err


def test_8bit_state_bytes_of_a_training_step_are_what_plan_counts():
    """HostAdamW(state_bits=8)'s state after a step, measured on a streamed model, is `training_host_bytes`'s."""
    config_class, kwargs = FAMILIES["llama"]
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, config_class)(**dict(kwargs, hidden_size=64, intermediate_size=128))
    )
    streamed = hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", full_finetune=True))
    layers = [p for layer in streamed.model.layers for p in layer.parameters()]
    measured = {}
    for bits in (32, 8):
        optimizer = HostAdamW(streamed.parameters(), lr=1e-3, state_bits=bits)
        streamed(**left_padded_batch(VOCAB)).loss.backward()
        optimizer.step()
        streamed.zero_grad(set_to_none=True)
        state = [v for p in layers for k, v in optimizer.state[p].items() if k != "step"]
        measured[bits] = _tensor_bytes(state)
        assert measured[bits] == training_host_bytes(layers, bits)["optimizer_state"]
        optimizer.close()
    assert measured[8] < 0.45 * measured[32]  # k/v projections (2048 values) and norms keep fp32 moments here
