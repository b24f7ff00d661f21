"""Mixture-of-Experts: exact training with the router aux loss, LoRA on experts, routed-expert fetch (engine/moe.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from families import instantiate
from moe_families import (
    CORE,
    FAMILIES,
    NO_AUX_LOSS,
    ROUTED,
    VOCAB,
    build,
    many_experts_model,
    record_expert_copies,
    with_expert_lora,
)
from parity import (
    GRAD_RTOL,
    LOSS_RTOL,
    assert_same_step,
    assert_step_matches,
    eval_logits,
    left_padded_batch,
    train_step,
)
from peft import PeftModel

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.engine import compat

MODES = ("all", "routed")


# Tiny models: intra-op threads only add overhead (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def streamed_copy(reference, base, family, **options):
    model = with_expert_lora(copy.deepcopy(base), family)
    model.load_state_dict(reference.state_dict())
    return hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", **options))


ALL = [f if f in CORE else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.mark.parametrize("family", ALL)
def test_streamed_moe_training_equals_ordinary_in_both_fetch_modes(family):
    base = build(family)
    batch = left_padded_batch(VOCAB)
    reference = with_expert_lora(copy.deepcopy(base), family)
    reference_step = train_step(reference, batch)
    reference_logits = eval_logits(reference, batch)
    trained = {n for n in reference_step[1] if ".experts." in n}
    if family in ROUTED:
        assert trained, "expert LoRA is not trained: the test would not cover it"
    if family not in NO_AUX_LOSS:
        with torch.no_grad():
            assert reference(**batch).aux_loss > 0

    for mode in MODES:
        streamed = streamed_copy(reference, base, family, expert_fetch=mode)
        hf_offload.reset_stats(streamed)
        assert_step_matches(reference_step, streamed, batch)
        torch.testing.assert_close(eval_logits(streamed, batch), reference_logits, rtol=1e-5, atol=1e-6)
        stats, summary = hf_offload.stats(streamed), hf_offload.summary(streamed)
        if family in ROUTED:
            assert summary["moe_layers"] > 0
            assert stats["experts_loaded"] > 0
            if mode == "all":
                assert stats["experts_skipped"] == 0
        else:  # experts hf_offload cannot route stream whole, in both modes
            assert summary["moe_layers"] == 0 and stats["experts_loaded"] == stats["experts_skipped"] == 0


def test_router_aux_loss_gradient_needs_the_recorded_router_logits(monkeypatch):
    """Proves the parity tests exercise the aux loss: router logits recorded under no_grad lose its gradient."""
    base = build("qwen3_moe")
    batch = left_padded_batch(VOCAB)
    reference = with_expert_lora(copy.deepcopy(base))
    reference_step = train_step(reference, batch)
    monkeypatch.setattr(compat, "recorded_output_keys", lambda: [])  # hooks record inside the no_grad forward
    streamed = streamed_copy(reference, base, None)
    with pytest.raises(AssertionError, match="relative gradient error"):
        assert_step_matches(reference_step, streamed, batch)


def test_sampling_router_needs_rng_replay():
    """PhiMoE's router samples in training: without RNG replay the recompute routes differently."""
    config_class, kwargs = FAMILIES["phimoe"]
    base = instantiate(config_class, dict(kwargs, attention_dropout=0.0, input_jitter_noise=0.0))
    batch = left_padded_batch(VOCAB)
    reference = with_expert_lora(copy.deepcopy(base), "phimoe")
    reference_step = train_step(reference, batch)
    assert_step_matches(reference_step, streamed_copy(reference, base, "phimoe"), batch)
    unreplayed = streamed_copy(reference, base, "phimoe", preserve_rng_state=False)
    with pytest.raises(AssertionError, match="relative gradient error"):
        assert_step_matches(reference_step, unreplayed, batch)


def test_routed_fetch_moves_only_routed_experts_with_64_experts():
    base = many_experts_model()
    batch = {k: v[:1, -4:] for k, v in left_padded_batch(VOCAB).items()}  # 4 tokens, top-2: at most 8 experts
    reference = with_expert_lora(copy.deepcopy(base))
    reference_step = train_step(reference, batch)
    results = {}
    for mode in MODES:
        streamed = streamed_copy(reference, base, None, expert_fetch=mode)
        copies = record_expert_copies(hf_offload.api.get_runtime(streamed).streamer)
        hf_offload.reset_stats(streamed)
        assert_step_matches(reference_step, streamed, batch)
        results[mode] = hf_offload.stats(streamed), copies

    layers = 4
    (stats_all, copies_all), (stats, copies) = results["all"], results["routed"]
    assert copies_all == [] and stats_all["experts_loaded"] == stats_all["layer_loads"] * 64
    fetches = (stats["experts_loaded"] + stats["experts_skipped"]) // 64
    assert (stats["experts_loaded"] + stats["experts_skipped"]) % 64 == 0
    assert fetches == stats["layer_loads"] == 2 * layers - 2  # turnaround: the last 2 layers are reused
    assert all(len(experts) <= 8 for _, _, experts in copies)
    assert stats["experts_loaded"] <= 8 * fetches
    # the backward reuses the forward's set: it is loaded with the layer, never completed on demand
    assert all(start == 0 for _, start, _ in copies)
    forward = {index: experts for index, _, experts in copies[:layers]}
    for index, _, experts in copies[layers:]:
        assert experts == forward[index]
    assert stats["bytes_to_device"] < stats_all["bytes_to_device"] / 2


