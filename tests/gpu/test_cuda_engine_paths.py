"""The engine's other CUDA paths: prefetch 0 and 2, activation offload, eval under inference mode then training,
nf4/int8 decoding on the device (quantized experts included), routed MoE (parity, one host readback per experts
call), unpinned stores staged through bounce buffers, QLoRA models.

Run on a machine with a GPU: `python -m pytest -q -m gpu tests/gpu`. Tiny fp32 models built in the test (no
downloads): the streamed step must equal the resident one on the same device within the CPU suite's tolerances.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from families import VOCAB, build
from moe_families import LORA_EXCLUDE
from moe_families import VOCAB as MOE_VOCAB
from moe_families import build as build_moe
from parity import assert_same_step, eval_logits, left_padded_batch, train_step, with_lora
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine import moe
from hf_offload.engine.quant import make_codec

pytestmark = pytest.mark.gpu

LAYERS = 4  # every tiny family is 4 layers deep


def on_cuda(batch: dict) -> dict:
    return {k: v.cuda() for k, v in batch.items()}


def resident_and_streamed(make, config: OffloadConfig):
    """`make()` twice: a resident reference on CUDA and the same model streamed with `config`."""
    reference = make()
    streamed = make()
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, config)
    return reference.cuda(), streamed


# --- dense: prefetch window, activation offload, slot reuse across steps -------------------------------------------
@pytest.mark.parametrize("offload_activations", [False, True])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_prefetch_and_activation_offload_keep_parity_on_cuda(prefetch, offload_activations):
    config = OffloadConfig(device="cuda", prefetch=prefetch, offload_activations=offload_activations)
    reference, streamed = resident_and_streamed(lambda: with_lora(build("llama")), config)
    batch = on_cuda(left_padded_batch(VOCAB))
    assert_same_step(reference, streamed, batch, seed=0)
    hf_offload.reset_stats(streamed)
    assert_same_step(reference, streamed, batch, seed=1)  # the second step starts from the slots the first left
    stats = hf_offload.stats(streamed)
    window = prefetch + 1
    assert stats["layer_loads"] == 2 * (LAYERS - window)
    assert stats["peak_resident_layers"] <= window
    if offload_activations:
        assert stats["bytes_to_host"] > 0 and stats["bytes_from_host_activations"] == stats["bytes_to_host"]
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)


# --- first use under inference mode, then training -------------------------------------------------------------------
@pytest.mark.parametrize("base_weight_dtype", [None, "nf4", "int8"])
def test_eval_under_inference_mode_then_train_on_cuda(base_weight_dtype):
    config = OffloadConfig(device="cuda", base_weight_dtype=base_weight_dtype)
    batch = on_cuda(left_padded_batch(VOCAB))
    if base_weight_dtype is None:
        reference, streamed = resident_and_streamed(lambda: with_lora(build("llama")), config)
    else:  # the same quantized store, never used under inference mode
        reference = hf_offload.enable_layer_streaming(with_lora(build("llama")), config)
        streamed = hf_offload.enable_layer_streaming(with_lora(build("llama")), config)
    streamed.eval()
    with torch.inference_mode():
        first = streamed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.clone()
    assert_same_step(reference, streamed, batch)
    torch.testing.assert_close(eval_logits(streamed, batch), first, rtol=1e-5, atol=1e-6)


# --- nf4 / int8 decoding on the device ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_cuda_decode_equals_cpu_decode(name, dtype):
    codec = make_codec(name)
    weight = torch.randn(192, 256, generator=torch.Generator().manual_seed(0))
    parts, meta = codec.encode(weight)  # encoded from fp32, decoded into `dtype`, as in the scratch
    on_cpu = torch.empty(weight.shape, dtype=dtype)
    codec.decode(parts, meta, on_cpu)
    scratch = torch.zeros(2 * weight.numel(), dtype=dtype, device="cuda")
    on_device = scratch[weight.numel() :].view(weight.shape)  # a view at an offset, as in the scratch buffer
    codec.decode([p.cuda() for p in parts], meta, on_device)
    torch.cuda.synchronize()
    assert scratch[: weight.numel()].abs().sum() == 0, "decode wrote outside its view"
    if dtype == torch.float32:
        torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=1e-6, atol=1e-7)
    else:  # the device kernel may round its product in the half type: one rounding step apart at most
        torch.testing.assert_close(on_device.cpu(), on_cpu)


# --- routed MoE ------------------------------------------------------------------------------------------------------
def expert_lora(model, family):
    torch.manual_seed(123)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        target_parameters=["gate_up_proj", "down_proj"],
        exclude_modules=LORA_EXCLUDE.get(family),
        init_lora_weights=False,
    )
    return get_peft_model(model, config)


def attention_lora(model, family):  # leaves the stacked expert tensors without adapters
    return with_lora(model, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("adapters", [attention_lora, expert_lora], ids=["attention_lora", "expert_lora"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_routed_moe_parity_and_one_readback_per_experts_call_on_cuda(family, adapters, implementation):
    base = build_moe(family)

    def make():
        model = adapters(copy.deepcopy(base), family)
        model.get_base_model().set_experts_implementation(implementation)
        return model

    config = OffloadConfig(device="cuda", expert_fetch="routed")
    reference, streamed = resident_and_streamed(make, config)
    batch = on_cuda({k: v[:1, -3:] for k, v in left_padded_batch(MOE_VOCAB).items()})  # some experts unrouted
    try:
        train_step(reference, batch)
    except (RuntimeError, NotImplementedError) as error:  # the implementation itself, resident, on this GPU
        pytest.skip(f"{implementation} does not run here resident either: {error}")
    runtime = get_runtime(streamed)
    calls = []
    load_experts = runtime.streamer.load_experts
    runtime.streamer.load_experts = lambda *args: calls.append(args[0]) or load_experts(*args)
    assert_same_step(reference, streamed, batch, seed=0)
    assert_same_step(reference, streamed, batch, seed=1)
    stats = hf_offload.stats(streamed)
    assert stats["experts_skipped"] > 0
    assert calls and stats["host_readbacks"] == len(calls) == runtime.ops.readbacks


@pytest.mark.parametrize("mode", ["routed", "all"])
@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_quantized_experts_on_cuda_equal_the_decoded_model(dtype, mode):
    """Experts encoded expert by expert, copied (routed: only the routed ones) and decoded on the device: the step
    equals a resident one on the decoded weights, expert LoRA included."""
    from hf_offload.engine.store import EncodedExperts

    base = build_moe("qwen3_moe")
    reference = expert_lora(copy.deepcopy(base), "qwen3_moe")
    streamed = expert_lora(copy.deepcopy(base), "qwen3_moe")
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(
        streamed, OffloadConfig(device="cuda", base_weight_dtype=dtype, expert_fetch=mode)
    )
    names = {id(p): n for n, p in streamed.named_parameters()}
    params = dict(reference.named_parameters())
    encoded = [(pack, e) for pack in get_runtime(streamed).store.packs for e in pack.encoded]
    assert any(isinstance(e, EncodedExperts) for _, e in encoded)
    for pack, e in encoded:
        params[names[id(e.param)]].data.copy_(e.dense_copy(pack.host))
    reference.cuda()
    batch = on_cuda({k: v[:1, -3:] for k, v in left_padded_batch(MOE_VOCAB).items()})  # some experts unrouted
    assert_same_step(reference, streamed, batch)
    stats = hf_offload.stats(streamed)
    assert (stats["experts_skipped"] > 0) == (mode == "routed")


def test_routed_ids_and_positions_cost_one_host_sync_on_cuda():
    """The routed call's own work (expert ids, fetch, positions, parametrization) makes no host sync but its one
    readback. The experts implementation is replaced by a sync-free stand-in: transformers' own may sync."""
    model = attention_lora(build_moe("qwen3_moe"), "qwen3_moe")
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cuda", expert_fetch="routed"))
    runtime = get_runtime(model)
    group = runtime.routed_experts.groups[0]
    read_to_host = runtime.ops.read_to_host

    def allowed_sync(tensor):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return read_to_host(tensor)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    runtime.ops.read_to_host = allowed_sync
    forward = moe._routed_forward(runtime.streamer, group, lambda hidden, index, weights: hidden * 1)
    hidden = torch.randn(6, 32, device="cuda")
    index = torch.tensor([[0, 3], [3, 5], [1, 0], [5, 6], [6, 0], [3, 1]], device="cuda")
    weights = torch.full((6, 2), 0.5, device="cuda")
    runtime.streamer.acquire(0, +1)
    try:
        with torch.no_grad():
            forward(hidden[:3], index[:3], weights[:3])  # warm-up (experts 0, 1, 3, 5): second slot, pinned blocks
            readbacks = runtime.ops.readbacks
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                forward(hidden, index, weights)  # appends expert 6 to the slot: a copy, no sync
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        runtime.streamer.release(0)
    assert runtime.ops.readbacks == readbacks + 1


