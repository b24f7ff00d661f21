"""`LayerStreamingRuntime`: one streamed model's engine, from installation to removal.

It ties the parts together: anatomy finds the layers, the host store packs them, the streamer moves them,
and each layer's `forward` is replaced (on the instance, reversibly) by the streamed call of `layer_fn`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import OffloadConfig
from . import compat, hostmem
from .anatomy import find_decoder_layers
from .device import DeviceOps, resolve_device
from .facts import StreamingSummary, bytes_per_train_step
from .layer_fn import call_streamed_layer
from .moe import RoutedExperts, find_expert_groups, has_unroutable_experts
from .quant import make_codec
from .store import HostStore, layout_layer, validate_layers
from .streamer import Streamer
from .trainable import (
    TrainableLayers,
    check_full_finetune,
    packed_as_frozen,
    trainable_decoder_weights,
    warn_if_host_memory_short,
)

logger = logging.getLogger(__name__)

RUNTIME_ATTRIBUTE = "_hf_offload_runtime"


class LayerStreamingRuntime:
    def __init__(self, model: nn.Module, config: OffloadConfig):
        self.config = config
        self.anatomy = find_decoder_layers(model)  # raises before any work is done
        # Full fine-tuning: the trainable decoder weights are packed like frozen ones (Note: [Trainable streamed
        # weights] in trainable.py), then given masters and gradients.
        trainable = trainable_decoder_weights(self.anatomy.layers, self.anatomy.shared_outside)
        if config.full_finetune:
            check_full_finetune(model, trainable)
            if config.check_host_memory:
                warn_if_host_memory_short(trainable)
        with packed_as_frozen(trainable if config.full_finetune else []):
            self._build_store(model, config)
        self.trainable = (
            TrainableLayers(self.store, self.streamer, self.ops, trainable) if config.full_finetune else None
        )
        self._moved: list[tuple[torch.Tensor, torch.device]] = []
        self._move_resident_tensors(model)
        self._saved_forwards: list[tuple[nn.Module, Any]] = []
        self._install_layer_forwards()
        self._handles: list[Any] = []
        self._guarded_merges: list[tuple[nn.Module, Any]] = []
        self._install_quantized_guards()
        parent = _parent_module(model, self.anatomy.path)
        # A new forward of the stack may follow a change of the host weights (load_state_dict, merge_adapter):
        # slots are only trusted from one forward to its own backward.
        self._hook = parent.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module, args) -> None:
        if self.trainable is not None:
            self.trainable.sync()
        self.streamer.invalidate()

    def _build_store(self, model: nn.Module, config: OffloadConfig) -> None:
        validate_layers(self.anatomy.layers, self.anatomy.shared_outside)
        self.device = resolve_device(config.device)
        self.ops = DeviceOps(self.device)
        pin = config.pin_memory if config.pin_memory is not None else self.device.type == "cuda"
        if pin and self.ops.is_cpu:
            logger.info("hf_offload: pin_memory has no effect when layers compute on the CPU")
        codec = make_codec(config.base_weight_dtype)
        if config.check_host_memory:
            _check_host_memory(self.anatomy.layers, config.base_weight_dtype, self.anatomy.shared_outside)
        # Experts modules are found before packing: their stacked tensors are packed as expert regions.
        groups, reasons = find_expert_groups(self.anatomy.layers)
        # Full fine-tuning moves every expert: a gradient must have its parameter's (all experts') shape.
        routed = config.expert_fetch == "routed" and not config.full_finetune
        if config.full_finetune and config.expert_fetch == "routed" and any(groups):
            logger.info(
                "hf_offload: full fine-tuning moves every expert with its layer (expert_fetch='routed' applies to "
                "adapter training): each experts weight's gradient has all its experts' shape."
            )
        if routed:
            _explain_whole_layer_experts(groups, reasons, self.anatomy.layers)
        self.store = HostStore.build(
            self.anatomy.layers,
            pin=self.ops.pin if pin else _no_pin,
            show_progress=config.show_progress,
            codec=codec,
            keep_resident=self.anatomy.shared_outside,
            expert_groups=lambda index: [g.params for g in groups[index]],
        )
        self.streamer = Streamer(self.store, self.ops, config.prefetch, routed=routed)
        self.routed_experts = RoutedExperts(groups if routed else [], self.streamer)
        self.routed_experts.install(self._host_views)

    # --- used by layer_fn ----------------------------------------------------------------------------------------
    def run_layer(self, index: int, direction: int, fn: Callable[[], Any]) -> Any:
        self.streamer.acquire(index, direction)
        try:
            return fn()
        finally:
            self.streamer.release(index)
            if self.trainable is not None:
                self.trainable.bind_masters(index)

    def streamed_trainable(self, index: int) -> list[nn.Parameter]:
        """Layer `index`'s trainable weights that stream (full fine-tuning), whose gradients `layer_fn` hands to
        `gradients_to_host` instead of autograd."""
        return self.trainable.params(index) if self.trainable is not None else []

    def gradients_to_host(self, index: int, grads: list[torch.Tensor | None]) -> None:
        self.trainable.accumulate(index, grads)
        if index == 0:
            self.trainable.flush()  # the last layer of the backward: .grad is complete when backward returns

    def _host_views(self, group) -> list[torch.Tensor]:
        pack = self.store.packs[group.layer_index]
        return [t.view_in(pack.host) for t in pack.experts[group.region].tensors]

    def activations_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if self.ops.is_cpu:
            host = tensor.clone()
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)  # ordered on the compute stream: no sync needed
        self.streamer.stats.bytes_to_host += tensor.numel() * tensor.element_size()
        return host

    def activations_to_device(self, host: torch.Tensor) -> torch.Tensor:
        self.streamer.stats.bytes_from_host_activations += host.numel() * host.element_size()
        return host.to(self.device, non_blocking=True)

    # --- description -----------------------------------------------------------------------------------------------
    def summary(self) -> StreamingSummary:
        packs = self.store.packs
        return StreamingSummary(
            device=str(self.device),
            layers=len(packs),
            layer_path=self.anatomy.path,
            prefetch=self.config.prefetch,
            host_store_bytes=self.store.nbytes,
            max_layer_bytes=self.store.max_layer_bytes,
            device_slot_bytes=self.config.slots * self.store.max_layer_bytes,
            bytes_per_train_step=bytes_per_train_step([p.nbytes for p in packs], self.config.prefetch),
            pinned=all(p.pinned for p in packs) if packs else False,
            base_weight_dtype=self.config.base_weight_dtype,
            quantized_weights=sum(len(p.encoded) for p in packs),
            device_scratch_bytes=self.store.max_scratch_bytes,
            expert_fetch=self.config.expert_fetch,
            moe_layers=sum(bool(p.experts) for p in packs),
            expert_bytes=sum(p.nbytes - p.base_nbytes for p in packs),
        )

    # --- installation and removal ------------------------------------------------------------------------------------
    def _move_resident_tensors(self, model: nn.Module) -> None:
        streamed = {id(t.param) for pack in self.store.packs for t in (*pack.tensors, *pack.encoded)}
        tensors = [p for p in model.parameters() if id(p) not in streamed] + list(model.buffers())
        for tensor in tensors:
            if tensor.device != self.device:
                self._moved.append((tensor, tensor.device))
                tensor.data = tensor.data.to(self.device)

    def _install_layer_forwards(self) -> None:
        for index, layer in enumerate(self.anatomy.layers):
            original = layer.forward  # bound method: the class forward (HF's checkpointing wrapper included)
            self._saved_forwards.append((layer, layer.__dict__.get("forward")))
            compat.keep_checkpointing_off(layer)
            layer.forward = _streamed_forward(self, index, layer, original)

    def _install_quantized_guards(self) -> None:
        """See Note: [Hollow weights] in store.py: what state_dict, load_state_dict and merging see."""
        for pack, layer in zip(self.store.packs, self.anatomy.layers):
            if pack.encoded:
                ids = {id(e.param) for e in pack.encoded}
                encoded = [(n, p) for n, p in layer.named_parameters(remove_duplicate=False) if id(p) in ids]
                self._handles.append(layer.register_state_dict_post_hook(_placeholders_in_state_dict(encoded)))
                self._handles.append(layer.register_load_state_dict_pre_hook(_refuse_loading_into(encoded)))
            for tuner in pack.quantized_tuners:
                self._guarded_merges.append((tuner, tuner.__dict__.get("merge")))
                tuner.merge = _refuse_merge

    def remove(self) -> None:
        """Undo everything: original forwards, weights back in their own storage on their original devices."""
        self._hook.remove()
        for handle in self._handles:
            handle.remove()
        for tuner, previous in self._guarded_merges:
            if previous is None:
                del tuner.merge
            else:
                tuner.merge = previous
        self._handles, self._guarded_merges = [], []
        self.routed_experts.remove()
        if self.trainable is not None:
            self.trainable.remove()
            self.trainable = None
        self.streamer.close()
        for layer, previous in self._saved_forwards:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
        self._saved_forwards = []
        self.store.unpack(self.ops.unpin)
        for tensor, device in self._moved:
            tensor.data = tensor.data.to(device)
        self._moved = []


def _streamed_forward(runtime: LayerStreamingRuntime, index: int, layer: nn.Module, original):
    def forward(*args, **kwargs):
        return call_streamed_layer(runtime, index, layer, original, args, kwargs)

    forward.__wrapped__ = original
    return forward


def _explain_whole_layer_experts(groups, reasons: list[str], layers: nn.ModuleList) -> None:
    """expert_fetch="routed": say which experts modules stream whole instead, and why (a dense model: nothing)."""
    if reasons:
        logger.warning(
            "hf_offload: expert_fetch='routed' cannot route these experts modules, which stream with their whole "
            "layer instead: %s",
            "; ".join(reasons),
        )
    elif not any(groups) and has_unroutable_experts(layers):
        logger.warning(
            "hf_offload: expert_fetch='routed': this model's experts modules do not take routed expert ids "
            "(forward(hidden_states, top_k_index, top_k_weights)), so every layer streams whole."
        )


def _no_pin(tensor: torch.Tensor) -> bool:
    return False


def _check_host_memory(layers: nn.ModuleList, chosen: str | None, keep_resident: frozenset[int]) -> None:
    """Stop before packing when the store would not fit in host memory (see hostmem.py)."""
    mappings = hostmem.file_mappings()

    def needs_of(dtype: str | None) -> list[hostmem.LayerNeed]:
        layouts = [layout_layer(layer, make_codec(dtype), keep_resident=keep_resident) for layer in layers]
        return hostmem.layer_needs(layouts, mappings)

    hostmem.check_fits(needs_of, chosen, hostmem.available_bytes())


def _placeholders_in_state_dict(encoded: list[tuple[str, nn.Parameter]]):
    def hook(module, state_dict, prefix, local_metadata):
        for name, param in encoded:
            if prefix + name in state_dict:
                state_dict[prefix + name] = torch.empty(param.shape, dtype=param.dtype, device="meta")
        if not _placeholders_in_state_dict.logged:
            _placeholders_in_state_dict.logged = True
            logger.warning(
                "hf_offload: state_dict() shows the quantized base weights of streamed layers as meta-device "
                "placeholders (they exist only as nf4/int8 bytes in host memory). Adapter checkpoints (peft "
                "save_pretrained, Trainer) are unaffected; to save full weights, call "
                "hf_offload.disable_layer_streaming(model) first, which gives them back dequantized."
            )

    return hook


_placeholders_in_state_dict.logged = False


def _refuse_loading_into(encoded: list[tuple[str, nn.Parameter]]):
    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        loaded = [prefix + name for name, _ in encoded if prefix + name in state_dict]
        if loaded:
            raise RuntimeError(
                f"hf_offload: cannot load {loaded[0]}{f' (and {len(loaded) - 1} more)' if len(loaded) > 1 else ''} "
                "into a streamed layer whose base weights are stored quantized in host memory. Call "
                "hf_offload.disable_layer_streaming(model), load the weights, then enable streaming again."
            )

    return hook


def _refuse_merge(*args, **kwargs):
    raise RuntimeError(
        "hf_offload: cannot merge adapters into base weights that are stored quantized in host memory "
        "(base_weight_dtype='nf4'/'int8', or a model loaded in 4/8 bits) while layers stream. Call "
        "hf_offload.disable_layer_streaming(model) first, then merge_adapter() / merge_and_unload()."
    )


def _parent_module(model: nn.Module, path: str) -> nn.Module:
    parent_path = path.rpartition(".")[0]
    return model.get_submodule(parent_path) if parent_path else model
