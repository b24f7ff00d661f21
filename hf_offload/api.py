"""The public entry points of the engine: turn layer streaming on and off, and read its counters."""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from .config import OffloadConfig
from .engine import compat
from .engine.facts import StreamingSummary
from .engine.runtime import RUNTIME_ATTRIBUTE, LayerStreamingRuntime

logger = logging.getLogger(__name__)


def _owner(model: nn.Module) -> nn.Module:
    """The transformers model that carries the runtime, whether `model` is it or a peft wrapper of it."""
    return compat.peft_base_model(model)


def get_runtime(model: nn.Module) -> LayerStreamingRuntime | None:
    """The streaming runtime of `model`, or None when streaming is off."""
    return getattr(_owner(model), RUNTIME_ATTRIBUTE, None)


def is_streaming(model: nn.Module) -> bool:
    """Whether layer streaming is on for `model` (or for the model a peft wrapper holds)."""
    return get_runtime(model) is not None


def enable_layer_streaming(model: nn.Module, config: OffloadConfig | None = None) -> nn.Module:
    """Keep the frozen decoder-layer weights of `model` in host memory and stream them to the device per layer.

    Converts in place and returns `model`: a `PreTrainedModel` or a peft `PeftModel` keeps its class, parameter
    names and `save_pretrained`. Trainable parameters (LoRA adapters) and everything outside the decoder layers
    (embeddings, final norm, head) move to the device. Apply peft before this, and create the optimizer after.

    Args:
        model: a causal LM (`PreTrainedModel`) or a peft model over one, with its weights loaded.
        config: how to stream; `OffloadConfig()` (defaults) when None.

    Returns:
        `model` itself, now streaming.

    Raises:
        UnsupportedModelError: the model cannot be streamed (nothing has changed); the message says what to do.
        HostMemoryError: the host store would not fit in available host memory (checked before packing).
        RuntimeError: streaming is already on for this model.

    Example:
        >>> model = enable_layer_streaming(peft_model, OffloadConfig(prefetch=1))
        >>> model(**batch).loss.backward()
    """
    config = config if config is not None else OffloadConfig()
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"`config` should be an hf_offload.OffloadConfig, but the value passed is {type(config)}")
    # Validated again (an option may have been changed after construction), and copied: the runtime keeps the
    # options it started with.
    config = dataclasses.replace(config)
    if is_streaming(model):
        raise RuntimeError(
            "Layer streaming is already on for this model; call hf_offload.disable_layer_streaming(model) first "
            "to change its configuration."
        )
    runtime = LayerStreamingRuntime(model, config)
    setattr(_owner(model), RUNTIME_ATTRIBUTE, runtime)
    logger.info(runtime.summary().describe())
    return model


def disable_layer_streaming(model: nn.Module) -> nn.Module:
    """Undo `enable_layer_streaming`: original layer forwards, weights in their own storage where they were.

    Returns:
        `model` itself, no longer streaming.

    Raises:
        RuntimeError: streaming is not on for this model.
    """
    runtime = get_runtime(model)
    if runtime is None:
        raise RuntimeError("Layer streaming is not on for this model; nothing to disable.")
    runtime.remove()
    delattr(_owner(model), RUNTIME_ATTRIBUTE)
    return model


def _require_runtime(model: nn.Module) -> LayerStreamingRuntime:
    runtime = get_runtime(model)
    if runtime is None:
        raise RuntimeError("Layer streaming is not on for this model; call hf_offload.enable_layer_streaming first.")
    return runtime


def stats(model: nn.Module) -> dict[str, int]:
    """Counters since streaming began or since `reset_stats`.

    Returns:
        A dict of counters: bytes_to_device, layer_loads, layer_reuses, peak_resident_layers, experts_loaded,
        experts_skipped, bytes_to_host, bytes_from_host_activations, host_readbacks (device-to-host reads the
        host waited for: one per routed experts call), routed_whole_loads.

    Raises:
        RuntimeError: streaming is not on for this model.
    """
    return _require_runtime(model).streamer.stats.as_dict()


def reset_stats(model: nn.Module) -> None:
    """Zero the counters of `stats`.

    Raises:
        RuntimeError: streaming is not on for this model.
    """
    streamer = _require_runtime(model).streamer
    streamer.stats = type(streamer.stats)()


def summary(model: nn.Module) -> StreamingSummary:
    """Static facts of a streamed model: layers, host store bytes, device slot and scratch bytes, bytes per train
    step, base_weight_dtype and how many linear weights it quantized, and for Mixture-of-Experts models
    expert_fetch, moe_layers (layers whose experts can be fetched by routing) and expert_bytes; unpinned_layers
    (layers not in page-locked memory, whose copies are staged through bounce buffers); on the CPU,
    simulated_async_seed (the seed of the simulated asynchronous device, None when it is off); with
    offload_activations, activation_host_bytes (the page-locked host buffers of saved activations) and
    activation_unpinned_buffers (those page-locking failed for).

    Returns:
        A frozen `StreamingSummary`; `.as_dict()` for a plain dict.

    Raises:
        RuntimeError: streaming is not on for `model`.
    """
    return _require_runtime(model).summary()