# --- without page-locked memory ------------------------------------------------------------------------------------
def test_unpinned_store_is_staged_through_bounce_buffers_on_cuda(caplog):
    config = OffloadConfig(device="cuda", pin_memory=False)
    with caplog.at_level("WARNING", logger="hf_offload"):
        reference, streamed = resident_and_streamed(lambda: with_lora(build("llama")), config)
    assert caplog.text.count("not in page-locked host memory") == 1
    runtime = get_runtime(streamed)
    runtime.ops.bounce_chunk_bytes = 4096  # several chunks per layer, through both buffers
    assert hf_offload.summary(streamed)["unpinned_layers"] == list(range(LAYERS))
    batch = on_cuda(left_padded_batch(VOCAB))
    assert_same_step(reference, streamed, batch, seed=0)
    assert_same_step(reference, streamed, batch, seed=1)
    assert runtime.ops.staged_bytes >= hf_offload.stats(streamed)["bytes_to_device"] > 0
    assert all(b is not None and b.is_pinned() for b in runtime.ops._bounces)


# --- QLoRA: models loaded in 4/8 bits ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-qlora")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def load_quantized(path, bits: str):
    options = {
        "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        "8bit": dict(load_in_8bit=True),
    }[bits]
    if bits == "4bit":
        options["bnb_4bit_compute_dtype"] = torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.BitsAndBytesConfig(**options), device_map="cuda", dtype=torch.float32
    )
    for module in model.modules():  # bitsandbytes' CPU eval repacking (as in the CPU suite); a no-op on CUDA
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return with_lora(model)


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_model_eval_then_train_on_cuda(checkpoint, bits, prefetch):
    reference = load_quantized(checkpoint, bits)
    streamed = load_quantized(checkpoint, bits)
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cuda", prefetch=prefetch))
    batch = on_cuda(left_padded_batch(VOCAB, length=10))
    streamed.eval()
    with torch.inference_mode():
        streamed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert_same_step(reference, streamed, batch, seed=0)
    hf_offload.reset_stats(streamed)
    assert_same_step(reference, streamed, batch, seed=1)
    assert hf_offload.stats(streamed)["layer_loads"] == 2 * (LAYERS - prefetch - 1)
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
