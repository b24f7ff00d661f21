"""Full fine-tuning with streamed layers == ordinary full fine-tuning (fp32, CPU, dropout on, every weight trained).

Loss, the gradient of every parameter and, after several AdamW steps with gradient accumulation, every weight.
"""

from __future__ import annotations

import copy

import families
import moe_families
import pytest
import torch
from parity import LOSS_RTOL, left_padded_batch

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHT_RTOL = 1e-5
GRAD_RTOL = 1e-5
DENSE = ["llama", "qwen3", "gemma2", "phi3", "gpt2", "falcon"]
MOE = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe", "gpt_oss"]


def full_config(**overrides) -> OffloadConfig:
    return OffloadConfig(device="cpu", full_finetune=True, **overrides)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.norm()
    return float((a - b).norm() / scale) if scale > 0 else float((a - b).norm())


def _assert_close(found: dict, expected: dict, rtol: float, what: str) -> None:
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert found[name] is None, f"{name}: a {what} where the ordinary model has none"
            continue
        assert found[name] is not None, f"{name}: no {what}"
        assert found[name].dtype == value.dtype and found[name].shape == value.shape, name
        rel = _rel(found[name], value)
        assert rel <= rtol, f"{name}: relative {what} error {rel:.2e}"


def _grads(model) -> dict:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model, batches, steps: int, accumulation: int, seed: int = 0, check=None):
    """AdamW over every parameter, `accumulation` micro-batches per step; returns the losses, calls `check`."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulation):
            torch.manual_seed(seed + 100 * step + micro)
            out = model(**batches[(step * accumulation + micro) % len(batches)])
            loss = out.loss / accumulation
            loss.backward()
            losses.append(float(out.loss.detach()))
        if check is not None:
            check(step, model)
        optimizer.step()
    return losses


def assert_trains_like_ordinary(
    base, steps: int = 3, accumulation: int = 2, vocab: int = families.VOCAB, batches=None, **cfg
):
    reference = copy.deepcopy(base)
    streamed = copy.deepcopy(base)
    hf_offload.enable_layer_streaming(streamed, full_config(**cfg))
    batches = batches or [left_padded_batch(vocab, seed=s) for s in (7, 8, 9)]

    ref_grads = []
    ref_losses = train(reference, batches, steps, accumulation, check=lambda step, m: ref_grads.append(_grads(m)))

    def check(step, model):
        expected = ref_grads[step]
        assert any(g is not None and g.abs().sum() > 0 for g in expected.values())
        _assert_close(_grads(model), expected, GRAD_RTOL, "gradient")

    losses = train(streamed, batches, steps, accumulation, check=check)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0)
    _assert_close(_weights(streamed), _weights(reference), WEIGHT_RTOL, "weight")
    # The weights moved: the test would prove nothing if training left them where they started.
    start, trainable = _weights(base), {n for n, p in base.named_parameters() if p.requires_grad}
    layers = hf_offload.summary(streamed).layer_path + "."
    trained = [n for n in _weights(reference) if n.startswith(layers) and n in trainable]
    moved = [not torch.equal(_weights(reference)[n], start[n]) for n in trained]
    assert moved and all(moved)
    return reference, streamed


@pytest.mark.parametrize("family", DENSE)
def test_full_finetune_trains_exactly_like_ordinary(family):
    reference, streamed = assert_trains_like_ordinary(families.build(family))
    # Every decoder weight streamed: none of them sits on the device between steps (here: it is the host store).
    runtime = get_runtime(streamed)
    assert runtime.trainable is not None and sum(map(len, runtime.trainable.layers)) > 0
    assert hf_offload.stats(streamed)["peak_resident_layers"] <= 2


def _few_token_batches() -> list[dict]:
    """Batches of 3 tokens: top-2 routing reaches at most 6 of the 8 experts of a layer, so routed fetch skips some."""
    return [left_padded_batch(moe_families.VOCAB, batch=1, length=3, seed=s) for s in (7, 8, 9)]


@pytest.mark.parametrize("fetch", ["all", "routed"])
@pytest.mark.parametrize("family", MOE)
def test_full_finetune_moe_experts_and_routers_train_exactly(family, fetch):
    """Every weight trains, dropout on. Routed fetch: the loaded experts' gradients come back as rows and are added
    into those rows of `.grad`; the unrouted experts' rows stay exactly zero, as in the ordinary step."""
    base = moe_families.build(family)
    batches = _few_token_batches() if fetch == "routed" else None
    reference, streamed = assert_trains_like_ordinary(
        base, steps=2, vocab=moe_families.VOCAB, batches=batches, expert_fetch=fetch
    )
    stats = hf_offload.stats(streamed)
    assert stats["experts_loaded"] > 0
    if fetch == "all":
        assert stats["experts_skipped"] == 0
    else:
        assert stats["experts_skipped"] > 0
    names = [n for n, _ in streamed.named_parameters() if "expert" in n]
    assert names, "no expert weights in this family"
    if family not in moe_families.NO_AUX_LOSS:
        reference.train()
        torch.manual_seed(0)
        batch = left_padded_batch(moe_families.VOCAB)
        torch.manual_seed(0)
        aux_ref = reference(**batch).aux_loss
        torch.manual_seed(0)
        aux = streamed(**batch).aux_loss
        assert aux_ref > 0
        torch.testing.assert_close(aux, aux_ref, rtol=LOSS_RTOL, atol=0)


