"""The public entry points of the engine: turn layer streaming on and off, and read its counters."""

from __future__ import annotations

import logging

from torch import nn

from .config import OffloadConfig
from .engine import compat
from .engine.runtime import RUNTIME_ATTRIBUTE, LayerStreamingRuntime

logger = logging.getLogger(__name__)


def _owner(model: nn.Module) -> nn.Module:
    """The transformers model that carries the runtime, whether `model` is it or a peft wrapper of it."""
    return compat.peft_base_model(model)


def get_runtime(model: nn.Module) -> LayerStreamingRuntime | None:
    """The streaming runtime of `model`, or None when streaming is off."""
    return getattr(_owner(model), RUNTIME_ATTRIBUTE, None)


def is_streaming(model: nn.Module) -> bool:
    return get_runtime(model) is not None


def enable_layer_streaming(model: nn.Module, config: OffloadConfig | None = None) -> nn.Module:
    """Keep the frozen decoder-layer weights of `model` in host memory and stream them to the device per layer.

    Converts in place and returns `model`: a `PreTrainedModel` or a peft `PeftModel` keeps its class, parameter
    names and `save_pretrained`. Trainable parameters (LoRA adapters) and everything outside the decoder layers
    (embeddings, final norm, head) move to the device. Apply peft before this, and create the optimizer after.

    Example:
        >>> model = enable_layer_streaming(peft_model, OffloadConfig(prefetch=1))
        >>> model(**batch).loss.backward()
    """
    config = config if config is not None else OffloadConfig()
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"`config` should be an hf_offload.OffloadConfig, but the value passed is {type(config)}")
    if is_streaming(model):
        raise RuntimeError(
            "Layer streaming is already on for this model; call hf_offload.disable_layer_streaming(model) first "
            "to change its configuration."
        )
    runtime = LayerStreamingRuntime(model, config)
    setattr(_owner(model), RUNTIME_ATTRIBUTE, runtime)
    summary = runtime.summary()
    logger.info(
        "hf_offload: streaming %d decoder layers (%s) from host memory to %s: %.2f GB in host memory%s%s, "
        "%.2f GB per training step, %.2f GB of device slots (prefetch=%d)%s.",
        summary["layers"],
        summary["layer_path"],
        summary["device"],
        summary["host_store_bytes"] / 1e9,
        " (pinned)" if summary["pinned"] else "",
        f", {summary['quantized_weights']} linear weights in {config.base_weight_dtype}"
        if config.base_weight_dtype
        else "",
        summary["bytes_per_train_step"] / 1e9,
        summary["device_slot_bytes"] / 1e9,
        config.prefetch,
        f" + {summary['device_scratch_bytes'] / 1e9:.2f} GB of dequantization scratch"
        if summary["device_scratch_bytes"]
        else "",
    )
    if summary["moe_layers"]:
        logger.info(
            "hf_offload: %d Mixture-of-Experts layers hold %.2f GB of experts; expert_fetch=%r%s.",
            summary["moe_layers"],
            summary["expert_bytes"] / 1e9,
            config.expert_fetch,
            " (only routed experts move; the bytes per step above are the bound)"
            if config.expert_fetch == "routed"
            else "",
        )
    return model


def disable_layer_streaming(model: nn.Module) -> nn.Module:
    """Undo `enable_layer_streaming`: original layer forwards, weights in their own storage where they were."""
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
    """Counters since streaming began or since `reset_stats`: bytes_to_device, layer_loads, layer_reuses,
    peak_resident_layers, experts_loaded, experts_skipped, bytes_to_host, bytes_from_host_activations, and
    host_readbacks (device-to-host reads the host waited for: one per routed experts call)."""
    return _require_runtime(model).streamer.stats.as_dict()


def reset_stats(model: nn.Module) -> None:
    """Zero the counters of `stats`."""
    streamer = _require_runtime(model).streamer
    streamer.stats = type(streamer.stats)()


def summary(model: nn.Module) -> dict:
    """Static facts of a streamed model: layers, host store bytes, device slot and scratch bytes, bytes per train
    step, base_weight_dtype and how many linear weights it quantized, and for Mixture-of-Experts models
    expert_fetch, moe_layers (layers whose experts can be fetched by routing) and expert_bytes; unpinned_layers
    (layers not in page-locked memory, whose copies are staged through bounce buffers); on the CPU,
    simulated_async_seed (the seed of the simulated asynchronous device, None when it is off)."""
    return _require_runtime(model).summary()
