"""The CUDA path of `offload_activations`: copies on their own streams, exact-size page-locked host buffers, the
saved boundary states off the device between forward and backward.

Run on a machine with a GPU: `python -m pytest -q -m gpu tests/gpu/test_cuda_offloaded_activations.py`.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
from test_cuda_streaming import _fresh, batch, llama, lora, release, step, streamed

import hf_offload
from hf_offload.api import get_runtime
from hf_offload.commands.bench.measure import chrome_trace
from hf_offload.commands.bench.models import build_model

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_offloaded_step_matches_the_resident_and_the_streamed_step(prefetch):
    """fp32, two steps (the second reuses the host buffers)."""
    config = llama(layers=6)
    reference = lora(build_model(config, torch.float32, "cpu")).to("cuda")
    plain = streamed(config, torch.float32, prefetch=prefetch)
    offloaded = streamed(config, torch.float32, prefetch=prefetch, offload_activations=True)
    inputs = batch(config.vocab_size, rows=2, length=256)
    boundary = inputs["input_ids"].numel() * config.hidden_size * 4
    for seed in (0, 1):
        hf_offload.reset_stats(offloaded)
        loss_ref, grads_ref = step(reference, inputs, seed)
        loss_plain, grads_plain = step(plain, inputs, seed)
        loss_off, grads_off = step(offloaded, inputs, seed)
        torch.testing.assert_close(loss_off, loss_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(loss_off, loss_plain, rtol=1e-6, atol=0)
        for name, g_ref in grads_ref.items():
            rel = ((grads_off[name] - g_ref).norm() / g_ref.norm()).item()
            assert rel <= 1e-4, f"{name}: relative gradient error {rel:.2e} against the resident step"
            rel = ((grads_off[name] - grads_plain[name]).norm() / g_ref.norm()).item()
            assert rel <= 1e-6, f"{name}: relative gradient error {rel:.2e} against the streamed step"
        stats = hf_offload.stats(offloaded)
        assert stats["bytes_to_host"] == stats["bytes_from_host_activations"] == 6 * boundary
    release(reference, plain, offloaded)


def test_host_buffers_are_exact_size_page_locked_and_reused():
    config = llama(layers=4)
    model = streamed(config, torch.bfloat16, offload_activations=True)
    activations = get_runtime(model).activations
    inputs = batch(config.vocab_size, rows=2, length=512)
    boundary = inputs["input_ids"].numel() * config.hidden_size * 2
    step(model, inputs)
    torch.cuda.synchronize()
    buffers = [buffer for buffer, _ in activations._free]
    assert len(buffers) == 4 and all(b.numel() == boundary for b in buffers), [b.numel() for b in buffers]
    assert all(b.is_pinned() for b in buffers), "page-locked through DeviceOps.pin: copies are asynchronous"
    assert all(b.data_ptr() in get_runtime(model).ops._registered for b in buffers)
    step(model, inputs)
    torch.cuda.synchronize()
    assert sorted(b.data_ptr() for b, _ in activations._free) == sorted(b.data_ptr() for b in buffers)
    assert activations.buffer_bytes == 4 * boundary and activations.unpinned_buffers == 0
    release(model)


def test_offloading_takes_the_saved_boundary_states_off_the_device():
    """8 layers, 32k tokens, hidden 2048 in bf16: 128 MiB per boundary state. Kept, all 8 are on the device when the
    backward starts; offloaded, at most the prefetched ones and the one being recomputed."""
    config = llama(layers=8, hidden=2048, intermediate=4096, heads=16, vocab=1024)
    config.max_position_embeddings = 32768
    inputs = batch(config.vocab_size, rows=1, length=32768)
    boundary = 32768 * 2048 * 2
    peaks = {}
    for offload in (False, True):
        model = streamed(config, torch.bfloat16, offload_activations=offload)
        step(model, inputs)  # warm-up: slots, buffers
        _fresh()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, inputs)
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated() - before
        release(model)
    saved = peaks[False] - peaks[True]
    assert saved >= 0.5 * (8 - 3) * boundary, {k: v / MiB for k, v in peaks.items()}


def test_device_to_host_copies_run_beside_the_compute_stream():
    """The profiled step: one device->host copy per layer, from the offload stream, into page-locked memory."""
    config = llama(layers=6, hidden=2048, intermediate=8192, heads=16, vocab=4096)
    model = streamed(config, torch.bfloat16, offload_activations=True)
    inputs = batch(config.vocab_size, rows=2, length=4096)
    boundary = inputs["input_ids"].numel() * config.hidden_size * 2
    step(model, inputs)  # warm-up
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        step(model, inputs)
        torch.cuda.synchronize()
    release(model)
    trace = chrome_trace(profiler)
    out = [
        e
        for e in trace["traceEvents"]
        if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "") and e.get("args", {}).get("bytes") == boundary
    ]
    assert len(out) == 6, [(e["name"], e["args"]) for e in out]
    assert all("Pinned" in e["name"] for e in out), {e["name"] for e in out}
    kernels = collections.Counter(e["args"].get("stream") for e in trace["traceEvents"] if e.get("cat") == "kernel")
    compute_stream = kernels.most_common(1)[0][0]
    streams = {e["args"].get("stream") for e in out}
    assert len(streams) == 1 and compute_stream not in streams, (streams, kernels)
    back = [
        e
        for e in trace["traceEvents"]
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "") and e.get("args", {}).get("bytes") == boundary
    ]
    assert len(back) == 6 and all("Pinned" in e["name"] for e in back)


def test_bench_sweep_over_sequence_lengths_on_cuda(capsys):
    """The long-context rows on a small model: peak GPU memory and tokens/s at each length, for every method."""
    from hf_offload.commands import cli

    methods = "resident-checkpointed,hf_offload,hf_offload-activations"
    argv = ["bench", "--device", "cuda", "--preset", "small", "--seq_lens", "2k,8k", "--steps", "1", "--warmup", "1"]
    assert cli.main([*argv, "--methods", methods, "--no_profile", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {(row["seq"], row["method"]): row for row in doc["rows"]}
    assert set(rows) == {(seq, m) for seq in (2048, 8192) for m in methods.split(",")}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row)
        assert row["peak_gpu_bytes"] > 0 and row["tokens_per_s"] > 0, key
    assert rows[8192, "hf_offload-activations"]["extra"]["stats"]["bytes_to_host"] > 0
    assert any("(page-locked)" in note for note in rows[8192, "hf_offload-activations"]["notes"])
    assert rows[8192, "hf_offload-activations"]["peak_gpu_bytes"] <= rows[8192, "hf_offload"]["peak_gpu_bytes"]
