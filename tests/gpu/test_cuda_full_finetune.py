"""The CUDA path of full fine-tuning: gradients copied back on their own stream, fp32 masters, HostAdamW.

Run on a machine with a GPU: `python -m pytest -q -m gpu tests/gpu`. Small Llama configs with random weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine.host_optimizer import HostAdamW

pytestmark = pytest.mark.gpu


def _model(dtype):
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=512,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _batch(rows=2, length=64):
    ids = torch.randint(0, 512, (rows, length), generator=torch.Generator().manual_seed(1)).cuda()
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_fp32_streamed_full_finetune_on_cuda_equals_resident_training():
    """Gradients (copied device->host on their own stream) and weights after AdamW steps, against the model resident
    on the GPU; fp32, tolerance for kernel-order differences between the two runs."""
    base = _model(torch.float32)
    reference = copy.deepcopy(base).cuda()
    streamed = hf_offload.enable_layer_streaming(copy.deepcopy(base), OffloadConfig(device="cuda", full_finetune=True))
    assert streamed.model.layers[0].mlp.up_proj.weight.device.type == "cpu"  # the master stays on the host
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    opt = HostAdamW(streamed.parameters(), lr=1e-3, step_during_backward=lambda: True)
    batch = _batch()
    for _ in range(3):
        for model in (reference, streamed):
            model.train()
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for (name, p), (_, q) in zip(streamed.named_parameters(), reference.named_parameters(), strict=True):
            rel = float((p.grad.cuda() - q.grad).norm() / q.grad.norm())
            assert rel < 1e-4, f"{name}: gradient relative error {rel:.2e}"
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    for (name, p), (_, q) in zip(streamed.named_parameters(), reference.named_parameters(), strict=True):
        rel = float((p.detach().cuda() - q.detach()).norm() / q.detach().norm())
        assert rel < 1e-4, f"{name}: weight relative error {rel:.2e}"
    assert get_runtime(streamed).trainable.grad_bytes_to_host > 0
    opt.close()


def test_bf16_model_streams_bf16_and_trains_fp32_masters_on_cuda():
    model = hf_offload.enable_layer_streaming(_model(torch.bfloat16), OffloadConfig(device="cuda", full_finetune=True))
    weight = model.model.layers[2].self_attn.q_proj.weight
    assert weight.dtype == torch.float32 and weight.device.type == "cpu"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = weight.detach().clone()
    losses = []
    for _ in range(3):
        loss = model(**_batch()).loss
        loss.backward()
        assert weight.grad.dtype == torch.float32 and weight.grad.device.type == "cpu"
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert not torch.equal(weight.detach(), before)
    assert losses[-1] < losses[0]
