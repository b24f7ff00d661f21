"""`hf-offload plan`: will a model fit, and will streaming be link-bound? From its config alone, no weights loaded.

The model is built on the meta device (shapes and dtypes only) and measured with the same host-store layout code
the engine uses, so host bytes and bytes per step are what `enable_layer_streaming` would report. Device memory
follows the performance model (docs/how-it-works.md): (prefetch + 1) x the largest layer + resident modules +
boundary activations (L x tokens x hidden) + one layer's recompute activations, plus the dequantization scratch,
the LoRA adapters with their gradients and 8-bit AdamW state, and the logits of the loss. The activation terms are
estimates.

Example:
    hf-offload plan meta-llama/Llama-3.1-70B --gpu_mem 80 --seq 4096 --batch 2 --base_weight_dtype nf4
    hf-offload plan ./my-model/config.json --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field

import torch

from ..engine import hostmem, shared_store
from ..engine.chunked_loss import DEFAULT_CHUNK_BYTES
from ..engine.distributed import Ranks
from ..engine.facts import bytes_per_train_step
from ..engine.layer_major import MEMORY_FRACTION
from ..engine.quant import BASE_WEIGHT_DTYPES
from ..engine.trainable import training_host_bytes
from ..optimizer_state import adamw8bit_state_bytes
from ..options import add_arguments, add_flag, all_options, values_from
from ..records import Record
from ..units import GB, parse_dtype
from .cli import SUBCOMMANDS
from .model_sizes import ConfigError, ModelSizes, load_config, measure

DEFAULT_PCIE_GBPS = 25.0  # pinned host-to-device copies on PCIe 4.0 x16; PCIe 5.0 reaches ~50
# GPU-to-GPU all-gather bandwidth of a rank under partitioned fetch: NCCL's all-gather bus bandwidth on NVLink
# nodes is ~230 GB/s (A100) to ~350 GB/s (H100); without NVLink the gather crosses PCIe and this is far lower
DEFAULT_INTERCONNECT_GBPS = 200.0
DEFAULT_GPU_TFLOPS = 400.0  # bf16 dense matmul throughput a training step achieves on an H100-class GPU
GPU_HEADROOM = 0.9  # share of GPU memory the estimate may use; the rest is CUDA context, workspaces, fragmentation
# One layer's recompute keeps about this many activations per token (norm inputs in fp32, q/k/v/o, attention output,
# MLP gate/up/activation/product); a rough count for a Llama-style layer with LoRA on every linear layer.
LAYER_ACTIVATIONS_PER_TOKEN = (10, 4)  # x hidden_size, x intermediate_size
LOGIT_EXTRA_BYTES = 8  # the loss upcasts logits to fp32 and keeps fp32 log-probabilities, per logit
DEFAULT_EVAL_BATCHES = 64


# A plan fails for the reasons a config cannot be read or measured, and for its own options: one error class.
PlanError = ConfigError


# --- the results --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate(Record):
    """One configuration's costs: host and device bytes, bytes per step and the break-even point."""

    base_weight_dtype: str | None
    tokens_per_step: int
    host_bytes: int
    host_terms: dict[str, int]  # what the host memory holds: the compute copy, and with full fine-tuning the rest
    full_finetune: bool
    grad_bytes_to_host: int  # full fine-tuning: the layers' weight gradients sent back per step
    # peak while a checkpoint loads straight into the store (HostStoreConfig, the launcher): the store as it fills
    # and the largest layer twice in the checkpoint's dtype in flight (once per node when the ranks share the store,
    # else per rank), and every rank's modules outside the layers
    loading_host_bytes: int
    unquantized_matrix_bytes: int  # weight matrices the codec leaves dense (unroutable MoE experts, odd sizes)
    gpu_bytes: int
    gpu_terms: dict[str, int]
    bytes_per_step: int
    break_even_tokens: int
    transfer_seconds: float
    compute_seconds: float
    tokens_per_second: float
    bound: str  # "transfer" or "compute"
    # what one evaluation batch costs (see `_evaluation`): every layer's bytes, a forward's FLOPs, and what it holds
    # on the device while its group runs layer-major (its hidden state, masks at as much, its logits)
    eval_batch: dict[str, float]
    # data parallel: ranks per node (host bytes are per node, GPU bytes per rank), the node's shared store in the
    # tmpfs (0 when each rank keeps its own), and the host-memory read rate of the node's ranks while they copy
    nproc_per_node: int = 1
    shm_bytes: int = 0
    host_read_gbps: float = 0.0
    partitioned_fetch: bool = False  # each layer read once per node, all-gathered among its ranks