def test_frozen_embeddings_still_train_the_layers():
    """Nothing entering the first layer needs a gradient: the layers' own weights still get theirs."""
    base = families.build("llama")
    base.get_input_embeddings().weight.requires_grad_(False)
    assert_trains_like_ordinary(base, steps=2, accumulation=1)


def test_partly_frozen_layers_train_what_is_trainable():
    base = families.build("llama")
    for layer in base.model.layers[:2]:
        layer.self_attn.requires_grad_(False)
    assert_trains_like_ordinary(base, steps=2, accumulation=1)


def test_bf16_model_trains_an_fp32_master_and_streams_bf16():
    """A bf16 model: fp32 masters and fp32 .grad on the host, a bf16 compute copy refreshed by each step."""
    base = families.build("llama").to(torch.bfloat16)
    model = hf_offload.enable_layer_streaming(copy.deepcopy(base), full_config())
    runtime = get_runtime(model)
    layer_weight = model.model.layers[1].mlp.down_proj.weight
    assert layer_weight.dtype == torch.float32  # the master
    assert runtime.trainable.master_bytes > 0
    tensor = next(t for t in runtime.trainable.layers[1] if t.param is layer_weight)
    assert tensor.host.dtype == torch.bfloat16

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # updates far below bf16's resolution
    batch = left_padded_batch(families.VOCAB)
    before = layer_weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        assert layer_weight.grad.dtype == torch.float32
        optimizer.step()
        # the compute copy is the rounded master, right after the step
        assert torch.equal(tensor.host, layer_weight.detach().to(torch.bfloat16))
    moved = layer_weight.detach() - before
    assert moved.abs().max() > 0
    assert torch.equal(before.to(torch.bfloat16), tensor.host) or (moved.abs() < 1e-4).all()


def test_weights_changed_outside_the_optimizer_reach_the_compute_copy():
    """load_state_dict (or any in-place write) on a bf16 model's masters refreshes the compute copy."""
    base = families.build("llama").to(torch.bfloat16)
    model = hf_offload.enable_layer_streaming(copy.deepcopy(base), full_config())
    reference = copy.deepcopy(base).float()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.5)
    model.load_state_dict(reference.state_dict())
    batch = left_padded_batch(families.VOCAB)
    model.eval()
    reference.to(torch.bfloat16).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_slots_are_reloaded_after_a_step_and_only_then():
    model = hf_offload.enable_layer_streaming(copy.deepcopy(families.build("llama")), full_config())
    runtime = get_runtime(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**left_padded_batch(families.VOCAB)).loss.backward()
    assert runtime.trainable.sync() == []  # backward writes .grad, never the weights
    optimizer.step()
    assert runtime.trainable.sync() == []  # the step's post-hook already refreshed every layer
    layer = model.model.layers[2].mlp.up_proj.weight
    with torch.no_grad():
        layer.add_(1.0)
    assert runtime.trainable.sync() == [2]


def test_disable_gives_the_trained_weights_back():
    base = families.build("llama").to(torch.bfloat16)
    model = hf_offload.enable_layer_streaming(copy.deepcopy(base), full_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(**left_padded_batch(families.VOCAB)).loss.backward()
    optimizer.step()
    trained = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    hf_offload.disable_layer_streaming(model)
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param.detach(), trained[name]), name


def test_full_finetune_refusals():
    with pytest.raises(ValueError, match="full_finetune"):
        OffloadConfig(full_finetune=True, base_weight_dtype="nf4")
    from parity import with_lora

    peft_model = with_lora(families.build("llama"))
    with pytest.raises(ValueError, match="this is a peft model"):
        hf_offload.enable_layer_streaming(peft_model, full_config())
    frozen = families.build("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no weight of the decoder layers requires grad"):
        hf_offload.enable_layer_streaming(frozen, full_config())
    assert not hf_offload.is_streaming(peft_model)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="full_finetune=True"):
        hf_offload.enable_layer_streaming(families.build("llama"), OffloadConfig(device="cpu"))


