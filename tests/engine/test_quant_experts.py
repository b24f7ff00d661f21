"""Quantized Mixture-of-Experts experts (base_weight_dtype='nf4'/'int8' on stacked expert tensors): encoded expert by
expert, routed fetch of encoded bytes, exactness against ordinary training on the decoded weights, guards."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import instantiate
from moe_families import (
    CORE,
    FAMILIES,
    ROUTED,
    VOCAB,
    build,
    many_experts_model,
    record_expert_copies,
    with_expert_lora,
)
from parity import assert_step_matches, eval_logits, left_padded_batch, train_step

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine.quant import Int8RowwiseCodec, NF4Codec, make_codec
from hf_offload.engine.store import EncodedExperts, layout_layer

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = ("nf4", "int8")
MODES = ("routed", "all")


def encoded_experts(model) -> list[tuple[object, EncodedExperts]]:
    """(pack, encoded expert tensor) of every streamed layer."""
    runtime = get_runtime(model)
    return [(pack, e) for pack in runtime.store.packs for e in pack.encoded if isinstance(e, EncodedExperts)]


def streamed_and_decoded_reference(base, family, **options):
    """A streamed LoRA model (LoRA on experts too) and an ordinary one with the same adapters whose quantized
    weights are replaced by what the streamed model computes with (the decoded values), as test_quant does."""
    reference = with_expert_lora(copy.deepcopy(base), family)
    streamed = with_expert_lora(copy.deepcopy(base), family)
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu", check_host_memory=False, **options))
    names = {id(p): n for n, p in streamed.named_parameters()}
    params = dict(reference.named_parameters())
    for pack in get_runtime(streamed).store.packs:
        for encoded in pack.encoded:
            params[names[id(encoded.param)]].data.copy_(encoded.dense_copy(pack.host))
    return streamed, reference


# --- the store: each expert encoded alone, addressable -------------------------------------------------------------
@pytest.mark.parametrize("codec", [NF4Codec(), Int8RowwiseCodec()], ids=DTYPES)
def test_each_expert_is_encoded_alone_at_its_own_byte_ranges(codec):
    """Expert e's parts in the store are exactly `codec.encode(stack[e])`, at `part.offset + e * part.stride`."""
    model = build("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    stacks = {name: p.detach().clone() for name, p in experts.named_parameters(recurse=False)}
    model.requires_grad_(False)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype=codec.name))
    pack = get_runtime(model).store.packs[0]
    by_name = {name: e for e in pack.encoded for name, p in experts.named_parameters(recurse=False) if p is e.param}
    assert set(by_name) == set(stacks) == {"gate_up_proj", "down_proj"}
    region = pack.experts[0]
    assert all(isinstance(t, EncodedExperts) for t in region.tensors)
    for name, encoded in by_name.items():
        stack = stacks[name]
        assert encoded.num_experts == stack.shape[0] == len(encoded.metas)
        for expert in range(stack.shape[0]):
            parts, meta = codec.encode(stack[expert])
            assert encoded.metas[expert] == meta
            for part, expected in zip(encoded.parts, parts, strict=True):
                start = part.offset + expert * part.stride
                raw = pack.host[start : start + expected.numel() * expected.element_size()]
                assert torch.equal(raw, expected.reshape(-1).view(torch.uint8)), (name, expert)
        # decoding all experts at once gives each expert's own decode
        dense = encoded.dense_copy(pack.host)
        for expert in range(stack.shape[0]):
            alone = torch.empty_like(stack[expert])
            codec.decode(*codec.encode(stack[expert]), alone)
            assert torch.equal(dense[expert], alone)
        assert (dense - stack).norm() / stack.norm() < 0.11
    # the encoded experts are the region's bytes: fewer than dense
    dense_bytes = sum(s.numel() * s.element_size() for s in stacks.values()) // 8
    assert region.expert_nbytes < dense_bytes / (3 if codec.name == "nf4" else 1.5)


