"""Engine behaviour beyond single-step parity: prefetch windows, RNG replay, removal, refusals, autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from families import VOCAB, build
from parity import assert_same_step, left_padded_batch, reference_and_streamed, train_step, with_lora

import hf_offload
from hf_offload import OffloadConfig

LAYERS = 4


@pytest.mark.parametrize("prefetch", [0, 1, 2, 5])
@pytest.mark.parametrize("offload_activations", [False, True])
def test_prefetch_window_and_activation_offload_keep_parity(prefetch, offload_activations):
    config = OffloadConfig(device="cpu", prefetch=prefetch, offload_activations=offload_activations)
    reference, streamed = reference_and_streamed(build("llama"), config)
    batch = left_padded_batch(VOCAB)
    hf_offload.reset_stats(streamed)
    assert_same_step(reference, streamed, batch)
    stats = hf_offload.stats(streamed)
    window = min(prefetch + 1, LAYERS)
    assert stats["peak_resident_layers"] == window
    # forward loads every layer; backward finds the last `window` layers still on the device (turnaround)
    assert stats["layer_loads"] == 2 * LAYERS - window
    layer_bytes = hf_offload.summary(streamed)["host_store_bytes"] // LAYERS
    assert stats["bytes_to_device"] == stats["layer_loads"] * layer_bytes
    if offload_activations:
        hidden_bytes = batch["input_ids"].numel() * 32 * 4  # (B, T, hidden) fp32 per layer boundary
        assert stats["bytes_to_host"] == LAYERS * hidden_bytes
        assert stats["bytes_from_host_activations"] == LAYERS * hidden_bytes
    else:
        assert stats["bytes_to_host"] == 0


def test_without_rng_replay_dropout_masks_differ():
    """Proves the parity tests exercise dropout: without replay the recompute draws other masks."""
    config = OffloadConfig(device="cpu", preserve_rng_state=False)
    reference, streamed = reference_and_streamed(build("llama"), config)
    with pytest.raises(AssertionError, match="relative gradient error"):
        assert_same_step(reference, streamed, left_padded_batch(VOCAB))


def test_several_optimizer_steps_match():
    reference, streamed = reference_and_streamed(build("qwen2"))
    batch = left_padded_batch(VOCAB)
    optims = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (reference, streamed)]
    for step in range(3):
        loss_ref, _ = train_step(reference, batch, seed=step)
        loss_st, _ = train_step(streamed, batch, seed=step)
        torch.testing.assert_close(loss_st, loss_ref, rtol=1e-5, atol=0)
        for optim in optims:
            optim.step()
    for (name, p_ref), (_, p_st) in zip(reference.named_parameters(), streamed.named_parameters()):
        torch.testing.assert_close(p_st, p_ref, rtol=1e-5, atol=1e-7, msg=name)


def test_autograd_grad_on_adapters_works():
    """LoRA parameters are inputs of the layer Function, so torch.autograd.grad reaches them too."""
    reference, streamed = reference_and_streamed(build("llama"), lora_dropout=0.0)
    batch = left_padded_batch(VOCAB)
    grads = []
    for model in (reference, streamed):
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(0)
        grads.append(torch.autograd.grad(model(**batch).loss, params))
    for g_ref, g_st in zip(*grads):
        torch.testing.assert_close(g_st, g_ref, rtol=1e-4, atol=1e-7)


def test_trainable_parameters_inside_layers_without_lora():
    """Full fine-tuning of some layer parameters (here the norms): they stay resident and get exact grads."""
    base = build("llama")
    reference, streamed = copy.deepcopy(base), copy.deepcopy(base)
    for model in (reference, streamed):
        for name, param in model.named_parameters():
            param.requires_grad = "norm" in name
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu"))
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))


def test_gradient_checkpointing_request_does_not_recompute_twice():
    reference, streamed = reference_and_streamed(build("llama"))
    streamed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    mlp = streamed.get_base_model().model.layers[0].mlp
    handle = mlp.register_forward_hook(lambda *args: calls.append(1))
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    handle.remove()
    assert len(calls) == 2  # forward + one recompute


@pytest.mark.parametrize("backward_in_autocast", [True, False], ids=["backward-inside", "backward-outside"])
def test_cpu_autocast_matches_ordinary_autocast(backward_in_autocast):
    """Backward outside autocast is the usual AMP pattern (Trainer, accelerate): the recompute must use the forward's
    autocast state while the backward ops must not."""
    reference, streamed = reference_and_streamed(build("llama"), lora_dropout=0.0)
    batch = left_padded_batch(VOCAB)
    losses = []
    for model in (reference, streamed):
        if backward_in_autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses.append(train_step(model, batch))
        else:
            model.train()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            losses.append((loss.detach(), grads))
    (loss_ref, grads_ref), (loss_st, grads_st) = losses
    torch.testing.assert_close(loss_st, loss_ref, rtol=1e-5, atol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads_st[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_disable_restores_the_model_exactly():
    base = build("gpt2")
    model = with_lora(copy.deepcopy(base))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    layers = model.get_base_model().transformer.h
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    assert "forward" in layers[0].__dict__
    assert hf_offload.is_streaming(model)
    train_step(model, left_padded_batch(VOCAB))
    hf_offload.disable_layer_streaming(model)
    assert not hf_offload.is_streaming(model)
    assert all("forward" not in layer.__dict__ for layer in layers)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    # the model trains ordinarily again, and can be streamed again
    train_step(model, left_padded_batch(VOCAB))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))


def test_state_dict_and_parameter_names_unchanged_while_streaming():
    base = build("llama")
    plain = with_lora(copy.deepcopy(base))
    streamed = with_lora(copy.deepcopy(base))
    names = [n for n, _ in streamed.named_parameters()]
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu"))
    assert [n for n, _ in streamed.named_parameters()] == names
    assert type(streamed.get_base_model()).__name__ == "LlamaForCausalLM"
    for (name, a), (_, b) in zip(plain.state_dict().items(), streamed.state_dict().items()):
        assert torch.equal(a, b), name


def test_host_weight_changes_between_forwards_are_seen():
    """Slots are not trusted across forwards: merging an adapter into the host weights changes the next logits."""
    _, streamed = reference_and_streamed(build("llama"), lora_dropout=0.0)
    batch = left_padded_batch(VOCAB)
    streamed.eval()
    with torch.no_grad():
        before = streamed(**batch).logits
        streamed.merge_adapter()  # W += BA in host memory; the adapter is then skipped
        after = streamed(**batch).logits
        streamed.unmerge_adapter()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


# --- refusals: clear errors before any work is done -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prefetch=-1), "`prefetch` should be a non-negative integer"),
        (dict(prefetch=1.5), "`prefetch` should be a non-negative integer"),
        (dict(prefetch=True), "`prefetch` should be a non-negative integer"),
        (dict(device="gpu0"), "`device` should be a torch device"),
        (dict(offload_activations="yes"), "`offload_activations` should be True or False"),
        (dict(pin_memory=1), "`pin_memory` should be True, False or None"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig(**kwargs)


def test_enabling_twice_is_refused():
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    with pytest.raises(RuntimeError, match="already on"):
        hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", prefetch=2))


def test_training_through_a_prefilled_cache_is_refused():
    from transformers import DynamicCache

    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    ids = left_padded_batch(VOCAB)["input_ids"][:1]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() > 0
    with pytest.raises(NotImplementedError, match="pre-filled KV cache"):
        model(input_ids=ids[:, :2], past_key_values=cache, use_cache=True).logits.sum().backward()


def test_layer_weight_tied_to_a_resident_module_stays_resident():
    """A frozen layer weight that a module outside the stack also uses is not streamed (it must stay put)."""
    base = build("llama")
    shared = base.model.layers[1].mlp.down_proj.weight
    base.model.extra = torch.nn.Linear(shared.shape[1], shared.shape[0], bias=False)
    base.model.extra.weight = shared  # tied: same Parameter object (the forward never calls `extra`)
    reference, streamed = reference_and_streamed(base, exclude_modules=["extra"])
    runtime = hf_offload.api.get_runtime(streamed)
    streamed_ids = {id(t.param) for pack in runtime.store.packs for t in pack.tensors}
    extra = streamed.get_base_model().model.extra.weight
    assert id(extra) not in streamed_ids
    assert extra is streamed.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))


def test_host_buffers_are_page_aligned_and_own_their_pages():
    """CUDA page-locks whole pages, once each: every layer buffer starts a page and no two share one."""
    import mmap

    from hf_offload.api import get_runtime

    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    pages = set()
    for pack in get_runtime(model).store.packs:
        start = pack.host.data_ptr()
        assert start % mmap.PAGESIZE == 0
        storage = pack.host.untyped_storage()
        end = start + -(-pack.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        assert end <= storage.data_ptr() + storage.nbytes()  # the last page is ours too
        owned = set(range(start // mmap.PAGESIZE, end // mmap.PAGESIZE))
        assert not owned & pages
        pages |= owned
