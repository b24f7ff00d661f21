"""A model's sizes from its config alone: built on the meta device, measured with the engine's own code.

`hf-offload plan` and `hf-offload bench` both read their configs and sizes here, so a plan and a bench of the same
model agree: the decoder layers are found by the engine's anatomy (not guessed from parameter names) and their
host-store bytes come from the store's layout code, quantized or not. Each distinct kind of decoder layer is built
and measured once, so a config of any depth is measured in about a second.
"""

from __future__ import annotations

import copy
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


# At most this many decoder layers are built one by one: when a config's layer kinds cannot be told from it (see the
# Note on measuring by layer kinds below), or a kind first appears deeper; past it such a config is refused.
MAX_MEASURED_LAYERS = 1024
# Periods of per-layer patterns (every n-th layer MoE, sliding, attention...) are looked for up to this length.
MAX_LAYER_PERIOD = 64
# Words in the names of config integers that place layer kinds: a threshold (first_k_dense_replace,
# max_window_layers, num_dense_layers, moe_layer_start_index...) or, for the second list, a period (decoder_sparse_step,
# moe_layer_freq, attn_layer_period, sliding_window_pattern, moe_layer_interval...).
_LAYER_RULE_WORDS = ("layer", "step", "freq", "period", "offset", "replace", "interval", "every", "pattern", "dense")
_PERIOD_WORDS = ("step", "freq", "period", "interval", "every", "pattern")


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
    """The model with its parameters on the meta device and its buffers real (rotary tables), no memory used.

    Its parameters are frozen, as the base of adapter training streams (experts modules are found as such)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).requires_grad_(False)
    except ValueError as err:
        raise ConfigError(f"{type(config).__name__} is not a causal LM transformers can build ({err}).") from err


@dataclass
class ModelSizes:
    """What plans and benchmarks need from a model, measured once on the meta device.

    The decoder layers are kept as their distinct kinds (one meta layer each) and, per layer, the kind it is: a
    100,000-layer config holds a handful of modules, not 100,000.
    """

    kinds: list[nn.Module]  # one decoder layer per distinct structure, on the meta device (for the store's layout)
    kind_of: list[int]  # per decoder layer, in order: its index in `kinds`
    dtype: torch.dtype
    total_params: int  # the base model's parameters
    resident_bytes: int  # everything outside the decoder layers
    compute_params: float  # parameters a token's forward multiplies with (embeddings excluded, MoE: active experts)
    lora_tensors: dict[int, int]  # numel of a LoRA A or B matrix per unit of rank -> how many there are in the model
    hidden: int
    intermediate: int
    vocab: int

    @property
    def layers(self) -> list[nn.Module]:
        """Every decoder layer in order (a layer of the same kind is the same meta module)."""
        return [self.kinds[k] for k in self.kind_of]

    @property
    def layer_bytes(self) -> list[int]:
        """Per decoder layer, dense, in `dtype`."""
        per_kind = [_nbytes(layer.parameters()) for layer in self.kinds]
        return [per_kind[k] for k in self.kind_of]

    def kind_counts(self) -> list[int]:
        """How many decoder layers each kind stands for."""
        counts = [0] * len(self.kinds)
        for k in self.kind_of:
            counts[k] += 1
        return counts

    def kind_layouts(self, base_weight_dtype: str | None) -> list:
        """The host store's layout of each layer kind, as `enable_layer_streaming` would pack it for adapter
        training (frozen base): the stacked tensors of experts modules as expert regions, encoded with the codec."""
        codec = make_codec(base_weight_dtype)
        groups, _ = find_expert_groups(nn.ModuleList(self.kinds))
        return [
            layout_layer(layer, codec, params=list(layer.parameters()), expert_groups=[g.params for g in found])
            for layer, found in zip(self.kinds, groups)
        ]

    def store_layouts(self, base_weight_dtype: str | None) -> list:
        """The host store's layout of every layer, in order (layers of one kind share one layout)."""
        per_kind = self.kind_layouts(base_weight_dtype)
        return [per_kind[k] for k in self.kind_of]


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def config_dtype(config) -> torch.dtype:
    """The floating dtype a config's checkpoint is stored in (bf16 when it does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.bfloat16


# Note: [Measuring a deep config by its layer kinds]
# Building every decoder layer on the meta device costs ~10 ms and a few kB of Python objects per layer, so a
# config with 100,000 layers would take minutes. Layers differ per index only through the config (`layer_types`,
# `mlp_only_layers`, `first_k_dense_replace`, `decoder_sparse_step`, `attn_layer_period`...), so `layer_keys` gives
# every index a key from the config alone: the element at that index of every per-layer list or string, whether the
# index is in every list of layer indices, and, for every integer whose name says it places layers, whether the
# index is below it and its remainder by it (small periods only). Layers with equal keys are built alike.
# The model is then built twice, shallow: D1 layers (up to the last first appearance of a key) and D2 > D1 (more of
# every pattern), with only the depth changed in the config (and its per-layer lists cut to it). The build is
# trusted when the modules outside the layers are the same at both depths (nothing there grows with the depth) and
# every layer of the deeper build has the structure (parameter names, shapes, dtypes, module types) of the first
# layer with its key; the layers are then measured kind by kind. When that check fails, a config of at most
# MAX_MEASURED_LAYERS layers is built whole, and a deeper one is refused with the reason. A config of any depth plans
# in about a second.
def layer_keys(config, depth: int) -> list[tuple]:
    """Per decoder layer, what the config says about it: layers with equal keys are built alike.

    Args:
        config: the (text) config of the model.
        depth: its number of decoder layers.

    Returns:
        One hashable key per layer index; see Note: [Measuring a deep config by its layer kinds].
    """
    per_layer, index_sets, rules = _layer_rules(config, depth)
    indices = range(depth)
    columns = [list(values) for _, values in per_layer]  # one column per fact, zipped into keys (fast at any depth)
    columns += [[i in members for i in indices] for _, members in index_sets]
    columns += [[i < v for i in indices] for _, v, _ in rules]
    columns += [[i % v for i in indices] for _, v, periodic in rules if periodic]
    return list(zip(*columns)) if columns else [()] * depth


def _layer_rules(config, depth: int) -> tuple[list, list, list]:
    """The config's per-layer lists and sets of layer indices, as (name, value), and its layer rules, as (name,
    integer, whether it is a period)."""
    per_layer, index_sets, rules = [], [], []
    for name, value in sorted(vars(config).items()):
        if name.startswith("_") and not name.endswith("pattern"):
            continue
        names_a_rule = any(word in name.lower() for word in _LAYER_RULE_WORDS)
        sequence = isinstance(value, (list, tuple)) or (isinstance(value, str) and names_a_rule)  # "M-M*-M..."
        if sequence and len(value) == depth and depth > 1:
            per_layer.append((name, tuple(_hashable(v) for v in value)))
        if isinstance(value, (list, tuple, set)) and value and all(_is_int(v) and 0 <= v < depth for v in value):
            index_sets.append((name, frozenset(value)))
        elif _is_int(value) and 0 < value < depth and names_a_rule:
            if name in _DEPTH_NAMES:
                continue
            periodic = value <= MAX_LAYER_PERIOD and any(word in name.lower() for word in _PERIOD_WORDS)
            rules.append((name, value, periodic))
    return per_layer, index_sets, rules


def _settings_apart(config, depth: int, index: int) -> list[str]:
    """The config settings that say layer `index` differs from the layer before it, as name=value."""
    per_layer, index_sets, rules = _layer_rules(config, depth)
    before = index - 1
    names = [name for name, values in per_layer if values[index] != values[before]]
    names += [name for name, members in index_sets if (index in members) != (before in members)]
    names += [name for name, v, periodic in rules if (index < v) != (before < v) or (periodic and index % v)]
    return [f"{name}={getattr(config, name)!r:.40}" for name in names]


_DEPTH_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def layer_signature(layer: nn.Module) -> tuple:
    """What the store's layout and the plan read from a layer: parameter names, shapes, dtypes, module types."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())
    return params, tuple((n, type(m).__qualname__) for n, m in layer.named_modules())


