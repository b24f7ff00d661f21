"""The host store built while a checkpoint loads: each decoder layer's buffer filled tensor by tensor, straight from
the checkpoint, in the store's layout and dtype, before the model exists in memory any other way.

Note: [Loading into the store]
Packing a loaded model (store.py) needs the whole model in host memory first, then a second copy per layer while
it packs: fine when the checkpoint's pages stay memory-mapped, not when loading converts them (a dtype change,
fused Mixture-of-Experts experts, which transformers stacks in anonymous memory), and never for a checkpoint bigger
than host memory. So a loader can plan the store from the model's skeleton (meta tensors: shapes and dtypes only)
with the very function packing uses (`store.layout_layer`), then write each tensor into its place as the checkpoint
yields it: dense tensors copied, linear weights encoded (nf4/int8) right away, nothing else kept. A parameter then
holds a view of its place in the layer buffer (dense) or the hollow placeholder (encoded).

When streaming is enabled, packing lays each layer out again from its real parameters (by then peft may have wrapped
them); where every parameter already sits at the place that layout gives it, the prebuilt buffer is adopted as the
layer's pack, with no copy (`PrebuiltLayer.matches`). Anything else (a weight left trainable, a tensor the
checkpoint lacked and transformers initialised elsewhere, another base_weight_dtype) falls back to ordinary packing
from the prebuilt values, layer by layer, so the result is the same either way; only memory and time differ.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from .hostmem import release_free_heap
from .moe import find_expert_groups
from .quant import Codec
from .store import (
    EncodedExperts,
    EncodedTensor,
    LayerLayout,
    Region,
    bind_encoded,
    encode_stacked_experts,
    encode_weight,
    hollow,
    layout_layer,
    page_aligned_empty,
    write_dense,
)
from .store_cache import layout_digest

PREBUILT_ATTRIBUTE = "_hf_offload_prebuilt_store"


@dataclass(frozen=True)
class Place:
    """Where one parameter of a layer goes: its dtype and shape, and its region (dense) or its encoded parts."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str  # "dense", "encoded" (a linear weight) or "experts" (a stacked expert tensor, encoded per expert)
    region: Region | None = None
    parts: tuple = ()
    scratch: Region | None = None