def test_a_warning_before_training_when_host_memory_is_short(monkeypatch, caplog):
    from hf_offload.engine import hostmem

    monkeypatch.setattr(hostmem, "available_bytes", lambda: 10_000)
    monkeypatch.setattr(hostmem, "check_fits", lambda *args: None)  # the store itself is checked elsewhere
    with caplog.at_level("WARNING", logger="hf_offload"):
        hf_offload.enable_layer_streaming(families.build("llama"), full_config())
    assert "full fine-tuning will need" in caplog.text and "optimizer_state" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_offload"):
        hf_offload.enable_layer_streaming(families.build("llama"), full_config(check_host_memory=False))
    assert "full fine-tuning will need" not in caplog.text


def test_bf16_gradients_accumulate_in_fp32_across_backwards():
    """A second backward adds into the fp32 .grad while the weights stream in bf16 (no dropout: eval mode)."""
    model = hf_offload.enable_layer_streaming(
        copy.deepcopy(families.build("llama")).to(torch.bfloat16), full_config()
    ).eval()
    batch = left_padded_batch(families.VOCAB)
    weight = model.model.layers[1].mlp.up_proj.weight
    model(**batch).loss.backward()
    first = weight.grad.clone()
    model(**batch).loss.backward()
    assert weight.grad.dtype == torch.float32 and first.abs().max() > 0
    torch.testing.assert_close(weight.grad, 2 * first, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "offload_activations"), [("llama", False), ("llama", True), ("qwen3_moe", False)])
def test_a_second_backward_through_a_retained_graph_matches_vanilla(family, offload_activations):
    """retain_graph=True, then a second backward: every gradient accumulates twice, as without streaming (dropout
    on; qwen3_moe with routed expert fetch); a third backward gets autograd's own error."""
    build = moe_families.build if family in MOE else families.build
    vocab = moe_families.VOCAB if family in MOE else families.VOCAB
    base = build(family)
    batch = left_padded_batch(vocab, batch=1, length=3) if family in MOE else left_padded_batch(vocab)
    streamed = hf_offload.enable_layer_streaming(
        copy.deepcopy(base), full_config(offload_activations=offload_activations)
    )
    grads = []
    for model in (copy.deepcopy(base), streamed):
        model.train()
        torch.manual_seed(0)
        loss = model(**batch).loss
        loss.backward(retain_graph=True)
        once = _grads(model)
        loss.backward()
        grads.append((once, _grads(model)))
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()
    (ref_once, ref_twice), (once, twice) = grads
    _assert_close(once, ref_once, GRAD_RTOL, "gradient")
    _assert_close(twice, ref_twice, GRAD_RTOL, "gradient")
    assert any(g is not None and not torch.equal(g, ref_once[n]) for n, g in ref_twice.items())
    if family in MOE:
        assert hf_offload.stats(streamed)["experts_skipped"] > 0


def test_a_step_between_forward_and_backward_is_refused_as_autograd_does():
    """Vanilla autograd refuses a backward through weights changed in place since the forward; so does streaming
    (the recompute would silently use the new weights)."""
    base = families.build("llama")
    batch = left_padded_batch(families.VOCAB)
    for model, message in (
        (copy.deepcopy(base), "modified by an inplace operation"),
        (hf_offload.enable_layer_streaming(copy.deepcopy(base), full_config()), "modified by an inplace operation"),
    ):
        optimizer = torch.optim.SGD(model.model.layers.parameters(), lr=0.1)  # only streamed weights change
        loss = model(**batch).loss
        loss.backward(retain_graph=True)
        optimizer.step()
        with pytest.raises(RuntimeError, match=message):
            loss.backward()


def test_gradients_reuse_their_host_buffer_unless_the_caller_kept_them():
    """After zero_grad(set_to_none=True) the next gradient is copied into the tensor `.grad` was (no new host memory
    per step); a gradient the caller still holds keeps its values, as in ordinary training."""
    model = hf_offload.enable_layer_streaming(copy.deepcopy(families.build("llama")), full_config()).eval()
    batch = left_padded_batch(families.VOCAB)
    weight = model.model.layers[1].mlp.up_proj.weight
    model(**batch).loss.backward()
    first_pointer, first = weight.grad.data_ptr(), weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    assert weight.grad.data_ptr() == first_pointer and torch.equal(weight.grad, first)
    kept = weight.grad
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        weight.mul_(2.0)  # a different gradient next time
    model(**batch).loss.backward()
    assert weight.grad.data_ptr() != first_pointer and not torch.equal(weight.grad, first)
    assert torch.equal(kept, first)
