"""Quantized host storage (base_weight_dtype='nf4'/'int8'): codecs, exactness, bytes moved, training, guards."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from families import VOCAB, build
from parity import assert_same_step, eval_logits, left_padded_batch, with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine.quant import Int8RowwiseCodec, NF4Codec

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def round_trip(codec, weight):
    parts, meta = codec.encode(weight)
    out = torch.empty_like(weight)
    codec.decode(parts, meta, out)
    return parts, out


# --- codecs against plain-torch references ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 32), (64, 128), (48, 64)])  # rows of 32: blocks of 64 cross rows
def test_nf4_round_trip_matches_the_nf4_definition(shape):
    """Independent of bitsandbytes' dequantize: each block of 64 is its NF4 code times one scale (its absmax).

    (96, 32) is the shape bitsandbytes 0.50.2's CPU kernel dequantizes wrongly when given 2D shapes; the codec
    works on flattened weights (Note: [nf4 on flattened weights]), which this test would catch breaking.
    """
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(shape)
    parts, decoded = round_trip(NF4Codec(), weight)
    assert [p.dtype for p in parts] == [torch.uint8, torch.uint8, torch.float32]
    assert sum(p.numel() * p.element_size() for p in parts) <= weight.numel() * (0.5 + 1 / 64) + 4 * 2

    code = F.get_4bit_type("nf4", device="cpu")
    blocks, decoded_blocks = weight.reshape(-1, 64), decoded.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    scale = decoded_blocks.abs().amax(1, keepdim=True)  # the code holds +-1, hit by each block's absmax element
    torch.testing.assert_close(scale, absmax, rtol=0.02, atol=0)  # double quantization of the absmax
    nearest = code[((blocks / absmax)[..., None] - code).abs().argmin(-1)]
    assert (decoded_blocks / scale - nearest).abs().max() < 1e-5
    assert (decoded - weight).norm() / weight.norm() < 0.11  # NF4 on Gaussian weights: ~0.09


def test_int8_round_trip_is_rowwise_absmax_rounding():
    torch.manual_seed(0)
    weight = torch.randn(48, 80)
    parts, decoded = round_trip(Int8RowwiseCodec(), weight)
    scale = weight.abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(decoded, torch.round(weight / scale) * scale, rtol=1e-6, atol=1e-7)
    assert [tuple(p.shape) for p in parts] == [(48, 80), (48,)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codec", [NF4Codec(), Int8RowwiseCodec()], ids=["nf4", "int8"])
def test_codecs_decode_into_half_precision_views(codec, dtype):
    torch.manual_seed(0)
    weight = torch.randn(64, 64, dtype=dtype)
    scratch = torch.zeros(2 * 64 * 64, dtype=dtype)
    parts, meta = codec.encode(weight)
    codec.decode(parts, meta, scratch[64 * 64 :].view(64, 64))  # a view at an offset, as in the scratch buffer
    assert scratch[: 64 * 64].abs().sum() == 0
    assert (scratch[64 * 64 :].float().view(64, 64) - weight.float()).norm() / weight.float().norm() < 0.11


# --- exactness: streaming quantized == ordinary training on the dequantized weights --------------------------------
def dequantized_reference(base, streamed):
    """The LoRA model of `base` with every quantized weight replaced by what the streamed model computes with."""
    reference = with_lora(copy.deepcopy(base))
    runtime = get_runtime(streamed)
    names = {id(p): n for n, p in streamed.named_parameters()}
    params = dict(reference.named_parameters())
    for pack in runtime.store.packs:
        for encoded in pack.encoded:
            params[names[id(encoded.param)]].data.copy_(encoded.dense_copy(pack.host))
    return reference


@pytest.mark.parametrize("family, dtype", [("llama", "nf4"), ("gpt2", "int8")])  # gpt2: transformers Conv1D
def test_quantized_streaming_equals_training_on_the_dequantized_weights(family, dtype):
    base = build(family)
    streamed = with_lora(copy.deepcopy(base))
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu", base_weight_dtype=dtype))
    summary = hf_offload.summary(streamed)
    assert summary["base_weight_dtype"] == dtype
    assert summary["quantized_weights"] == 4 * (7 if family == "llama" else 4)  # every linear of every layer
    reference = dequantized_reference(base, streamed)
    batch = left_padded_batch(VOCAB)
    hf_offload.reset_stats(streamed)
    assert_same_step(reference, streamed, batch)
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
    # the dequantized weights differ from the originals: the test compares against the right model
    original = with_lora(copy.deepcopy(base))
    assert not torch.allclose(eval_logits(original, batch), eval_logits(reference, batch), rtol=1e-4, atol=1e-5)


def test_each_window_decodes_once_and_the_turnaround_reuses_the_scratch(monkeypatch):
    calls = []
    decode = NF4Codec.decode
    monkeypatch.setattr(NF4Codec, "decode", lambda self, *a: calls.append(1) or decode(self, *a))
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype="nf4"))
    model(**left_padded_batch(VOCAB)).loss.backward()
    # 4 layers forward + 4 backward, less the turnaround layer (still decoded in the scratch): 7 windows x 7 weights
    assert len(calls) == 7 * 7
    assert get_runtime(model).streamer.scratch_bytes == hf_offload.summary(model)["device_scratch_bytes"] > 0


# --- bf16 models: bytes moved, losses, training ---------------------------------------------------------------------
def bf16_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def train_losses(model, batch, steps: int) -> tuple[list[float], int]:
    """Losses of `steps` AdamW steps on one batch, and the bytes moved to the device in the first step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    hf_offload.reset_stats(model)
    losses, first_step_bytes = [], None
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        first_step_bytes = first_step_bytes or hf_offload.stats(model)["bytes_to_device"]
    return losses, first_step_bytes


