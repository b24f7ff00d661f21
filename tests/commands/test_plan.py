"""`hf-offload plan`: host/device memory, bytes per step and break-even from a config alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from families import FAMILIES, LLAMA_70B, build
from moe_families import FAMILIES as MOE_FAMILIES
from moe_families import build as build_moe
from moe_families import with_expert_lora
from parity import with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.commands.cli import main
from hf_offload.commands.model_sizes import measure
from hf_offload.commands.plan import PlanError, load_config, make_plan


def llama_70b_params() -> int:
    h, inter, layers, vocab, kv = 8192, 28672, 80, 128256, 8192 * 8 // 64
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; two norms
    return layers * per_layer + 2 * vocab * h + h  # untied embeddings and head, final norm


@pytest.fixture(scope="module")
def plans_70b(llama_70b):
    config = load_config(str(llama_70b))
    return {d: make_plan(config, gpu_mem_gb=80, host_mem_gb=1000, base_weight_dtype=d) for d in (None, "int8", "nf4")}


def test_70b_host_memory_is_about_two_bytes_per_parameter_in_bf16(plans_70b):
    plan, params = plans_70b[None], llama_70b_params()
    assert plan["parameters"] == params and plan["dtype"] == "bfloat16" and plan["layers"] == 80
    assert abs(plan["host_bytes"] - 2 * params) / (2 * params) < 0.10
    assert plans_70b["int8"]["host_bytes"] < plan["host_bytes"] / 1.9
    assert plans_70b["nf4"]["host_bytes"] < plan["host_bytes"] / 3.6


def test_70b_bytes_per_step_and_break_even_follow_the_performance_model(plans_70b):
    """The performance model: ~2 x the store per step; break-even ~ bytes_per_param x F / (3 x BW)."""
    for dtype, bytes_per_param in ((None, 2.0), ("nf4", 0.516)):
        plan = plans_70b[dtype]
        assert plan["host_bytes"] < plan["bytes_per_step"] < 2 * plan["host_bytes"]
        expected = bytes_per_param * 400e12 / (3 * 25e9)
        assert abs(plan["break_even_tokens"] - expected) / expected < 0.10, (plan["break_even_tokens"], expected)
        # 2048 tokens per micro-batch: below both break-evens, so the link is the limit and the advice says so
        assert plan["bound"] == "transfer" and plan["tokens_per_step"] < plan["break_even_tokens"]
        assert plan["fits"] and [line.split(":")[0] for line in plan["advice"]] == ["speed"]
    assert plans_70b["nf4"]["tokens_per_second"] > 3.5 * plans_70b[None]["tokens_per_second"]


def test_plan_agrees_with_the_engine_on_a_real_model(tmp_path):
    """The plan measures a meta model with the engine's own layout: host bytes and bytes per step match exactly."""
    name, kwargs = FAMILIES["llama"]
    config = getattr(transformers, name)(**kwargs)
    for dtype in (None, "nf4"):
        plan = make_plan(config, base_weight_dtype=dtype, dtype=torch.float32)
        model = with_lora(copy.deepcopy(build("llama")))
        hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype=dtype))
        summary = hf_offload.summary(model)
        assert plan["host_bytes"] == summary["host_store_bytes"]
        assert plan["bytes_per_step"] == summary["bytes_per_train_step"]
        assert plan["gpu_terms"]["layer_slots"] == summary["device_slot_bytes"]
        assert plan["gpu_terms"]["dequant_scratch"] == summary["device_scratch_bytes"]


def test_plan_agrees_with_the_engine_on_a_quantized_moe():
    """A Qwen3-MoE-like model: with nf4/int8 the plan's host store counts the experts encoded expert by expert, as the
    engine packs them (experts are most of an MoE's bytes), and matches the store actually built."""
    name, kwargs = MOE_FAMILIES["qwen3_moe"]
    config = getattr(transformers, name)(**kwargs)
    host = {}
    for dtype in (None, "nf4", "int8"):
        plan = make_plan(config, base_weight_dtype=dtype, dtype=torch.float32)
        model = with_expert_lora(build_moe("qwen3_moe"))
        hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype=dtype))
        summary = hf_offload.summary(model)
        assert abs(plan["host_bytes"] - summary["host_store_bytes"]) <= 0.10 * summary["host_store_bytes"]
        assert plan["host_bytes"] == summary["host_store_bytes"]  # the same layout code: exactly
        assert plan["gpu_terms"]["dequant_scratch"] == summary["device_scratch_bytes"]
        assert plan["bytes_per_step"] == summary["bytes_per_train_step"]
        host[dtype] = plan["host_bytes"]
    # fp32 experts: nf4 ~0.52/4 and int8 ~1/4 of the bytes (small tensors pay alignment and per-row scales)
    assert host["nf4"] < host[None] / 4 and host["int8"] < host[None] / 3


