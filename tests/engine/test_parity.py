"""Streamed == ordinary, for many families: loss, every LoRA gradient (dropout on), eval logits, generate()."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, VOCAB, build
from parity import assert_same_step, eval_logits, left_padded_batch, reference_and_streamed

import hf_offload


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_training_step_equals_ordinary(family):
    reference, streamed = reference_and_streamed(build(family))
    batch = left_padded_batch(VOCAB)

    assert_same_step(reference, streamed, batch, seed=0)
    torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)

    prompt = batch["input_ids"][1:], batch["attention_mask"][1:]
    out_ref = reference.generate(input_ids=prompt[0], attention_mask=prompt[1], max_new_tokens=6, do_sample=False)
    out_st = streamed.generate(input_ids=prompt[0], attention_mask=prompt[1], max_new_tokens=6, do_sample=False)
    assert torch.equal(out_ref, out_st)

    stats = hf_offload.stats(streamed)
    assert 0 < stats["peak_resident_layers"] <= 2  # prefetch + 1
    assert stats["layer_loads"] > 0 and stats["bytes_to_device"] > 0
