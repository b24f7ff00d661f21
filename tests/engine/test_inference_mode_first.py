"""A streamed model first used under `torch.inference_mode()` (a sanity eval, a pipeline) then trains.

Device slots, the decode scratch and the nf4 code map are allocated on first use; allocated inside inference mode
they would be inference tensors, and every later training step would fail writing into them.
"""

from __future__ import annotations

import pytest
import torch
from families import VOCAB, build
from parity import assert_same_step, eval_logits, left_padded_batch, reference_and_streamed

from hf_offload import OffloadConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("base_weight_dtype", [None, "nf4", "int8"])
@pytest.mark.parametrize("prefetch", [0, 1])
def test_training_after_a_first_use_under_inference_mode(base_weight_dtype, prefetch):
    config = OffloadConfig(device="cpu", prefetch=prefetch, base_weight_dtype=base_weight_dtype)
    reference, streamed = reference_and_streamed(build("llama"), config)
    if base_weight_dtype is not None:  # quantized weights: the reference is the same store, never in inference mode
        _, reference = reference_and_streamed(build("llama"), config)
    batch = left_padded_batch(VOCAB)
    streamed.eval()
    with torch.inference_mode():
        first = streamed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_same_step(reference, streamed, batch)
    torch.testing.assert_close(eval_logits(streamed, batch), first, rtol=1e-5, atol=1e-6)
