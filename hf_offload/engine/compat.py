"""The few places hf_offload touches internals of transformers, peft or accelerate, isolated here.

Each helper names the version it was checked against. Everything else in the package uses public APIs only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys

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


# Checked against transformers 5.24: decoder layers receive the KV cache as a `Cache` object (keyword `cache`, or
# `past_key_values` / `past_key_value` / `layer_past` in older code, by position in some families) and write this
# call's keys and values into it (`cache.update(..., layer_idx)`). Custom-code models (trust_remote_code) may still
# pass legacy tuples `(k, v)` and return `present` tuples, with an output arity that follows `use_cache`.
#
# Note: [KV caches in a streamed layer]
# A streamed layer runs twice when it needs gradients: forward (no graph) and the recompute in backward. A `Cache`
# object is mutable, so only the forward call gets it: it fills the cache with exactly the keys and values the
# unstreamed layer would store (computed without a graph, as under torch.no_grad). The recompute gets no cache, which
# computes the same output because the cache it was given was empty for this layer. A cache that already holds tokens
# for this layer would have to be read in the recompute as it was before the forward appended to it, and gradients
# would have to flow into it: that case is refused with the way out. Legacy tuple caches are plain tensors that the
# layer does not mutate: they pass through unchanged (and gradients flow through them like any other input), and
# `use_cache` is never rewritten, so a block's output arity stays what the model's own code expects.


def check_cache_arguments(args: tuple, kwargs: dict, layer_index: int) -> None:
    """Refuse a `Cache` that already holds tokens for this layer in a call that needs gradients.

    See Note: [KV caches in a streamed layer].

    Raises:
        NotImplementedError: a cache passed to the layer is pre-filled for `layer_index`.
    """
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"`{k}`", v) for k, v in kwargs.items()]
    for name, value in named:
        if isinstance(value, Cache) and _holds_state(value, layer_index):
            raise NotImplementedError(
                "hf_offload cannot backpropagate through a decoder layer that reads a pre-filled KV cache "
                f"({name} already holds state for layer {layer_index}). To train a completion on a prompt, pass the "
                "prompt and the completion as one sequence (labels -100 on the prompt) without `past_key_values`; "
                "to decode, run the forward under torch.no_grad()."
            )


def _holds_state(cache, layer_index: int) -> bool:
    """Whether `cache` already holds keys/values (or a recurrent state) for decoder layer `layer_index`.

    Checked against transformers 5.24: a `Cache` keeps one layer object per decoder layer in `cache.layers`; attention
    layers set `is_initialized` on their first update, linear-attention layers (hybrid models) record
    `has_previous_state`. Caches without per-layer objects fall back to `get_seq_length`.
    """
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list | tuple):
        if layer_index >= len(layers):
            return False
        layer = layers[layer_index]
        previous = getattr(layer, "has_previous_state", False)
        if isinstance(previous, dict):
            previous = any(previous.values())
        return bool(getattr(layer, "is_initialized", False) or previous)
    return cache.get_seq_length() > 0


def without_caches(leaves: list) -> list:
    """`leaves` with every `Cache` object replaced by None: the arguments of the recompute in backward."""
    return [None if isinstance(x, Cache) else x for x in leaves]


def accelerate_hooked_modules(model: nn.Module) -> list[str]:
    """Names of modules carrying accelerate's dispatch hooks (checked against accelerate 1.15: `_hf_hook`)."""
    return [name or "<root>" for name, module in model.named_modules() if hasattr(module, "_hf_hook")]


def peft_base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (peft 0.21: `PeftModel.get_base_model()`), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_quantized_parameter(param: torch.Tensor) -> bool:
    """bitsandbytes parameters (Params4bit, Int8Params): quantized by the model loader, streamed as they are."""
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


# --- linear layers and peft tuner layers -----------------------------------------------------------------------------
def is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes layers included) or transformers' `Conv1D` (GPT-2 family; weight is (in, out))."""
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def add_lora(model: nn.Module, lora_config) -> nn.Module:
    """`peft.get_peft_model`, without the deprecation warning it triggers in transformers 5.x.

    peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5.x deprecates in favour of
    `is_activation_checkpointing` with a FutureWarning (checked: transformers 5.24, peft 0.21.2). The warning is
    about peft's code, not the user's; hf_offload adds LoRA for the user, so it keeps that line out of their log.
    """
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config)


