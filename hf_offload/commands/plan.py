"""`hf-offload plan`: will a model fit, and will streaming be link-bound? From its config alone, no weights loaded.

The model is built on the meta device (shapes and dtypes only) and measured with the same host-store layout code
the engine uses, so host bytes and bytes per step are what `enable_layer_streaming` would report. Device memory
follows DESIGN.md section 5: (prefetch + 1) x the largest layer + resident modules + boundary activations
(L x tokens x hidden) + one layer's recompute activations, plus the dequantization scratch, the LoRA adapters with
their gradients and 8-bit AdamW state, and the logits of the loss. The activation terms are estimates.

Example:
    hf-offload plan meta-llama/Llama-3.1-70B --gpu_mem 80 --seq 4096 --batch 2 --base_weight_dtype nf4
    hf-offload plan ./my-model/config.json --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import hostmem
from ..engine.anatomy import UnsupportedModelError, find_decoder_layers
from ..engine.quant import BASE_WEIGHT_DTYPES, linear_weights, make_codec
from ..engine.store import layout_layer
from ..engine.trainable import training_host_bytes
from ..optimizer_state import adamw8bit_state_bytes
from ..options import add_arguments, add_flag, all_options, values_from
from ..units import GB, parse_dtype

DEFAULT_PCIE_GBPS = 25.0  # pinned host-to-device copies on PCIe 4.0 x16; PCIe 5.0 reaches ~50
DEFAULT_GPU_TFLOPS = 400.0  # bf16 dense matmul throughput a training step achieves on an H100-class GPU
GPU_HEADROOM = 0.9  # share of GPU memory the estimate may use; the rest is CUDA context, workspaces, fragmentation
# One layer's recompute keeps about this many activations per token (norm inputs in fp32, q/k/v/o, attention output,
# MLP gate/up/activation/product); a rough count for a Llama-style layer with LoRA on every linear layer.
LAYER_ACTIVATIONS_PER_TOKEN = (10, 4)  # x hidden_size, x intermediate_size
LOGIT_EXTRA_BYTES = 8  # the loss upcasts logits to fp32 and keeps fp32 log-probabilities, per logit


class PlanError(ValueError):
    """The model or its config cannot be planned; the message says why and what to pass instead."""


# --- reading the model ------------------------------------------------------------------------------------------------
def load_config(model: str):
    """A transformers config from a config.json path, a local model directory, or a Hub id (downloads config.json)."""
    from transformers import AutoConfig

    if os.path.isfile(model):
        with open(model) as f:
            config_dict = json.load(f)
        model_type = config_dict.pop("model_type", None)
        if model_type is None:
            raise PlanError(f"{model} has no `model_type`; pass the config.json of a transformers model.")
        try:
            return AutoConfig.for_model(model_type, **config_dict)
        except ValueError as err:
            raise PlanError(f"transformers does not know model_type {model_type!r} ({err}).") from err
    if os.path.isdir(model):
        return AutoConfig.from_pretrained(model)
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id=model, filename="config.json")
    except Exception as err:  # offline, unknown repo, gated repo, bad id: all end here with one message
        raise PlanError(
            f"could not get config.json of {model!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}). Without network access, pass a local model "
            "directory or a config.json path; gated models need `hf auth login` first."
        ) from err
    return load_config(path)


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.bfloat16


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first(config, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@dataclass
class ModelSizes:
    """What a plan needs from a model, measured once on the meta device."""

    layers: list[nn.Module]
    dtype: torch.dtype
    total_params: int
    resident_bytes: int
    compute_params: float  # parameters a token's forward multiplies with (embeddings excluded, MoE: active experts)
    lora_tensors: list[int]  # numel of each LoRA A and B matrix, per unit of rank
    hidden: int
    intermediate: int
    vocab: int


def measure(config, dtype: torch.dtype | None = None) -> ModelSizes:
    """Build the model on the meta device and measure what a plan needs."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or _config_dtype(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        raise PlanError(f"{type(config).__name__} is not a causal LM transformers can build ({err}).") from err
    layers = list(find_decoder_layers(model).layers)
    streamed = {id(p) for layer in layers for p in layer.parameters()}
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    resident = sum(p.numel() * p.element_size() for p in params if id(p) not in streamed)
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    compute = float(total - (0 if tied else embedding.numel()))
    text = _text_config(config)
    experts = _first(text, ("num_local_experts", "num_experts", "n_routed_experts"))
    active = _first(text, ("num_experts_per_tok", "num_experts_per_token", "moe_topk"))
    if experts and active:
        # Routed experts (transformers 5: parameters under an `experts` module) compute only for the tokens
        # routed to them: a token multiplies with active / experts of them.
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in f".{n}")
        compute -= expert_params * (1 - active / experts)
    lora = [n for layer in layers for w, _ in linear_weights(layer) for n in w.shape]
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    if hidden is None:
        raise PlanError(f"{type(config).__name__} has no hidden_size; cannot estimate activations.")
    moe_inter = _first(text, ("moe_intermediate_size",))
    inter = (moe_inter * active if moe_inter and active else None) or _first(
        text, ("intermediate_size", "n_inner", "ffn_dim", "d_ff"), 4 * hidden
    )
    vocab = _first(text, ("vocab_size",), embedding.shape[0])
    return ModelSizes(layers, dtype, total, resident, compute, lora, hidden, inter, vocab)