def measure(config, dtype: torch.dtype | None = None, *, every_layer: bool = False) -> ModelSizes:
    """Build the model on the meta device and measure it, each distinct layer kind once.

    Args:
        config: a transformers config.
        dtype: the weights' dtype (default: the config's).
        every_layer: build every decoder layer instead of one per kind (slower; the same figures).

    Raises:
        ConfigError: transformers cannot build it as a causal LM, it lacks a hidden size, or it is deeper than
            MAX_MEASURED_LAYERS and its layer kinds cannot be told from the config.
        UnsupportedModelError: hf_offload cannot find its decoder layers.
    """
    dtype = dtype or config_dtype(config)
    text = _text_config(config)
    depth_name = next((n for n in _DEPTH_NAMES if _is_int(getattr(text, n, None))), None)
    depth = getattr(text, depth_name) if depth_name else None
    built = None if every_layer or depth is None else _build_by_kinds(config, dtype, depth_name, depth)
    if built is None:
        if depth is not None and depth > MAX_MEASURED_LAYERS:
            raise ConfigError(
                f"the config has {depth:,} decoder layers; at most {MAX_MEASURED_LAYERS:,} are built one by one when "
                "their kinds cannot be told from the config. Check num_hidden_layers in the config."
            )
        model = empty_model(config, dtype)
        layers = list(find_decoder_layers(model).layers)
        built = model, layers, list(range(len(layers)))
    model, layers, kind_of = built
    return _sizes(config, dtype, model, layers, kind_of)


class _KindsDiffer(Exception):
    """The shallow builds do not agree with the layer keys; the message says where."""