def is_peft_tuner_layer(module: nn.Module) -> bool:
    """A peft adapter layer wrapping a base layer (peft 0.21: `BaseTunerLayer`, with `get_base_layer()`)."""
    tuners_utils = sys.modules.get("peft.tuners.tuners_utils")  # not imported: no module can be a peft layer
    return tuners_utils is not None and isinstance(module, tuners_utils.BaseTunerLayer)


# --- bitsandbytes-quantized models (QLoRA) ---------------------------------------------------------------------------
# Checked against bitsandbytes 0.50.2. A 4-bit weight (`Params4bit`) is packed codes in `.data` plus a `QuantState`
# whose tensors (`absmax`, `code`, `offset`, and for double quantization `state2.absmax`, `state2.code`) the layer
# reads in forward. An 8-bit `Linear8bitLt` reads `state.CB` (the same memory as `weight.data`) and `state.SCB`.
_QUANT_STATE_TENSORS = ("absmax", "code", "offset")


def _bnb():
    import bitsandbytes

    return bitsandbytes


def check_streamable_bnb_parameter(param: torch.Tensor, index: int) -> None:
    """Refuse bitsandbytes parameters whose quantization state the host store does not know how to stream."""
    bnb = _bnb()
    if isinstance(param, bnb.nn.Params4bit) and param.quant_state is not None:
        return
    if isinstance(param, bnb.nn.Int8Params):
        return
    from .errors import UnsupportedModelError

    raise UnsupportedModelError(
        f"Decoder layer {index} holds a bitsandbytes parameter hf_offload cannot stream ({type(param).__name__}"
        f"{', without its quantization state' if isinstance(param, bnb.nn.Params4bit) else ''}). Load the model in "
        "bf16/fp16/fp32 (optionally with OffloadConfig(base_weight_dtype='nf4')), or with BitsAndBytesConfig "
        "load_in_4bit / load_in_8bit."
    )


def bnb_state_tensors(module: nn.Module) -> list[tuple[object, str]]:
    """(holder, attribute name) of every tensor a bitsandbytes linear layer reads besides its weight's `.data`.

    Also normalises the layer so these are the only places it reads from while streamed: an 8-bit layer moves its
    weight's `CB`/`SCB` into `state` on its first forward (`init_8bit_state`), done here up front; a 4-bit layer
    repacks its weight for CPU inference kernels in eval mode (`_convert_weight_packed_for_cpu`, replacing the weight
    and its state with private copies), which is switched off (and stays off: it is only an inference speed-up).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not is_quantized_parameter(weight):
        return []
    bnb = _bnb()
    found: list[tuple[object, str]] = []
    if isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None:
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
        state = weight.quant_state
        found += [(state, n) for n in _QUANT_STATE_TENSORS if isinstance(getattr(state, n, None), torch.Tensor)]
        nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
        if nested is not None:
            found += [(nested, n) for n in _QUANT_STATE_TENSORS if isinstance(getattr(nested, n, None), torch.Tensor)]
    elif isinstance(weight, bnb.nn.Int8Params) and isinstance(getattr(module, "state", None), bnb.MatmulLtState):
        if weight.CB is not None and hasattr(module, "init_8bit_state"):
            module.init_8bit_state()
        found += [(module.state, n) for n in ("CB", "SCB") if isinstance(getattr(module.state, n), torch.Tensor)]
    return found


def logical_numel(param: torch.Tensor) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit weight packs two per byte (its `quant_state.shape`)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


# --- outputs recorded by transformers' output-capturing hooks (router logits, attentions) --------------------------
# Checked against transformers 5.23 (`transformers/utils/output_capturing.py`): `@capture_outputs` on a model's
# forward sets a ContextVar `_active_collector` to a dict {key: [tensors]} (keys such as "router_logits",
# "attentions", "hidden_states", plus private keys starting with "_"); forward hooks on the recorded module classes
# append to those lists while the collector is set. Older 5.x releases kept the same variable in utils/generic.py.
try:
    from transformers.utils.output_capturing import _active_collector as _output_collector
except ImportError:  # pragma: no cover - early transformers 5.x
    try:
        from transformers.utils.generic import _active_collector as _output_collector
    except ImportError:
        _output_collector = None

# Recorded at the decoder layer's own output (outside the streamed call), so never collected inside it.
_LAYER_LEVEL_KEYS = ("hidden_states",)


def recorded_output_keys() -> list[str]:
    """The keys the active output collector records from inside a decoder layer; [] when none is active."""
    collected = _output_collector.get() if _output_collector is not None else None
    if not collected:
        return []
    return [k for k in collected if not k.startswith("_") and k not in _LAYER_LEVEL_KEYS]


@contextlib.contextmanager
def collect_recorded_outputs(keys: list[str]):
    """Inside the block, recorded outputs of `keys` go to the yielded dict of lists instead of the model's collector.

    Used around a streamed layer call: what the hooks record there (under no_grad in the forward, under grad in the
    recompute) becomes an output of the layer's autograd Function, and is then handed to the model's collector.
    """
    collected: dict[str, list] = {k: [] for k in keys}
    token = _output_collector.set(collected)
    try:
        yield collected
    finally:
        _output_collector.reset(token)


def extend_recorded_outputs(outputs: dict[str, list]) -> None:
    """Append `outputs` to the model's active collector, in order (layer by layer, like its own hooks)."""
    collected = _output_collector.get()
    for key, values in outputs.items():
        collected[key].extend(values)


