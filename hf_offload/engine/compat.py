"""The few places hf_offload touches internals of transformers, peft or accelerate, isolated here.

Each helper names the version it was checked against. Everything else in the package uses public APIs only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Checked against transformers 5.23: every decoder layer subclasses GradientCheckpointingLayer, whose class-level
# `forward` wrapper checkpoints when the instance flag `gradient_checkpointing` is set. A layer we stream already
# recomputes in backward, so that flag must stay off on streamed layers.
try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers < 4.52
    GradientCheckpointingLayer = None

try:
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover
    Cache = ()


def is_checkpointing_layer(module: nn.Module) -> bool:
    return GradientCheckpointingLayer is not None and isinstance(module, GradientCheckpointingLayer)


# Checked against transformers 5.23 (`GradientCheckpointingLayer.forward_with_checkpointing`): the names under
# which decoder layers receive the KV cache and the switch that asks them to fill one.
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def cache_free_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The layer arguments for a recomputable call: no KV cache is written, as under HF's own checkpointing.

    A layer that appends to a cache in the forward would append again in the backward recompute. Training calls
    pass an empty cache at most, so dropping it changes nothing; a cache that already holds tokens would change
    the result, so that case is refused. Caches come by keyword or, in some families (GPT-2), by position.
    """

    def drop(name: str, value):
        if value is None:
            return None
        if isinstance(value, Cache) and value.get_seq_length() > 0:
            raise NotImplementedError(
                "hf_offload cannot backpropagate through a decoder layer that reads a pre-filled KV cache "
                f"({name} holds {value.get_seq_length()} tokens). Train without `past_key_values`, or run this "
                "forward under torch.no_grad()."
            )
        return None

    args = tuple(drop(f"argument {i}", a) if isinstance(a, Cache) else a for i, a in enumerate(args))
    kwargs = dict(kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    for name, value in kwargs.items():
        if name in CACHE_KWARGS or isinstance(value, Cache):
            kwargs[name] = drop(f"`{name}`", value)
    return args, kwargs


def accelerate_hooked_modules(model: nn.Module) -> list[str]:
    """Names of modules carrying accelerate's dispatch hooks (checked against accelerate 1.15: `_hf_hook`)."""
    return [name or "<root>" for name, module in model.named_modules() if hasattr(module, "_hf_hook")]


def peft_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (peft 0.21: `PeftModel.get_base_model()`), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_quantized_parameter(param: torch.Tensor) -> bool:
    """bitsandbytes parameters (Params4bit, Int8Params) carry quantization state the host store cannot pack yet."""
    return type(param).__module__.startswith("bitsandbytes")


def keep_checkpointing_off(layer: nn.Module) -> None:
    """Streamed layers already recompute in backward; HF's own checkpointing on top would recompute twice.

    `PreTrainedModel.activation_checkpointing_enable` (what Trainer calls for `gradient_checkpointing=True`)
    sets the per-layer flag again, so it is cleared on every call (transformers 5.23).
    """
    if getattr(layer, "gradient_checkpointing", False):
        layer.gradient_checkpointing = False
        if not getattr(keep_checkpointing_off, "_warned", False):
            keep_checkpointing_off._warned = True
            logger.info(
                "hf_offload: gradient checkpointing is off on streamed layers; layer streaming already recomputes "
                "each layer once in backward."
            )