def test_nf4_and_int8_cut_bytes_moved_keep_the_loss_and_train():
    base = bf16_llama()
    batch = left_padded_batch(VOCAB, batch=2, length=8)
    runs = {}
    for dtype, steps in ((None, 1), ("nf4", 3), ("int8", 3)):  # bf16 on CPU is slow: one step is the reference
        model = with_lora(copy.deepcopy(base), lora_dropout=0.0)
        hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype=dtype))
        runs[dtype] = train_losses(model, batch, steps=steps)
    (bf16_losses, bf16_bytes), (nf4_losses, nf4_bytes), (int8_losses, int8_bytes) = runs.values()
    assert bf16_bytes / nf4_bytes >= 3.2, bf16_bytes / nf4_bytes
    assert bf16_bytes / int8_bytes >= 1.8, bf16_bytes / int8_bytes
    for losses in (nf4_losses, int8_losses):
        assert abs(losses[0] - bf16_losses[0]) / bf16_losses[0] < 0.01, (losses[0], bf16_losses[0])
        assert losses[-1] < losses[0] - 0.05, losses


# --- what state_dict, load_state_dict, merging and disabling do ------------------------------------------------------
def test_quantized_store_saves_adapters_and_refuses_what_it_cannot_do(tmp_path):
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype="nf4"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.shape == (32, 32) and torch.isnan(weight).all() and weight.untyped_storage().nbytes() == 4

    state = model.state_dict()
    assert state[key].device.type == "meta" and state[key].shape == (32, 32)
    model.save_pretrained(tmp_path)  # adapters only: unaffected by the placeholders
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert len(saved) == len(lora) > 0
    assert all(torch.equal(v, lora[k.replace(".weight", ".default.weight")]) for k, v in saved.items())

    with pytest.raises(RuntimeError, match="cannot load .*q_proj.base_layer.weight.*quantized"):
        model.load_state_dict(state)
    model.load_state_dict(lora, strict=False)  # loading adapters (Trainer resume) is fine
    with pytest.raises(RuntimeError, match="cannot merge adapters.*disable_layer_streaming"):
        model.merge_adapter()

    batch = left_padded_batch(VOCAB)
    logits = eval_logits(model, batch)
    hf_offload.disable_layer_streaming(model)  # weights come back dense: the dequantized values
    assert weight.is_contiguous() and not torch.isnan(weight).any()
    torch.testing.assert_close(eval_logits(model, batch), logits, rtol=1e-5, atol=1e-6)
    model.merge_adapter()


def test_bad_base_weight_dtype_is_refused():
    with pytest.raises(ValueError, match="`base_weight_dtype` should be one of 'nf4', 'int8' or None"):
        OffloadConfig(base_weight_dtype="fp8")


# --- on a GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_quantized_streaming_on_cuda_equals_the_dequantized_model(dtype):
    base = build("llama")
    streamed = with_lora(copy.deepcopy(base))
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cuda", base_weight_dtype=dtype))
    reference = dequantized_reference(base, streamed).cuda()
    batch = {k: v.cuda() for k, v in left_padded_batch(VOCAB).items()}
    assert_same_step(reference, streamed, batch)