# --- the estimate -----------------------------------------------------------------------------------------------------
def estimate(
    sizes: ModelSizes,
    *,
    base_weight_dtype: str | None = None,
    seq: int = 2048,
    batch: int = 1,
    pcie_gbps: float = DEFAULT_PCIE_GBPS,
    gpu_tflops: float = DEFAULT_GPU_TFLOPS,
    lora_r: int = 16,
    prefetch: int = 1,
    offload_activations: bool = False,
    full_finetune: bool = False,
) -> dict:
    """Host bytes, device bytes (with their terms), bytes per step and break-even tokens for one configuration.

    With `full_finetune`, host memory also holds the layers' fp32 masters (bf16/fp16 models), fp32 gradients and
    AdamW state (`host_terms`), the device trains the resident modules with AdamW instead of adapters, and each step
    sends every layer's gradients back to the host (`grad_bytes_to_host`)."""
    codec = make_codec(base_weight_dtype)
    layouts = [layout_layer(layer, codec, params=list(layer.parameters())) for layer in sizes.layers]
    store = [layout.nbytes for layout in layouts]
    n_layers = len(store)
    tokens = batch * seq
    act = 4 if sizes.dtype == torch.float32 else 2
    lora = [lora_r * n for n in sizes.lora_tensors]  # numel of each adapter matrix
    boundary = n_layers * tokens * sizes.hidden * act
    per_hidden, per_inter = LAYER_ACTIVATIONS_PER_TOKEN
    gpu_terms = {
        "layer_slots": (prefetch + 1) * max(store),
        "dequant_scratch": max(layout.scratch_nbytes for layout in layouts),
        "resident_modules": sizes.resident_bytes,
        # fp32 adapters (peft's default for bf16/fp16 bases), their fp32 gradients, 8-bit AdamW state
        "adapters_and_optimizer": 0 if full_finetune else sum(8 * n + adamw8bit_state_bytes(n) for n in lora),
        "boundary_activations": 0 if offload_activations else boundary,
        "layer_activations": tokens * (per_hidden * sizes.hidden + per_inter * sizes.intermediate) * act,
        "logits": tokens * sizes.vocab * (act + LOGIT_EXTRA_BYTES),
    }
    host_terms = {"compute_copy": sum(store)}
    grad_bytes_to_host = 0
    if full_finetune:
        # the engine's own accounting (fp32 masters, gradients, AdamW moments), on the meta model's parameters
        host_terms.update(training_host_bytes([p for layer in sizes.layers for p in layer.parameters()]))
        # the resident modules train on the device with torch AdamW: gradient and two moments in their dtype
        gpu_terms["resident_grads_adamw"] = 3 * sizes.resident_bytes
        gpu_terms["layer_gradients"] = max(store)  # one layer's weight gradients, until they reach the host
        grad_bytes_to_host = sum(store)  # each layer's weight gradients, in the compute dtype
    if offload_activations:
        host_terms["offloaded_activations"] = boundary
    host_bytes = sum(host_terms.values())
    # forward loads every layer; backward every layer but those still in their slots at the turnaround
    bytes_per_step = 2 * sum(store) - sum(store[max(0, n_layers - prefetch - 1) :])
    bandwidth, flops_per_s = pcie_gbps * GB, gpu_tflops * 1e12
    flops = 6 * sizes.compute_params * tokens  # forward, recompute, input gradients
    transfer_s, compute_s = bytes_per_step / bandwidth, flops / flops_per_s
    break_even = math.ceil(bytes_per_step * flops_per_s / (6 * sizes.compute_params * bandwidth))
    return {
        "base_weight_dtype": base_weight_dtype,
        "tokens_per_step": tokens,
        "host_bytes": host_bytes,
        "host_terms": host_terms,
        "full_finetune": full_finetune,
        "grad_bytes_to_host": grad_bytes_to_host,
        # weight matrices the codec leaves dense: not nn.Linear/Conv1D (fused MoE expert tensors), or odd sizes
        "unquantized_matrix_bytes": sum(r.nbytes for layout in layouts for p, r in layout.dense if p.dim() >= 2)
        if codec is not None
        else 0,
        "gpu_bytes": sum(gpu_terms.values()),
        "gpu_terms": gpu_terms,
        "bytes_per_step": bytes_per_step,
        "break_even_tokens": break_even,
        "transfer_seconds": transfer_s,
        "compute_seconds": compute_s,
        "tokens_per_second": tokens / max(transfer_s, compute_s),
        "bound": "transfer" if transfer_s > compute_s else "compute",
    }


