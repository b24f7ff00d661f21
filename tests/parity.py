"""Helpers for parity tests: the same model trained ordinarily and streamed must agree exactly (fp32, CPU)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

import hf_offload

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def with_lora(model, **overrides):
    """LoRA with dropout on every linear layer; B initialised non-zero so every adapter gets a gradient."""
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    kwargs.update(overrides)
    torch.manual_seed(123)
    return get_peft_model(model, LoraConfig(**kwargs))


def reference_and_streamed(base, config: hf_offload.OffloadConfig | None = None, **lora):
    """Two identical LoRA models from `base`; the second one streamed."""
    reference = with_lora(copy.deepcopy(base), **lora)
    streamed = with_lora(copy.deepcopy(base), **lora)
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, config or hf_offload.OffloadConfig(device="cpu"))
    return reference, streamed


def left_padded_batch(vocab: int, batch: int = 3, length: int = 12, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch):  # rows 1.. are left-padded by 2, 4, ...
        attention_mask[row, : 2 * row] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def train_step(model, batch, seed: int = 0):
    """Loss and the gradient of every trainable parameter after one forward/backward in train mode."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_step(reference, streamed, batch, seed: int = 0):
    reference_step = train_step(reference, batch, seed)
    assert_step_matches(reference_step, streamed, batch, seed)
    return reference_step[0]


def assert_step_matches(reference_step, model, batch, seed: int = 0) -> None:
    """One training step of `model` gives the loss and every gradient of `reference_step` (`train_step`'s result)."""
    loss_ref, grads_ref = reference_step
    loss, grads = train_step(model, batch, seed)
    torch.testing.assert_close(loss, loss_ref, rtol=LOSS_RTOL, atol=0)
    assert grads_ref.keys() == grads.keys()
    assert grads_ref, "no trainable parameters"
    for name, g_ref in grads_ref.items():
        assert g_ref.abs().sum() > 0, f"{name}: the reference gradient is zero, the test would prove nothing"
        rel = (grads[name] - g_ref).norm() / g_ref.norm()
        assert rel <= GRAD_RTOL, f"{name}: relative gradient error {rel:.2e}"


def eval_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
