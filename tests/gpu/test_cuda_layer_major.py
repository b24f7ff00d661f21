"""Layer-major evaluation on CUDA: hidden states on the device or parked in host memory, outputs as batch by batch.

Run on a machine with a GPU: `python -m pytest -q -m gpu tests/gpu/test_cuda_layer_major.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_cuda_streaming import batch, llama, lora

import hf_offload
from hf_offload import OffloadConfig, evaluate_layer_major
from hf_offload.api import get_runtime
from hf_offload.commands.bench.models import build_model
from hf_offload.engine.layer_major import LayerMajorSchedule

pytestmark = pytest.mark.gpu


def test_layer_major_on_cuda_parks_hidden_states_and_matches_batch_by_batch():
    config = llama(layers=6)
    base = build_model(config, torch.bfloat16, "cpu")
    resident = lora(copy.deepcopy(base)).to("cuda").eval()
    streamed = lora(copy.deepcopy(base))
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cuda", show_progress=False))
    streamed.eval()
    batches = [batch(config.vocab_size, 2, 64 + 16 * k) for k in range(4)]
    for b in batches:
        b["input_ids"] = b["input_ids"].roll(len(b["input_ids"][0]) // 3, dims=1)  # different rows per batch
        b["labels"] = b["input_ids"]

    with torch.no_grad():
        expected = [resident(**b) for b in batches]
        hf_offload.reset_stats(streamed)
        by_batch = [streamed(**b) for b in batches]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the workers compute on the caller's stream
        hf_offload.reset_stats(streamed)
        outputs = list(evaluate_layer_major(streamed, batches))
    torch.cuda.synchronize()
    stats = hf_offload.stats(streamed)

    assert stats["layer_loads"] == config.num_hidden_layers
    assert stats["bytes_to_host"] == stats["bytes_from_host_activations"] == 0  # small states stay on the device

    # parked in page-locked host memory between layers (what happens when they do not fit)
    schedule = LayerMajorSchedule(get_runtime(streamed), park=True)
    hf_offload.reset_stats(streamed)
    with torch.no_grad():
        parked = schedule.run([lambda b=b: streamed(**b) for b in batches])
    torch.cuda.synchronize()
    stats = hf_offload.stats(streamed)
    hidden_bytes = sum(b["input_ids"].numel() for b in batches) * config.hidden_size * 2
    assert stats["bytes_to_host"] == stats["bytes_from_host_activations"] == config.num_hidden_layers * hidden_bytes
    assert stats["layer_loads"] == config.num_hidden_layers
    for got, alone in zip(parked, by_batch):
        assert torch.equal(got.logits, alone.logits)

    for got, alone, want in zip(outputs, by_batch, expected):
        assert torch.equal(got.logits, alone.logits)  # the same kernels on the same inputs
        torch.testing.assert_close(got.loss, want.loss, rtol=2e-2, atol=2e-2)
        assert got.logits.device.type == "cuda"
