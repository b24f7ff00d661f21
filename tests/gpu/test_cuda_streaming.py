"""The CUDA path of the engine: bf16 parity with resident training, the memory formula, asynchronous copies.

Run on a machine with a GPU: `python -m pytest -q -m gpu tests/gpu`. Models are small Llama configs built in the
test with random weights (no downloads); each test takes seconds on an H100.
"""

from __future__ import annotations

import gc
import json
import time

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.commands.bench.measure import chrome_trace, overlap_from_trace
from hf_offload.commands.bench.models import build_model

pytestmark = pytest.mark.gpu

MiB = 1 << 20


def llama(layers: int, hidden: int = 256, intermediate: int = 512, heads: int = 4, vocab: int = 512, **extra):
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=vocab,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        use_cache=False,
        **extra,
    )


def lora(model, dropout: float = 0.0):
    """LoRA on all linear layers; B non-zero so that every adapter gets a gradient."""
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


def batch(vocab: int, rows: int, length: int, device="cuda") -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def step(model, inputs: dict, seed: int = 0):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # seeds every CUDA generator too: dropout masks are drawn alike in both models
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def streamed(config, dtype, prefetch: int = 1, dropout: float = 0.0, **options):
    model = lora(build_model(config, dtype, "cpu"), dropout)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cuda", prefetch=prefetch, **options))
    return model


def release(*models) -> None:
    for model in models:
        if hf_offload.is_streaming(model):
            hf_offload.disable_layer_streaming(model)
    del models
    gc.collect()
    torch.cuda.empty_cache()


# --- parity -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, loss_rtol, grad_rtol",
    [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 2e-2)],
    ids=["fp32", "bf16"],
)
@pytest.mark.parametrize("dropout", ["none", "lora", "attention"])
def test_streamed_step_matches_resident_step(dtype, loss_rtol, grad_rtol, dropout):
    """Same weights, adapters, batch and seed: the streamed step equals the resident one (within dtype tolerance).

    The dropout cases check that the CUDA RNG state is replayed in the recompute (masks drawn on the device).
    """
    config = llama(layers=6, attention_dropout=0.1 if dropout == "attention" else 0.0)
    lora_dropout = 0.1 if dropout == "lora" else 0.0
    reference = lora(build_model(config, dtype, "cpu"), lora_dropout).to("cuda")
    model = streamed(config, dtype, dropout=lora_dropout)
    inputs = batch(config.vocab_size, rows=2, length=128)

    loss_ref, grads_ref = step(reference, inputs)
    loss_st, grads_st = step(model, inputs)
    assert torch.isfinite(loss_ref)
    torch.testing.assert_close(loss_st, loss_ref, rtol=loss_rtol, atol=0)
    assert grads_ref.keys() == grads_st.keys() and grads_ref
    for name, g_ref in grads_ref.items():
        assert g_ref.norm() > 0, f"{name}: zero reference gradient, the comparison would prove nothing"
        rel = ((grads_st[name] - g_ref).norm() / g_ref.norm()).item()
        assert rel <= grad_rtol, f"{name}: relative gradient error {rel:.2e} (dtype {dtype}, dropout {dropout})"

    reference.eval()
    model.eval()
    with torch.no_grad():
        logits_ref = reference(input_ids=inputs["input_ids"]).logits.float()
        logits_st = model(input_ids=inputs["input_ids"]).logits.float()
    rel = ((logits_st - logits_ref).norm() / logits_ref.norm()).item()
    assert rel <= loss_rtol, f"eval logits differ: relative error {rel:.2e}"
    stats = hf_offload.stats(model)
    assert stats["peak_resident_layers"] <= 2
    release(reference, model)


# --- memory -----------------------------------------------------------------------------------------------------------
WIDE = dict(hidden=1024, intermediate=4096, heads=16, vocab=1024)  # ~30 MB per layer in bf16
ROWS, LENGTH = 2, 512


