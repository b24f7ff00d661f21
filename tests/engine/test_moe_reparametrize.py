"""Routed expert fetch gives each experts call fresh tensors: autograd never sees a Parameter rebound behind it.

An experts implementation may save the expert Parameter object itself for its backward (grouped_mm does). If the
routed call pointed that Parameter's `.data` at the loaded experts and back at the host store afterwards, the
recompute's `autograd.grad` would read the host tensor (all experts) in backward: wrong shape, wrong device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from moe_families import VOCAB, build, with_expert_lora
from parity import GRAD_RTOL, LOSS_RTOL, left_padded_batch, train_step, with_lora

import hf_offload
from hf_offload import OffloadConfig

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def adapted(base, family, on_experts: bool, implementation: str):
    # LoRA on the attention projections leaves the stacked 3D expert tensors without adapters (all-linear does
    # too on GPT-OSS, but peft adds expert adapters to it on other families); target_parameters adds them
    if on_experts:
        model = with_expert_lora(copy.deepcopy(base), family)
    else:
        model = with_lora(copy.deepcopy(base), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model.get_base_model().set_experts_implementation(implementation)
    return model


def few_tokens_batch():
    """3 tokens, top-2 of 8 experts: at most 6 experts routed per layer, so some are always left out."""
    return {k: v[:1, -3:] for k, v in left_padded_batch(VOCAB).items()}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("on_experts", [False, True], ids=["linear_lora", "expert_lora"])
@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_routed_experts_call_matches_ordinary_training(family, on_experts, implementation):
    base = build(family)
    batch = few_tokens_batch()
    reference = adapted(base, family, on_experts, implementation)
    loss_ref, grads_ref = train_step(reference, batch)

    streamed = adapted(base, family, on_experts, implementation)
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu", expert_fetch="routed"))
    for step in range(2):  # the second step starts from slots and plans the first one left
        loss, grads = train_step(streamed, batch)
        torch.testing.assert_close(loss, loss_ref, rtol=LOSS_RTOL, atol=0)
        assert grads.keys() == grads_ref.keys()
        for name, g_ref in grads_ref.items():
            assert g_ref.abs().sum() > 0, f"{name}: the reference gradient is zero, the test would prove nothing"
            rel = (grads[name] - g_ref).norm() / g_ref.norm()
            assert rel <= GRAD_RTOL, f"step {step}, {name}: relative gradient error {rel:.2e}"
    stats = hf_offload.stats(streamed)
    assert stats["experts_skipped"] > 0, "every expert was routed: the batch does not exercise routed fetch"


def test_expert_parameters_are_never_rebound_by_the_routed_call():
    """The Parameters keep pointing at the host store while and after the experts run."""
    model = with_lora(build("gpt_oss"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", expert_fetch="routed"))
    runtime = hf_offload.api.get_runtime(model)
    seen = []
    group = runtime.routed_experts.groups[0]
    host_ptrs = [p.data_ptr() for p in group.params]
    hook = group.base.register_forward_pre_hook(lambda m, a: seen.append([p.data_ptr() for p in group.params]))
    try:
        train_step(model, few_tokens_batch())
    finally:
        hook.remove()
    assert seen and all(ptrs == host_ptrs for ptrs in seen)
    assert [p.data_ptr() for p in group.params] == host_ptrs