def make_plan(
    config,
    *,
    gpu_mem_gb: float | None = None,
    host_mem_gb: float | None = None,
    dtype: torch.dtype | None = None,
    **options,
) -> dict:
    """The plan `hf-offload plan` prints: `estimate` for the chosen options, a verdict and what to change.

    `options` are those of `estimate`. Host memory: `host_mem_gb`, else what this machine has available now.
    """
    base_weight_dtype = options.get("base_weight_dtype")
    if options.get("full_finetune") and base_weight_dtype is not None:
        raise PlanError(
            f"--full_finetune trains the decoder weights, so they cannot be stored quantized (--base_weight_dtype "
            f"{base_weight_dtype}); drop one of the two."
        )
    if base_weight_dtype is not None and base_weight_dtype not in BASE_WEIGHT_DTYPES:
        raise PlanError(
            f"--base_weight_dtype should be one of {', '.join(BASE_WEIGHT_DTYPES)}, not {base_weight_dtype!r}"
        )
    sizes = measure(config, dtype)
    plan = estimate(sizes, **options)
    if options.get("full_finetune"):
        others = dict.fromkeys((None, *BASE_WEIGHT_DTYPES), plan)  # the weights train: no quantized store to suggest
    else:
        others = {d: estimate(sizes, **{**options, "base_weight_dtype": d}) for d in (None, *BASE_WEIGHT_DTYPES)}
    gpu_budget = gpu_mem_gb * GB * GPU_HEADROOM if gpu_mem_gb else None
    host_available = host_mem_gb * GB if host_mem_gb else hostmem.available_bytes()
    fits_gpu = gpu_budget is None or plan["gpu_bytes"] <= gpu_budget
    fits_host = host_available is None or plan["host_bytes"] <= host_available
    plan.update(
        model_type=getattr(config, "model_type", None),
        dtype=str(sizes.dtype).removeprefix("torch."),
        layers=len(sizes.layers),
        parameters=sizes.total_params,
        gpu_budget_bytes=gpu_budget,
        host_available_bytes=host_available,
        host_available_source="--host_mem" if host_mem_gb else "this machine (MemAvailable)",
        fits_gpu=fits_gpu,
        fits_host=fits_host,
        fits=fits_gpu and fits_host,
        advice=_advice(plan, others, gpu_budget, host_available, options),
    )
    return plan


