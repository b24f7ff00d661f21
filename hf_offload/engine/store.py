"""The host store: each decoder layer's frozen tensors packed into one contiguous byte buffer in host memory.

One buffer per layer means one host-to-device copy per layer, whatever mix of dtypes the layer holds. The store
is built layer by layer, and each parameter's old storage is released as soon as it is packed, so host memory
never holds two copies of the model. Between uses, each frozen parameter's `.data` is a view into its layer's
buffer, so `state_dict()` and `save_pretrained()` see the real weights.

Layout note: a later shared store (one host copy for several ranks, or memory-mapped checkpoint files) only has to
provide the same `LayerPack.host` byte buffers; nothing else depends on where those bytes live.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import compat

ALIGNMENT = 64  # bytes; every tensor starts on a boundary any dtype view accepts


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def page_aligned_empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of host memory (uint8) that start on a page boundary and own every page they touch.

    Page-locking works on whole pages, and a page can be registered only once: a layer buffer sharing a page
    with another one (small buffers from the heap often do) could not be pinned. This costs under two pages.
    """
    page = mmap.PAGESIZE
    base = torch.empty((nbytes + page - 1) // page * page + page, dtype=torch.uint8)
    offset = -base.data_ptr() % page
    return base[offset : offset + nbytes]


@dataclass
class PackedTensor:
    """Where one frozen parameter lives inside its layer's buffer."""

    param: nn.Parameter
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    original_device: torch.device

    def view_in(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into `buffer` (a host buffer or a device slot of the same layout)."""
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class LayerPack:
    """One decoder layer's frozen tensors in one host byte buffer."""

    index: int
    host: torch.Tensor  # uint8, nbytes long
    tensors: list[PackedTensor] = field(default_factory=list)
    pinned: bool = False

    @property
    def nbytes(self) -> int:
        return self.host.numel()

    def bind(self, buffer: torch.Tensor, views: list[torch.Tensor] | None = None) -> None:
        """Point every packed parameter at its place in `buffer` (no copies)."""
        views = views if views is not None else [t.view_in(buffer) for t in self.tensors]
        for packed, view in zip(self.tensors, views):
            packed.param.data = view

    def bind_host(self) -> None:
        self.bind(self.host)


def frozen_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters of `layer` that do not train, each once (tied parameters appear once)."""
    seen: dict[int, nn.Parameter] = {}
    for param in layer.parameters():  # nn.Module.parameters() already yields a tied parameter once
        if not param.requires_grad:
            seen.setdefault(id(param), param)
    return list(seen.values())


def validate_layers(layers: nn.ModuleList) -> None:
    """Refuse, before anything is moved, layers whose weights the store cannot pack."""
    owner: dict[int, int] = {}
    for index, layer in enumerate(layers):
        if any(t.device.type == "meta" for t in (*layer.parameters(), *layer.buffers())):
            raise ValueError(
                f"Decoder layer {index} has weights on the meta device; load the model's weights before "
                "enable_layer_streaming (from_pretrained without device_map='meta' or init_empty_weights)."
            )
        for param in frozen_parameters(layer):
            if compat.is_quantized_parameter(param):
                raise ValueError(
                    f"Decoder layer {index} holds a bitsandbytes-quantized parameter ({type(param).__name__}); "
                    "streaming models loaded in 4/8 bits is not supported yet. Load the model in bf16/fp16/fp32."
                )
            if owner.setdefault(id(param), index) != index:
                raise ValueError(
                    f"A frozen parameter is shared by decoder layers {owner[id(param)]} and {index}; hf_offload "
                    "streams each layer's weights separately and cannot stream weights shared across layers."
                )
    if not owner:
        raise ValueError(
            "Every parameter of the decoder layers is trainable, so there is nothing to stream: layer streaming "
            "keeps frozen weights in host memory. Freeze the base model and train adapters (for example "
            "peft.get_peft_model(model, LoraConfig(target_modules='all-linear'))) before enable_layer_streaming."
        )


def pack_layer(index: int, layer: nn.Module, pin: Callable[[torch.Tensor], bool]) -> LayerPack:
    """Move `layer`'s frozen parameters into one new host buffer and free their old storage."""
    params = frozen_parameters(layer)
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += _aligned(param.numel() * param.element_size())
    pack = LayerPack(index=index, host=page_aligned_empty(total))
    pack.pinned = pin(pack.host)
    for param, offset in zip(params, offsets):
        packed = PackedTensor(
            param=param,
            offset=offset,
            nbytes=param.numel() * param.element_size(),
            dtype=param.dtype,
            shape=param.shape,
            original_device=param.device,
        )
        view = packed.view_in(pack.host)
        view.copy_(param.data)
        param.data = view  # the old storage is freed here unless something else holds it
        pack.tensors.append(packed)
    return pack


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
    ) -> HostStore:
        from tqdm.auto import tqdm

        packs = []
        for index, layer in enumerate(
            tqdm(
                layers,
                desc="hf_offload: packing layers in host memory",
                unit="layer",
                disable=_tqdm_disable(show_progress),
            )
        ):
            packs.append(pack_layer(index, layer, pin))
        return cls(packs)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.packs)

    @property
    def max_layer_bytes(self) -> int:
        return max((p.nbytes for p in self.packs), default=0)

    def unpack(self, unpin: Callable[[torch.Tensor], None]) -> None:
        """Give every parameter its own storage again, on its original device, layer by layer."""
        for pack in self.packs:
            for packed in pack.tensors:
                view = packed.view_in(pack.host)
                target = packed.original_device
                # A pinned buffer is about to be unregistered; parameters must not keep views into it.
                packed.param.data = view.clone() if target.type == "cpu" and pack.pinned else view.to(target)
            if pack.pinned:
                unpin(pack.host)
            pack.host = torch.empty(0, dtype=torch.uint8)
        self.packs = []


def _tqdm_disable(show_progress: bool | None) -> bool | None:
    return None if show_progress is None else not show_progress  # tqdm: None disables on a non-terminal