@dataclass
class PrebuiltLayer:
    """One decoder layer's buffer as the loader fills it, and where each of its tensors went."""

    index: int
    codec: Codec | None
    nbytes: int
    places: dict[str, Place]  # by the parameter's name in the model it was planned on
    layout_digest: str = ""  # where every tensor goes (a store cache's key, see store_cache.py)
    host: torch.Tensor | None = None  # allocated when the first tensor arrives
    dense: dict[int, Region] = field(default_factory=dict)  # id(parameter) -> its region
    encoded: dict[int, EncodedTensor | EncodedExperts] = field(default_factory=dict)  # id(parameter) -> its record
    names: dict[int, str] = field(default_factory=dict)  # id(parameter) -> its name, for the records' order
    dense_params: dict[str, nn.Parameter] = field(default_factory=dict)  # by name: what `move_to` rebinds

    @property
    def complete(self) -> bool:
        return len(self.dense) + len(self.encoded) == len(self.places)

    def write(self, name: str, value: torch.Tensor) -> nn.Parameter:
        """Put the checkpoint's `value` for parameter `name` into its place; returns the parameter to install."""
        place = self.places[name]
        if tuple(value.shape) != place.shape:
            raise ValueError(
                f"hf_offload: the checkpoint's `{name}` has shape {tuple(value.shape)}, but the model built from its "
                f"config expects {place.shape}. The checkpoint and its config.json disagree; check the checkpoint."
            )
        if self.host is None:
            self.host = page_aligned_empty(self.nbytes)
        value = value.to(place.dtype)
        param = _unbound_parameter(place.dtype)
        if place.kind == "dense":
            param.data = write_dense(place.region, value, self.host)
            self.dense[id(param)] = place.region
            self.dense_params[name] = param
        else:
            encode = encode_weight if place.kind == "encoded" else encode_stacked_experts
            self.encoded[id(param)] = encode(self.host, param, value, self.codec, list(place.parts), place.scratch)
            self.names[id(param)] = name
        if self.complete:
            release_free_heap()  # the layer's loading temporaries, freed, must not stay in the process
        return param

    def matches(self, layout: LayerLayout) -> bool:
        """Whether `layout` (planned from the real parameters) puts every tensor where it already is."""
        if self.host is None or not self.complete or layout.nbytes != self.nbytes or layout.attributes:
            return False
        encoded = [*layout.encoded, *layout.encoded_experts]
        if len(layout.dense) != len(self.dense) or len(encoded) != len(self.encoded):
            return False
        base = self.host.data_ptr()
        for param, region in layout.dense:
            if self.dense.get(id(param)) != region or param.data.data_ptr() != base + region.offset:
                return False
        for param, parts, scratch in encoded:
            record = self.encoded.get(id(param))
            if record is None or list(record.parts) != list(parts) or record.scratch != scratch:
                return False
        return True

    def record(self, param: nn.Parameter) -> EncodedTensor | EncodedExperts:
        return self.encoded[id(param)]

    def fill_from_cache(self, cached) -> dict[str, nn.Parameter]:
        """Take a store cache's buffer of this layer (`store_cache.CachedLayer`, the same layout) as the filled
        buffer; returns every parameter by name, bound as `write` would have bound it."""
        self.host = cached.host
        params, metas = {}, iter(cached.encoded_meta)
        for name, place in self.places.items():
            param = _unbound_parameter(place.dtype)
            if place.kind == "dense":
                param.data = place.region.view_in(self.host)
                self.dense[id(param)] = place.region
                self.dense_params[name] = param
            else:
                param.data = hollow(place.shape, place.dtype)
                stacked = place.kind == "experts"
                record = bind_encoded(param, self.codec, list(place.parts), place.scratch, next(metas), stacked)
                self.encoded[id(param)] = record
                self.names[id(param)] = name
            params[name] = param
        return params

    def cache_entry(self) -> SimpleNamespace:
        """This layer as `store_cache.write_cache` takes a pack: its buffer and its encoded records in place order."""
        by_name = {self.names[id(record.param)]: record for record in self.encoded.values()}
        encoded = [by_name[name] for name, place in self.places.items() if place.kind != "dense"]
        return SimpleNamespace(index=self.index, host=self.host, nbytes=self.nbytes, encoded=encoded)

    def move_to(self, host: torch.Tensor) -> None:
        """Rebind this complete layer to `host`, a buffer holding the same bytes (the node's shared store); the
        old buffer is freed once nothing else holds it."""
        for name, param in self.dense_params.items():
            param.data = self.places[name].region.view_in(host)
        self.host = host

    def give_back_dense(self) -> None:
        """Decode every encoded tensor into a dense tensor of its own, for ordinary packing (the fallback)."""
        for record in self.encoded.values():
            record.param.data = record.dense_copy(self.host)
        self.encoded.clear()
        self.host = None  # dense parameters keep their views (and so the buffer) until they are packed


def _unbound_parameter(dtype: torch.dtype) -> nn.Parameter:
    """A parameter of its own, to be bound through `.data` as packing binds them: a Parameter made from a view would
    share the buffer's version counter with every other tensor of the layer, and autograd would take a write to one
    weight for a write to all. On the CPU, whatever device the caller's context defaults to (loading runs under
    transformers' meta-device context)."""
    return nn.Parameter(torch.empty(0, dtype=dtype, device="cpu"), requires_grad=dtype.is_floating_point)