def _fresh() -> None:
    """Collect models of earlier measurements (streamed models hold reference cycles) before measuring."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()


def _trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _measured_step(model, inputs, optimizer) -> tuple[int, int]:
    """Memory allocated before a (second, steady-state) training step, and the peak during it."""
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return before, torch.cuda.max_memory_allocated()


def _streamed_peak(layers: int, prefetch: int = 1):
    """Memory before and peak during a steady-state streamed step, the runtime's summary, stats, adapter bytes."""
    _fresh()
    model = streamed(llama(layers=layers, **WIDE), torch.bfloat16, prefetch=prefetch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = batch(WIDE["vocab"], ROWS, LENGTH)
    before, peak = _measured_step(model, inputs, optimizer)
    summary, stats, trainable = hf_offload.summary(model), hf_offload.stats(model), _trainable_bytes(model)
    summary["allocated_slot_bytes"] = get_runtime(model).streamer.slot_bytes  # what the streamer really holds
    release(model)
    return before, peak, summary, stats, trainable


def _one_layer_transient() -> int:
    """Activation memory of an ordinary resident step of a one-layer model of the same widths and batch.

    It bounds "one layer's recompute activations" of the formula, together with the head's logits and loss,
    which the formula leaves out and which are the same for a streamed model.
    """
    _fresh()
    model = lora(build_model(llama(layers=1, **WIDE), torch.bfloat16, "cpu")).to("cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before, peak = _measured_step(model, batch(WIDE["vocab"], ROWS, LENGTH), optimizer)
    release(model)
    return peak - before


@pytest.mark.parametrize("prefetch", [1, 2])
def test_peak_memory_is_within_the_design_formula(prefetch):
    """The memory model: (prefetch+1) x largest layer + resident modules + boundary activations + one layer's recompute.

    "Resident modules" here include the LoRA adapters, their optimizer state and, during backward, their grads.
    Stated slack: 10% + 64 MiB (allocator rounding, the incoming gradient of the hidden state, cuBLAS workspace).
    """
    layers = 12
    transient = _one_layer_transient()
    before, peak, summary, stats, trainable = _streamed_peak(layers, prefetch)
    assert summary["layers"] == layers and stats["peak_resident_layers"] <= prefetch + 1
    slots = summary["allocated_slot_bytes"]
    assert slots == (prefetch + 1) * summary["max_layer_bytes"]  # prefetch + 1 slots, each one layer large
    resident = before - slots + trainable  # embeddings, norm, head; adapters, their optimizer state and grads
    boundary = layers * ROWS * LENGTH * WIDE["hidden"] * 2  # bf16 hidden state saved per layer
    formula = slots + resident + boundary + transient
    assert peak <= formula * 1.10 + 64 * MiB, (
        f"peak {peak / MiB:.0f} MiB > formula {formula / MiB:.0f} MiB (slots {slots / MiB:.0f}, resident "
        f"{resident / MiB:.0f}, boundary {boundary / MiB:.0f}, one layer + head {transient / MiB:.0f})"
    )
    # and the model itself (all layers) would not have fitted in that budget: the test means something
    assert summary["host_store_bytes"] > 3 * slots


def test_peak_memory_does_not_grow_with_depth_but_for_boundary_states():
    """Six more layers add their boundary states (and their adapters' grads) to a step's memory, not their weights."""
    before_6, peak_6, summary_6, _, trainable_6 = _streamed_peak(layers=6)
    before_12, peak_12, summary_12, _, trainable_12 = _streamed_peak(layers=12)
    extra_weights = summary_12["host_store_bytes"] - summary_6["host_store_bytes"]
    extra_boundary = 6 * ROWS * LENGTH * WIDE["hidden"] * 2
    extra_grads = trainable_12 - trainable_6
    growth = (peak_12 - before_12) - (peak_6 - before_6)
    assert growth <= 1.5 * extra_boundary + extra_grads + 8 * MiB, (
        f"6 more layers grew the step's memory by {growth / MiB:.1f} MiB; boundary states account for "
        f"{extra_boundary / MiB:.1f} MiB and adapter grads for {extra_grads / MiB:.1f} MiB (their weights: "
        f"{extra_weights / MiB:.0f} MiB, which must stay on the host)"
    )
    assert extra_weights > 4 * (1.5 * extra_boundary + extra_grads + 8 * MiB)  # the check can tell them apart
    assert before_12 - before_6 <= 4 * extra_grads  # only adapters and their optimizer state stay resident


# --- the copy path ----------------------------------------------------------------------------------------------------
def test_host_store_is_page_locked_and_copies_return_before_they_finish():
    model = streamed(llama(layers=4, hidden=2048, intermediate=8192, heads=16, vocab=1024), torch.bfloat16)
    runtime = get_runtime(model)
    assert runtime.summary()["pinned"]
    for pack in runtime.store.packs:
        assert pack.pinned and pack.host.is_pinned(), f"layer {pack.index}: host buffer not page-locked"
        # is_pinned() looks at the storage's start: the registration must start there
        assert pack.host.untyped_storage().data_ptr() == pack.host.data_ptr()
    streamer = runtime.streamer
    nbytes = runtime.store.max_layer_bytes

    # device time of one layer's copy, measured plainly
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    target.copy_(runtime.store.packs[0].host, non_blocking=True)
    start.record()
    target.copy_(runtime.store.packs[0].host, non_blocking=True)
    end.record()
    end.synchronize()
    copy_s = start.elapsed_time(end) / 1e3

    streamer.acquire(0, +1)  # allocates the slots (layers 0 and 1)
    streamer.release(0)
    torch.cuda.synchronize()
    # acquiring layer 2 loads it and prefetches layer 3: two copies enqueued, the host must not wait for either
    torch.cuda._sleep(100_000_000)  # keep the compute stream busy, so a hidden host sync would show
    began = time.perf_counter()
    streamer.acquire(2, +1)
    host_s = time.perf_counter() - began
    streamer.release(2)
    torch.cuda.synchronize()
    assert hf_offload.stats(model)["layer_loads"] == 4
    assert host_s < copy_s, f"acquire blocked the host for {host_s * 1e3:.2f} ms (one copy: {copy_s * 1e3:.2f} ms)"
    del target
    release(model)


def test_host_store_is_unregistered_when_the_model_is_collected():
    model = streamed(llama(layers=2), torch.bfloat16)
    finalizers = list(get_runtime(model).ops._registered.values())
    assert finalizers and all(f.alive for f in finalizers)
    del model
    gc.collect()
    assert not any(f.alive for f in finalizers), "page-locked host memory outlived its model"


@pytest.mark.parametrize("offload_activations", [False, True])
def test_streamed_layers_never_synchronize_the_host(offload_activations):
    """The hot loop (acquire, copy, bind, forward, recompute, backprop, release) runs without a host sync.

    Layers are called directly (embeddings and rotary tables computed before), so that syncs the model's own
    code may do elsewhere do not hide or fake the engine's.
    """
    config = llama(layers=4, **WIDE)
    model = streamed(config, torch.bfloat16, offload_activations=offload_activations)
    runtime = get_runtime(model)
    inner = model.get_base_model().model
    ids = batch(config.vocab_size, ROWS, LENGTH)["input_ids"]
    positions = torch.arange(LENGTH, device="cuda")[None]

    def layers_step():
        hidden = inner.embed_tokens(ids)
        rotary = inner.rotary_emb(hidden, positions)
        for layer in runtime.anatomy.layers:
            hidden = layer(hidden, position_embeddings=rotary, position_ids=positions)
        hidden.float().square().mean().backward()

    layers_step()  # warm-up: slots, cuBLAS handles and workspaces, pinned activation buffers
    slots = [s.buffer.data_ptr() for s in runtime.streamer._slots]
    hf_offload.reset_stats(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layers_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    stats = hf_offload.stats(model)
    # forward 2: the first two layers are still in the slots the warm-up's backward left (the host weights did not
    # change); backward 2: the last two are reused at the turnaround
    assert stats["layer_loads"] == 2 * (4 - 2)
    assert [s.buffer.data_ptr() for s in runtime.streamer._slots] == slots  # slots reused, never reallocated
    release(model)


def test_one_pinned_copy_per_layer_overlapping_compute():
    """Profile one training step: every layer load is one host->device copy from page-locked memory, the layer's
    full size, and most copy time runs while kernels compute (compute-heavy batch: 16k tokens)."""
    config = llama(layers=6, hidden=2048, intermediate=8192, heads=16, vocab=4096)
    model = streamed(config, torch.bfloat16)
    inputs = batch(config.vocab_size, rows=4, length=4096)
    model(**inputs).loss.backward()  # warm-up
    torch.cuda.synchronize()
    hf_offload.reset_stats(model)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        model(**inputs).loss.backward()
        torch.cuda.synchronize()
    stats = hf_offload.stats(model)
    layer_bytes = get_runtime(model).store.max_layer_bytes
    release(model)
    trace = chrome_trace(profiler)
    copies = [
        e
        for e in trace["traceEvents"]
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "") and e.get("args", {}).get("bytes", 0) >= MiB
    ]
    kinds = sorted({e.get("cat") for e in trace["traceEvents"] if "cat" in e})
    assert copies, f"no large host->device copies in the trace (categories seen: {kinds})"
    assert all("Pinned" in e["name"] for e in copies), {e["name"] for e in copies}
    assert len(copies) == stats["layer_loads"], (len(copies), stats)
    assert all(e["args"]["bytes"] == layer_bytes for e in copies)
    overlap = overlap_from_trace(trace)
    assert overlap.copy_hidden_share >= 0.5, vars(overlap)


def test_bench_runs_on_cuda(capsys):
    """The bench's CUDA columns: pinned peak, H2D GB/s, overlap and peak GPU memory, on the tiny preset."""
    from hf_offload.commands import cli

    methods = "resident,resident-checkpointed,hf_offload,accelerate-cpu-offload"
    argv = ["bench", "--device", "cuda", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--methods", methods]
    assert cli.main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["h2d_peak_gbps"] > 1
    rows = {r["method"]: r for r in doc["rows"]}
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["peak_gpu_bytes"] > 0 and row["gpu_busy_share"] is not None, name
    ours = rows["hf_offload"]
    assert ours["h2d_gbps"] > 0 and ours["copy_overlap_share"] is not None
    assert "hf_offload/resident step time" in doc["ratios"]


@pytest.mark.gpu
def test_shared_read_only_store_is_page_locked_and_streams_exactly(tmp_path, monkeypatch):
    """The node's shared store is a read-only file mapping: it is registered read-only and copies stay asynchronous."""
    import copy

    from families import build
    from peft import LoraConfig, get_peft_model

    import hf_offload
    from hf_offload import OffloadConfig
    from hf_offload.engine import shared_store

    monkeypatch.setattr(shared_store, "ROOT", str(tmp_path))
    torch.manual_seed(0)
    reference = get_peft_model(build("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model = copy.deepcopy(reference)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cuda", shared_host_store=True))
    assert hf_offload.summary(model).pinned and hf_offload.summary(model).unpinned_layers == []
    reference.to("cuda")
    ids = torch.randint(3, 90, (2, 8), device="cuda")
    model.eval(), reference.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