def test_experts_that_were_not_loaded_are_never_read():
    """Fill the device slots with NaN bytes: a routed step must read only experts it loaded, so parity holds."""
    base = many_experts_model()
    batch = {k: v[:1, -4:] for k, v in left_padded_batch(VOCAB).items()}
    reference = with_expert_lora(copy.deepcopy(base))
    reference_step = train_step(reference, batch)
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        streamed = streamed_copy(reference, base, None)
        streamed.get_base_model().set_experts_implementation(implementation)
        train_step(streamed, batch)  # slots are allocated
        streamer = hf_offload.api.get_runtime(streamed).streamer
        for slot in streamer._slots:
            slot.buffer.fill_(0xFF)  # every float32 (and bf16) made of these bytes is NaN
        streamer.invalidate()  # the slots' bytes changed behind the streamer's back: nothing in them is loaded now
        assert_step_matches(reference_step, streamed, batch)


def test_expert_lora_saves_and_loads_like_ordinary_peft(tmp_path):
    base = build("mixtral")
    batch = left_padded_batch(VOCAB)
    model = hf_offload.enable_layer_streaming(with_expert_lora(copy.deepcopy(base)), OffloadConfig(device="cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_step(model, batch)
    optimizer.step()
    model.save_pretrained(tmp_path)
    logits = eval_logits(model, batch)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(eval_logits(loaded, batch), logits, rtol=1e-5, atol=1e-6)
    saved = {n: p for n, p in model.state_dict().items() if "lora" in n}
    assert any(".experts." in n for n in saved)
    for name, value in loaded.state_dict().items():
        if name in saved:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


def test_disable_restores_experts_modules():
    model = with_expert_lora(build("qwen3_moe"))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    entries = [layer.mlp.experts for layer in model.get_base_model().model.layers]
    assert all("forward" in e.__dict__ for e in entries)
    train_step(model, left_padded_batch(VOCAB))
    hf_offload.disable_layer_streaming(model)
    assert all("forward" not in e.__dict__ for e in entries)
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_generate_with_routed_experts_matches():
    base = build("qwen2_moe")
    reference = with_expert_lora(copy.deepcopy(base))
    streamed = streamed_copy(reference, base, None)
    reference.eval(), streamed.eval()
    batch = left_padded_batch(VOCAB)
    prompt = dict(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:])
    out_ref = reference.generate(**prompt, max_new_tokens=5, do_sample=False, output_router_logits=False)
    out_st = streamed.generate(**prompt, max_new_tokens=5, do_sample=False, output_router_logits=False)
    assert torch.equal(out_ref, out_st)


def test_routed_fetch_on_a_dense_model_is_a_no_op():
    from families import build as build_dense
    from parity import reference_and_streamed

    reference, streamed = reference_and_streamed(
        build_dense("llama"), OffloadConfig(device="cpu", expert_fetch="routed")
    )
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    assert hf_offload.summary(streamed)["moe_layers"] == 0
    stats = hf_offload.stats(streamed)
    assert stats["experts_loaded"] == stats["experts_skipped"] == 0


def test_load_experts_appends_within_one_acquisition():
    """A second, different expert request while the layer is in use keeps the first views valid."""
    model = with_expert_lora(build("olmoe"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", prefetch=0))
    runtime = hf_offload.api.get_runtime(model)
    streamer, pack = runtime.streamer, runtime.store.packs[0]
    region = pack.experts[0]
    host = [t.view_in(pack.host) for t in region.tensors]
    streamer.acquire(0, +1)
    order, views = streamer.load_experts(0, 0, [5, 1])
    first = [v.clone() for v in views]
    order2, views2 = streamer.load_experts(0, 0, [1, 6, 2])
    streamer.release(0)
    assert order == [1, 5] and order2 == [1, 5, 2, 6]
    for h, v, v2, f in zip(host, views, views2, first):
        torch.testing.assert_close(v, f, rtol=0, atol=0)
        torch.testing.assert_close(v2, h[order2], rtol=0, atol=0)


def test_bad_expert_fetch_is_refused():
    with pytest.raises(ValueError, match="`expert_fetch` should be one of 'routed', 'all'"):
        OffloadConfig(expert_fetch="some")


def test_experts_that_cannot_be_routed_stream_whole_with_a_warning(caplog):
    model = with_expert_lora(build("dbrx"), "dbrx")
    with caplog.at_level("WARNING", logger="hf_offload"):
        hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    assert "DbrxExperts in layers 0, 1, 2, 3: its expert weights are not direct parameters" in caplog.text
    assert hf_offload.summary(model)["moe_layers"] == 0


def test_quantized_store_and_routed_fetch_compose():
    """nf4 base weights with routed experts: the same step as nf4 with whole-layer fetch, fewer bytes."""
    from parity import with_lora

    base = build("qwen3_moe")
    base.config.output_router_logits = True
    results = {}
    for mode in ("routed", "all"):
        model = with_lora(copy.deepcopy(base), lora_dropout=0.0)
        config = OffloadConfig(device="cpu", base_weight_dtype="nf4", expert_fetch=mode, check_host_memory=False)
        hf_offload.enable_layer_streaming(model, config)
        assert hf_offload.summary(model)["quantized_weights"] > 0
        results[mode] = (*train_step(model, left_padded_batch(VOCAB)), hf_offload.stats(model))
    (loss_r, grads_r, stats_r), (loss_a, grads_a, stats_a) = results["routed"], results["all"]
    torch.testing.assert_close(loss_r, loss_a, rtol=LOSS_RTOL, atol=0)
    for name, grad in grads_a.items():
        assert (grads_r[name] - grad).norm() <= GRAD_RTOL * grad.norm(), name
    assert stats_r["bytes_to_device"] <= stats_a["bytes_to_device"]
    assert stats_r["experts_loaded"] + stats_r["experts_skipped"] == stats_a["experts_loaded"]