def test_verdict_says_what_to_change(llama_70b):
    config = load_config(str(llama_70b))
    plan = make_plan(config, gpu_mem_gb=24, host_mem_gb=64, seq=8192, batch=4)
    assert not plan["fits"] and not plan["fits_gpu"] and not plan["fits_host"]
    host, gpu = plan["advice"][:2]
    assert host.startswith("host memory") and "--base_weight_dtype nf4 needs" in host
    assert gpu.startswith("GPU memory") and "tokens per micro-batch" in gpu and "--offload_activations" in gpu


def test_cli_prints_one_json_object(llama_70b, capsys):
    assert main(["plan", str(llama_70b), "--json", "--base_weight_dtype", "nf4", "--seq", "4096"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"host_bytes", "gpu_bytes", "bytes_per_step", "break_even_tokens"} <= plan.keys()
    assert plan["base_weight_dtype"] == "nf4" and plan["tokens_per_step"] == 4096
    assert main(["plan", str(llama_70b), "--gpu_mem", "80"]) == 0
    assert "verdict:" in capsys.readouterr().out


def test_hub_id_without_network_fails_clearly(monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(PlanError, match="could not get config.json of 'org/model'.*local model directory"):
        load_config("org/model")
    assert main(["plan", "org/model"]) == 2
    assert "could not get config.json" in capsys.readouterr().err


def test_chunked_loss_and_tiled_mlp_let_longer_sequences_fit(llama_70b):
    """GPU memory against sequence length: with the logits in chunks and the MLP in tiles, what grows with the tokens
    is hidden-size activations; with the boundary activations offloaded too, several times longer sequences fit."""
    config = load_config(str(llama_70b))
    options = dict(gpu_mem_gb=80, host_mem_gb=1000, base_weight_dtype="nf4", seq=131072)
    whole = dict(chunked_loss=False, mlp_tile_tokens=None)
    plans = {
        (offload, chunked): make_plan(config, **options, offload_activations=offload, **({} if chunked else whole))
        for offload in (False, True)
        for chunked in (False, True)
    }
    on, off = plans[False, True], plans[False, False]
    vocab, hidden = LLAMA_70B["vocab_size"], LLAMA_70B["hidden_size"]
    assert off["gpu_terms"]["logits"] == 131072 * vocab * (2 + 8)  # bf16 logits, fp32 copy and log-probabilities
    assert on["gpu_terms"]["logits"] < off["gpu_terms"]["logits"] / 50
    assert on["gpu_terms"]["logits"] > 131072 * hidden * 2  # the hidden states of the scored tokens are counted
    assert on["gpu_terms"]["layer_activations"] < off["gpu_terms"]["layer_activations"]
    assert on["max_tokens_per_micro_batch"] > off["max_tokens_per_micro_batch"] > 0
    assert plans[True, True]["max_tokens_per_micro_batch"] > 5 * plans[True, False]["max_tokens_per_micro_batch"]
    # the longest micro-batch is the largest that fits: one more token does not
    for (offload, chunked), plan in plans.items():
        longest = plan["max_tokens_per_micro_batch"]
        extra = dict(offload_activations=offload, **({} if chunked else whole))
        at = {t: make_plan(config, **{**options, "seq": t}, **extra)["fits_gpu"] for t in (longest, longest + 1)}
        assert at == {longest: True, longest + 1: False}


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_offloaded_activations_leave_the_device_for_page_locked_host_memory(llama_70b, prefetch):
    """What the engine does with offload_activations: every layer's saved boundary state in a host buffer of its
    exact size; on the device only the recomputing layer's and the `prefetch` ones on their way back."""
    config = load_config(str(llama_70b))
    options = dict(gpu_mem_gb=80, host_mem_gb=1000, base_weight_dtype="nf4", seq=65536, prefetch=prefetch)
    kept, offloaded = (make_plan(config, **options, offload_activations=o) for o in (False, True))
    per_layer = 65536 * LLAMA_70B["hidden_size"] * 2  # bf16 hidden states of one layer boundary
    layers = LLAMA_70B["num_hidden_layers"]
    assert kept["gpu_terms"]["boundary_activations"] == layers * per_layer
    assert offloaded["gpu_terms"]["boundary_activations"] == (prefetch + 1) * per_layer
    assert "offloaded_activations" not in kept["host_terms"]
    assert offloaded["host_terms"]["offloaded_activations"] == layers * per_layer
    assert offloaded["host_bytes"] - kept["host_bytes"] == layers * per_layer
    assert kept["gpu_bytes"] - offloaded["gpu_bytes"] == (layers - prefetch - 1) * per_layer
    assert offloaded["max_tokens_per_micro_batch"] > 5 * kept["max_tokens_per_micro_batch"]
    moved = (layers - prefetch - 1) * per_layer
    assert any(f"--offload_activations moves {moved / 1e9:.1f} GB" in line for line in kept["advice"]), kept["advice"]


def test_data_parallel_plans_host_memory_per_node_and_gpu_memory_per_rank(llama_70b, plans_70b):
    config = load_config(str(llama_70b))
    one = plans_70b[None]
    shared = make_plan(config, gpu_mem_gb=80, host_mem_gb=1000, host_mem_gbps=300, nproc_per_node=8)
    private = make_plan(config, gpu_mem_gb=80, host_mem_gb=1000, nproc_per_node=8, shared_host_store=False)
    assert shared["host_bytes"] == one["host_bytes"] == shared["shm_bytes"]  # one store for the node's 8 ranks
    assert private["host_bytes"] == 8 * one["host_bytes"] and private["shm_bytes"] == 0 and not private["fits_host"]
    assert shared["gpu_bytes"] == private["gpu_bytes"] == one["gpu_bytes"]  # each rank has its own GPU
    assert shared["host_read_gbps"] == pytest.approx(8 * one["host_read_gbps"])
    assert one["host_read_gbps"] == pytest.approx(one["bytes_per_step"] / max(one["transfer_seconds"], 1e-9) / 1e9)
    advice = "\n".join(shared["advice"])
    assert "share one host store" in advice and "more than half of the node's 300 GB/s" in advice
    assert "separately" not in advice and "each of the 8 ranks keeps its own" in "\n".join(private["advice"])


def test_partitioned_fetch_reads_each_layer_once_per_node(llama_70b):
    config = load_config(str(llama_70b))
    common = dict(gpu_mem_gb=80, host_mem_gb=1000, host_mem_gbps=300, nproc_per_node=8, base_weight_dtype="nf4")
    replicated = make_plan(config, **common)
    partitioned = make_plan(config, **common, partitioned_fetch=True, pcie_gbps=25, interconnect_gbps=200)
    per_step = replicated["bytes_per_step"]
    assert partitioned["bytes_per_step"] == per_step  # the bytes each GPU needs do not change
    # 1/8 of each layer over the rank's PCIe link, then 7/8 from the other ranks over NVLink
    assert partitioned["transfer_seconds"] == pytest.approx(per_step / 8 / 25e9 + per_step * 7 / 8 / 200e9)
    assert partitioned["transfer_seconds"] < replicated["transfer_seconds"]
    assert partitioned["break_even_tokens"] < replicated["break_even_tokens"]
    step = max(partitioned["transfer_seconds"], partitioned["compute_seconds"])
    assert partitioned["host_read_gbps"] == pytest.approx(per_step / step / 1e9)  # the node reads each byte once
    assert "partitioned fetch: each layer once per node" in "\n".join(partitioned["advice"])
    assert replicated["host_read_gbps"] > 150  # more than half of the node's 300 GB/s: partitioned fetch is advised
    advised = f"use --partitioned_fetch on NVLink nodes ({partitioned['host_read_gbps']:.0f} GB/s)"
    assert advised in "\n".join(replicated["advice"])
    alone = make_plan(config, gpu_mem_gb=80, host_mem_gb=1000, partitioned_fetch=True)
    assert not alone["partitioned_fetch"] and "no effect with one rank per node" in "\n".join(alone["advice"])


def test_data_parallel_plan_refusals(llama_70b, capsys):
    assert main(["plan", str(llama_70b), "--nproc_per_node", "0"]) == 2
    assert "--nproc_per_node should be at least 1" in capsys.readouterr().err
    assert main(["plan", str(llama_70b), "--nproc_per_node", "2", "--full_finetune"]) == 2
    assert "--full_finetune runs as one process" in capsys.readouterr().err


def test_loading_straight_into_the_store_is_planned_and_judged(llama_70b):
    """The peak while a checkpoint loads into the store: the store, the modules outside the layers, the largest layer
    twice in the checkpoint's dtype. A host that holds the store but not that peak does not fit."""
    config = load_config(str(llama_70b))
    plan = make_plan(config, gpu_mem_gb=80, host_mem_gb=1000, base_weight_dtype="nf4")
    sizes = measure(config)
    want = plan["host_terms"]["compute_copy"] + sizes.resident_bytes + 2 * max(sizes.layer_bytes)
    assert plan["loading_host_bytes"] == want
    between = (plan["host_bytes"] + plan["loading_host_bytes"]) / 2 / 1e9
    assert not make_plan(config, gpu_mem_gb=80, host_mem_gb=between, base_weight_dtype="nf4")["fits_host"]
    # data parallel: local rank 0 alone loads the layers into the node's shared store; each rank loads the rest
    shared = make_plan(config, gpu_mem_gb=80, host_mem_gb=1000, base_weight_dtype="nf4", nproc_per_node=8)
    assert shared["loading_host_bytes"] == want + 7 * sizes.resident_bytes
    private = make_plan(
        config, gpu_mem_gb=80, host_mem_gb=1000, base_weight_dtype="nf4", nproc_per_node=8, shared_host_store=False
    )
    assert private["loading_host_bytes"] == 8 * want
