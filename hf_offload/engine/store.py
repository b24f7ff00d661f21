"""The host store: each decoder layer's frozen tensors packed into one contiguous byte buffer in host memory.

One buffer per layer means one host-to-device copy per layer, whatever mix of dtypes the layer holds. The store
is built layer by layer, and each parameter's old storage is released as soon as it is packed, so host memory
never holds two copies of the model.

What a buffer holds, per frozen tensor:
- dense tensors (the default; norms and biases always): the tensor's bytes. Between uses the parameter's `.data`
  is a view into the host buffer, so `state_dict()` and `save_pretrained()` see the real weights.
- encoded linear weights (`base_weight_dtype="nf4"` / `"int8"`, see `quant.py`): the codec's parts. Inside the
  layer window the streamer decodes them into a dense scratch buffer on the device and binds `.data` there.
  Between uses `.data` is a "hollow" placeholder of the right shape and dtype that costs one element and reads
  as NaN (see Note: [Hollow weights]).
- encoded expert tensors (the same option, stacked [num_experts, out, in] tensors of an experts module): each
  expert encoded alone, part p of all experts one [num_experts, ...] array (`StackedRegion`, Note: [Experts
  encoded one by one] in quant.py); hollow between uses like an encoded linear weight.
- bitsandbytes-quantized weights of a model loaded in 4/8 bits (QLoRA): the weight's bytes as they are, plus the
  tensors of its quantization state (`PackedAttribute`), which are bound wherever the weight is bound.

Note: [Hollow weights]
A dense copy of an encoded weight exists only in the device scratch, inside its layer's window. Keeping one on the
host would undo the saving (nf4 host bytes are a quarter of bf16), and a parameter cannot point at the meta device
(torch refuses to change a parameter's tensor type through `.data`). So between uses the parameter holds a NaN
scalar expanded to its shape: no memory, loud if used, and in-place writes into it raise. The runtime shows these
weights as meta-device placeholders in `state_dict()` (adapter checkpoints are unaffected), refuses to load into
them and refuses to merge adapters into them; `disable_layer_streaming` gives every weight back dequantized.

Expert regions: a Mixture-of-Experts layer's stacked expert tensors (shape [num_experts, ...]) are packed after
everything else, each still one contiguous tensor, so expert e of a tensor is the byte range
`offset + e * slice_nbytes` and can be copied alone, and everything but the experts (attention, router, shared
experts, norms, quantization states) is the prefix `[0, base_nbytes)` of the buffer: one copy. The layout is the
same whether or not experts are fetched by routing; only the streamer decides what to copy. An encoded expert
tensor keeps this property part by part: expert e of part p is `part.offset + e * part.stride`, so the encoded
bytes of one expert are a few fixed ranges, copied alone and decoded alone. Its dense form lives in the scratch
buffer as [num_experts, out, in]; a routed load decodes its k experts into the first k positions there.

Layout note: a later shared store (one host copy for several ranks, or memory-mapped checkpoint files) only has to
provide the same `LayerPack.host` byte buffers; nothing else depends on where those bytes live.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from . import compat, store_cache
from .errors import UnsupportedModelError
from .quant import Codec, encode_experts, linear_weights
from .store_cache import CachedLayer

ALIGNMENT = 64  # bytes; every tensor starts on a boundary any dtype view accepts
READ_AHEAD = True  # see Note: [Reading ahead while packing]; off only to measure what it brings


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class Region:
    """A typed tensor at a byte offset of a layer's buffer (or of the device scratch)."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view_in(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