# --- experts modules -------------------------------------------------------------------------------------------------
# Checked against transformers 5.23: every experts module of the standard form (`@use_experts_implementation`
# classes, and hand-written ones such as Step3p7Experts) reads its expert count from `self.num_experts`,
# holds its expert weights as direct parameters of shape [num_experts, ...], and takes
# (hidden_states, top_k_index, top_k_weights) — GPT-OSS names them (hidden_states, router_indices, routing_weights).
EXPERT_INDEX_ARGUMENTS = ("top_k_index", "router_indices")


@contextlib.contextmanager
def experts_count(module: nn.Module, num_experts: int):
    """Let `module` believe it holds `num_experts` experts for the duration of the block."""
    saved = module.num_experts
    module.num_experts = num_experts
    try:
        yield
    finally:
        module.num_experts = saved


# --- peft LoRA on expert tensors (`target_parameters`) --------------------------------------------------------------
# Checked against peft 0.21: `lora.ParamWrapper` adapts one parameter of its base layer; wrappers nest (one per
# targeted parameter); `get_delta_factors(adapter)` returns (lhs, rhs, scaling) with delta = scaling * lhs @ rhs per
# expert (lhs: [E, a, r], rhs: [E, r, b], in the parameter's dtype), and its forward folds the delta into the
# parameter through `torch.nn.utils.parametrize`.
try:
    from peft.tuners.lora.layer import ParamWrapper
except ImportError:  # pragma: no cover
    ParamWrapper = None


def is_param_wrapper(module: nn.Module) -> bool:
    return ParamWrapper is not None and isinstance(module, ParamWrapper)


