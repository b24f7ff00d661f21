"""Slots stay valid across training steps while the host weights do not change, and only then.

A step's backward leaves the first layers in the device slots; the next step's forward finds them there instead of
copying them again. Any change of the host weights in between (load_state_dict, an in-place update, an adapter
merge, a write into the host store) makes the next acquisition copy the layer again.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import VOCAB, build
from moe_families import VOCAB as MOE_VOCAB
from moe_families import build as build_moe
from parity import assert_same_step, eval_logits, left_padded_batch, reference_and_streamed, train_step, with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_the_next_step_reuses_the_layers_the_backward_left(prefetch):
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=prefetch))
    batch = left_padded_batch(VOCAB)
    assert_same_step(reference, streamed, batch, seed=0)
    hf_offload.reset_stats(streamed)
    assert_same_step(reference, streamed, batch, seed=1)
    window = prefetch + 1
    # forward: all but the `window` layers the backward left; backward: all but the `window` the forward left
    assert hf_offload.stats(streamed)["layer_loads"] == 2 * (LAYERS - window)


def test_routed_moe_steps_reuse_layers_too():
    model = with_lora(build_moe("qwen3_moe"), lora_dropout=0.0)
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", prefetch=1, expert_fetch="routed"))
    batch = left_padded_batch(MOE_VOCAB)
    train_step(model, batch)
    hf_offload.reset_stats(model)
    train_step(model, batch)
    assert hf_offload.stats(model)["layer_loads"] == 2 * (LAYERS - 2)


def _change_layer_0(model, how: str):
    """Change layer 0's frozen q_proj weight of `model` (streamed or not) in place, the way `how` says."""
    layer = model.get_base_model().model.layers[0]
    weight = layer.self_attn.q_proj.base_layer.weight
    new = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
    runtime = get_runtime(model)
    if how == "load_state_dict":
        layer.self_attn.q_proj.base_layer.load_state_dict({"weight": new})
    elif how == "in_place":  # an optimizer step on a host weight is an in-place update like this one
        with torch.no_grad():
            weight.copy_(new)
    elif how == "host_store" and runtime is not None:  # a write into the host buffer itself
        pack = runtime.store.packs[0]
        (packed,) = [t for t in pack.tensors if t.param is weight]
        packed.view_in(pack.host).copy_(new)
    else:
        with torch.no_grad():
            weight.copy_(new)


@pytest.mark.parametrize("how", ["load_state_dict", "in_place", "host_store"])
def test_a_changed_host_weight_is_copied_again(how):
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=1))
    batch = left_padded_batch(VOCAB)
    assert_same_step(reference, streamed, batch)  # the backward leaves layers 0 and 1 in the slots
    _change_layer_0(reference, how)
    _change_layer_0(streamed, how)
    hf_offload.reset_stats(streamed)
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
    assert_same_step(reference, streamed, batch)


def test_merging_an_adapter_after_a_step_is_seen():
    reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=1))
    batch = left_padded_batch(VOCAB)
    assert_same_step(reference, streamed, batch)
    expected = copy.deepcopy(reference)
    expected.merge_adapter()
    expected_logits = eval_logits(expected, batch)
    streamed.merge_adapter()  # writes host weights through `.data`: no version counter sees it
    torch.testing.assert_close(eval_logits(streamed, batch), expected_logits, rtol=1e-5, atol=1e-6)
    streamed.unmerge_adapter()
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
