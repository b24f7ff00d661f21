"""Loading a Hub checkpoint straight into the host store: `from_pretrained(..., quantization_config=HostStoreConfig())`.

The decoder layers' weights go from the checkpoint's memory-mapped shards into their places in the host store, one
tensor at a time, in the store's dtype (nf4/int8 encoded right away); the rest of the model (embeddings, head, final
norm) loads as usual. Host memory while loading stays near the store's size, so a checkpoint bigger than host memory
loads when its store fits. See Note: [Loading into the store] in engine/prebuilt.py for the store side.

Note: [Why a transformers quantizer]
transformers applies every checkpoint conversion (key renames, per-expert tensors fused into [num_experts, ...]
tensors, dtype casts) in one loading loop, and gives quantizers a per-tensor hook into it: a registered quantization
method is asked which parameters it takes (`param_needs_quantization`), and its operation (`get_quantize_ops`) gets
each such tensor after conversion and returns what to install. That is exactly the seam needed: the conversions stay
transformers' own for every family, the tensors arrive one by one (transformers loads synchronously for on-the-fly
quantization, so it never reads ahead of us), and `from_pretrained(..., quantization_config=...)` is the spelling
users know from bitsandbytes. The other design, building the model on the meta device and running a loading loop
of our own, would have to re-implement the renames and fusions per family. The quantizer is ours only while loading:
afterwards the model no longer says it is quantized (it is an ordinary model whose decoder weights live in the store),
so the Trainer, peft and saving treat it as they treat any model.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import weakref

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..engine import compat, hostmem, nf4_encode, shared_store, store_cache
from ..engine.anatomy import check_streamable
from ..engine.distributed import current_ranks
from ..engine.errors import UnsupportedModelError
from ..engine.prebuilt import PREBUILT_ATTRIBUTE, PrebuiltStore, plan_prebuilt_store
from ..engine.quant import make_codec

logger = logging.getLogger(__name__)

METHOD = "hf_offload"
_SYNC_LOADING = "HF_DEACTIVATE_ASYNC_LOAD"  # transformers' switch for loading tensors one at a time


@register_quantization_config(METHOD)
class HostStoreConfig(QuantizationConfigMixin):
    """Pass as `from_pretrained(..., quantization_config=HostStoreConfig(...))` to load the decoder layers' weights
    straight into hf_offload's host store.

    Args:
        base_weight_dtype: how the store keeps frozen linear and expert weights: None (as loaded), "nf4" or "int8".
            `enable_layer_streaming` must then be given the same `base_weight_dtype` (the Trainer flag and the
            launcher pass one value to both).
        check_host_memory: before any weight is read, stop with a clear error when the store and the rest of the
            model would not fit in available host memory.
        required: False when the launcher adds this config on its own: a model hf_offload cannot stream then loads
            the ordinary way instead of failing (it is not the one being trained, or the Trainer will say why).
        store_cache: a directory. The store built from the checkpoint is written there once, and a later load of
            the same checkpoint files (names, sizes, modification times), config, dtype and layout maps it instead of
            reading a single decoder-layer weight from the checkpoint (see Note: [Loading from a store cache]).
        shared_host_store: data parallel (torchrun, accelerate launch): local rank 0 of each node loads the store
            into the node's shared store, and the node's other ranks map it without reading a decoder-layer weight
            (see Note: [Loading into the node's shared store]). None (the default): when several ranks of a job run
            on one node, as `OffloadConfig(shared_host_store=...)` decides.
    """

    def __init__(
        self,
        base_weight_dtype: str | None = None,
        check_host_memory: bool = True,
        required: bool = True,
        store_cache: str | None = None,
        shared_host_store: bool | None = None,
    ):
        make_codec(base_weight_dtype)  # refuses an unknown dtype, naming the choices
        if shared_host_store is not None and not isinstance(shared_host_store, bool):
            raise ValueError(
                "`shared_host_store` should be True, False or None (on with several ranks per node), but the value "
                f"passed is {shared_host_store!r}."
            )
        self.quant_method = METHOD
        self.base_weight_dtype = base_weight_dtype
        self.check_host_memory = bool(check_host_memory)
        self.required = bool(required)
        self.store_cache = None if store_cache is None else str(store_cache)
        self.shared_host_store = shared_host_store

    def __repr__(self) -> str:
        return f"HostStoreConfig(base_weight_dtype={self.base_weight_dtype!r})"


@register_quantizer(METHOD)
class HostStoreQuantizer(HfQuantizer):
    """transformers' side of `HostStoreConfig`: plans the store on the model skeleton, fills it while loading."""

    requires_calibration = False

    def __init__(self, quantization_config: HostStoreConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._restore_async: str | None = None

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            raise ValueError(
                "This checkpoint's config.json names hf_offload's HostStoreConfig as its quantization_config; "
                "hf_offload never saves one. Remove `quantization_config` from config.json."
            )
        # Older transformers read every tensor ahead on a thread pool; one at a time keeps memory at one tensor.
        self._restore_async = os.environ.get(_SYNC_LOADING, "")
        os.environ[_SYNC_LOADING] = "1"

    def _process_model_before_weight_loading(self, model, **kwargs):
        config: HostStoreConfig = self.quantization_config
        try:
            anatomy = check_streamable(model, skeleton=True)
        except UnsupportedModelError:
            if config.required:
                self._restore_loading()
                raise
            logger.info("hf_offload: %s loads the ordinary way (it cannot stream)", type(model).__name__)
            return model
        store = plan_prebuilt_store(
            anatomy.layers, anatomy.path, make_codec(config.base_weight_dtype), anatomy.shared_outside
        )
        ranks = current_ranks()
        if _shares_while_loading(config, ranks, anatomy):
            key = _loading_key(model, store, kwargs.get("checkpoint_files"))
            if ranks.local_rank != 0:
                attached = shared_store.attach(key, ranks)  # local rank 0 loads; this rank reads no layer weight
                if attached is not None:
                    store.shared = attached[0]
                    _take_cached_store(model, anatomy, store, attached[1])
                    setattr(model, PREBUILT_ATTRIBUTE, store)
                    return model
            else:
                try:
                    store.building = shared_store.Building.begin(shared_store.required_bytes(store.layers))
                except shared_store.SharedStoreError:
                    self._restore_loading()
                    raise
                store.shared_key = key
                weakref.finalize(store, _give_up_building, store.building)  # a failed load lets the waiters go
                nf4_encode.building_for_node(True)  # the waiting ranks' cores are idle: encode on them too
        cached = None
        if config.store_cache is not None:
            store.cache_fields = _cache_fields(model, store, kwargs.get("checkpoint_files"))
            if store.cache_fields is not None:
                cached = store_cache.open_cached(config.store_cache, store.cache_fields)
        if config.check_host_memory and cached is None:
            try:
                check_loading_fits(model, anatomy, config.base_weight_dtype, store)
            except hostmem.HostMemoryError:
                self._restore_loading()
                if store.building is not None:
                    _give_up_building(store.building)
                raise
        if cached is not None:
            _take_cached_store(model, anatomy, store, cached)
        setattr(model, PREBUILT_ATTRIBUTE, store)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        store = getattr(model, PREBUILT_ATTRIBUTE, None)
        return store is not None and store.layer_of(param_name) is not None

    def get_quantize_ops(self):
        return _write_into_store_op_class()()

    def postprocess_model(self, model, **kwargs):
        """After loading: the model is an ordinary one again, whose decoder weights live in the store."""
        self._restore_loading()
        for attribute in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attribute):
                delattr(model, attribute)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        store: PrebuiltStore | None = getattr(model, PREBUILT_ATTRIBUTE, None)
        if store is None:
            return model
        from_cache = store.detached is not None
        if from_cache:  # loaded from a store cache or the node's shared store: the layers come back, filled
            _reattach_layers(model, store)
        if store.building is not None:
            nf4_encode.building_for_node(False)
            _publish_shared(store)
        if not from_cache and store.cache_fields is not None and all(layer.complete for layer in store.layers):
            entries = [layer.cache_entry() for layer in store.layers]
            store_cache.write_cache(self.quantization_config.store_cache, store.cache_fields, entries)
        incomplete = [layer.index for layer in store.layers if not layer.complete]
        if incomplete:
            logger.info(
                "hf_offload: the checkpoint did not fill layers %s of the host store completely; they are packed "
                "the ordinary way when streaming starts.",
                ", ".join(map(str, incomplete[:8])) + (", ..." if len(incomplete) > 8 else ""),
            )
        if store.base_weight_dtype is not None:
            store.guard = model.register_forward_pre_hook(_refuse_forward_before_streaming)
        return model

    def _restore_loading(self) -> None:
        if self._restore_async is not None:
            if self._restore_async:
                os.environ[_SYNC_LOADING] = self._restore_async
            else:
                os.environ.pop(_SYNC_LOADING, None)
            self._restore_async = None

    def is_serializable(self, safe_serialization=None):
        return False  # never reached: postprocess_model detaches the quantizer from the model

    @property
    def is_trainable(self) -> bool:
        return True


@functools.cache
def _write_into_store_op_class() -> type:
    class WriteIntoStore(compat.weight_conversion_op_base()):
        """transformers' per-tensor operation: each decoder-layer tensor goes into its place in the store."""

        def convert(self, input_dict, model=None, **kwargs):
            store: PrebuiltStore = getattr(model, PREBUILT_ATTRIBUTE)
            installed = {}
            for name, value in input_dict.items():
                value = value[0] if isinstance(value, list) else value
                layer = store.layer_of(name)
                installed[name] = layer.write(name, value) if layer is not None else value
            return installed

    return WriteIntoStore


def _refuse_forward_before_streaming(module, args):
    raise RuntimeError(
        f"hf_offload: the decoder weights of this {type(module).__name__} were loaded into hf_offload's host store "
        "in encoded form (HostStoreConfig(base_weight_dtype=...)) and compute only while streaming. Call "
        "hf_offload.enable_layer_streaming(model, OffloadConfig(base_weight_dtype=...)) with the same dtype (the "
        "Trainer flag and `hf-offload launch` do it) before running the model."
    )


# Note: [Loading from a store cache]
# A store cache written by an earlier load of the same checkpoint holds every decoder layer's buffer exactly as this
# load would fill it, so reading the checkpoint's layer tensors would only be thrown away. transformers reads every
# checkpoint tensor the model has a parameter for; so while it loads, the decoder layer list is taken out of the
# model (its parameters already bound to the mapped cache), the checkpoint's layer tensors are unexpected keys that it
# skips unread (their warning silenced by a pattern), and the list goes back in once loading is over. Layers that
# hold buffers of their own (which transformers would have to materialise) load the ordinary way instead.


# Note: [Loading into the node's shared store]
# Under data parallel, every rank of a node would load the same checkpoint into a store of its own, then share one
# (engine/shared_store.py): N stores at once while loading, and N times the reading and encoding. Instead local rank
# 0 locks the node's segment before loading (`shared_store.Building`), loads as usual, and once loading is over
# writes the finished store into it layer by layer, moving its own layers onto the files as it goes. Every other
# local rank waits for the segment before loading, then takes it as a store cache hit (Note: [Loading from a store
# cache]): layers bound to the read-only mapping, detached while transformers loads the rest, so no decoder-layer
# tensor of the checkpoint is read. The segment is keyed by the checkpoint (files, config, dtype, layouts), which
# every rank knows without reading a weight: a rank loading another one stops with a clear error. Waiting is on
# files, never a torch.distributed collective (the process group may not exist yet); local rank 0 failing lets go
# of its lock and the waiters stop with an error. A load that does not fill every layer (the checkpoint lacks some
# tensors) is declined in the segment and each rank loads its own; so do layers holding buffers of their own (as
# for a store cache). The runtime later adopts the shared layers and keeps the segment's lock.


def _shares_while_loading(config: HostStoreConfig, ranks, anatomy) -> bool:
    wanted = shared_store.wanted(config.shared_host_store, ranks)
    if wanted and any(True for _ in anatomy.layers.buffers()):
        logger.info("hf_offload: the decoder layers hold buffers; each rank loads its own store, shared afterwards")
        return False
    return wanted


def _loading_key(model, store: PrebuiltStore, checkpoint_files) -> str:
    """What the node's shared store is loaded from (`_checkpoint_key_fields`); every rank computes it without reading
    a weight."""
    return "checkpoint " + store_cache.key_of(_checkpoint_key_fields(model, store, checkpoint_files))


def _give_up_building(building: shared_store.Building) -> None:
    if building.in_progress:  # not published, declined or abandoned yet: the load failed
        nf4_encode.building_for_node(False)
        building.abandon()


def _publish_shared(store: PrebuiltStore) -> None:
    """Local rank 0, loading over: the finished store goes into the node's segment (or the segment is declined)."""
    building, store.building = store.building, None
    ranks = current_ranks()
    incomplete = [layer.index for layer in store.layers if not layer.complete]
    if incomplete:
        building.decline(f"the checkpoint did not fill layer {incomplete[0]} of the store", ranks)
        return
    entries = [layer.cache_entry() for layer in store.layers]

    def swap(position: int, mapped) -> None:
        entries[position].host = mapped
        store.layers[position].move_to(mapped)

    store.shared = building.publish(entries, store.shared_key, swap, ranks)


def _cache_fields(model, store: PrebuiltStore, checkpoint_files) -> dict | None:
    """The store cache key of a load straight from `checkpoint_files`, or None (logged) when there are none."""
    if not checkpoint_files:
        logger.info("hf_offload: store_cache is not used: transformers named no checkpoint files for this load")
        return None
    return _checkpoint_key_fields(model, store, checkpoint_files)


def _checkpoint_key_fields(model, store: PrebuiltStore, checkpoint_files) -> dict:
    """The key fields of a store loaded from `checkpoint_files`: their names, sizes and modification times, the
    config, the dtype and the layouts."""
    files = "checkpoint " + store_cache.checkpoint_fingerprint(list(checkpoint_files)) if checkpoint_files else None
    layouts = [layer.layout_digest for layer in store.layers]
    return store_cache.make_key_fields(store.base_weight_dtype, layouts, store_cache.model_identity(model), files)


def _take_cached_store(model: nn.Module, anatomy, store: PrebuiltStore, cached: list) -> None:
    """Bind every decoder-layer parameter to the mapped cache and hide the layers from transformers' loading loop.
    See Note: [Loading from a store cache]."""
    if any(True for _ in anatomy.layers.buffers()):
        logger.info("hf_offload: the decoder layers hold buffers; the store cache is not used for this load")
        return
    for layer, entry in zip(store.layers, cached):
        for name, param in layer.fill_from_cache(entry).items():
            module_path, _, attribute = name.rpartition(".")
            param._is_hf_initialized = True
            setattr(model.get_submodule(module_path), attribute, param)
    parent_path, _, attribute = anatomy.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    store.detached = (parent, attribute, parent._modules[attribute], ignored)
    parent._modules[attribute] = nn.ModuleList()
    pattern = rf"^{re.escape(anatomy.path)}\.\d+\."
    patterns = {*(ignored or ()), pattern}
    model._keys_to_ignore_on_load_unexpected = patterns if isinstance(ignored, set) else sorted(patterns)


def _reattach_layers(model: nn.Module, store: PrebuiltStore) -> None:
    parent, attribute, layers, ignored = store.detached
    parent._modules[attribute] = layers
    model._keys_to_ignore_on_load_unexpected = ignored
    store.detached = None


def check_loading_fits(model: nn.Module, anatomy, chosen: str | None, store: PrebuiltStore) -> None:
    """Stop before any weight is read when the store plus the rest of the model would not fit in host memory.

    Counted from the skeleton alone: the store's bytes, the modules outside the layers as loaded, and while a layer
    loads, its largest tensor twice in the checkpoint's dtype (transformers materialises per-expert tensors, then
    their fused stack) plus an fp32 copy of it for encoding.
    """
    in_layers = {id(p) for p in anatomy.layers.parameters()}
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_layers)
    largest = max((p.numel() for p in anatomy.layers.parameters()), default=0)
    itemsize = max((p.element_size() for p in anatomy.layers.parameters()), default=0)
    transient = largest * (2 * itemsize + 4)

    def needs_of(dtype: str | None) -> list[hostmem.LayerNeed]:
        planned = (
            store
            if dtype == chosen
            else plan_prebuilt_store(anatomy.layers, anatomy.path, make_codec(dtype), anatomy.shared_outside)
        )
        rest = hostmem.LayerNeed(store_bytes=outside, freed_bytes=0, transient_bytes=0)
        return [rest] + [hostmem.LayerNeed(layer.nbytes, 0, transient) for layer in planned.layers]

    hostmem.check_fits(needs_of, chosen, hostmem.available_bytes(), settings="HostStoreConfig")


# --- the launcher: every causal LM the launched script loads goes into the store ---------------------------------


def load_into_store_for_launch(original, cls, args: tuple, kwargs: dict, settings: dict):
    """`hf-offload launch`'s `from_pretrained` (installed by its start-up hook): `original` (transformers' own),
    loading into the host store as the launcher's `settings` say, unless the caller chose a quantization_config, the
    class is not a language model, or the checkpoint is already quantized."""
    if kwargs.get("quantization_config") is not None or not _is_language_model(cls):
        return original(cls, *args, **kwargs)
    ours = HostStoreConfig(
        settings.get("base_weight_dtype"),
        check_host_memory=settings.get("check_host_memory", True),
        required=False,
        store_cache=settings.get("store_cache"),
        shared_host_store=settings.get("shared_host_store"),
    )
    try:
        return original(cls, *args, **{**kwargs, "quantization_config": ours})
    except ValueError as err:
        if "HostStoreConfig" not in str(err):
            raise
        # a pre-quantized checkpoint (fp8, bitsandbytes, ...): transformers refuses a second quantization config
        logger.info("hf_offload: this checkpoint is already quantized; it loads the ordinary way")
        return original(cls, *args, **kwargs)


def _is_language_model(cls: type) -> bool:
    return cls.__name__.endswith(("ForCausalLM", "ForConditionalGeneration"))