def test_nf4_keeps_experts_whose_slices_are_not_a_multiple_of_64_dense():
    """Note: [nf4 on flattened weights]: a down_proj expert of 32 x 3 values stays dense; int8 encodes it."""
    config_class, kwargs = FAMILIES["qwen3_moe"]
    model = instantiate(config_class, dict(kwargs, moe_intermediate_size=3))  # gate_up 6 x 32, down 32 x 3
    model.requires_grad_(False)
    layer = model.model.layers[0]
    group = [list(layer.mlp.experts.parameters(recurse=False))]
    for dtype, encoded in (("nf4", ["gate_up_proj"]), ("int8", ["gate_up_proj", "down_proj"])):
        layout = layout_layer(layer, make_codec(dtype), expert_groups=group)
        names = {id(p): n for n, p in layer.mlp.experts.named_parameters()}
        assert [names[id(p)] for p, _, _ in layout.encoded_experts] == encoded
        assert [names[id(p)] for p, _ in layout.dense if id(p) in names] == ["down_proj"][: 2 - len(encoded)]


# --- exactness: a streamed step == an ordinary step on the decoded weights ------------------------------------------
ALL = [f if f in CORE else pytest.param(f, marks=pytest.mark.slow) for f in ROUTED]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ALL)
def test_streamed_quantized_moe_equals_ordinary_training_on_the_decoded_weights(family, dtype):
    base = build(family)
    batch = left_padded_batch(VOCAB)
    original_logits = None
    for mode in MODES:
        streamed, reference = streamed_and_decoded_reference(base, family, base_weight_dtype=dtype, expert_fetch=mode)
        assert encoded_experts(streamed), "no expert tensor is encoded: the test would not cover them"
        reference_step = train_step(reference, batch)
        assert any(".experts." in n for n in reference_step[1]), "expert LoRA is not trained"
        hf_offload.reset_stats(streamed)
        assert_step_matches(reference_step, streamed, batch)
        torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
        stats = hf_offload.stats(streamed)
        assert stats["experts_loaded"] > 0
        if mode == "all":
            assert stats["experts_skipped"] == 0
        # the decoded experts differ from the originals: the test compares against the right model
        if original_logits is None:
            original_logits = eval_logits(with_expert_lora(copy.deepcopy(base), family), batch)
        assert not torch.allclose(original_logits, eval_logits(reference, batch), rtol=1e-4, atol=1e-5)


def test_the_parity_test_sees_the_decoded_experts():
    """Teeth: a reference whose experts are the original values (its linear weights still the decoded ones) must
    disagree with the streamed step, so the parity above depends on the experts being decoded as the reference's."""
    base = build("qwen3_moe")
    batch = left_padded_batch(VOCAB)
    streamed, reference = streamed_and_decoded_reference(base, None, base_weight_dtype="nf4")
    originals = dict(with_expert_lora(copy.deepcopy(base)).named_parameters())
    names = {id(p): n for n, p in streamed.named_parameters()}
    params = dict(reference.named_parameters())
    for _, encoded in encoded_experts(streamed):
        params[names[id(encoded.param)]].data.copy_(originals[names[id(encoded.param)]])
    with pytest.raises(AssertionError):
        assert_step_matches(train_step(reference, batch), streamed, batch)


# --- routed fetch moves and decodes only the routed experts' encoded bytes ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_fetch_moves_the_encoded_bytes_of_routed_experts_only(dtype, monkeypatch):
    base = many_experts_model()
    batch = {k: v[:1, -4:] for k, v in left_padded_batch(VOCAB).items()}  # 4 tokens, top-2: at most 8 experts
    decoded = []  # experts per decode call
    codec_class = type(make_codec(dtype))
    decode_experts = codec_class.decode_experts
    monkeypatch.setattr(
        codec_class,
        "decode_experts",
        lambda self, parts, metas, out: decoded.append(len(metas)) or decode_experts(self, parts, metas, out),
    )
    results = {}
    for mode in MODES:
        streamed, reference = streamed_and_decoded_reference(base, None, base_weight_dtype=dtype, expert_fetch=mode)
        reference_step = train_step(reference, batch)
        streamer = get_runtime(streamed).streamer
        copies = record_expert_copies(streamer)
        decoded.clear()
        hf_offload.reset_stats(streamed)
        assert_step_matches(reference_step, streamed, batch)
        results[mode] = hf_offload.stats(streamed), copies, list(decoded), get_runtime(streamed).store

    (_, copies_all, decoded_all, store), (stats, copies, decoded_routed, _) = results["all"], results["routed"]
    assert copies_all == [] and set(decoded_all) == {64}  # whole layers: every expert decoded, never copied alone
    # bytes: each load's base prefix plus, per routed copy, the ENCODED bytes of the experts it copied
    packs = store.packs
    expert_nbytes = packs[0].experts[0].expert_nbytes
    assert all(isinstance(t, EncodedExperts) for t in packs[0].experts[0].tensors)
    base_loads = stats["layer_loads"] * packs[0].base_nbytes
    assert stats["bytes_to_device"] == base_loads + sum(len(e) for _, _, e in copies) * expert_nbytes
    assert stats["experts_loaded"] == sum(len(e) for _, _, e in copies) <= 8 * stats["layer_loads"]
    assert expert_nbytes * (3 if dtype == "nf4" else 1.5) < sum(
        e.scratch.nbytes // e.num_experts for e in packs[0].experts[0].tensors
    )
    # decodes: only routed experts, never more than the slot holds
    assert decoded_routed and max(decoded_routed) <= 8
    assert sum(decoded_routed) < sum(decoded_all) / 4


