"""`OffloadConfig`: how the engine streams a model, each option declared once (see `hf_offload.options`).

The options declared here show on the Python API, the plugin, the Trainer's `--offload_*` flags, `hf-offload
launch` and, where they change what is modelled, `hf-offload plan` and `bench`. Add an option here and every face
shows it; `docs/options.md` is generated from these declarations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .engine.quant import BASE_WEIGHT_DTYPES
from .options import (
    TRAINING_FACES,
    OptionError,
    boolean,
    non_negative_int,
    option,
    optional_boolean,
    optional_positive_int,
    spelled,
    validate,
    zero_is_none,
)

EXPERT_FETCH_MODES = ("routed", "all")


def _directory(value):
    if value is None:
        return None
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip()):
        return os.fspath(value)
    raise OptionError("a directory path (a non-empty string) or None")


def _device(value):
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise OptionError("a torch device such as 'cuda', 'cuda:1' or 'cpu'") from None


@dataclass
class OffloadConfig:
    """How `enable_layer_streaming` keeps a model's decoder layers in host memory and streams them.

    Every field is an option (see `docs/options.md`); a bad value raises `ValueError` naming it.

    Example:
        >>> from hf_offload import OffloadConfig, enable_layer_streaming
        >>> model = enable_layer_streaming(model, OffloadConfig(prefetch=2))
    """

    device: str | torch.device | None = option(
        None,
        "Where layers compute. None: the accelerator if one is present, else the CPU.",
        faces={"config", "bench"},
        check=_device,
    )
    prefetch: int = option(
        1,
        "Decoder layers loaded ahead of the one computing. 1 (the default) is double buffering; 0 loads each layer "
        "only when it is needed. Device memory holds prefetch + 1 layers.",
        faces=TRAINING_FACES | {"plan", "bench"},
        check=non_negative_int,
    )
    offload_activations: bool = option(
        False,
        "Keep the layer-boundary hidden states saved for backward in host memory instead of on the device (for "
        "long contexts; costs one extra round trip of activations per step).",
        faces=TRAINING_FACES | {"plan", "bench"},
        check=boolean,
    )
    pin_memory: bool | None = option(
        None,
        "Page-lock the host store so copies run asynchronously at full link speed. None: on when the device is "
        "CUDA. Needs as much lockable host memory as the frozen layers.",
        faces=TRAINING_FACES,
        check=optional_boolean,
    )
    preserve_rng_state: bool = option(
        True,
        "Replay the random state when a layer is recomputed in backward, so dropout masks match the forward. Turn "
        "off only for layers that draw no random numbers.",
        faces=TRAINING_FACES,
        check=boolean,
    )
    show_progress: bool | None = option(
        None,
        "Progress bar while the host store is built. None: only on a terminal.",
        faces=TRAINING_FACES,
        check=optional_boolean,
    )
    base_weight_dtype: str | None = option(
        None,
        "Keep the frozen linear weights and Mixture-of-Experts expert tensors of the decoder layers quantized in "
        "host memory and over the link: 'nf4' "
        "(4-bit NormalFloat with double quantization, as QLoRA; about 3.9x fewer bytes than bf16) or 'int8' "
        "(row-wise absmax; about 2x fewer). They are dequantized on the device inside the layer's window. Norms, "
        "biases and embeddings stay as they are. None (the default) keeps weights as loaded.",
        faces=TRAINING_FACES | {"plan"},
        choices=BASE_WEIGHT_DTYPES,
    )
    check_host_memory: bool = option(
        True,
        "Before building the host store, compare the host memory it needs with what is available and stop with a "
        "clear message (and the base_weight_dtype that would fit) instead of being OOM-killed; with "
        "offload_activations, the same before each new host buffer for saved activations.",
        faces=TRAINING_FACES,
        check=boolean,
    )
    expert_fetch: str = option(
        "routed",
        "Mixture-of-Experts layers: 'routed' (the default) moves a layer's attention, router and shared weights, "
        "computes the routing, then moves only the experts that received at least one token; the backward reuses "
        "that set. 'all' moves every expert with its layer. Dense models and dense layers have no experts to "
        "route: both values stream them whole.",
        faces=TRAINING_FACES,
        choices=EXPERT_FETCH_MODES,
    )
    full_finetune: bool = option(
        False,
        "Train every weight of the decoder layers, not adapters: master weights (fp32 for bf16/fp16 models), their "
        "gradients and the optimizer state stay in host memory, each layer streams in the compute dtype and sends "
        "its gradients back to the host in backward. No LoRA is added. Mixture-of-Experts layers with "
        "expert_fetch='routed' move only the routed experts, whose gradients come back as rows of the experts' "
        "gradient.",
        faces=TRAINING_FACES | {"plan"},
        check=boolean,
    )
    store_cache: str | None = option(
        None,
        "A directory to keep the built host store in: the first run writes it there (one file per layer and a "
        "manifest), later runs of the same checkpoint, base_weight_dtype and hf_offload version (restarts, resumes, "
        "other ranks) map those files instead of packing and encoding again. A cache made for anything else is "
        "detected, logged and replaced, never used. Needs the store's size on that disk. None (the default): no "
        "cache.",
        faces=TRAINING_FACES,
        check=_directory,
    )

    eval_group_size: int | None = option(
        None,
        "Evaluation runs layer-major: this many eval batches go through each decoder layer while it is on the "
        "device, so a layer is loaded once per group instead of once per batch. None (the default): as many batches "
        "as a quarter of the available host (and device) memory holds the boundary hidden states of (batch by batch "
        "under partitioned_fetch, whose ranks must load the same layers). 1: batch by batch.",
        faces=TRAINING_FACES,
        check=optional_positive_int,
    )
    chunked_loss: bool = option(
        True,
        "In training forwards with labels, compute the output head and the cross-entropy in chunks of tokens (each "
        "chunk recomputed in backward), so the logits of the whole sequence never exist: for long sequences they "
        "are the largest tensors of a step. Exact; the model's `outputs.logits` is then an empty tensor of shape "
        "(batch, sequence, 0) (the loss is what training needs). Eval, predict, generate() and forwards without "
        "labels return full logits.",
        faces=TRAINING_FACES | {"plan"},
        check=boolean,
    )
    loss_chunk_tokens: int | None = option(
        None,
        "Tokens per chunk of `chunked_loss`. None (or 0): as many as keep one chunk's float32 logits under 256 MiB "
        "(2,097 tokens with a 32k vocabulary, 441 with 152k).",
        faces=TRAINING_FACES | {"plan"},
        check=zero_is_none(optional_positive_int),
    )
    mlp_tile_tokens: int | None = option(
        8192,
        "When a streamed decoder layer's input holds more tokens than this, its MLP computes in sequence tiles of "
        "about this many tokens (in the forward and in the backward recompute, each tile recomputed for its own "
        "backward), so the MLP's intermediate activations exist for one tile at a time. Exact. Dense MLPs only (a "
        "`mlp`, `feed_forward` or `ffn` child of linear layers and activations); an MLP that draws random numbers "
        "(dropout, LoRA dropout) computes whole. None (or 0) turns tiling off.",
        faces=TRAINING_FACES | {"plan"},
        check=zero_is_none(optional_positive_int),
    )

    shared_host_store: bool | None = option(
        None,
        "Data parallel (torchrun, accelerate launch): one host store per node instead of one per rank. Local rank 0 "
        "builds the store into files under /dev/shm; the node's other ranks map them read-only without building "
        "their own (loading into the store, without reading the decoder layers of the checkpoint). None (the "
        "default): on when several ranks of a job run on one node. The tmpfs must hold the store (checked before "
        "anything is built; the files are removed once every rank has mapped them).",
        faces=TRAINING_FACES | {"plan"},
        check=optional_boolean,
    )

    partitioned_fetch: bool = option(
        False,
        "Data parallel on nodes whose GPUs share a fast interconnect (NVLink): each local rank copies 1/N of a "
        "layer from host memory and the node's ranks all-gather the rest from each other, so the node's host memory "
        "and PCIe links carry each layer once instead of once per rank. False (the default): every rank copies "
        "whole layers (replicated). Every rank of a node must then load the same layers in the same order: training "
        "steps and evaluation with the Trainer's even batches do; generation of different lengths per rank would "
        "wait forever. No effect with one rank per node.",
        faces=TRAINING_FACES | {"plan"},
        check=boolean,
    )

    def __post_init__(self) -> None:
        validate(self, "config")
        check_engine_combinations(vars(self), "config")

    @property
    def slots(self) -> int:
        """Device slots: the layer computing plus the ones loading ahead."""
        return self.prefetch + 1


def check_engine_combinations(values: dict, face: str) -> None:
    """Rules between the engine's options, each option spelled as `face` spells it (every face checks them).

    Raises:
        ValueError: two options that cannot go together, both named, and what to do.
    """
    if values.get("full_finetune") and values.get("store_cache") is not None:
        raise ValueError(
            f"{spelled('full_finetune', face)} trains the decoder weights in the host store, so a store cached on disk "
            f"would not hold them, but {spelled('store_cache', face)} is {values['store_cache']!r}. Leave "
            f"{spelled('store_cache', face)} unset with full fine-tuning."
        )
    if values.get("full_finetune") and values.get("base_weight_dtype") is not None:
        raise ValueError(
            f"{spelled('full_finetune', face)} trains the decoder weights, so they cannot be kept quantized, but "
            f"{spelled('base_weight_dtype', face)} is {values['base_weight_dtype']!r}. Leave the base weights as "
            "loaded with full fine-tuning, or train adapters over a quantized store."
        )
    if values.get("full_finetune") and values.get("shared_host_store"):
        raise ValueError(
            f"{spelled('full_finetune', face)} writes the decoder weights, so they cannot be kept in a store shared "
            f"read-only by several ranks, but {spelled('shared_host_store', face)} is on. Leave it unset with full "
            "fine-tuning (one process, its own store)."
        )
    if values.get("full_finetune") and values.get("partitioned_fetch"):
        raise ValueError(
            f"{spelled('partitioned_fetch', face)} shares the work of loading layers between data-parallel ranks, "
            f"but {spelled('full_finetune', face)} runs in one process. Leave partitioned_fetch off with full "
            "fine-tuning."
        )