@dataclass(frozen=True)
class Plan(Estimate):
    """What `hf-offload plan` prints: the chosen configuration's `Estimate`, the model, the verdict, the advice."""

    model_type: str | None = None
    dtype: str = ""
    layers: int = 0
    parameters: int = 0
    gpu_budget_bytes: float | None = None
    host_available_bytes: float | None = None
    host_available_source: str = ""
    fits_gpu: bool = True
    fits_host: bool = True
    fits: bool = True
    max_tokens_per_micro_batch: int | None = None  # the longest micro-batch that fits the GPU budget (if given)
    advice: list[str] = field(default_factory=list)
    evaluation: dict[str, float] = field(default_factory=dict)  # one evaluation, batch by batch and layer-major


# --- the estimate -----------------------------------------------------------------------------------------------------
TOKEN_TERMS = ("boundary_activations", "layer_activations", "logits")


def token_terms(
    sizes: ModelSizes,
    tokens: int,
    *,
    offload_activations: bool = False,
    prefetch: int = 1,
    chunked_loss: bool = True,
    loss_chunk_tokens: int | None = None,
    mlp_tile_tokens: int | None = 8192,
) -> dict[str, int]:
    """The device bytes that depend on the tokens of a micro-batch (batch x seq).

    Boundary activations (the hidden state each layer saves for its backward) grow with the tokens: every layer's
    stays on the device until its backward, or, offloaded, only those of the layer being recomputed and of the
    `prefetch` layers whose copies back have started (see `boundary_states_on_device`). A layer's recompute keeps
    its activations, but with the MLP in tiles its intermediates only for one tile. The loss keeps one chunk of
    logits (plus the hidden states of the tokens it scores) when chunked, else the whole logits.

    Args:
        sizes: the model's sizes (`measure`).
        tokens: tokens per micro-batch (batch x seq).
        offload_activations, prefetch, chunked_loss, loss_chunk_tokens, mlp_tile_tokens: the OffloadConfig options.

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
        "boundary_activations": boundary_states_on_device(len(sizes.kind_of), offload_activations, prefetch)
        * tokens
        * sizes.hidden
        * act,
        "layer_activations": (tokens * per_hidden * sizes.hidden + mlp_tokens * per_inter * sizes.intermediate) * act,
        "logits": logits,
    }


def boundary_states_on_device(layers: int, offload_activations: bool, prefetch: int) -> int:
    """How many layers' saved boundary states the device holds at most during a training step.

    Kept: all of them when the backward starts. Offloaded (engine/activations.py): in the backward, the recomputing
    layer's and the `prefetch` ones already on their way back (a forward holds fewer: the computing layer's input and
    the one whose copy out may still run).
    """
    return min(layers, prefetch + 1) if offload_activations else layers


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
    full_finetune: bool = False,
    nproc_per_node: int = 1,
    shared_host_store: bool | None = None,
    early_layer_steps: bool = True,
    host_optimizer_bits: int = 32,
    partitioned_fetch: bool = False,
    interconnect_gbps: float = DEFAULT_INTERCONNECT_GBPS,
) -> Estimate:
    """Host bytes, device bytes (with their terms), bytes per step and break-even tokens for one configuration.

    `chunked_loss`, `loss_chunk_tokens` and `mlp_tile_tokens` are the OffloadConfig options (same defaults): with
    them the logits and the MLP intermediates stop growing with the sequence (see `token_terms`). With
    `full_finetune`, host memory also holds the layers' fp32 masters (bf16/fp16 models), fp32 gradients and AdamW
    state (`host_terms`), the device trains the resident modules with AdamW instead of adapters, and each step sends
    every layer's gradients back to the host (`grad_bytes_to_host`). With `nproc_per_node` data-parallel ranks,
    host bytes are the node's: one store shared by the ranks (`shared_host_store`, on by default with several ranks)
    or one per rank; GPU bytes are each rank's. With `early_layer_steps` (the Trainer's HostAdamW stepping layers
    during backward) host memory also holds its copies of the layers' weights and moments (`early_step_backups`).
    `host_optimizer_bits` is HostAdamW's `state_bits`: the moments (and their copies) in fp32 or 8-bit.
    With `partitioned_fetch`, each rank copies 1/`nproc_per_node` of every layer over its link and all-gathers the
    rest at `interconnect_gbps`, one after the other on its copy stream; the node reads each layer once.
    """
    layouts = sizes.kind_layouts(base_weight_dtype)  # one per layer kind; `counts` says how many layers each
    counts = sizes.kind_counts()
    store = [layouts[k].nbytes for k in sizes.kind_of]
    n_layers = len(store)
    tokens = batch * seq
    act = 4 if sizes.dtype == torch.float32 else 2
    lora = {lora_r * n: count for n, count in sizes.lora_tensors.items()}  # numel of an adapter matrix -> how many
    boundary = n_layers * tokens * sizes.hidden * act
    long_context = dict(chunked_loss=chunked_loss, loss_chunk_tokens=loss_chunk_tokens, mlp_tile_tokens=mlp_tile_tokens)
    gpu_terms = {
        "layer_slots": (prefetch + 1) * max(store),
        "dequant_scratch": max(layout.scratch_nbytes for layout in layouts),
        "resident_modules": sizes.resident_bytes,
        # fp32 adapters (peft's default for bf16/fp16 bases), their fp32 gradients, 8-bit AdamW state
        "adapters_and_optimizer": 0
        if full_finetune
        else sum(count * (8 * n + adamw8bit_state_bytes(n)) for n, count in lora.items()),
        **token_terms(sizes, tokens, offload_activations=offload_activations, prefetch=prefetch, **long_context),
    }
    shared = shared_store.wanted(shared_host_store, Ranks(local_world_size=nproc_per_node))
    copies = 1 if shared else nproc_per_node
    host_terms = {"compute_copy": copies * sum(store)}
    grad_bytes_to_host = 0
    if full_finetune:
        # the engine's own accounting (fp32 masters, gradients, AdamW moments), on the meta model's parameters
        training: dict[str, int] = {}
        for layer, count in zip(sizes.kinds, counts):
            for name, nbytes in training_host_bytes(list(layer.parameters()), host_optimizer_bits).items():
                training[name] = training.get(name, 0) + count * nbytes
        host_terms.update(training)
        if early_layer_steps:  # HostAdamW's copies of each layer's weights (master dtype) and moments (as kept)
            host_terms["early_step_backups"] = training["gradients"] + training["optimizer_state"]
        # the resident modules train on the device with torch AdamW: gradient and two moments in their dtype
        gpu_terms["resident_grads_adamw"] = 3 * sizes.resident_bytes
        gpu_terms["layer_gradients"] = max(store)  # one layer's weight gradients, until they reach the host
        grad_bytes_to_host = sum(store)  # each layer's weight gradients, in the compute dtype
    if offload_activations:
        host_terms["offloaded_activations"] = boundary  # exact-size page-locked buffers, one per layer
    host_bytes = sum(host_terms.values())
    # loading into a shared store, local rank 0 alone reads the layers; every rank loads the modules outside them
    loading_host_bytes = copies * (sum(store) + 2 * max(sizes.layer_bytes, default=0)) + nproc_per_node * (
        sizes.resident_bytes
    )
    bytes_per_step = bytes_per_train_step(store, prefetch)
    bandwidth, flops_per_s = pcie_gbps * GB, gpu_tflops * 1e12
    flops = 6 * sizes.compute_params * tokens  # forward, recompute, input gradients
    sharing = nproc_per_node if partitioned_fetch else 1  # ranks that split each layer copy
    transfer_s = bytes_per_step / sharing / bandwidth + bytes_per_step * (sharing - 1) / sharing / (
        interconnect_gbps * GB
    )
    compute_s = flops / flops_per_s
    break_even = math.ceil(transfer_s * flops_per_s / (6 * sizes.compute_params))
    step_s = max(transfer_s, compute_s)
    return Estimate(
        base_weight_dtype=base_weight_dtype,
        tokens_per_step=tokens,
        host_bytes=host_bytes,
        host_terms=host_terms,
        full_finetune=full_finetune,
        grad_bytes_to_host=grad_bytes_to_host,
        loading_host_bytes=loading_host_bytes,
        # not nn.Linear/Conv1D nor the stacked tensors of a routable experts module, or odd sizes
        unquantized_matrix_bytes=sum(
            count * r.nbytes for layout, count in zip(layouts, counts) for p, r in layout.dense if p.dim() >= 2
        )
        if base_weight_dtype is not None
        else 0,
        gpu_bytes=sum(gpu_terms.values()),
        gpu_terms=gpu_terms,
        bytes_per_step=bytes_per_step,
        break_even_tokens=break_even,
        transfer_seconds=transfer_s,
        compute_seconds=compute_s,
        tokens_per_second=tokens / max(transfer_s, compute_s),
        bound="transfer" if transfer_s > compute_s else "compute",
        eval_batch={
            "layer_bytes": sum(store),
            "seconds_of_compute": 2 * sizes.compute_params * tokens / flops_per_s,
            "group_bytes": tokens * (2 * sizes.hidden + sizes.vocab) * act,
            "fixed_gpu_bytes": gpu_terms["layer_slots"] + gpu_terms["dequant_scratch"] + gpu_terms["resident_modules"],
            "bandwidth": bandwidth,
        },
        nproc_per_node=nproc_per_node,
        shm_bytes=sum(store) if shared else 0,
        host_read_gbps=nproc_per_node // sharing * bytes_per_step / step_s / GB if step_s else 0.0,
        partitioned_fetch=sharing > 1,
    )


def make_plan(
    config,
    *,
    gpu_mem_gb: float | None = None,
    host_mem_gb: float | None = None,
    host_mem_gbps: float | None = None,
    dtype: torch.dtype | None = None,
    **options,
) -> Plan:
    """The plan `hf-offload plan` prints: `estimate` for the chosen options, a verdict and what to change.

    `options` are those of `estimate`. Host memory: `host_mem_gb`, else what this machine has available now.
    `host_mem_gbps`: the node's host memory bandwidth, against which the data-parallel ranks' reads are advised.
    """
    base_weight_dtype = options.get("base_weight_dtype")
    if options.get("full_finetune") and base_weight_dtype is not None:
        raise PlanError(
            f"--full_finetune trains the decoder weights, so they cannot be stored quantized (--base_weight_dtype "
            f"{base_weight_dtype}); drop one of the two."
        )
    if options.get("full_finetune") and options.get("nproc_per_node", 1) > 1:
        raise PlanError(
            f"--full_finetune runs as one process (the layers' gradients go to host masters that data parallel would "
            f"not average), but --nproc_per_node is {options['nproc_per_node']}; plan one process, or adapters."
        )
    if options.get("host_optimizer_bits", 32) != 32 and not options.get("full_finetune"):
        raise PlanError(
            f"--host_optimizer_bits {options['host_optimizer_bits']} sets the state of the host optimizer of full "
            "fine-tuning; add --full_finetune, or drop --host_optimizer_bits."
        )
    if base_weight_dtype is not None and base_weight_dtype not in BASE_WEIGHT_DTYPES:
        raise PlanError(
            f"--base_weight_dtype should be one of {', '.join(BASE_WEIGHT_DTYPES)}, not {base_weight_dtype!r}"
        )
    eval_batches = options.pop("eval_batches", DEFAULT_EVAL_BATCHES)
    sizes = measure(config, dtype)
    plan = estimate(sizes, **options)
    if options.get("full_finetune"):
        others = dict.fromkeys((None, *BASE_WEIGHT_DTYPES), plan)  # the weights train: no quantized store to suggest
    else:
        others = {d: estimate(sizes, **{**options, "base_weight_dtype": d}) for d in (None, *BASE_WEIGHT_DTYPES)}
    gpu_budget = gpu_mem_gb * GB * GPU_HEADROOM if gpu_mem_gb else None
    host_available = host_mem_gb * GB if host_mem_gb else hostmem.available_bytes()
    fits_gpu = gpu_budget is None or plan["gpu_bytes"] <= gpu_budget
    max_tokens = None
    if gpu_budget is not None:
        fixed = plan.gpu_bytes - sum(plan.gpu_terms[t] for t in TOKEN_TERMS)
        names = ("offload_activations", "prefetch", "chunked_loss", "loss_chunk_tokens", "mlp_tile_tokens")
        max_tokens = longest_micro_batch(sizes, fixed, gpu_budget, **{k: v for k, v in options.items() if k in names})
    fits_host = host_available is None or max(plan["host_bytes"], plan["loading_host_bytes"]) <= host_available
    return Plan(
        **plan.as_dict(),
        model_type=getattr(config, "model_type", None),
        dtype=str(sizes.dtype).removeprefix("torch."),
        layers=len(sizes.kind_of),
        parameters=sizes.total_params,
        gpu_budget_bytes=gpu_budget,
        host_available_bytes=host_available,
        host_available_source="--host_mem" if host_mem_gb else "this machine (MemAvailable)",
        fits_gpu=fits_gpu,
        fits_host=fits_host,
        fits=fits_gpu and fits_host,
        max_tokens_per_micro_batch=max_tokens,
        advice=[
            *_advice(plan, others, gpu_budget, host_available, options, max_tokens, len(sizes.layers)),
            *_data_parallel_advice(
                plan, others, estimate(sizes, **{**options, "partitioned_fetch": True}), host_mem_gbps, options
            ),
        ],
        evaluation=_evaluation(plan.eval_batch, eval_batches, gpu_budget),
    )


def _evaluation(batch: dict, eval_batches: int, gpu_budget: float | None) -> dict:
    """Bytes and time of one evaluation of `eval_batches` batches, batch by batch and layer-major.

    Layer-major loads each layer once per group; a group is as many batches as `MEMORY_FRACTION` of the GPU memory
    left by the layer slots and resident modules holds (what the engine plans from free memory), or all of them
    when no GPU memory is given. Time: the copy and the compute overlap, the longer one counts.
    """
    if gpu_budget is None:
        group = eval_batches
    else:
        spare = max(0.0, gpu_budget - batch["fixed_gpu_bytes"]) * MEMORY_FRACTION
        group = max(1, min(eval_batches, int(spare // batch["group_bytes"]) if batch["group_bytes"] else eval_batches))
    compute = eval_batches * batch["seconds_of_compute"]
    result = {"eval_batches": eval_batches, "group_size": group}
    for name, loads in (("batch_major", eval_batches), ("layer_major", math.ceil(eval_batches / group))):
        nbytes = loads * batch["layer_bytes"]
        result[f"{name}_bytes"] = nbytes
        result[f"{name}_seconds"] = max(nbytes / batch["bandwidth"], compute)
    return result


def _advice(
    plan: Estimate,
    others: dict[str | None, Estimate],
    gpu_budget,
    host_available,
    options: dict,
    max_tokens,
    layers: int,
) -> list[str]:
    advice = []
    chosen = options.get("base_weight_dtype")

    def host_peak(estimate) -> int:  # training, or loading straight into the store, whichever holds more
        return max(estimate["host_bytes"], estimate["loading_host_bytes"])

    smaller = [d for d in BASE_WEIGHT_DTYPES if host_peak(others[d]) < host_peak(plan)]
    if host_available is not None and host_peak(plan) > host_available:
        fitting = [d for d in smaller if host_peak(others[d]) <= host_available]
        advice.append(
            f"host memory: needs {host_peak(plan) / GB:.1f} GB, {host_available / GB:.1f} GB available; "
            + (
                f"--base_weight_dtype {fitting[0]} needs {host_peak(others[fitting[0]]) / GB:.1f} GB"
                if fitting
                else "no base_weight_dtype fits: more host memory is needed"
            )
        )
    if gpu_budget is not None and plan["gpu_bytes"] > gpu_budget:
        terms = plan["gpu_terms"]
        line = f"GPU memory: needs {plan['gpu_bytes'] / GB:.1f} GB, budget {gpu_budget / GB:.1f} GB; "
        if max_tokens >= 1:
            line += f"at most {max_tokens} tokens per micro-batch (batch x seq) fit"
        else:
            line += "even one token does not fit"
        if not options.get("offload_activations") and terms["boundary_activations"]:
            kept = boundary_states_on_device(layers, True, options.get("prefetch", 1))
            moved = terms["boundary_activations"] * (1 - kept / layers)
            line += f"; --offload_activations moves {moved / GB:.1f} GB to host memory"
        if chosen != "nf4" and others["nf4"]["gpu_bytes"] < plan["gpu_bytes"]:
            line += f"; --base_weight_dtype nf4 needs {others['nf4']['gpu_bytes'] / GB:.1f} GB"
        advice.append(line)
    if plan["unquantized_matrix_bytes"] > plan["host_bytes"] / 4:
        advice.append(
            f"quantization: {plan['unquantized_matrix_bytes'] / GB:.1f} GB of the layers' weight matrices are neither "
            "linear layers nor experts hf_offload can route (or their sizes are not multiples of 64 for nf4), and stay "
            "in their dtype; base_weight_dtype does not shrink them"
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


def _data_parallel_advice(
    plan: Estimate, others: dict, partitioned: Estimate, host_mem_gbps: float | None, options: dict
) -> list[str]:
    """What several ranks per node change: the tmpfs that holds the shared store, and host memory bandwidth
    (`partitioned`: the plan with partitioned fetch)."""
    n = plan["nproc_per_node"]
    if n == 1:
        if options.get("partitioned_fetch"):
            return ["--partitioned_fetch has no effect with one rank per node: set --nproc_per_node to the node's GPUs"]
        return []
    advice = []
    if plan["shm_bytes"]:
        advice.append(
            f"data parallel: the node's {n} ranks share one host store of {plan['shm_bytes'] / GB:.1f} GB in /dev/shm "
            "(check `df -h /dev/shm`; Docker: --shm-size); each rank also holds its own process memory"
        )
    else:
        advice.append(
            f"data parallel: each of the {n} ranks keeps its own host store ({n} x "
            f"{plan['host_bytes'] / n / GB:.1f} GB); leave --shared_host_store unset to share one per node"
        )
    line = f"host memory bandwidth: the {n} ranks read {plan['host_read_gbps']:.0f} GB/s from host memory while copying"
    if plan["partitioned_fetch"]:
        line += " (partitioned fetch: each layer once per node, all-gathered between the GPUs)"
    if host_mem_gbps is not None and plan["host_read_gbps"] > host_mem_gbps / 2:
        line += (
            f", more than half of the node's {host_mem_gbps:.0f} GB/s: the copies will slow down. Pin each rank to the "
            "NUMA node of its GPU (docs/multi-gpu.md)"
        )
        if not plan["partitioned_fetch"]:
            line += f", use --partitioned_fetch on NVLink nodes ({partitioned['host_read_gbps']:.0f} GB/s)"
        if options.get("base_weight_dtype") != "nf4" and not options.get("full_finetune"):
            line += f", or use --base_weight_dtype nf4 ({others['nf4']['host_read_gbps']:.0f} GB/s)"
    elif host_mem_gbps is not None:
        line += f", within the node's {host_mem_gbps:.0f} GB/s"
    advice.append(line)
    return advice


def format_plan(plan: Plan) -> str:
    gb = lambda n: f"{n / GB:,.1f} GB"
    verdict = "fits" if plan["fits"] else "does NOT fit"
    ev = plan.evaluation
    lines = [
        f"{plan['model_type']}: {plan['parameters'] / 1e9:.2f}B parameters, {plan['layers']} decoder layers, "
        f"{plan['dtype']} weights, base_weight_dtype={plan['base_weight_dtype']}",
        f"  host memory        {gb(plan['host_bytes'])}"
        + (f" per node ({plan['nproc_per_node']} ranks)" if plan["nproc_per_node"] > 1 else "")
        + (
            f"   (available: {gb(plan['host_available_bytes'])}, {plan['host_available_source']})"
            if plan["host_available_bytes"] is not None
            else ""
        ),
    ]
    if len(plan["host_terms"]) > 1:
        lines += [f"    {name:<24}{gb(value)}" for name, value in plan["host_terms"].items()]
    lines.append(
        f"  while loading      {gb(plan['loading_host_bytes'])}   (straight into the store: the store, the modules "
        "outside the layers and the largest layer twice)"
    )
    lines += [
        f"  GPU memory         {gb(plan['gpu_bytes'])} at {plan['tokens_per_step']} tokens per micro-batch"
        + (" per rank" if plan["nproc_per_node"] > 1 else "")
        + (f"   (budget: {gb(plan['gpu_budget_bytes'])})" if plan["gpu_budget_bytes"] else ""),
    ]
    lines += [f"    {name:<24}{gb(value)}" for name, value in plan["gpu_terms"].items()]
    if plan.max_tokens_per_micro_batch is not None:
        longest = plan.max_tokens_per_micro_batch
        lines.append(f"  longest fitting    {longest:,} tokens per micro-batch (batch x seq)")
    lines += [
        f"  bytes per step     {gb(plan['bytes_per_step'])}"
        + (f"   (+ {gb(plan['grad_bytes_to_host'])} of gradients to the host)" if plan["grad_bytes_to_host"] else ""),
        f"  break-even         {plan['break_even_tokens']} tokens per micro-batch "
        f"(transfer {plan['transfer_seconds']:.2f} s vs compute {plan['compute_seconds']:.2f} s per step: "
        f"{plan['bound']}-bound, ~{plan['tokens_per_second']:,.0f} tokens/s)",
        f"  evaluation         {ev['eval_batches']} batches: {gb(ev['batch_major_bytes'])}, "
        f"~{ev['batch_major_seconds']:,.1f} s batch by batch; {gb(ev['layer_major_bytes'])}, "
        f"~{ev['layer_major_seconds']:,.1f} s layer-major (groups of {ev['group_size']})",
        f"verdict: {verdict}",
    ]
    lines += [f"  - {line}" for line in plan["advice"]]
    return "\n".join(lines)


# --- the subcommand -------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help=SUBCOMMANDS["plan"][1],
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
    add_flag(
        parser,
        "nproc_per_node",
        type=int,
        default=1,
        help="data-parallel ranks (GPUs) per node, as torchrun's --nproc_per_node: host memory is per node, GPU "
        "memory per rank (default: 1)",
    )
    add_flag(
        parser,
        "host_mem_gbps",
        type=float,
        default=None,
        metavar="GB/s",
        help="the node's host memory bandwidth, to compare with what the ranks read while copying",
    )
    add_flag(
        parser,
        "interconnect_gbps",
        type=float,
        default=DEFAULT_INTERCONNECT_GBPS,
        metavar="GB/s",
        help="with --partitioned_fetch: the all-gather bandwidth between a node's GPUs (default: "
        f"{DEFAULT_INTERCONNECT_GBPS:.0f}, NVLink; far lower without it)",
    )
    add_flag(
        parser,
        "eval_batches",
        type=int,
        default=DEFAULT_EVAL_BATCHES,
        help=f"eval batches (of --batch x --seq) for the evaluation line (default: {DEFAULT_EVAL_BATCHES})",
    )
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
        for name in ("seq", "batch", "eval_batches", "nproc_per_node"):
            if getattr(args, name) < 1:
                raise PlanError(f"--{name} should be at least 1, but the value passed is {getattr(args, name)}")
        for name in ("gpu_mem", "host_mem", "pcie_gbps", "gpu_tflops", "host_mem_gbps", "interconnect_gbps"):
            value = getattr(args, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise PlanError(f"--{name} should be a positive number, but the value passed is {value}")
        options = values_from(args, all_options(), "plan")
        config = load_config(args.model)
        plan = make_plan(
            config,
            gpu_mem_gb=args.gpu_mem,
            host_mem_gb=args.host_mem,
            host_mem_gbps=args.host_mem_gbps,
            nproc_per_node=args.nproc_per_node,
            dtype=_dtype(args.dtype),
            seq=args.seq,
            batch=args.batch,
            pcie_gbps=args.pcie_gbps,
            gpu_tflops=args.gpu_tflops,
            interconnect_gbps=args.interconnect_gbps,
            eval_batches=args.eval_batches,
            **options,
        )
    except ValueError as err:  # PlanError, UnsupportedModelError
        print(f"hf-offload plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict()) if args.json else format_plan(plan))
    return 0
