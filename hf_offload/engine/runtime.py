"""`LayerStreamingRuntime`: one streamed model's engine, from installation to removal.

It ties the parts together: anatomy finds the layers, the host store packs them, the streamer moves them,
and each layer's `forward` is replaced (on the instance, reversibly) by the streamed call of `layer_fn`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import OffloadConfig
from . import compat, hostmem, nf4_encode, shared_store, store_cache
from .activations import ActivationOffload
from .anatomy import check_streamable
from .chunked_loss import ChunkedLoss
from .device import BOUNCE_BUFFERS, DeviceOps, resolve_device
from .distributed import FetchPartition, current_ranks, refuse_full_finetune
from .facts import StreamingSummary, bytes_per_train_step
from .layer_fn import call_streamed_layer
from .moe import RoutedExperts, find_expert_groups, has_unroutable_experts
from .overrides import Overrides, deepcopy_refusal
from .prebuilt import take_prebuilt_store
from .quant import make_codec
from .store import HostStore, StoreCache, layout_layer, layout_tensors, require_frozen_weights
from .streamer import Streamer
from .tiled_mlp import TiledMLPs
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
        self.anatomy = check_streamable(model)  # every refusal comes before any work is done
        _refuse_streaming_twice(self.anatomy.layers)
        # Full fine-tuning: the trainable decoder weights are packed like frozen ones (Note: [Trainable streamed
        # weights] in trainable.py), then given masters and gradients.
        trainable = trainable_decoder_weights(self.anatomy.layers, self.anatomy.shared_outside)
        if config.full_finetune:
            refuse_full_finetune(current_ranks())
            check_full_finetune(model, trainable)
            if config.check_host_memory:
                warn_if_host_memory_short(trainable)
        with packed_as_frozen(trainable if config.full_finetune else []):
            require_frozen_weights(self.anatomy.layers, self.anatomy.shared_outside)
            self._build_store(model, config)
        self.trainable = (
            TrainableLayers(self.store, self.streamer, self.ops, trainable) if config.full_finetune else None
        )
        self.routed_experts.gradient_sink = self.trainable  # Note: [Routed experts under full fine-tuning]
        self._moved: list[tuple[torch.Tensor, torch.device]] = []
        self._move_resident_tensors(model)
        self.overrides = Overrides()  # every method replaced on the model, restored by remove()
        self._install_layer_forwards()
        self._handles: list[Any] = []
        self._install_quantized_guards()
        self._install_cast_guards(model)
        self._exclude_streamed_from_ddp(model)
        if self.shared_store is not None:
            self._install_shared_store_guards()
        if any(pack.encoded for pack in self.store.packs):
            self._install_full_save_guard(model)
        # Slots stay valid across steps while the host bytes do not change (Note: [Slot validity] in streamer.py);
        # peft's merge and unmerge write through `.data`, which no version counter sees.
        self._install_merge_invalidation()
        if self.trainable is not None:
            # weights written outside an optimizer step (load_state_dict) reach the compute copy before a forward
            parent = _parent_module(model, self.anatomy.path)
            self._handles.append(parent.register_forward_pre_hook(self._sync_trainable))
        # Long sequences: MLPs in tiles, head and loss in chunks (see tiled_mlp.py and chunked_loss.py).
        self.tiled_mlps = TiledMLPs(self.anatomy.layers, self.ops, config.mlp_tile_tokens)
        self.chunked_loss = (
            ChunkedLoss(compat.peft_base_model(model), self.ops, config.loss_chunk_tokens)
            if config.chunked_loss
            else None
        )

    def _sync_trainable(self, module, args) -> None:  # a forward pre-hook: returns None, the arguments unchanged
        self.trainable.sync()

    def _build_store(self, model: nn.Module, config: OffloadConfig) -> None:
        self.device = resolve_device(config.device)
        self.prefetch = _effective_prefetch(config.prefetch, len(self.anatomy.layers))
        self.ops = DeviceOps(self.device)
        simulated = self.ops.simulation is not None
        pin = config.pin_memory if config.pin_memory is not None else self.device.type == "cuda" or simulated
        if pin and self.ops.is_cpu and not simulated:
            logger.info("hf_offload: pin_memory has no effect when layers compute on the CPU")
        codec = make_codec(config.base_weight_dtype)
        # Layers a checkpoint load already built in the store (HostStoreConfig) are adopted as they are.
        loaded = take_prebuilt_store(model, self.anatomy.layers, config.base_weight_dtype)
        prebuilt = loaded.layers if loaded is not None else None
        # Experts modules are found before packing: their stacked tensors are packed as expert regions.
        groups, reasons = find_expert_groups(self.anatomy.layers)
        expert_groups = [[g.params for g in layer_groups] for layer_groups in groups]
        self._ranks = current_ranks()
        sharing = self._begin_sharing(config, codec, expert_groups, loaded)  # before a byte is packed
        if sharing.mapped is not None:
            prebuilt = None  # this rank's own loaded store (if any) gives way to local rank 0's
        routed = config.expert_fetch == "routed"
        if routed:
            _explain_whole_layer_experts(groups, reasons, self.anatomy.layers)
        nf4_encode.building_for_node(sharing.building is not None)  # the waiting ranks' cores are idle
        try:  # a failure lets go of the segment local rank 0 locked: the waiting ranks stop with an error
            if config.check_host_memory and prebuilt is None and sharing.mapped is None:
                _check_host_memory(
                    self.anatomy.layers, config.base_weight_dtype, self.anatomy.shared_outside, expert_groups
                )
            self.store = HostStore.build(
                self.anatomy.layers,
                pin=self.ops.pin if pin else _no_pin,
                show_progress=config.show_progress,
                codec=codec,
                keep_resident=self.anatomy.shared_outside,
                expert_groups=lambda index: expert_groups[index],
                # a store loaded from a checkpoint is cached by the loader, keyed by the checkpoint (store_loading.py)
                cache=_store_cache(model, config.store_cache) if prebuilt is None and sharing.mapped is None else None,
                prebuilt=prebuilt,
                mapped=sharing.mapped,
            )
        except BaseException:
            sharing.abandon()
            raise
        finally:
            nf4_encode.building_for_node(False)
        self.shared_store = self._share_store(pin, sharing)
        self._warn_unpinned(pin)
        self.streamer = Streamer(self.store, self.ops, self.prefetch, routed=routed, partition=self._partition(config))
        self.routed_experts = RoutedExperts(groups if routed else [], self.streamer)
        self.routed_experts.install()
        self.activations = (
            ActivationOffload(self.ops, self.streamer, config.check_host_memory) if config.offload_activations else None
        )
        if self.activations is not None:
            self.streamer.backward_prefetch = self.activations.prefetch

    def _begin_sharing(self, config: OffloadConfig, codec, expert_groups: list, loaded) -> _Sharing:
        """One store per node for data-parallel ranks (see Note: [Shared store lifecycle] in shared_store.py): a
        store the checkpoint load already shared is kept; else local rank 0 locks the segment it is about to build,
        and every other local rank waits for it and maps it (it packs nothing)."""
        wanted = _wants_shared_store(config, self._ranks)
        if loaded is not None and loaded.shared is not None:
            return _Sharing(wanted, loaded=loaded.shared)
        if not wanted:
            return _Sharing(False)
        layouts = _layouts(self.anatomy, codec, expert_groups)
        key = _weights_key(self.anatomy.layers, layouts, codec)
        if self._ranks.local_rank == 0:
            return _Sharing(True, key=key, building=shared_store.Building.begin(shared_store.required_bytes(layouts)))
        attached = shared_store.attach(key, self._ranks)
        if attached is None:
            return _Sharing(False)
        return _Sharing(True, attached=attached[0], mapped=attached[1])

    def _share_store(self, pin: bool, sharing: _Sharing) -> shared_store.SharedStore | None:
        """This rank's hold on the node's shared store once the store is built (None: a store of its own)."""
        if sharing.loaded is not None:
            self.shared_store = sharing.loaded
            if not sharing.wanted:  # shared while loading, but streaming was asked for a store of its own
                self._unshare_store()
            return self.shared_store
        if sharing.building is None:
            return sharing.attached
        pin_fn, packs = self.ops.pin if pin else _no_pin, self.store.packs

        def swap(position: int, mapped: torch.Tensor) -> None:
            pack = packs[position]
            was_pinned = pack.pinned
            if was_pinned:
                self.ops.unpin(pack.host)
            pack.host = mapped
            pack.pinned = pin_fn(mapped) if was_pinned else False
            pack.bind_host()

        return sharing.building.publish(packs, sharing.key, swap, self._ranks)

    def _partition(self, config: OffloadConfig) -> FetchPartition | None:
        """This rank's share of each layer copy (see Note: [Partitioned fetch] in distributed.py), or None."""
        if not config.partitioned_fetch:
            return None
        if self._ranks.local_world_size < 2 or not self._ranks.distributed:
            logger.info("hf_offload: partitioned_fetch has no effect with one rank on a node: it copies whole layers")
            return None
        logger.info(
            "hf_offload: partitioned fetch: local rank %d copies 1/%d of each layer from host memory and all-gathers "
            "the rest from the node's other ranks",
            self._ranks.local_rank,
            self._ranks.local_world_size,
        )
        return FetchPartition(self._ranks)

    # --- used by layer_fn ----------------------------------------------------------------------------------------
    def run_layer(self, index: int, direction: int, fn: Callable[[], Any]) -> Any:
        version = self.trainable.version(index) if self.trainable is not None else 0
        self.streamer.acquire(index, direction)
        try:
            return fn()
        finally:
            self.streamer.release(index)
            if self.trainable is not None:
                self.trainable.bind_masters(index)
                self.trainable.window_closed(index, version)

    def streamed_trainable(self, index: int) -> list[nn.Parameter]:
        """Layer `index`'s trainable weights that stream (full fine-tuning), whose gradients `layer_fn` hands to
        `gradients_to_host` instead of autograd."""
        return self.trainable.params(index) if self.trainable is not None else []

    def gradients_to_host(self, index: int, grads: list[torch.Tensor | None]) -> None:
        self.trainable.accumulate(index, grads)
        if index == 0:
            self.trainable.flush()  # the last layer of the backward: .grad is complete when backward returns

    def activations_to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied to host memory in compute-stream order (layer-major evaluation parks hidden states with
        it; training's saved activations go through `self.activations`, on their own streams)."""
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

    def unpinned_layers(self) -> list[int]:
        """Layers whose copies are staged through bounce buffers (their host buffers are not page-locked)."""
        if not self.ops.stages_unpinned_copies:
            return []  # the plain CPU copies synchronously anyway
        return [pack.index for pack in self.store.packs if not pack.pinned]

    def _warn_unpinned(self, pin_requested: bool) -> None:
        unpinned = self.unpinned_layers()
        if not unpinned:
            return
        why = "page-locking failed for them" if pin_requested else "pin_memory=False"
        logger.warning(
            "hf_offload: %d of %d layers are not in page-locked host memory (%s): their copies to %s are staged "
            "through %d page-locked bounce buffers of %s, which costs host time per copy. hf_offload.summary(model) "
            "lists them under unpinned_layers.",
            len(unpinned),
            len(self.store.packs),
            why,
            self.device,
            BOUNCE_BUFFERS,
            hostmem.format_bytes(self.ops.bounce_chunk_bytes),
        )

    # --- description -----------------------------------------------------------------------------------------------
    def summary(self) -> StreamingSummary:
        packs = self.store.packs
        return StreamingSummary(
            device=str(self.device),
            layers=len(packs),
            layer_path=self.anatomy.path,
            prefetch=self.prefetch,
            host_store_bytes=self.store.nbytes,
            max_layer_bytes=self.store.max_layer_bytes,
            device_slot_bytes=(self.prefetch + 1) * self.store.max_layer_bytes,
            bytes_per_train_step=bytes_per_train_step([p.nbytes for p in packs], self.prefetch),
            pinned=all(p.pinned for p in packs) if packs else False,
            base_weight_dtype=self.config.base_weight_dtype,
            quantized_weights=sum(len(p.encoded) for p in packs),
            device_scratch_bytes=self.store.max_scratch_bytes,
            expert_fetch=self.config.expert_fetch,
            moe_layers=sum(bool(p.experts) for p in packs),
            expert_bytes=sum(p.nbytes - p.base_nbytes for p in packs),
            unpinned_layers=self.unpinned_layers(),
            simulated_async_seed=None if self.ops.simulation is None else self.ops.simulation.seed,
            chunked_loss=self.chunked_loss is not None and self.chunked_loss.head is not None,
            loss_chunk_tokens=self.config.loss_chunk_tokens,
            mlp_tile_tokens=self.config.mlp_tile_tokens,
            tiled_mlp_layers=len(self.tiled_mlps.mlps),
            layers_loaded_into_store=sum(p.adopted for p in packs),
            offload_activations=self.activations is not None,
            activation_host_bytes=0 if self.activations is None else self.activations.buffer_bytes,
            activation_unpinned_buffers=0 if self.activations is None else self.activations.unpinned_buffers,
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
            compat.keep_checkpointing_off(layer)
            self.overrides.replace(layer, "forward", _streamed_forward(self, index, layer, original))

    def _install_quantized_guards(self) -> None:
        """See Note: [Hollow weights] in store.py: what state_dict, load_state_dict and merging see."""
        for pack, layer in zip(self.store.packs, self.anatomy.layers):
            if pack.encoded:
                ids = {id(e.param) for e in pack.encoded}
                encoded = [(n, p) for n, p in layer.named_parameters(remove_duplicate=False) if id(p) in ids]
                self._handles.append(layer.register_state_dict_post_hook(_placeholders_in_state_dict(encoded)))
                self._handles.append(layer.register_load_state_dict_pre_hook(_refuse_loading(encoded, _QUANTIZED_LOAD)))
            streamed = {id(t.param) for t in (*pack.tensors, *pack.encoded)}
            named = [(n, p) for n, p in layer.named_parameters(remove_duplicate=False) if id(p) in streamed]
            self._handles.append(layer.register_load_state_dict_pre_hook(_refuse_assigning_to(named)))
            for tuner in pack.quantized_tuners:
                self.overrides.replace(tuner, "merge", _refuse_merge)

    def _install_cast_guards(self, model: nn.Module) -> None:
        """model.half(), .to(dtype), .to(device), .cuda() would replace the streamed weights' tensors behind the
        store's back: refused on the model, its transformers model and every streamed layer (see `_refuse_cast`)."""
        kinds = {(t.param.dtype, t.param.device) for pack in self.store.packs for t in (*pack.tensors, *pack.encoded)}
        for module in {id(m): m for m in (model, compat.peft_base_model(model), *self.anatomy.layers)}.values():
            self.overrides.replace(module, "_apply", _refuse_cast(module, kinds))

    def _install_full_save_guard(self, model: nn.Module) -> None:
        """save_pretrained of the transformers model writes every weight; quantized ones exist only as nf4/int8
        bytes (meta placeholders in state_dict), so the save would stop half-way and leave a partial directory.
        Refused before anything is written; peft's save_pretrained (adapters only) is unaffected."""
        owner = compat.peft_base_model(model)
        if callable(getattr(owner, "save_pretrained", None)):
            self.overrides.replace(owner, "save_pretrained", _refuse_full_save)

    def _install_shared_store_guards(self) -> None:
        """The writes into frozen weights that a shared, read-only store refuses with a message rather than a
        segmentation fault: merging adapters and loading a state dict into streamed weights."""
        for pack, layer in zip(self.store.packs, self.anatomy.layers):
            streamed = {id(t.param) for t in pack.tensors}
            named = [(n, p) for n, p in layer.named_parameters(remove_duplicate=False) if id(p) in streamed]
            self._handles.append(layer.register_load_state_dict_pre_hook(_refuse_loading(named, _SHARED_LOAD)))
            for module in layer.modules():
                if compat.is_peft_tuner_layer(module) and callable(getattr(module, "merge", None)):
                    self.overrides.replace(module, "merge", _refuse_merge_shared)

    def _exclude_streamed_from_ddp(self, model: nn.Module) -> None:
        """See Note: [Streamed layers under DistributedDataParallel] in distributed.py."""
        streamed = {id(t.param) for pack in self.store.packs for t in (*pack.tensors, *pack.encoded)}
        for module in {id(m): m for m in (model, compat.peft_base_model(model))}.values():
            self.overrides.replace(module, compat.DDP_IGNORE_ATTRIBUTE, compat.ddp_ignored_names(module, streamed))

    def __deepcopy__(self, memo):
        raise_deepcopy_refusal()

    def _install_merge_invalidation(self) -> None:
        guarded = {id(tuner) for pack in self.store.packs for tuner in pack.quantized_tuners}  # merging refused
        for layer in self.anatomy.layers:
            for module in layer.modules():
                if compat.is_peft_tuner_layer(module) and id(module) not in guarded:
                    for name in ("merge", "unmerge"):
                        if callable(getattr(module, name, None)):
                            invalidating = _then_invalidate(getattr(module, name), self.streamer)
                            self.overrides.replace(module, name, invalidating)

    def remove(self) -> None:
        """Undo everything: original forwards, weights back in their own storage on their original devices."""
        if self.chunked_loss is not None:
            self.chunked_loss.remove()
        self.tiled_mlps.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.routed_experts.remove()
        if self.trainable is not None:
            self.trainable.remove()
            self.trainable = None
        self.streamer.close()
        if self.activations is not None:
            self.activations.close()
        self.overrides.restore()
        if self.shared_store is not None:
            self._unshare_store()
        self.store.unpack(self.ops.unpin)
        for tensor, device in self._moved:
            tensor.data = tensor.data.to(device)
        self._moved = []

    def _unshare_store(self) -> None:
        """Give each layer a private copy of its shared buffer, so the weights `unpack` hands back are writable and
        the mapping can go."""
        for pack in self.store.packs:
            if pack.pinned:
                self.ops.unpin(pack.host)
            pack.host, pack.pinned = pack.host.clone(), False
            pack.bind_host()
        self.shared_store.close()
        self.shared_store = None


class _StreamedForward:
    """A streamed layer's `forward` (set on the instance). A callable object rather than a closure so that copying
    the layer is refused (see `raise_deepcopy_refusal`) and a second runtime can recognise a streamed layer."""

    def __init__(self, runtime: LayerStreamingRuntime, index: int, layer: nn.Module, original):
        self.runtime, self.index, self.layer, self.original = runtime, index, layer, original
        self.__wrapped__ = original

    # torch.compile compiles the resident parts (embeddings, norm, head, loss) and runs streamed layers eagerly:
    # their forward moves weights and runs an autograd Function with side effects that must not be traced.
    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        return call_streamed_layer(self.runtime, self.index, self.layer, self.original, args, kwargs)

    def __deepcopy__(self, memo):
        raise_deepcopy_refusal()


def _streamed_forward(runtime: LayerStreamingRuntime, index: int, layer: nn.Module, original) -> _StreamedForward:
    return _StreamedForward(runtime, index, layer, original)


def is_streamed_layer(layer: nn.Module) -> bool:
    return isinstance(layer.__dict__.get("forward"), _StreamedForward)


def raise_deepcopy_refusal():
    """Note: [Copying a streamed model]
    A deep copy of a streamed model would copy the parameters' host views but keep calling the original's runtime:
    the copy's layers would compute with the original's host store and its gradients land in the original's
    adapters (a reference or EMA model would silently follow the live one). So copying is refused. The same holds
    for a module hf_offload gave its own forward (an experts module with routed fetch, a tiled MLP, the chunked-loss
    head: `overrides.InstalledForward`): copied alone, it would keep calling the original's forward.
    """
    raise deepcopy_refusal()


def _refuse_streaming_twice(layers: nn.ModuleList) -> None:
    if any(is_streamed_layer(layer) for layer in layers):
        raise RuntimeError(
            "The decoder layers of this module already stream: layer streaming is on for a model that contains it "
            "(or that it contains). Streaming twice would hold the host store twice and move every byte twice. "
            "Enable it once, on the model you train (the peft model or the transformers model); to change its "
            "configuration, call hf_offload.disable_layer_streaming on that model first."
        )


def _effective_prefetch(prefetch: int, n_layers: int) -> int:
    """At most the other layers can be loaded ahead; more would only allocate device slots that stay empty."""
    if prefetch <= n_layers - 1:
        return prefetch
    logger.warning(
        "hf_offload: prefetch=%d is more than the %d other decoder layers of this model; using prefetch=%d "
        "(device memory holds all %d layers).",
        prefetch,
        n_layers - 1,
        n_layers - 1,
        n_layers,
    )
    return n_layers - 1


def _then_invalidate(method, streamer):
    """`method`, then forget what the device slots hold (it changed host weights through `.data`)."""

    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        finally:
            streamer.invalidate()

    call.__wrapped__ = method
    return call


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


def _check_host_memory(
    layers: nn.ModuleList, chosen: str | None, keep_resident: frozenset[int], expert_groups: list[list]
) -> None:
    """Stop before packing when the store would not fit in host memory (see hostmem.py)."""
    mappings = hostmem.file_mappings()

    def needs_of(dtype: str | None) -> list[hostmem.LayerNeed]:
        layouts = [
            layout_layer(layer, make_codec(dtype), keep_resident=keep_resident, expert_groups=groups)
            for layer, groups in zip(layers, expert_groups)
        ]
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


def _refuse_loading(params: list[tuple[str, nn.Parameter]], why: str):
    """A `load_state_dict` pre-hook that refuses a state dict holding any of `params` (name, parameter); `why` is
    the message, with `{name}` for what was about to be loaded."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        loaded = [prefix + name for name, _ in params if prefix + name in state_dict]
        if loaded:
            more = f" (and {len(loaded) - 1} more)" if len(loaded) > 1 else ""
            raise RuntimeError("hf_offload: " + why.format(name=loaded[0] + more))

    return hook


_QUANTIZED_LOAD = (
    "cannot load {name} into a streamed layer whose base weights are stored quantized in host memory. Call "
    "hf_offload.disable_layer_streaming(model), load the weights, then enable streaming again."
)
_SHARED_LOAD = (
    "load_state_dict would write {name} into the node's shared host store, which every data-parallel rank of this "
    "node reads (it is mapped read-only). Load frozen weights before streaming (from_pretrained), or load adapters "
    "only (peft's set_peft_model_state_dict, strict=False without the base weights)."
)


def _refuse_cast(module: nn.Module, kinds: set[tuple[torch.dtype, torch.device]]):
    """An instance `_apply` (what .half(), .float(), .to(), .cuda() call) that refuses to change streamed weights.

    The conversion is tried on an empty tensor of each (dtype, device) the streamed weights have; one that would
    change either is refused before any tensor is touched. Conversions that change nothing (.to of the same dtype
    and device, share_memory) go through.
    """
    original = type(module)._apply.__get__(module)

    def _apply(fn, recurse=True):
        for dtype, device in kinds:
            probe = fn(torch.empty(0, dtype=dtype, device=device))
            if probe.dtype != dtype or probe.device != device:
                raise RuntimeError(
                    f"hf_offload: this would convert the streamed decoder-layer weights from {dtype} on {device} to "
                    f"{probe.dtype} on {probe.device} (model.half(), .to(dtype), .to(device) or .cuda() after "
                    "enable_layer_streaming), behind the host store's back. Load or cast the model in the dtype you "
                    "want before enable_layer_streaming (the resident parts move to the compute device by "
                    "themselves), or call hf_offload.disable_layer_streaming(model) first."
                )
        return original(fn, recurse)

    return _apply


def _refuse_assigning_to(streamed: list[tuple[str, nn.Parameter]]):
    """load_state_dict(..., assign=True) would put new Parameter objects in the layer, which the store does not
    know: it would keep streaming the old weights into the old objects."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if not local_metadata.get("assign_to_params_buffers"):
            return
        assigned = [prefix + name for name, _ in streamed if prefix + name in state_dict]
        if assigned:
            raise RuntimeError(
                f"hf_offload: load_state_dict(..., assign=True) would replace {assigned[0]}"
                f"{f' (and {len(assigned) - 1} more)' if len(assigned) > 1 else ''}, a weight of a streamed layer "
                "that lives in the host store, and the store would keep streaming the old one. Load without "
                "assign=True (the values are copied into the store), or call "
                "hf_offload.disable_layer_streaming(model), load with assign=True, then enable streaming again."
            )

    return hook


def _refuse_full_save(*args, **kwargs):
    raise RuntimeError(
        "hf_offload: save_pretrained of the whole model would write the base weights, which are stored quantized in "
        "host memory (base_weight_dtype='nf4'/'int8') and have no dense copy to write; nothing was written. Save the "
        "adapter with the peft model's save_pretrained, or call hf_offload.disable_layer_streaming(model) first, "
        "which gives the weights back dequantized, then save."
    )


def _refuse_merge(*args, **kwargs):
    raise RuntimeError(
        "hf_offload: cannot merge adapters into base weights that are stored quantized in host memory "
        "(base_weight_dtype='nf4'/'int8', or a model loaded in 4/8 bits) while layers stream. Call "
        "hf_offload.disable_layer_streaming(model) first, then merge_adapter() / merge_and_unload()."
    )


def _wants_shared_store(config: OffloadConfig, ranks) -> bool:
    if config.full_finetune and config.shared_host_store is None:
        return False  # full fine-tuning writes its store: not shared by default (OffloadConfig refuses it outright)
    return shared_store.wanted(config.shared_host_store, ranks)


@dataclass
class _Sharing:
    """How this rank takes part in its node's shared store while the store is built (see `_begin_sharing`)."""

    wanted: bool
    key: str = ""
    building: shared_store.Building | None = None  # local rank 0: the segment it fills once the store is packed
    attached: shared_store.SharedStore | None = None  # another local rank: local rank 0's segment, mapped
    mapped: list | None = None  # ... and its layer buffers, which packing binds as they are
    loaded: shared_store.SharedStore | None = None  # the checkpoint load shared the store already

    def abandon(self) -> None:
        if self.building is not None:
            self.building.abandon()


def _layouts(anatomy, codec, expert_groups: list) -> list:
    """Every layer's layout as it will be packed (nothing packed yet)."""
    return [
        layout_layer(layer, codec, keep_resident=anatomy.shared_outside, expert_groups=groups)
        for layer, groups in zip(anatomy.layers, expert_groups)
    ]


def _weights_key(layers: nn.ModuleList, layouts: list, codec) -> str:
    """What a rank would pack: the codec, every layer's layout and a sample of the raw weights it holds (the same
    on every rank that loaded the same model). Local rank 0 writes it in the shared store; the others compare."""
    digests = [store_cache.layout_digest(layer, layout) for layer, layout in zip(layers, layouts)]
    values = [shared_store.values_fingerprint(layout_tensors(layout)) for layout in layouts]
    return "weights " + store_cache.key_of(
        {"codec": codec.name if codec else None, "layout": digests, "values": values}
    )


def _refuse_merge_shared(*args, **kwargs):
    raise RuntimeError(
        "hf_offload: cannot merge adapters into base weights kept in the node's shared host store: every "
        "data-parallel rank of this node reads them (they are mapped read-only). Save the adapter and merge it "
        "after training (hf_offload's save_merged writes a merged copy without changing the store), or turn "
        "sharing off (shared_host_store=False)."
    )


def _parent_module(model: nn.Module, path: str) -> nn.Module:
    parent_path = path.rpartition(".")[0]
    return model.get_submodule(parent_path) if parent_path else model


def _store_cache(model: nn.Module, directory: str | None) -> StoreCache | None:
    if directory is None:
        return None
    return StoreCache(directory, store_cache.model_identity(compat.peft_base_model(model)))