def page_aligned_empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of host memory (uint8) in a storage of its own that starts on a page boundary and spans whole pages.

    Page-locking works on whole pages, and a page can be registered only once: a layer buffer sharing a page
    with another one (small buffers from the heap often do) could not be pinned. And CUDA tells whether a tensor
    is pinned (`is_pinned()`, which decides whether a copy from it can be asynchronous) from its storage's start,
    so the storage must start where the registration starts: the buffer is its own private anonymous mapping
    (under one page of waste), released when the tensor is.
    """
    if nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # no mmap flags (Windows): no page-locking there either
        return torch.empty(nbytes, dtype=torch.uint8)
    page = mmap.PAGESIZE
    mapping = mmap.mmap(-1, -(-nbytes // page) * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # the storage keeps `mapping` alive and spans all of it; the tensor is its first nbytes
    return torch.frombuffer(mapping, dtype=torch.uint8)[:nbytes]


@dataclass(frozen=True)
class StackedRegion:
    """One part of an expert tensor encoded expert by expert: expert e's part (`shape`) at `offset + e * stride`."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]  # one expert's part
    count: int  # experts
    stride: int  # bytes from one expert's part to the next: the part's bytes, aligned

    @property
    def nbytes(self) -> int:
        return self.count * self.stride

    def view_in(self, buffer: torch.Tensor, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Experts `start .. start + count - 1` (default: to the last) of this part in `buffer`, as [count, ...]."""
        count = self.count - start if count is None else count
        first = self.offset + start * self.stride
        rows = buffer[first : first + count * self.stride].view(count, self.stride)
        return rows[:, : math.prod(self.shape) * self.dtype.itemsize].view(self.dtype).view(count, *self.shape)


@dataclass
class PackedTensor:
    """Where one frozen parameter lives inside its layer's buffer."""

    param: nn.Parameter
    region: Region
    original_device: torch.device

    offset = property(lambda self: self.region.offset)
    nbytes = property(lambda self: self.region.nbytes)
    dtype = property(lambda self: self.region.dtype)
    shape = property(lambda self: self.region.shape)

    def view_in(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into `buffer` (a host buffer or a device slot of the same layout)."""
        return self.region.view_in(buffer)


@dataclass
class ExpertRegion:
    """Stacked expert tensors of one experts module, dense (`PackedTensor`) or encoded (`EncodedExperts`): each
    is one or more arrays holding expert e at `offset + e * size` (see `slices`)."""

    num_experts: int
    tensors: list[PackedTensor | EncodedExperts] = field(default_factory=list)

    @staticmethod
    def slices(tensor: PackedTensor | EncodedExperts) -> list[tuple[int, int]]:
        """Per array of `tensor` in the buffer, (offset, bytes per expert): expert e is at offset + e * size."""
        if isinstance(tensor, EncodedExperts):
            return [(part.offset, part.stride) for part in tensor.parts]
        return [(tensor.offset, tensor.nbytes // tensor.shape[0])]

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert in the buffer, over all its tensors (encoded bytes for encoded ones)."""
        return sum(size for tensor in self.tensors for _, size in self.slices(tensor))

    def view_first(
        self, tensor: PackedTensor | EncodedExperts, buffer: torch.Tensor, count: int, scratch: torch.Tensor | None
    ) -> torch.Tensor:
        """The first `count` experts of `tensor` as a dense [count, ...] tensor: in `buffer` (a slot), or for an
        encoded tensor decoded in `scratch`."""
        if isinstance(tensor, EncodedExperts):
            return tensor.scratch.view_in(scratch)[:count]
        start, end = tensor.offset, tensor.offset + count * (tensor.nbytes // tensor.shape[0])
        return buffer[start:end].view(tensor.dtype).view(count, *tensor.shape[1:])


@dataclass
class EncodedTensor:
    """A frozen linear weight kept encoded in its layer's buffer; dense only in the device scratch, in the window."""

    param: nn.Parameter
    codec: Codec
    parts: list[Region]
    meta: dict
    scratch: Region  # its dense form in the scratch buffer
    original_device: torch.device
    hollow: torch.Tensor  # bound between uses; see Note: [Hollow weights]

    @property
    def codec_meta(self) -> dict:
        """What decoding needs besides the parts (kept by a store cache)."""
        return self.meta

    def decode(self, buffer: torch.Tensor, scratch: torch.Tensor) -> None:
        self.codec.decode([part.view_in(buffer) for part in self.parts], self.meta, self.scratch.view_in(scratch))

    def dense_copy(self, buffer: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.scratch.shape, dtype=self.scratch.dtype, device=buffer.device)
        self.codec.decode([part.view_in(buffer) for part in self.parts], self.meta, out)
        return out


@dataclass
class EncodedExperts:
    """A frozen stacked expert tensor kept encoded expert by expert (Note: [Experts encoded one by one], quant.py).

    Its dense form is a [num_experts, out, in] region of the scratch buffer; position i there decodes position i of
    the parts in the slot, whichever expert the slot holds at that position."""

    param: nn.Parameter
    codec: Codec
    parts: list[StackedRegion]
    metas: list[dict]  # per expert id
    scratch: Region  # [num_experts, out, in] in the scratch buffer
    original_device: torch.device
    hollow: torch.Tensor  # bound between uses; see Note: [Hollow weights]

    @property
    def codec_meta(self) -> list[dict]:
        """What decoding needs besides the parts, per expert (kept by a store cache)."""
        return self.metas

    @property
    def num_experts(self) -> int:
        return self.scratch.shape[0]

    def decode_positions(self, buffer: torch.Tensor, scratch: torch.Tensor, experts: Sequence[int], start: int) -> None:
        """Decode positions `start ..` of the parts in `buffer`, which hold `experts` (ids, in that order), into the
        same positions of the scratch region."""
        if not experts:
            return
        parts = [part.view_in(buffer, start, len(experts)) for part in self.parts]
        out = self.scratch.view_in(scratch)[start : start + len(experts)]
        self.codec.decode_experts(parts, [self.metas[e] for e in experts], out)

    def decode(self, buffer: torch.Tensor, scratch: torch.Tensor) -> None:
        """Decode every expert (a whole-layer load, the experts in id order)."""
        self.decode_positions(buffer, scratch, range(self.num_experts), 0)

    def dense_copy(self, buffer: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.scratch.shape, dtype=self.scratch.dtype, device=buffer.device)
        self.codec.decode_experts([part.view_in(buffer) for part in self.parts], self.metas, out)
        return out


def encode_weight(
    host: torch.Tensor, param: nn.Parameter, value: torch.Tensor, codec: Codec, parts: list[Region], scratch: Region
) -> EncodedTensor:
    """Encode `value` (the weight `param` holds) into its `parts` of `host`, and make `param` hollow."""
    meta = write_encoded(codec, parts, value, host)
    encoded = EncodedTensor(param, codec, parts, meta, scratch, param.device, hollow(value.shape, param.dtype))
    param.data = encoded.hollow  # see Note: [Hollow weights]; the dense storage is freed here
    return encoded


def encode_stacked_experts(
    host: torch.Tensor,
    param: nn.Parameter,
    value: torch.Tensor,
    codec: Codec,
    parts: list[StackedRegion],
    scratch: Region,
) -> EncodedExperts:
    """Encode the stacked expert tensor `value` (what `param` holds) expert by expert into its `parts` of `host`,
    and make `param` hollow."""
    metas = encode_experts(codec, value, [part.view_in(host) for part in parts])
    encoded = EncodedExperts(param, codec, parts, metas, scratch, param.device, hollow(value.shape, param.dtype))
    param.data = encoded.hollow  # see Note: [Hollow weights]; the dense storage is freed here
    return encoded


def bind_encoded(
    param: nn.Parameter, codec: Codec, parts: list, scratch: Region, meta, stacked: bool
) -> EncodedTensor | EncodedExperts:
    """The record of a weight whose encoded parts are in place already (a store cache), with the codec's metadata
    (`meta`; per expert for a stacked expert tensor); makes `param` hollow."""
    kind = EncodedExperts if stacked else EncodedTensor
    record = kind(param, codec, parts, meta, scratch, param.device, hollow(param.shape, param.dtype))
    param.data = record.hollow  # see Note: [Hollow weights]
    return record


@dataclass
class PackedAttribute:
    """A non-parameter tensor a layer reads (the quantization state of a bitsandbytes weight), streamed with it."""

    holder: object
    name: str
    region: Region
    original_device: torch.device

    def bind(self, buffer: torch.Tensor) -> None:
        setattr(self.holder, self.name, self.region.view_in(buffer))


@dataclass
class LayerPack:
    """One decoder layer's frozen tensors in one host byte buffer."""

    index: int
    host: torch.Tensor  # uint8, nbytes long
    tensors: list[PackedTensor] = field(default_factory=list)
    pinned: bool = False
    encoded: list[EncodedTensor | EncodedExperts] = field(default_factory=list)
    attributes: list[PackedAttribute] = field(default_factory=list)
    scratch_nbytes: int = 0  # dense bytes of the encoded weights, laid out in the scratch buffer
    quantized_tuners: list[nn.Module] = field(default_factory=list)  # peft layers whose base weight is quantized
    experts: list[ExpertRegion] = field(default_factory=list)  # packed after the rest (see the module docstring)
    base_nbytes: int = 0  # bytes before the first expert region (all of them when there is none)
    adopted: bool = False  # the buffer a checkpoint loader filled, taken as it was (see prebuilt.py)

    @property
    def nbytes(self) -> int:
        return self.host.numel()

    @property
    def expert_tensor_ids(self) -> set[int]:
        return {id(t) for region in self.experts for t in region.tensors}

    def bind(self, buffer: torch.Tensor, views: list[torch.Tensor] | None = None) -> None:
        """Point every packed parameter and attribute at its place in `buffer` (no copies)."""
        views = views if views is not None else [t.view_in(buffer) for t in self.tensors]
        for packed, view in zip(self.tensors, views):
            packed.param.data = view
        for attribute in self.attributes:
            attribute.bind(buffer)

    def materialize(
        self, buffer: torch.Tensor, scratch: torch.Tensor, decode: bool = True, experts: bool = True
    ) -> None:
        """Decode the encoded weights from `buffer` (a device slot) into `scratch` and bind them there.

        `experts=False` (routed fetch): encoded expert tensors stay hollow; the streamer decodes the loaded experts
        (see Note: [Routed expert fetch] in streamer.py)."""
        for encoded in self.encoded:
            if not experts and isinstance(encoded, EncodedExperts):
                continue
            if decode:
                encoded.decode(buffer, scratch)
            encoded.param.data = encoded.scratch.view_in(scratch)

    def bind_host(self) -> None:
        self.bind(self.host)
        for encoded in self.encoded:
            encoded.param.data = encoded.hollow


@dataclass
class LayerLayout:
    """Where each frozen tensor of one layer goes in its buffer, from shapes and dtypes alone (works on meta)."""

    dense: list[tuple[nn.Parameter, Region]] = field(default_factory=list)
    encoded: list[tuple[nn.Parameter, list[Region], Region]] = field(default_factory=list)
    encoded_experts: list[tuple[nn.Parameter, list[StackedRegion], Region]] = field(default_factory=list)
    attributes: list[tuple[object, str, Region, bool]] = field(default_factory=list)  # ..., aliases a dense param
    quantized_tuners: list[nn.Module] = field(default_factory=list)
    nbytes: int = 0
    scratch_nbytes: int = 0
    base_nbytes: int = 0  # where the expert regions start (nbytes when there are none)


def frozen_parameters(layer: nn.Module, keep_resident: frozenset[int] = frozenset()) -> list[nn.Parameter]:
    """The parameters of `layer` to stream: frozen ones, each once, but those also used outside the layer stack
    (ids in `keep_resident`), which stay on the device like the rest of the resident modules."""
    seen: dict[int, nn.Parameter] = {}
    for param in layer.parameters():  # nn.Module.parameters() already yields a tied parameter once
        if not param.requires_grad and id(param) not in keep_resident:
            seen.setdefault(id(param), param)
    return list(seen.values())


def layout_layer(
    layer: nn.Module,
    codec: Codec | None,
    params: list[nn.Parameter] | None = None,
    keep_resident: frozenset[int] = frozenset(),
    expert_groups: Sequence[Sequence[nn.Parameter]] = (),
) -> LayerLayout:
    """Plan `layer`'s buffer: `params` (default: its frozen parameters but `keep_resident`) dense or encoded with
    `codec`, then the quantization-state tensors of bitsandbytes weights, then the stacked expert tensors of
    `expert_groups` (per experts module, its frozen [num_experts, ...] parameters) as expert regions, encoded expert
    by expert when `codec` accepts them. Plans (hf-offload plan) pass every parameter of a meta model."""
    params = frozen_parameters(layer, keep_resident) if params is None else params
    in_groups = [p for group in expert_groups for p in group]
    expert_ids = {id(p) for p in in_groups}
    params = [p for p in params if id(p) not in expert_ids]
    wanted = {id(p) for p in params}
    linear = list(linear_weights(layer))
    encode = {
        id(w)
        for w, _ in linear
        if codec is not None and id(w) in wanted and not compat.is_quantized_parameter(w) and codec.accepts(w)
    }
    layout = LayerLayout()
    offset = scratch = 0
    for param in params:
        if id(param) in encode:
            parts = []
            for part in codec.parts(tuple(param.shape), param.dtype):
                parts.append(Region(offset, part.dtype, part.shape))
                offset += _aligned(part.nbytes)
            layout.encoded.append((param, parts, Region(scratch, param.dtype, tuple(param.shape))))
            scratch += _aligned(param.numel() * param.element_size())
        else:
            layout.dense.append((param, Region(offset, param.dtype, tuple(param.shape))))
            offset += _aligned(param.numel() * param.element_size())
    # Tensors a bitsandbytes layer reads besides its weight; one that shares the weight's memory shares its region.
    placed = {(p.data_ptr(), p.dtype, tuple(p.shape)): region for p, region in layout.dense if p.device.type != "meta"}
    for module in layer.modules():
        for holder, name in compat.bnb_state_tensors(module):
            tensor = getattr(holder, name)
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            region = placed.get(key) if tensor.device.type != "meta" else None
            alias = region is not None
            if not alias:
                region = placed[key] = Region(offset, tensor.dtype, tuple(tensor.shape))
                offset += _aligned(region.nbytes)
            layout.attributes.append((holder, name, region, alias))
    layout.base_nbytes = offset
    for param in in_groups:
        if codec is not None and codec.accepts_experts(param):  # Note: [Experts encoded one by one] in quant.py
            parts = []
            for part in codec.parts(tuple(param.shape[1:]), param.dtype):
                parts.append(StackedRegion(offset, part.dtype, part.shape, param.shape[0], _aligned(part.nbytes)))
                offset += parts[-1].nbytes
            layout.encoded_experts.append((param, parts, Region(scratch, param.dtype, tuple(param.shape))))
            scratch += _aligned(param.numel() * param.element_size())
        else:
            layout.dense.append((param, Region(offset, param.dtype, tuple(param.shape))))
            offset += _aligned(param.numel() * param.element_size())
    quantized = encode | {id(w) for w, _ in linear if compat.is_quantized_parameter(w)}
    layout.quantized_tuners = list({id(t): t for w, t in linear if t is not None and id(w) in quantized}.values())
    layout.nbytes, layout.scratch_nbytes = offset, scratch
    return layout


def require_frozen_weights(layers: nn.ModuleList, keep_resident: frozenset[int] = frozenset()) -> None:
    """Refuse layers with nothing to stream (every weight trainable); the other refusals are
    `anatomy.check_streamable`'s."""
    if not any(frozen_parameters(layer, keep_resident) for layer in layers):
        raise UnsupportedModelError(
            "Every parameter of the decoder layers is trainable, so there is nothing to stream: layer streaming "
            "keeps frozen weights in host memory. Freeze the base model and train adapters (for example "
            "peft.get_peft_model(model, LoraConfig(target_modules='all-linear'))) before enable_layer_streaming, or "
            "pass OffloadConfig(full_finetune=True) to train every weight with master weights in host memory."
        )


def write_dense(region: Region, value: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Copy `value` into its place `region` of the layer buffer `host` and return that view."""
    view = region.view_in(host)
    view.copy_(value)
    return view


def write_encoded(codec: Codec, parts: list[Region], value: torch.Tensor, host: torch.Tensor) -> dict:
    """Encode `value` with `codec` into its places `parts` of the layer buffer `host`; returns the codec's metadata."""
    tensors, meta = codec.encode(value)
    for part, tensor in zip(parts, tensors, strict=True):
        part.view_in(host).copy_(tensor.reshape(part.shape))
    return meta


def hollow(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """What an encoded weight's parameter holds between uses: see Note: [Hollow weights]."""
    return torch.full((), float("nan"), dtype=dtype, device="cpu").expand(tuple(shape))


def pack_layer(
    index: int,
    layer: nn.Module,
    pin: Callable[[torch.Tensor], bool],
    codec: Codec | None = None,
    keep_resident: frozenset[int] = frozenset(),
    expert_groups: Sequence[Sequence[nn.Parameter]] = (),
    layout: LayerLayout | None = None,
    cached: CachedLayer | None = None,
    prebuilt=None,
) -> LayerPack:
    """Move `layer`'s frozen parameters into one new host buffer and free their old storage.

    `expert_groups`: per experts module, its frozen stacked expert parameters (each [num_experts, ...]); they are
    packed last, as expert regions (encoded expert by expert when `codec` accepts them). `layout`: `layout_layer`'s
    plan, when the caller made it already.
    Two ways the buffer may exist already, in which case nothing is copied or encoded and every parameter is bound
    exactly as packing would bind it:
    `cached`: this layer's buffer as a store cache holds it (same layout; see store_cache.py).
    `prebuilt`: the layer's buffer as a checkpoint loader filled it (`prebuilt.PrebuiltLayer`), taken when the
    parameters already sit where this layout puts them (see Note: [Loading into the store] in prebuilt.py).
    """
    layout = layout or layout_layer(layer, codec, keep_resident=keep_resident, expert_groups=expert_groups)
    encoded = [*layout.encoded, *layout.encoded_experts]
    if cached is not None and (cached.host.numel() != layout.nbytes or len(cached.encoded_meta) != len(encoded)):
        raise ValueError(f"hf_offload: the cached buffer of layer {index} does not have this layer's layout")
    adopted = prebuilt is not None and prebuilt.matches(layout)
    if prebuilt is not None and not adopted:
        prebuilt.give_back_dense()  # packed the ordinary way below, from the prebuilt values
    filled = adopted or cached is not None
    pack = LayerPack(
        index=index,
        host=prebuilt.host if adopted else cached.host if cached is not None else page_aligned_empty(layout.nbytes),
        scratch_nbytes=layout.scratch_nbytes,
        quantized_tuners=layout.quantized_tuners,
        base_nbytes=layout.base_nbytes,
        adopted=adopted,
    )
    pack.pinned = pin(pack.host)
    # Attributes first: one that aliases a parameter is copied with it, before the parameter is rebound.
    for holder, name, region, alias in layout.attributes:
        tensor = getattr(holder, name)
        if not alias and cached is None:
            region.view_in(pack.host).copy_(tensor)
        pack.attributes.append(PackedAttribute(holder, name, region, tensor.device))
    for param, region in layout.dense:
        packed = PackedTensor(param=param, region=region, original_device=param.device)
        view = packed.view_in(pack.host) if filled else write_dense(region, param.data, pack.host)
        param.data = view  # the old storage is freed here unless something else holds it
        pack.tensors.append(packed)
    for attribute in pack.attributes:
        attribute.bind(pack.host)
    for number, (param, parts, scratch) in enumerate(encoded):
        stacked = number >= len(layout.encoded)
        if adopted:
            record = prebuilt.record(param)
        elif cached is not None:
            record = bind_encoded(param, codec, parts, scratch, cached.encoded_meta[number], stacked)
        elif stacked:
            record = encode_stacked_experts(pack.host, param, param.data, codec, parts, scratch)
        else:
            record = encode_weight(pack.host, param, param.data, codec, parts, scratch)
        pack.encoded.append(record)
    by_param = {id(t.param): t for t in (*pack.tensors, *pack.encoded)}
    for group in expert_groups:
        pack.experts.append(ExpertRegion(group[0].shape[0], [by_param[id(p)] for p in group]))
    return pack


@dataclass(frozen=True)
class StoreCache:
    """Where to keep the built store on disk, and the model identity that goes into its key (store_cache.py)."""

    directory: str
    identity: dict  # store_cache.model_identity(model)

    def key_fields(self, layers: nn.ModuleList, layouts: list[LayerLayout], codec: Codec | None) -> dict | None:
        """The key's fields (Note: [Store cache key]), or None (logged) when the weights are not in memory."""
        tensors = [tensor for layout in layouts for tensor in layout_tensors(layout)]
        try:
            content = store_cache.fingerprint(tensors)
        except ValueError as error:
            store_cache.logger.warning("hf_offload: store_cache is not used: %s", error)
            return None
        digests = [store_cache.layout_digest(layer, layout) for layer, layout in zip(layers, layouts)]
        return store_cache.make_key_fields(codec.name if codec else None, digests, self.identity, content)


class HostStore:
    """All layer packs of one model."""

    def __init__(self, packs: list[LayerPack]):
        self.packs = packs

    @classmethod
    def build(
        cls,
        layers: nn.ModuleList,
        pin: Callable[[torch.Tensor], bool],
        show_progress: bool | None = None,
        codec: Codec | None = None,
        keep_resident: frozenset[int] = frozenset(),
        expert_groups: Callable[[int], Sequence[Sequence[nn.Parameter]]] | None = None,
        cache: StoreCache | None = None,
        prebuilt: Sequence | None = None,
        mapped: Sequence[CachedLayer] | None = None,
    ) -> HostStore:
        """Pack every layer; with `cache`, map the layer buffers from it when its key matches, else write them to
        it once packed (see store_cache.py); `prebuilt`: per layer, its buffer filled by a checkpoint loader;
        `mapped`: per layer, its buffer as another process built it (the node's shared store), bound as it is."""
        from tqdm.auto import tqdm

        groups = [expert_groups(index) if expert_groups else () for index in range(len(layers))]
        layouts = [
            layout_layer(layer, codec, keep_resident=keep_resident, expert_groups=groups[i])
            for i, layer in enumerate(layers)
        ]
        fields = cache.key_fields(layers, layouts, codec) if cache is not None else None
        cached = store_cache.open_cached(cache.directory, fields) if fields is not None else mapped
        desc = "hf_offload: packing layers in host memory" if cached is None else "hf_offload: mapping layers"
        progress = tqdm(layers, desc=desc, unit="layer", disable=_tqdm_disable(show_progress))
        packs = []
        filled = cached is not None or prebuilt is not None  # buffers exist already: nothing to read ahead
        with ThreadPoolExecutor(1, thread_name_prefix="hf_offload-read-ahead") as reader:
            for index, layer in enumerate(progress):
                if READ_AHEAD and not filled and index + 1 < len(layers):  # Note: [Reading ahead while packing]
                    reader.submit(_touch_pages, layout_tensors(layouts[index + 1]))
                packs.append(
                    pack_layer(
                        index,
                        layer,
                        pin,
                        codec,
                        keep_resident,
                        groups[index],
                        layouts[index],
                        cached and cached[index],
                        prebuilt[index] if prebuilt is not None else None,
                    )
                )
        if fields is not None and cached is None:
            store_cache.write_cache(cache.directory, fields, packs)
        return cls(packs)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.packs)

    @property
    def max_layer_bytes(self) -> int:
        return max((p.nbytes for p in self.packs), default=0)

    @property
    def max_scratch_bytes(self) -> int:
        return max((p.scratch_nbytes for p in self.packs), default=0)

    def unpack(self, unpin: Callable[[torch.Tensor], None]) -> None:
        """Give every parameter its own storage again, on its original device, layer by layer.

        Encoded weights come back dequantized (the values the layers computed with, not the original ones)."""
        for pack in self.packs:
            restored: dict[int, torch.Tensor] = {}  # by buffer offset, so aliases stay aliases
            for packed in pack.tensors:
                view = packed.view_in(pack.host)
                target = packed.original_device
                # A pinned buffer is about to be unregistered; parameters must not keep views into it.
                packed.param.data = view.clone() if target.type == "cpu" and pack.pinned else view.to(target)
                restored[packed.offset] = packed.param.data
            for attribute in pack.attributes:
                tensor = restored.get(attribute.region.offset)
                if tensor is None or tensor.dtype != attribute.region.dtype:
                    tensor = attribute.region.view_in(pack.host).to(attribute.original_device, copy=True)
                    restored[attribute.region.offset] = tensor
                setattr(attribute.holder, attribute.name, tensor)
            for encoded in pack.encoded:
                encoded.param.data = encoded.dense_copy(pack.host).to(encoded.original_device)
            if pack.pinned:
                unpin(pack.host)
            pack.host = torch.empty(0, dtype=torch.uint8)
        self.packs = []


# Note: [Reading ahead while packing]
# Weights loaded from safetensors files in their own dtype are usually views of the files mapped in memory, read
# from disk only when first touched: packing a layer would then wait for the disk, then encode, in turn. While a
# layer packs, one thread reads one byte of every page of the next layer's tensors, so the disk reads of the next
# layer overlap the encoding of this one. It only reads; weights already in memory cost it a few microseconds.


def layout_tensors(layout: LayerLayout) -> list[torch.Tensor]:
    tensors = [p.data for p, _ in layout.dense] + [p.data for p, _, _ in (*layout.encoded, *layout.encoded_experts)]
    return tensors + [getattr(holder, name) for holder, name, _, alias in layout.attributes if not alias]


def _touch_pages(tensors: list[torch.Tensor]) -> None:
    page = mmap.PAGESIZE
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.numel():
            tensor.detach().reshape(-1).view(torch.uint8)[::page].max()  # one read per page: faults it in


def _tqdm_disable(show_progress: bool | None) -> bool | None:
    if show_progress is None:
        from ..verbosity import progress_bars_enabled

        # the Hugging Face libraries' switch first; then tqdm's None: disabled on a non-terminal
        return None if progress_bars_enabled() else True
    return not show_progress
