"""The CUDA path of the chunked loss and the tiled MLP: parity with a resident step, and the logits never on the GPU.

Run on a machine with a GPU: `python -m pytest -q -m gpu tests/gpu/test_cuda_long_context.py`.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_streaming import _fresh, batch, llama, lora, release, step, streamed

from hf_offload.api import get_runtime
from hf_offload.commands.bench.models import build_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dropout", ["none", "lora", "attention"])
def test_chunked_loss_and_tiled_mlp_match_a_resident_step(dropout):
    """fp32; LoRA dropout makes the MLPs draw random numbers: the CUDA generator is rewound and they compute whole."""
    config = llama(layers=4, attention_dropout=0.1 if dropout == "attention" else 0.0)
    lora_dropout = 0.1 if dropout == "lora" else 0.0
    reference = lora(build_model(config, torch.float32, "cpu"), lora_dropout).to("cuda")
    model = streamed(config, torch.float32, dropout=lora_dropout, loss_chunk_tokens=48, mlp_tile_tokens=64)
    inputs = batch(config.vocab_size, rows=2, length=128)

    loss_ref, grads_ref = step(reference, inputs)
    loss_st, grads_st = step(model, inputs)
    torch.testing.assert_close(loss_st, loss_ref, rtol=1e-5, atol=0)
    for name, g_ref in grads_ref.items():
        rel = ((grads_st[name] - g_ref).norm() / g_ref.norm()).item()
        assert rel <= 1e-4, f"{name}: relative gradient error {rel:.2e}"
    engine = get_runtime(model)
    assert engine.chunked_loss.chunked_forwards == 1
    if dropout == "lora":
        assert engine.tiled_mlps.tiled_calls == 0 and engine.tiled_mlps.whole_calls == 2 * 4
    else:
        assert engine.tiled_mlps.tiled_calls == 2 * 4
    release(reference, model)


@pytest.mark.parametrize("chunked", [True, False])
def test_a_long_sequence_never_holds_its_logits(chunked):
    """16k tokens x 32k vocabulary: the float32 logits alone are 2 GiB. Chunked, the step's peak stays well below."""
    config = llama(layers=2, hidden=256, intermediate=1024, vocab=32000)
    config.max_position_embeddings = 16384
    model = streamed(config, torch.bfloat16, chunked_loss=chunked)
    inputs = batch(config.vocab_size, rows=1, length=16384)
    logits_bytes = 16384 * 32000 * 4
    _fresh()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - before
    if chunked:
        assert growth < 0.5 * logits_bytes, f"peak growth {growth / 2**20:.0f} MiB"
    else:  # the measurement sees the logits when they exist
        assert growth > logits_bytes, f"peak growth {growth / 2**20:.0f} MiB"
    release(model)