def test_experts_that_were_not_loaded_are_never_read_or_decoded():
    """Fill the slots AND the decode scratch with NaN bytes: a routed nf4 step must read only experts it loaded and
    decoded, so parity holds for every experts implementation."""
    base = many_experts_model()
    batch = {k: v[:1, -4:] for k, v in left_padded_batch(VOCAB).items()}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        streamed, reference = streamed_and_decoded_reference(base, None, base_weight_dtype="nf4")
        reference_step = train_step(reference, batch)
        streamed.get_base_model().set_experts_implementation(implementation)
        train_step(streamed, batch)  # slots and scratch are allocated
        streamer = get_runtime(streamed).streamer
        for slot in streamer._slots:
            slot.buffer.fill_(0xFF)  # every float32 made of these bytes is NaN, and nf4 codes of them decode to NaN
        streamer._scratch.fill_(0xFF)
        streamer.invalidate()
        assert_step_matches(reference_step, streamed, batch)


def test_load_experts_appends_decoded_experts_within_one_acquisition():
    """A second request in the same acquisition decodes only what it appended; the first views stay valid."""
    model = with_expert_lora(build("olmoe"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", prefetch=0, base_weight_dtype="nf4"))
    runtime = get_runtime(model)
    streamer, pack = runtime.streamer, runtime.store.packs[0]
    dense = [t.dense_copy(pack.host) for t in pack.experts[0].tensors]
    streamer.acquire(0, +1)
    order, views = streamer.load_experts(0, 0, [5, 1])
    first = [v.clone() for v in views]
    order2, views2 = streamer.load_experts(0, 0, [1, 6, 2])
    streamer.release(0)
    assert order == [1, 5] and order2 == [1, 5, 2, 6]
    for d, v, v2, f in zip(dense, views, views2, first):
        assert v.shape[0] == 2 and v2.shape[0] == 4
        torch.testing.assert_close(v, f, rtol=0, atol=0)
        torch.testing.assert_close(v2, d[order2], rtol=0, atol=0)


# --- hollow between uses, state_dict, disable, summary ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_encoded_experts_are_hollow_between_uses_and_come_back_dequantized(dtype):
    base = build("qwen3_moe")
    model = with_expert_lora(copy.deepcopy(base))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype=dtype))
    train_step(model, left_padded_batch(VOCAB))
    encoded = encoded_experts(model)
    assert len(encoded) == 2 * 4  # gate_up_proj and down_proj of each of the 4 MoE layers
    decoded = {id(e.param): e.dense_copy(pack.host) for pack, e in encoded}
    for _, e in encoded:
        assert e.param.data.stride() == (0, 0, 0) and torch.isnan(e.param.data).all()  # Note: [Hollow weights]
    # state_dict shows them as the runtime shows every encoded weight: meta placeholders of the right shape
    names = {id(p): n for n, p in model.named_parameters()}
    state = model.state_dict()
    for _, e in encoded:
        value = state[names[id(e.param)]]
        assert value.device.type == "meta" and value.shape == e.param.shape and value.dtype == e.param.dtype
    summary = hf_offload.summary(model)
    linear = sum(
        1 for pack in get_runtime(model).store.packs for e in pack.encoded if not isinstance(e, EncodedExperts)
    )
    assert summary["quantized_weights"] == linear + len(encoded)
    assert summary["expert_bytes"] == sum(p.nbytes - p.base_nbytes for p in get_runtime(model).store.packs)
    assert summary["expert_bytes"] == sum(sum(r.nbytes for r in e.parts) for _, e in encoded)
    assert summary["device_scratch_bytes"] >= sum(e.scratch.nbytes for _, e in encoded[:2])
    # loading into them is refused, as for encoded linear weights
    with pytest.raises(RuntimeError, match="stored quantized in host memory"):
        model.load_state_dict({names[id(encoded[0][1].param)]: torch.zeros(encoded[0][1].param.shape)}, strict=False)

    params = [e.param for _, e in encoded]
    hf_offload.disable_layer_streaming(model)
    originals = dict(base.named_parameters())
    for param in params:
        assert torch.equal(param.data, decoded[id(param)])  # the values the layers computed with
        original = originals[names[id(param)].replace("base_model.model.", "").replace(".base_layer", "")]
        assert (param.data - original).norm() / original.norm() < 0.11


