"""The host store: one aligned byte buffer per layer, whatever mix of dtypes; packing and unpacking are exact."""

from __future__ import annotations

import torch
from torch import nn

from hf_offload.engine.store import ALIGNMENT, HostStore


def _mixed_layer(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.Module()
    layer.a = nn.Linear(5, 3)  # fp32 weight (15 elements: not a multiple of the alignment) and bias
    layer.b = nn.Linear(3, 7).to(torch.bfloat16)
    layer.c = nn.Embedding(4, 3).to(torch.float16)
    layer.trainable = nn.Linear(2, 2)
    for p in layer.parameters():
        p.requires_grad = False
    layer.trainable.weight.requires_grad = True
    return layer


def test_mixed_dtypes_pack_into_one_aligned_buffer_and_unpack_exactly():
    layers = nn.ModuleList([_mixed_layer(0), _mixed_layer(1)])
    before = {n: p.detach().clone() for n, p in layers.named_parameters()}
    store = HostStore.build(layers, pin=lambda t: False, show_progress=False)

    assert len(store.packs) == 2
    for pack, layer in zip(store.packs, layers):
        assert pack.host.dtype == torch.uint8 and pack.host.dim() == 1
        assert all(t.offset % ALIGNMENT == 0 for t in pack.tensors)
        assert {t.dtype for t in pack.tensors} == {torch.float32, torch.bfloat16, torch.float16}
        # the trainable parameter is not packed; every frozen one is a view into the layer's buffer
        assert layer.trainable.weight.requires_grad and all(t.param is not layer.trainable.weight for t in pack.tensors)
        base = pack.host.untyped_storage().data_ptr()
        for t in pack.tensors:
            assert t.param.untyped_storage().data_ptr() == base
    for name, param in layers.named_parameters():
        assert torch.equal(param, before[name]), name

    store.unpack(unpin=lambda t: None)
    for name, param in layers.named_parameters():
        assert torch.equal(param, before[name]), name
        assert param.dtype == before[name].dtype


def test_store_sizes():
    layers = nn.ModuleList([_mixed_layer(0)])
    store = HostStore.build(layers, pin=lambda t: False, show_progress=False)
    frozen = [p for p in layers.parameters() if not p.requires_grad]
    raw = sum(p.numel() * p.element_size() for p in frozen)
    assert raw <= store.nbytes <= raw + ALIGNMENT * len(frozen)
    assert store.max_layer_bytes == store.nbytes