def _build_by_kinds(config, dtype, depth_name: str, depth: int):
    """(shallow model, its layers, per full-depth layer the index of its kind's layer) or None: build it whole.

    Raises:
        ConfigError: the config is deeper than MAX_MEASURED_LAYERS and the shallow builds disagree with its keys.
    """
    keys = layer_keys(_text_config(config), depth)
    first: dict[tuple, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    shallow = max(first.values()) + 1
    _, _, rules = _layer_rules(_text_config(config), depth)
    period = max((v for _, v, periodic in rules if periodic), default=1)
    deeper = min(depth, shallow + max(16, 2 * period))  # every pattern repeated past its first appearances
    if deeper >= depth and shallow <= MAX_MEASURED_LAYERS:
        return None  # shallow enough to build whole
    try:
        if shallow > MAX_MEASURED_LAYERS:
            raise _KindsDiffer(
                f"a kind of layer first appears at layer {shallow - 1:,} (set apart by "
                f"{', '.join(_settings_apart(_text_config(config), depth, shallow - 1))})"
            )
        small, small_layers = _shallow(config, dtype, depth_name, shallow)
        model, layers = _shallow(config, dtype, depth_name, deeper)
        if _outside_signature(small, small_layers) != _outside_signature(model, layers):
            raise _KindsDiffer("the modules outside the decoder layers change with the number of layers")
        signatures = [layer_signature(layer) for layer in layers]
        for i, signature in enumerate(signatures):
            if signature != signatures[first[keys[i]]]:
                raise _KindsDiffer(
                    f"layer {i} is built unlike layer {first[keys[i]]} although the config says nothing different "
                    "about them"
                )
    except _KindsDiffer as err:
        if depth > MAX_MEASURED_LAYERS:
            raise ConfigError(
                f"the config has {depth:,} decoder layers, and their kinds cannot be told from the config: {err}. "
                f"At most {MAX_MEASURED_LAYERS:,} layers are built one by one; check num_hidden_layers in the config."
            ) from None
        return None
    return model, layers, [first[key] for key in keys]


def _shallow(config, dtype, depth_name: str, depth: int):
    """The model built with `depth` decoder layers (per-layer lists cut to them), everything else as configured."""
    text = _text_config(config)
    full = getattr(text, depth_name)
    per_layer = [getattr(text, name) for name, _ in _layer_rules(text, full)[0]]
    # the copy gets the per-layer lists cut to `depth` (copying a 100,000-long list again and again is what costs)
    config = copy.deepcopy(config, {id(values): copy.deepcopy(values[:depth]) for values in per_layer})
    setattr(_text_config(config), depth_name, depth)
    model = empty_model(config, dtype)
    layers = list(find_decoder_layers(model).layers)
    if len(layers) != depth:
        raise _KindsDiffer(f"a model configured with {depth} layers was built with {len(layers)}")
    return model, layers


def _outside_signature(model: nn.Module, layers: list[nn.Module]) -> list:
    streamed = {id(p) for layer in layers for p in layer.parameters()}
    return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters() if id(p) not in streamed]


def _sizes(config, dtype, model: nn.Module, layers: list[nn.Module], kind_of: list[int]) -> ModelSizes:
    """Measure `model`, whose decoder `layers` stand for a stack where layer i is built like layers[kind_of[i]]."""
    used = sorted(set(kind_of))
    kinds = [layers[k] for k in used]
    renumber = {k: n for n, k in enumerate(used)}
    kind_of = [renumber[k] for k in kind_of]
    counts = [0] * len(kinds)
    for k in kind_of:
        counts[k] += 1
    streamed = {id(p) for layer in layers for p in layer.parameters()}
    outside = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in streamed]
    total = sum(p.numel() for p in outside) + sum(
        n * sum(p.numel() for p in layer.parameters()) for layer, n in zip(kinds, counts)
    )
    resident = _nbytes(outside)
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
        expert_params = sum(
            n * sum(p.numel() for name, p in layer.named_parameters() if ".experts." in f".{name}")
            for layer, n in zip(kinds, counts)
        )
        expert_params += sum(
            p.numel() for name, p in model.named_parameters() if ".experts." in f".{name}" and id(p) not in streamed
        )
        compute -= expert_params * (1 - active / experts)
    lora: dict[int, int] = {}
    for layer, n in zip(kinds, counts):
        for w, _ in linear_weights(layer):
            for size in w.shape:
                lora[size] = lora.get(size, 0) + n
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    if hidden is None:
        raise ConfigError(f"{type(config).__name__} has no hidden_size; cannot estimate activations.")
    moe_inter = _first(text, ("moe_intermediate_size",))
    inter = (moe_inter * active if moe_inter and active else None) or _first(
        text, ("intermediate_size", "n_inner", "ffn_dim", "d_ff"), 4 * hidden
    )
    vocab = _first(text, ("vocab_size",), embedding.shape[0])
    return ModelSizes(kinds, kind_of, dtype, total, resident, compute, lora, hidden, inter, vocab)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _first(config, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default