@dataclass
class PrebuiltStore:
    """Every decoder layer's prebuilt buffer, kept on the model until streaming adopts it."""

    layer_path: str  # dotted name of the layer list in the model it was planned on
    layer_ids: list[int]  # id() of each layer module, to recognise the stack under peft wrappers
    base_weight_dtype: str | None
    layers: list[PrebuiltLayer]
    guard: object = None  # the forward pre-hook refusing to run hollow weights before streaming, if any
    cache_fields: dict | None = None  # the store cache key of this load (store_loading.py), if it uses one
    detached: tuple | None = None  # the layer list while transformers loads the rest (a store cache hit)
    shared: object = None  # `shared_store.SharedStore`: the layers live in the node's shared store (data parallel)
    building: object = None  # `shared_store.Building`: local rank 0's segment until loading is over
    shared_key: str = ""  # what the segment is loaded from (store_loading.py)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def layer_of(self, name: str) -> PrebuiltLayer | None:
        """The layer whose parameter `name` (a name in the model it was planned on) is, if any."""
        prefix = self.layer_path + "."
        if not name.startswith(prefix):
            return None
        index = name[len(prefix) :].partition(".")[0]
        if not index.isdigit() or int(index) >= len(self.layers):
            return None
        layer = self.layers[int(index)]
        return layer if name in layer.places else None

    def release(self) -> None:
        if self.guard is not None:
            self.guard.remove()
            self.guard = None


def plan_prebuilt_store(
    layers: nn.ModuleList, layer_path: str, codec: Codec | None, keep_resident: frozenset[int]
) -> PrebuiltStore:
    """Lay out every layer of a model skeleton (meta tensors) exactly as packing will, by parameter name."""
    planned = []
    for index, layer in enumerate(layers):
        names = {id(p): f"{layer_path}.{index}.{n}" for n, p in layer.named_parameters()}
        params = [p for p in layer.parameters() if id(p) not in keep_resident]
        with _frozen(params):  # every weight streams as a frozen one; routed expert groups are found among frozen
            groups, _ = find_expert_groups(nn.ModuleList([layer]))
            layout = layout_layer(layer, codec, params=params, expert_groups=[g.params for g in groups[0]])
        places: dict[str, Place] = {}
        for param, region in layout.dense:
            places[names[id(param)]] = Place(param.dtype, tuple(param.shape), "dense", region=region)
        for kind, entries in (("encoded", layout.encoded), ("experts", layout.encoded_experts)):
            for param, parts, scratch in entries:
                places[names[id(param)]] = Place(param.dtype, tuple(param.shape), kind, None, tuple(parts), scratch)
        digest = layout_digest(layer, layout)
        planned.append(PrebuiltLayer(index, codec, layout.nbytes, places, digest))
    base_weight_dtype = codec.name if codec is not None else None
    return PrebuiltStore(layer_path, [id(layer) for layer in layers], base_weight_dtype, planned)


@contextlib.contextmanager
def _frozen(params: list[nn.Parameter]):
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)


def take_prebuilt_store(model: nn.Module, layers: nn.ModuleList, base_weight_dtype: str | None) -> PrebuiltStore | None:
    """The prebuilt store a checkpoint load left on `model` for this layer stack, handed over once (or None).

    Raises:
        ValueError: the store was loaded with another base_weight_dtype than streaming asks for.
    """
    from .compat import peft_base_model

    base = peft_base_model(model)
    store: PrebuiltStore | None = getattr(base, PREBUILT_ATTRIBUTE, None)
    if store is None or store.layer_ids != [id(layer) for layer in layers]:
        return None
    if store.base_weight_dtype != base_weight_dtype:
        raise ValueError(
            f"The decoder weights of this model were loaded into the host store with base_weight_dtype="
            f"{store.base_weight_dtype!r} (HostStoreConfig), but streaming was asked for base_weight_dtype="
            f"{base_weight_dtype!r}. Pass OffloadConfig(base_weight_dtype={store.base_weight_dtype!r}), or load "
            f"with HostStoreConfig(base_weight_dtype={base_weight_dtype!r})."
        )
    store.release()
    delattr(base, PREBUILT_ATTRIBUTE)
    return store
