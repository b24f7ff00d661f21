"""Try layer streaming on every causal-LM family transformers ships, with generic tiny configs (maintainer tool).

    python tools/sweep_families.py            # all families (about 6 minutes on 2 cores)
    python tools/sweep_families.py llama qwen2

For each `model_type` in transformers' causal-LM mapping it shrinks the default config, builds the model, and checks
one LoRA training step (loss, every adapter gradient, dropout on) and eval logits against the unstreamed model, as
the parity tests do. It prints one line per family: OK, REFUSED (a clear hf_offload error), FAIL (a parity or
runtime failure of the streamed model while the ordinary one trains: a bug to fix), or SKIP (the generic tiny config
does not build, is too big for a sweep, or does not train even without streaming: write a config by hand in
tests/families.py to cover it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from parity import assert_same_step, eval_logits, left_padded_batch, reference_and_streamed, train_step, with_lora  # noqa: E402

import hf_offload  # noqa: E402

SMALL = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, n_embd=32, n_layer=4, n_head=4, d_model=32, n_layers=4, n_heads=4,
    num_layers=4, ffn_dim=64, max_position_embeddings=128, n_positions=128, moe_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, attention_dropout=0.1, hidden_dropout=0.1,
)  # fmt: skip
MAX_PARAMS = 3e6


def tiny_config(model_type: str):
    config = transformers.CONFIG_MAPPING[model_type]()
    for key, value in SMALL.items():
        if hasattr(config, key):
            with contextlib.suppress(Exception):  # some configs derive read-only attributes
                setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = (config.layer_types * 4)[:4]
    return config


def check(model_type: str) -> str:
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if n_params > MAX_PARAMS:
            return f"SKIP: the generic tiny config still has {n_params:,} parameters"
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as err:
        return f"SKIP: does not build ({type(err).__name__}: {str(err)[:80]})"
    batch = left_padded_batch(96)
    try:
        reference, streamed = reference_and_streamed(base)
        assert_same_step(reference, streamed, batch)
        torch.testing.assert_close(eval_logits(streamed, batch), eval_logits(reference, batch), rtol=1e-5, atol=1e-6)
        return "OK"
    except hf_offload.UnsupportedModelError as err:
        return f"REFUSED: {str(err)[:120]}"
    except AssertionError as err:
        if "reference gradient is zero" in str(err):
            return f"SKIP: an adapter gets no gradient even without streaming ({str(err)[:80]})"
        return f"FAIL: {str(err)[:160]}"
    except Exception as err:
        try:
            plain = with_lora(copy.deepcopy(base))
            train_step(plain, batch)
            eval_logits(plain, batch)
        except Exception as ref_err:
            return f"SKIP: does not run without streaming either ({type(ref_err).__name__}: {str(ref_err)[:60]})"
        return f"FAIL: {type(err).__name__}: {str(err)[:160]}"


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    wanted = set(sys.argv[1:])
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if not wanted or model_type in wanted:
            print(f"{model_type:28s} {check(model_type)}", flush=True)


if __name__ == "__main__":
    main()
