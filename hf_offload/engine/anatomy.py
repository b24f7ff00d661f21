"""Find the decoder layers of a causal LM (plain or peft-wrapped), or say clearly why it cannot be streamed.

The model's own `forward` keeps doing embeddings, masks, rotary embeddings, the final norm, the head and the
loss. Only the repeated decoder layers are intercepted, which is how "any HF causal LM" stays true.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import compat
from .errors import UnsupportedModelError

# Exceptions to the search below, keyed by `config.model_type`: the dotted path of the layer list. Empty while
# every family tried is found by the generic rule; add an entry rather than special-casing code elsewhere.
LAYER_LIST_OVERRIDES: dict[str, str] = {}

_DEPTH_ATTRIBUTES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class Anatomy:
    """Where the decoder layers of a model live."""

    path: str  # dotted name of the ModuleList, e.g. "model.layers" or "base_model.model.transformer.h"
    layers: nn.ModuleList
    # ids of layer parameters that modules outside the stack use too (tied weights): these stay resident
    shared_outside: frozenset[int] = frozenset()


def _describe(model: nn.Module) -> str:
    base = compat.peft_base_model(model)
    return type(base).__name__ if base is model else f"{type(base).__name__} (inside {type(model).__name__})"


def _depth(config) -> int | None:
    for attr in _DEPTH_ATTRIBUTES:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module) -> Anatomy:
    """Locate the decoder layer stack of `model`, or raise `UnsupportedModelError` naming the class and why."""
    base = compat.peft_base_model(model)
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"hf_offload streams decoder-only causal LMs; {_describe(model)} is an encoder-decoder model "
            "(config.is_encoder_decoder=True). Use a causal LM (AutoModelForCausalLM)."
        )
    hooked = compat.accelerate_hooked_modules(model)
    if hooked:
        raise UnsupportedModelError(
            f"{_describe(model)} was loaded with a `device_map` that dispatches or offloads it through "
            f"accelerate hooks (on {', '.join(hooked[:3])}{'...' if len(hooked) > 3 else ''}). hf_offload does "
            "its own placement: load the model without `device_map` (or with device_map='cpu'), then call "
            "enable_layer_streaming."
        )

    model_type = getattr(config, "model_type", None)
    modules = dict(model.named_modules())
    if model_type in LAYER_LIST_OVERRIDES:
        suffix = LAYER_LIST_OVERRIDES[model_type]
        for name, module in modules.items():
            if name == suffix or name.endswith("." + suffix):
                return Anatomy(name, module, _used_outside(model, name))

    lists = [(name, m) for name, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) > 0]
    # transformers 5.x: decoder layers are GradientCheckpointingLayer subclasses.
    candidates = [(n, m) for n, m in lists if all(compat.is_checkpointing_layer(layer) for layer in m)]
    if not candidates:
        depth = _depth(config) if config is not None else None
        candidates = [(n, m) for n, m in lists if len(m) == depth and len({type(layer) for layer in m}) == 1]
    if not candidates:
        raise UnsupportedModelError(
            f"hf_offload cannot find the decoder layers of {_describe(model)}: no nn.ModuleList of "
            "GradientCheckpointingLayer modules, nor one of config.num_hidden_layers identical blocks. "
            "Add its layer list to hf_offload.engine.anatomy.LAYER_LIST_OVERRIDES, or open an issue."
        )
    # Several stacks (a vision tower beside the text decoder, say): stream the one with the most weights.
    path, layers = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))
    return Anatomy(path, layers, _used_outside(model, path))


def _used_outside(model: nn.Module, path: str) -> frozenset[int]:
    inside = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name.startswith(path + ".")}
    outside = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith(path + ".")}
    return frozenset(inside & outside)


def check_streamable(model: nn.Module, skeleton: bool = False) -> Anatomy:
    """Every refusal that does not depend on which weights train, made before anything about `model` changes.

    Finds the decoder layers (as `find_decoder_layers`), then refuses weights on the meta device anywhere in the
    model (unless `skeleton`: a model built on the meta device whose checkpoint is about to load), bitsandbytes
    parameters without the state needed to stream them, and weights shared across layers.

    Returns:
        Where the decoder layers are.

    Raises:
        UnsupportedModelError: the model cannot be streamed; the message says why and what to do instead.
    """
    anatomy = find_decoder_layers(model)
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if meta and not skeleton:
        where = ", ".join(meta[:3]) + ("..." if len(meta) > 3 else "")
        raise UnsupportedModelError(
            f"{_describe(model)} has weights on the meta device ({where}): they were never loaded. Load the "
            "model's weights before streaming (from_pretrained without device_map='meta' or init_empty_weights); "
            "for a tied output head, call model.tie_weights() first."
        )
    owner: dict[int, int] = {}
    for index, layer in enumerate(anatomy.layers):
        for param in layer.parameters():
            if id(param) in anatomy.shared_outside:
                continue
            if compat.is_quantized_parameter(param):
                compat.check_streamable_bnb_parameter(param, index)
            if owner.setdefault(id(param), index) != index:
                raise UnsupportedModelError(
                    f"A parameter of {_describe(model)} is shared by decoder layers {owner[id(param)]} and {index}; "
                    "hf_offload streams each layer's weights separately and cannot stream weights shared across "
                    "layers. Give each layer its own copy before streaming (for example `module.weight = "
                    "nn.Parameter(module.weight.detach().clone())` in every layer but the first that uses it), or "
                    "train this model without layer streaming."
                )
    return anatomy
