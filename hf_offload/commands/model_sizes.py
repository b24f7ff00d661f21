"""A model's sizes from its config alone: built on the meta device, measured with the engine's own code.

`hf-offload plan` and `hf-offload bench` both read their configs and sizes here, so a plan and a bench of the same
model agree: the decoder layers are found by the engine's anatomy (not guessed from parameter names) and their
host-store bytes come from the store's layout code, quantized or not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.anatomy import find_decoder_layers
from ..engine.moe import find_expert_groups
from ..engine.quant import linear_weights, make_codec
from ..engine.store import layout_layer


class ConfigError(ValueError):
    """A model or config cannot be read or measured; the message says why and what to pass instead."""


# Every decoder layer is built on the meta device and measured (about 10 ms and a few kB each); past this a config
# is a typo rather than a model, and building it would take minutes and gigabytes.
MAX_MEASURED_LAYERS = 1024


# --- reading a config -----------------------------------------------------------------------------------------------
def load_config(source: str):
    """A transformers config from a config.json path, a local model directory, or a Hub id (downloads config.json).

    Raises:
        ConfigError: the file or directory holds no usable config, or the Hub could not be reached.
    """
    from transformers import AutoConfig

    if os.path.isfile(source):
        try:
            with open(source) as f:
                config_dict = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{source} is not a JSON file ({err}); pass a transformers config.json.") from err
        if not isinstance(config_dict, dict):
            raise ConfigError(f"{source} holds JSON but not an object; pass a transformers config.json.")
        model_type = config_dict.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"{source} has no `model_type`; pass the config.json of a transformers model.")
        try:
            return AutoConfig.for_model(model_type, **config_dict)
        except ValueError as err:
            raise ConfigError(f"transformers does not know model_type {model_type!r} ({err}).") from err
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ConfigError(f"{source} is a directory without a config.json; pass a model directory or a config.")
        return load_config(os.path.join(source, "config.json"))
    if _looks_local(source):
        raise ConfigError(
            f"{source} does not exist: pass an existing model directory or config.json path, or a Hub id."
        )
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id=source, filename="config.json")
    except Exception as err:  # offline, unknown repo, gated repo, bad id: all end here with one message
        raise ConfigError(
            f"could not get config.json of {source!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}). Without network access, pass a local model "
            "directory or a config.json path; gated models need `hf auth login` first."
        ) from err
    return load_config(path)


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id ("org/name"): absolute, relative with ./ or ~, a .json file, or deeper."""
    return source.startswith(("/", ".", "~")) or source.endswith(".json") or source.count("/") > 1 or "\\" in source


# --- measuring it -----------------------------------------------------------------------------------------------------
def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model with its parameters on the meta device and its buffers real (rotary tables), no memory used."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        raise ConfigError(f"{type(config).__name__} is not a causal LM transformers can build ({err}).") from err


@dataclass
class ModelSizes:
    """What plans and benchmarks need from a model, measured once on the meta device."""

    layers: list[nn.Module]  # the decoder layers, on the meta device (for the store's layout code)
    dtype: torch.dtype
    total_params: int  # the base model's parameters
    resident_bytes: int  # everything outside the decoder layers
    layer_bytes: list[int]  # per decoder layer, dense, in `dtype`
    compute_params: float  # parameters a token's forward multiplies with (embeddings excluded, MoE: active experts)
    lora_tensors: list[int]  # numel of each LoRA A and B matrix, per unit of rank
    hidden: int
    intermediate: int
    vocab: int

    def store_layouts(self, base_weight_dtype: str | None) -> list:
        """The host store's layout of every layer, as `enable_layer_streaming` would pack it for adapter training
        (frozen base): the stacked tensors of experts modules as expert regions, encoded with the codec too."""
        codec = make_codec(base_weight_dtype)
        groups, _ = find_expert_groups(nn.ModuleList(self.layers))
        return [
            layout_layer(layer, codec, params=list(layer.parameters()), expert_groups=[g.params for g in found])
            for layer, found in zip(self.layers, groups)
        ]


def config_dtype(config) -> torch.dtype:
    """The floating dtype a config's checkpoint is stored in (bf16 when it does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.bfloat16


def measure(config, dtype: torch.dtype | None = None) -> ModelSizes:
    """Build the model on the meta device and measure it.

    Raises:
        ConfigError: transformers cannot build it as a causal LM, or it lacks a hidden size.
        UnsupportedModelError: hf_offload cannot find its decoder layers.
    """
    dtype = dtype or config_dtype(config)
    depth = _first(_text_config(config), ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    if depth is not None and depth > MAX_MEASURED_LAYERS:
        raise ConfigError(
            f"the config has {depth:,} decoder layers; models are measured for at most {MAX_MEASURED_LAYERS:,} (every "
            "layer is built on the meta device). Check num_hidden_layers in the config."
        )
    model = empty_model(config, dtype)
    model.requires_grad_(False)  # a frozen base, as adapter training streams it (experts modules count as such)
    layers = list(find_decoder_layers(model).layers)
    streamed = {id(p) for layer in layers for p in layer.parameters()}
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    resident = sum(p.numel() * p.element_size() for p in params if id(p) not in streamed)
    layer_bytes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]
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
        raise ConfigError(f"{type(config).__name__} has no hidden_size; cannot estimate activations.")
    moe_inter = _first(text, ("moe_intermediate_size",))
    inter = (moe_inter * active if moe_inter and active else None) or _first(
        text, ("intermediate_size", "n_inner", "ffn_dim", "d_ff"), 4 * hidden
    )
    vocab = _first(text, ("vocab_size",), embedding.shape[0])
    return ModelSizes(layers, dtype, total, resident, layer_bytes, compute, lora, hidden, inter, vocab)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first(config, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