def param_wrapper_chain(module: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(the nested ParamWrappers from the outside in, the wrapped base module)."""
    wrappers = []
    while is_param_wrapper(module):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def param_wrapper_deltas(wrapper: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """The (lhs, rhs, scaling) factors of each adapter `wrapper` applies in its forward now; [] when it applies none.

    Mirrors `ParamWrapper.forward`: nothing when adapters are disabled or merged into the weight.
    """
    if wrapper.disable_adapters:
        if wrapper.merged:
            raise NotImplementedError(
                "hf_offload: a LoRA adapter on expert weights is merged and adapters are disabled; peft would unmerge "
                "it inside the forward, which would write into the streamed device copy. Call unmerge_adapter() "
                "before disabling adapters."
            )
        return []
    if wrapper.merged:
        return []
    return [wrapper.get_delta_factors(a) for a in wrapper.active_adapters if a in wrapper.lora_A]


# --- accelerate's record of the dataloader being iterated ------------------------------------------------------------
# Checked against accelerate 1.15: a prepared dataloader (DataLoaderShard) registers itself in the shared
# `GradientState` when its iteration begins (`_add_dataloader`) and leaves when it ends (`_remove_dataloader`); it
# sets its own `end_of_dataloader` attribute before yielding its last batch. `gather_for_metrics` and the Trainer's
# `batch_eval_metrics` read `GradientState.end_of_dataloader` / `.remainder` through the active dataloader.
def dataloader_position(gradient_state) -> tuple | None:
    """What `gradient_state` says now about the dataloader being iterated: (dataloader, end_of_dataloader)."""
    if gradient_state is None or not gradient_state.in_dataloader:
        return None
    active = gradient_state.active_dataloader
    return active, active.end_of_dataloader


def restore_dataloader_position(gradient_state, position: tuple | None, readded: list) -> None:
    """Make `gradient_state` say again what `dataloader_position` returned; dataloaders registered again to do so
    are appended to `readded` (for `forget_readded_dataloaders`)."""
    if position is None:
        return
    dataloader, end = position
    if not gradient_state.in_dataloader or gradient_state.active_dataloader is not dataloader:
        gradient_state._add_dataloader(dataloader)
        readded.append(dataloader)
    dataloader.end_of_dataloader = end


def forget_readded_dataloaders(gradient_state, readded: list) -> None:
    for dataloader in readded:
        gradient_state._remove_dataloader(dataloader)
    readded.clear()


# --- a causal LM's loss function -------------------------------------------------------------------------------------
# Checked against transformers 5.24 (`PreTrainedModel.loss_function`): a property that returns the instance attribute
# `_loss_function` when it is set, else `LOSS_MAPPING[self.loss_type]` (causal LMs: `loss_utils.ForCausalLMLoss`);
# its setter sets `_loss_function`. Causal LM forwards call `self.loss_function(logits, labels, vocab_size, **kwargs)`
# once, after the head (and the family's logit softcapping or scaling).
try:
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError:  # pragma: no cover
    ForCausalLMLoss = None


def uses_causal_lm_loss(model: nn.Module) -> bool:
    """Whether `model`'s forward computes its loss with transformers' own causal-LM cross-entropy."""
    return ForCausalLMLoss is not None and getattr(model, "loss_function", None) is ForCausalLMLoss


def replace_loss_function(model: nn.Module, loss_function):
    """Make `model.loss_function` return `loss_function`; returns a callable that undoes it."""
    had, previous = "_loss_function" in model.__dict__, model.__dict__.get("_loss_function")
    model.__dict__["_loss_function"] = loss_function

    def restore() -> None:
        if had:
            model.__dict__["_loss_function"] = previous
        else:
            model.__dict__.pop("_loss_function", None)

    return restore


def weight_conversion_op_base() -> type:
    """The base class of transformers' per-tensor loading operations (`core_model_loading.ConversionOps`).

    A quantizer's `get_quantize_ops()` returns one; transformers calls its `convert(input_dict, model=..., ...)`
    with each checkpoint tensor (renamed, Mixture-of-Experts experts already fused) and installs what it returns.
    Checked against transformers 5.0.0 and 5.24.0 (the module and the class exist in both, `convert` takes the
    tensors by target name and keyword arguments).
    """
    try:
        from transformers.core_model_loading import ConversionOps
    except ImportError as err:
        import transformers

        raise ImportError(
            "hf_offload loads checkpoints straight into its host store through transformers' per-tensor loading "
            "operations (transformers.core_model_loading.ConversionOps), which this transformers "
            f"({transformers.__version__}) does not have. Install transformers>=5.0, or load the model without "
            "HostStoreConfig (enable_layer_streaming then packs it after loading)."
        ) from err
    return ConversionOps


# Checked against torch 2.13 (OpenMP and native thread pools): `torch.set_num_threads` sets a process-wide default
# and the calling thread's own count; a thread reads the default once, at its first parallel kernel, and keeps its
# own count after that. Encoding threads each take one chunk at a time, so their kernels must not fan out again
# (with OpenMP that oversubscribes the cores and spins in barriers, many times slower on a busy machine).
def single_threaded_pool(workers: int, name: str):
    """A `ThreadPoolExecutor` of `workers` threads whose torch kernels run on one thread each.

    The caller's own thread count and the process-wide default are what they were before, once this returns.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    ready = threading.Barrier(workers + 1)

    def initializer() -> None:
        torch.get_num_threads()  # reads the process-wide default now, so the next line is what the thread keeps
        torch.set_num_threads(1)
        ready.wait()

    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=initializer)
    for _ in range(workers):  # each submit starts a thread while none is idle (all wait in the initializer)
        pool.submit(int)
    ready.wait()
    torch.set_num_threads(before)
    return pool


# Checked against torch 2.13 (and 2.4+, which read the same attribute): `DistributedDataParallel.__init__` reads
# `module._ddp_params_and_buffers_to_ignore` (fully qualified names) and leaves those parameters out of everything:
# the start-up broadcast of rank 0's weights, the one-device-type check and the reducer. The setter is
# `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`, which also marks each parameter
# (`_ddp_ignored`); setting the attribute alone is what that setter does for the names.
DDP_IGNORE_ATTRIBUTE = "_ddp_params_and_buffers_to_ignore"


def ddp_ignored_names(module: nn.Module, streamed: set[int]) -> list[str]:
    """The names, as DDP spells them for `module`, of the parameters whose ids are in `streamed`, plus any that
    `module` already asked DDP to ignore."""
    names = [name for name, param in module.named_parameters(remove_duplicate=False) if id(param) in streamed]
    return sorted({*getattr(module, DDP_IGNORE_ATTRIBUTE, ()), *names})