def _advice(plan: dict, others: dict, gpu_budget, host_available, options: dict) -> list[str]:
    advice = []
    chosen = options.get("base_weight_dtype")
    smaller = [d for d in BASE_WEIGHT_DTYPES if others[d]["host_bytes"] < plan["host_bytes"]]
    if host_available is not None and plan["host_bytes"] > host_available:
        fitting = [d for d in smaller if others[d]["host_bytes"] <= host_available]
        advice.append(
            f"host memory: needs {plan['host_bytes'] / GB:.1f} GB, {host_available / GB:.1f} GB available; "
            + (
                f"--base_weight_dtype {fitting[0]} needs {others[fitting[0]]['host_bytes'] / GB:.1f} GB"
                if fitting
                else "no base_weight_dtype fits: more host memory is needed"
            )
        )
    if gpu_budget is not None and plan["gpu_bytes"] > gpu_budget:
        terms = plan["gpu_terms"]
        per_token = (terms["boundary_activations"] + terms["layer_activations"] + terms["logits"]) / plan[
            "tokens_per_step"
        ]
        fixed = plan["gpu_bytes"] - per_token * plan["tokens_per_step"]
        max_tokens = int((gpu_budget - fixed) // per_token) if per_token else 0
        line = f"GPU memory: needs {plan['gpu_bytes'] / GB:.1f} GB, budget {gpu_budget / GB:.1f} GB; "
        if max_tokens >= 1:
            line += f"at most {max_tokens} tokens per micro-batch (batch x seq) fit"
        else:
            line += "even one token does not fit"
        if not options.get("offload_activations") and terms["boundary_activations"]:
            line += f"; --offload_activations moves {terms['boundary_activations'] / GB:.1f} GB to host memory"
        if chosen != "nf4" and others["nf4"]["gpu_bytes"] < plan["gpu_bytes"]:
            line += f"; --base_weight_dtype nf4 needs {others['nf4']['gpu_bytes'] / GB:.1f} GB"
        advice.append(line)
    if plan["unquantized_matrix_bytes"] > plan["host_bytes"] / 4:
        advice.append(
            f"quantization: {plan['unquantized_matrix_bytes'] / GB:.1f} GB of the layers' weight matrices are not "
            f"linear layers (fused MoE expert tensors) and stay in their dtype; base_weight_dtype does not shrink them"
        )
    if plan["tokens_per_step"] < plan["break_even_tokens"]:
        line = (
            f"speed: link-bound (the copy of {plan['bytes_per_step'] / GB:.1f} GB per step takes longer than the "
            f"compute); the GPU is busy from {plan['break_even_tokens']} tokens per micro-batch"
        )
        if chosen != "nf4" and not options.get("full_finetune"):
            line += f", or from {others['nf4']['break_even_tokens']} with --base_weight_dtype nf4"
        advice.append(line)
    return advice


def format_plan(plan: dict) -> str:
    gb = lambda n: f"{n / GB:,.1f} GB"
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines = [
        f"{plan['model_type']}: {plan['parameters'] / 1e9:.2f}B parameters, {plan['layers']} decoder layers, "
        f"{plan['dtype']} weights, base_weight_dtype={plan['base_weight_dtype']}",
        f"  host memory        {gb(plan['host_bytes'])}"
        + (
            f"   (available: {gb(plan['host_available_bytes'])}, {plan['host_available_source']})"
            if plan["host_available_bytes"] is not None
            else ""
        ),
    ]
    if len(plan["host_terms"]) > 1:
        lines += [f"    {name:<24}{gb(value)}" for name, value in plan["host_terms"].items()]
    lines += [
        f"  GPU memory         {gb(plan['gpu_bytes'])} at {plan['tokens_per_step']} tokens per micro-batch"
        + (f"   (budget: {gb(plan['gpu_budget_bytes'])})" if plan["gpu_budget_bytes"] else ""),
    ]
    lines += [f"    {name:<24}{gb(value)}" for name, value in plan["gpu_terms"].items()]
    lines += [
        f"  bytes per step     {gb(plan['bytes_per_step'])}"
        + (f"   (+ {gb(plan['grad_bytes_to_host'])} of gradients to the host)" if plan["grad_bytes_to_host"] else ""),
        f"  break-even         {plan['break_even_tokens']} tokens per micro-batch "
        f"(transfer {plan['transfer_seconds']:.2f} s vs compute {plan['compute_seconds']:.2f} s per step: "
        f"{plan['bound']}-bound, ~{plan['tokens_per_second']:,.0f} tokens/s)",
        f"verdict: {verdict}",
    ]
    lines += [f"  - {line}" for line in plan["advice"]]
    return "\n".join(lines)


# --- the subcommand -------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="Will a model fit, and how fast will it stream? From its config alone (no weights are loaded).",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("model", help="Hub id (downloads config.json only), local model directory, or config.json")
    add_flag(parser, "gpu_mem", type=float, default=None, metavar="GB", help="GPU memory to plan for")
    add_flag(parser, "host_mem", type=float, default=None, metavar="GB", help="host memory (default: available)")
    add_flag(parser, "seq", type=int, default=2048, help="sequence length (default: 2048)")
    add_flag(parser, "batch", type=int, default=1, help="micro-batch size (default: 1)")
    add_flag(parser, "dtype", type=str, default=None, help="weights' dtype: bf16, fp16 or fp32 (default: config's)")
    add_flag(parser, "pcie_gbps", type=float, default=DEFAULT_PCIE_GBPS, help="host-to-device GB/s achieved")
    add_flag(parser, "gpu_tflops", type=float, default=DEFAULT_GPU_TFLOPS, help="TFLOP/s a step achieves")
    add_arguments(parser, all_options(), "plan")
    add_flag(parser, "json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _dtype(name: str | None):
    try:
        return parse_dtype(name) if name else None
    except ValueError as err:
        raise PlanError(f"--dtype {err}") from None


def run(args: argparse.Namespace) -> int:
    try:
        for name in ("seq", "batch"):
            if getattr(args, name) < 1:
                raise PlanError(f"--{name} should be at least 1, but the value passed is {getattr(args, name)}")
        options = values_from(args, all_options(), "plan")
        config = load_config(args.model)
        plan = make_plan(
            config,
            gpu_mem_gb=args.gpu_mem,
            host_mem_gb=args.host_mem,
            dtype=_dtype(args.dtype),
            seq=args.seq,
            batch=args.batch,
            pcie_gbps=args.pcie_gbps,
            gpu_tflops=args.gpu_tflops,
            **options,
        )
    except (ValueError, UnsupportedModelError) as err:  # PlanError is a ValueError
        print(f"hf-offload plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0