@pytest.mark.parametrize("mode", MODES)
def test_training_after_a_first_use_under_inference_mode(mode):
    """The scratch the experts decode into is allocated on first use, possibly under inference mode: training after
    must still match a model never used there."""
    base = build("qwen3_moe")
    batch = left_padded_batch(VOCAB)
    config = OffloadConfig(device="cpu", base_weight_dtype="nf4", expert_fetch=mode)
    streamed, reference = (
        hf_offload.enable_layer_streaming(with_expert_lora(copy.deepcopy(base)), config) for _ in range(2)
    )
    streamed.eval()
    with torch.inference_mode():
        first = streamed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_step_matches(train_step(reference, batch), streamed, batch)
    torch.testing.assert_close(eval_logits(streamed, batch), first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 128), (256, 192), (32, 32), (96, 64)])  # 16384 | numel: one batched decode
def test_nf4_decode_of_many_experts_is_bitwise_each_experts_own_decode(shape, dtype, monkeypatch):
    """The batched nf4 decode (real expert shapes) and the one-by-one fallback give each expert's `decode`."""
    from hf_offload.engine import store

    codec = NF4Codec()
    stack = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    part_shapes = codec.parts(shape, dtype)
    regions, offset = [], 0
    for part in part_shapes:
        regions.append(store.StackedRegion(offset, part.dtype, part.shape, 6, store._aligned(part.nbytes)))
        offset += regions[-1].nbytes
    host = torch.zeros(offset, dtype=torch.uint8)
    from hf_offload.engine.quant import encode_experts

    metas = encode_experts(codec, stack, [r.view_in(host) for r in regions])
    calls = []
    one = codec.decode
    monkeypatch.setattr(codec, "decode", lambda *args: calls.append(1) or one(*args))
    for start, count in ((0, 6), (1, 3), (5, 1)):
        calls.clear()
        out = torch.full((count, *shape), float("nan"), dtype=dtype)
        experts = [4, 0, 2, 5, 1, 3][start : start + count]  # positions hold experts in any order (routed slots)
        codec.decode_experts([r.view_in(host, start, count) for r in regions], [metas[e] for e in experts], out)
        batched = math.prod(shape) % (64 * 256) == 0
        assert len(calls) == (0 if batched else count)
        for i in range(count):
            alone = torch.empty(shape, dtype=dtype)
            one([r.view_in(host, start + i, 1)[0] for r in regions], metas[experts[i]], alone)
            assert torch.equal(out[i], alone), (start, i)


def test_expert_shapes_of_16384_values_decode_in_one_batch_and_keep_parity():
    """gate_up_proj experts of 128 x 128 take the batched nf4 decode (down_proj, 128 x 64, the one-by-one one)."""
    config_class, kwargs = FAMILIES["qwen3_moe"]
    base = instantiate(config_class, dict(kwargs, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=2))
    batch = left_padded_batch(VOCAB)
    for mode in MODES:
        streamed, reference = streamed_and_decoded_reference(base, None, base_weight_dtype="nf4", expert_fetch=mode)
        shapes = {tuple(e.param.shape[1:]) for _, e in encoded_experts(streamed)}
        assert shapes == {(128, 128), (128, 64)}
        assert_step_matches(train_step(reference, batch), streamed, batch)
    # what the reference computed with is each expert's own round trip through the codec
    names = {id(p): n.replace("base_model.model.", "") for n, p in streamed.named_parameters()}
    names = {key: name.replace(".base_layer", "") for key, name in names.items()}
    originals = dict(base.named_parameters())
    codec = NF4Codec()
    for pack, encoded in encoded_experts(streamed):
        dense = encoded.dense_copy(pack.host)
        for expert, weight in enumerate(originals[names[id(encoded.param)]].detach()):
            alone = torch.empty_like(weight)
            codec.decode(*codec.encode(weight), alone)
            assert torch.equal(dense[expert], alone)
