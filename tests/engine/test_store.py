"""The host store: one aligned byte buffer per layer, whatever mix of dtypes; packing and unpacking are exact;
linear weights quantized on request; models loaded in 4/8 bits with bitsandbytes (QLoRA) streamed as they are."""

from __future__ import annotations

import pytest
import torch
import transformers
from families import VOCAB, build
from parity import assert_same_step, eval_logits, left_padded_batch, with_lora
from torch import nn

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine.quant import NF4Codec
from hf_offload.engine.store import ALIGNMENT, HostStore, frozen_parameters, layout_layer


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


def test_layout_quantizes_base_linear_weights_only():
    model = with_lora(build("llama"))
    layer = model.get_base_model().model.layers[0]
    layout = layout_layer(layer, NF4Codec())
    encoded = {id(p) for p, _, _ in layout.encoded}
    names = {id(p): n for n, p in layer.named_parameters()}
    assert sorted(names[i] for i in encoded) == sorted(
        f"{m}.base_layer.weight"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )
    assert {names[id(p)] for p, _ in layout.dense} == {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert len(layout.quantized_tuners) == 7
    assert len(layout.dense) + len(layout.encoded) == len(frozen_parameters(layer))
    assert layout_layer(layer, None).encoded == []


# --- QLoRA: models loaded with BitsAndBytesConfig ----------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny fp32 Llama saved to disk; rows of 64 so every bitsandbytes CPU kernel sees whole blocks."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


QUANTIZATION = {
    "4bit": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "8bit": dict(load_in_8bit=True),
}


def load_quantized(path, bits: str, device: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=transformers.BitsAndBytesConfig(**QUANTIZATION[bits]),
        device_map=device,
        dtype=torch.float32,
    )
    # bitsandbytes repacks 4-bit weights for its CPU inference kernels in eval mode (bf16 scales, other numerics);
    # streamed layers keep their layout, so the resident reference must too for eval logits to compare.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return with_lora(model)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_model_streams_with_parity_against_itself_resident(checkpoint, bits):
    check_qlora_parity(checkpoint, bits, "cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("load_device", ["cuda", "cpu"])  # cpu: quantized while loading into host memory
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_model_streams_on_cuda_with_parity_against_itself_resident(checkpoint, bits, load_device):
    check_qlora_parity(checkpoint, bits, load_device, "cuda")


def check_qlora_parity(checkpoint, bits: str, load_device: str, device: str):
    reference = load_quantized(checkpoint, bits, load_device).to(device)
    streamed = load_quantized(checkpoint, bits, load_device)
    # same adapters (with_lora seeds them); the base weights are the same checkpoint quantized the same way
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(reference.parameters(), streamed.parameters()))
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device=device))
    runtime = get_runtime(streamed)
    assert all(pack.attributes for pack in runtime.store.packs)  # quantization state travels with the weights

    # Inside the window, the layer reads its weight and its quantization state from the device slot.
    proj = streamed.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    seen = []

    def record(module, args):
        weight = module.weight
        state = weight.quant_state.absmax if bits == "4bit" else module.state.SCB
        seen.append((weight.untyped_storage().data_ptr(), state.untyped_storage().data_ptr()))

    handle = proj.register_forward_pre_hook(record)
    batch = {k: v.to(device) for k, v in left_padded_batch(VOCAB, length=10).items()}
    hf_offload.reset_stats(streamed)
    assert_same_step(reference, streamed, batch)
    handle.remove()
    host = runtime.store.packs[0].host.untyped_storage().data_ptr()
    slots = {slot.buffer.untyped_storage().data_ptr() for slot in runtime.streamer._slots}
    assert seen and all(w in slots and s == w for w, s in seen) and host not in slots
    stats = hf_offload.stats(streamed)
    assert stats["bytes_to_device"] == stats["layer_loads"] * runtime.store.packs[0].nbytes

    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
    state, expected = streamed.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k].cpu(), v.cpu()) for k, v in expected.items() if isinstance(v, torch.Tensor))
    with pytest.raises(RuntimeError, match="cannot merge adapters"):
        streamed.merge_adapter()
    hf_offload.disable_layer_streaming(streamed)
    assert_same_step(reference, streamed, batch)
