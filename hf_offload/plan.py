"""`hf-offload plan`: will a model fit, and will streaming be link-bound? From its config alone, no weights loaded.

The model is built on the meta device (shapes and dtypes only) and measured with the same host-store layout code
the engine uses, so host bytes and bytes per step are what `enable_layer_streaming` would report. Device memory
follows DESIGN.md section 5: (prefetch + 1) x the largest layer + resident modules + boundary activations
(L x tokens x hidden) + one layer's recompute activations, plus the dequantization scratch, the LoRA adapters with
their gradients and 8-bit AdamW state, and the logits of the loss. The activation terms are estimates.

Example:
    hf-offload plan meta-llama/Llama-3.1-70B --gpu-mem 80 --seq 4096 --batch 2 --base-weight-dtype nf4
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

from .engine import hostmem
from .engine.anatomy import UnsupportedModelError, find_decoder_layers
from .engine.chunked_loss import DEFAULT_CHUNK_BYTES
from .engine.quant import BASE_WEIGHT_DTYPES, linear_weights, make_codec
from .engine.store import layout_layer
from .optimizer_state import adamw8bit_state_bytes

GB = 1e9
DEFAULT_PCIE_GBPS = 25.0  # pinned host-to-device copies on PCIe 4.0 x16; PCIe 5.0 reaches ~50
DEFAULT_GPU_TFLOPS = 400.0  # bf16 dense matmul throughput a training step achieves on an H100-class GPU
GPU_HEADROOM = 0.9  # share of GPU memory the estimate may use; the rest is CUDA context, workspaces, fragmentation
# One layer's recompute keeps about this many activations per token (norm inputs in fp32, q/k/v/o, attention output,
# MLP gate/up/activation/product); a rough count for a Llama-style layer with LoRA on every linear layer.
LAYER_ACTIVATIONS_PER_TOKEN = (10, 4)  # x hidden_size, x intermediate_size
LOGIT_EXTRA_BYTES = 8  # the loss upcasts logits to fp32 and keeps fp32 log-probabilities, per logit
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
TOKEN_TERMS = ("boundary_activations", "layer_activations", "logits")


def token_terms(
    sizes: ModelSizes,
    tokens: int,
    *,
    offload_activations: bool = False,
    chunked_loss: bool = True,
    loss_chunk_tokens: int | None = None,
    mlp_tile_tokens: int | None = 8192,
) -> dict[str, int]:
    """The device bytes that depend on the tokens of a micro-batch (batch x seq).

    Boundary activations grow with the tokens (unless offloaded). A layer's recompute keeps its activations, but
    with the MLP in tiles its intermediates only for one tile. The loss keeps one chunk of logits (plus the hidden
    states of the tokens it scores) when chunked, else the whole logits.

    Args:
        sizes: the model's sizes (`measure`).
        tokens: tokens per micro-batch (batch x seq).
        offload_activations, chunked_loss, loss_chunk_tokens, mlp_tile_tokens: the OffloadConfig options.

    Returns:
        {"boundary_activations", "layer_activations", "logits"}: bytes on the device.
    """
    act = 4 if sizes.dtype == torch.float32 else 2
    per_hidden, per_inter = LAYER_ACTIVATIONS_PER_TOKEN
    mlp_tokens = min(tokens, mlp_tile_tokens) if mlp_tile_tokens is not None else tokens
    if chunked_loss:
        chunk = loss_chunk_tokens or max(1, DEFAULT_CHUNK_BYTES // (4 * sizes.vocab))
        logits = min(tokens, chunk) * sizes.vocab * (act + LOGIT_EXTRA_BYTES) + tokens * sizes.hidden * act
    else:
        logits = tokens * sizes.vocab * (act + LOGIT_EXTRA_BYTES)
    return {
        "boundary_activations": 0 if offload_activations else len(sizes.layers) * tokens * sizes.hidden * act,
        "layer_activations": (tokens * per_hidden * sizes.hidden + mlp_tokens * per_inter * sizes.intermediate) * act,
        "logits": logits,
    }


def longest_micro_batch(sizes: ModelSizes, fixed_bytes: int, budget: float, **options) -> int:
    """The longest micro-batch that fits the GPU.

    Args:
        sizes: the model's sizes (`measure`).
        fixed_bytes: device bytes that do not depend on the tokens (slots, resident modules, adapters, optimizer).
        budget: device bytes available.
        options: `token_terms` options.

    Returns:
        The most tokens per micro-batch whose device bytes (`fixed_bytes` + `token_terms`) fit `budget`; 0 if none.
    """

    def fits(tokens: int) -> bool:
        return fixed_bytes + sum(token_terms(sizes, tokens, **options).values()) <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > 2**40:  # nothing grows with the tokens
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


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
    chunked_loss: bool = True,
    loss_chunk_tokens: int | None = None,
    mlp_tile_tokens: int | None = 8192,
) -> dict:
    """Host bytes, device bytes (with their terms), bytes per step and break-even tokens for one configuration.

    `chunked_loss`, `loss_chunk_tokens` and `mlp_tile_tokens` are the OffloadConfig options (same defaults): with
    them the logits and the MLP intermediates stop growing with the sequence (see `token_terms`).
    """
    codec = make_codec(base_weight_dtype)
    layouts = [layout_layer(layer, codec, params=list(layer.parameters())) for layer in sizes.layers]
    store = [layout.nbytes for layout in layouts]
    n_layers = len(store)
    tokens = batch * seq
    act = 4 if sizes.dtype == torch.float32 else 2
    lora = [lora_r * n for n in sizes.lora_tensors]  # numel of each adapter matrix
    boundary = n_layers * tokens * sizes.hidden * act
    long_context = dict(chunked_loss=chunked_loss, loss_chunk_tokens=loss_chunk_tokens, mlp_tile_tokens=mlp_tile_tokens)
    gpu_terms = {
        "layer_slots": (prefetch + 1) * max(store),
        "dequant_scratch": max(layout.scratch_nbytes for layout in layouts),
        "resident_modules": sizes.resident_bytes,
        # fp32 adapters (peft's default for bf16/fp16 bases), their fp32 gradients, 8-bit AdamW state
        "adapters_and_optimizer": sum(8 * n + adamw8bit_state_bytes(n) for n in lora),
        **token_terms(sizes, tokens, offload_activations=offload_activations, **long_context),
    }
    host_bytes = sum(store) + (boundary if offload_activations else 0)
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
    if base_weight_dtype is not None and base_weight_dtype not in BASE_WEIGHT_DTYPES:
        raise PlanError(
            f"--base-weight-dtype should be one of {', '.join(BASE_WEIGHT_DTYPES)}, not {base_weight_dtype!r}"
        )
    sizes = measure(config, dtype)
    plan = estimate(sizes, **options)
    others = {d: estimate(sizes, **{**options, "base_weight_dtype": d}) for d in (None, *BASE_WEIGHT_DTYPES)}
    gpu_budget = gpu_mem_gb * GB * GPU_HEADROOM if gpu_mem_gb else None
    host_available = host_mem_gb * GB if host_mem_gb else hostmem.available_bytes()
    fits_gpu = gpu_budget is None or plan["gpu_bytes"] <= gpu_budget
    if gpu_budget is not None:
        fixed = plan["gpu_bytes"] - sum(plan["gpu_terms"][t] for t in TOKEN_TERMS)
        names = ("offload_activations", "chunked_loss", "loss_chunk_tokens", "mlp_tile_tokens")
        plan["max_tokens_per_micro_batch"] = longest_micro_batch(
            sizes, fixed, gpu_budget, **{k: v for k, v in options.items() if k in names}
        )
    fits_host = host_available is None or plan["host_bytes"] <= host_available
    plan.update(
        model_type=getattr(config, "model_type", None),
        dtype=str(sizes.dtype).removeprefix("torch."),
        layers=len(sizes.layers),
        parameters=sizes.total_params,
        gpu_budget_bytes=gpu_budget,
        host_available_bytes=host_available,
        host_available_source="--host-mem" if host_mem_gb else "this machine (MemAvailable)",
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
                f"--base-weight-dtype {fitting[0]} needs {others[fitting[0]]['host_bytes'] / GB:.1f} GB"
                if fitting
                else "no base_weight_dtype fits: more host memory is needed"
            )
        )
    if gpu_budget is not None and plan["gpu_bytes"] > gpu_budget:
        terms = plan["gpu_terms"]
        max_tokens = plan["max_tokens_per_micro_batch"]
        line = f"GPU memory: needs {plan['gpu_bytes'] / GB:.1f} GB, budget {gpu_budget / GB:.1f} GB; "
        if max_tokens >= 1:
            line += f"at most {max_tokens} tokens per micro-batch (batch x seq) fit"
        else:
            line += "even one token does not fit"
        if not options.get("offload_activations") and terms["boundary_activations"]:
            line += f"; --offload-activations moves {terms['boundary_activations'] / GB:.1f} GB to host memory"
        if chosen != "nf4" and others["nf4"]["gpu_bytes"] < plan["gpu_bytes"]:
            line += f"; --base-weight-dtype nf4 needs {others['nf4']['gpu_bytes'] / GB:.1f} GB"
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
        if chosen != "nf4":
            line += f", or from {others['nf4']['break_even_tokens']} with --base-weight-dtype nf4"
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
        f"  GPU memory         {gb(plan['gpu_bytes'])} at {plan['tokens_per_step']} tokens per micro-batch"
        + (f"   (budget: {gb(plan['gpu_budget_bytes'])})" if plan["gpu_budget_bytes"] else ""),
    ]
    lines += [f"    {name:<24}{gb(value)}" for name, value in plan["gpu_terms"].items()]
    if plan.get("max_tokens_per_micro_batch") is not None:
        longest = plan["max_tokens_per_micro_batch"]
        lines.append(f"  longest fitting    {longest:,} tokens per micro-batch (batch x seq)")
    lines += [
        f"  bytes per step     {gb(plan['bytes_per_step'])}",
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
    parser.add_argument("--gpu-mem", type=float, default=None, metavar="GB", help="GPU memory to plan for")
    parser.add_argument("--host-mem", type=float, default=None, metavar="GB", help="host memory (default: available)")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default: 2048)")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size (default: 1)")
    parser.add_argument("--base-weight-dtype", choices=BASE_WEIGHT_DTYPES, default=None)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="weights' dtype (default: config's)")
    parser.add_argument("--pcie-gbps", type=float, default=DEFAULT_PCIE_GBPS, help="host-to-device GB/s achieved")
    parser.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS, help="TFLOP/s a step achieves")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every linear layer (default: 16)")
    parser.add_argument("--prefetch", type=int, default=1, help="layers loaded ahead (default: 1)")
    parser.add_argument("--offload-activations", action="store_true", help="boundary activations in host memory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("seq", "batch", "lora_r"):
        if getattr(args, name) < 1:
            print(f"hf-offload plan: --{name.replace('_', '-')} should be at least 1", file=sys.stderr)
            return 2
    try:
        config = load_config(args.model)
        plan = make_plan(
            config,
            gpu_mem_gb=args.gpu_mem,
            host_mem_gb=args.host_mem,
            dtype=_DTYPES[args.dtype] if args.dtype else None,
            base_weight_dtype=args.base_weight_dtype,
            seq=args.seq,
            batch=args.batch,
            pcie_gbps=args.pcie_gbps,
            gpu_tflops=args.gpu_tflops,
            lora_r=args.lora_r,
            prefetch=args.prefetch,
            offload_activations=args.offload_activations,
        )
    except (PlanError, UnsupportedModelError) as err:
        print(f"hf-offload plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0
