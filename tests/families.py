"""Tiny configs of many causal-LM families, built in the test (no downloads), shared by the parity tests."""

from __future__ import annotations

import transformers

VOCAB = 96
DROPOUT = 0.1

# Every config is 4 layers deep, so that the prefetch window (2 slots) is smaller than the stack.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
)

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2, attention_dropout=DROPOUT)),
    "mistral": ("MistralConfig", dict(_COMMON, num_key_value_heads=2, sliding_window=4, attention_dropout=DROPOUT)),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_key_value_heads=2, attention_dropout=DROPOUT)),
    "qwen3": ("Qwen3Config", dict(_COMMON, num_key_value_heads=2, head_dim=8, attention_dropout=DROPOUT)),
    "gemma": ("GemmaConfig", dict(_COMMON, num_key_value_heads=2, head_dim=8, attention_dropout=DROPOUT)),
    "gemma2": (
        "Gemma2Config",
        dict(
            _COMMON,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            attention_dropout=DROPOUT,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            _COMMON,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            attention_dropout=DROPOUT,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        ),
    ),
    "phi3": (
        "Phi3Config",
        dict(_COMMON, num_key_value_heads=2, attention_dropout=DROPOUT, resid_pdrop=DROPOUT, pad_token_id=0),
    ),
    "phi": ("PhiConfig", dict(_COMMON, attention_dropout=DROPOUT, resid_pdrop=DROPOUT)),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=128,
            attn_pdrop=DROPOUT,
            resid_pdrop=DROPOUT,
            embd_pdrop=DROPOUT,
        ),
    ),
    "falcon": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            attention_dropout=DROPOUT,
            hidden_dropout=DROPOUT,
        ),
    ),
    "falcon_alibi": (
        "FalconConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            alibi=True,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
            attention_dropout=DROPOUT,
        ),
    ),
    "bloom": (
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=32, n_layer=4, n_head=4, attention_dropout=DROPOUT, hidden_dropout=DROPOUT),
    ),
    "gpt_neox": ("GPTNeoXConfig", dict(_COMMON, attention_dropout=DROPOUT, hidden_dropout=DROPOUT)),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=128,
            dropout=DROPOUT,
            attention_dropout=DROPOUT,
            word_embed_proj_dim=32,
        ),
    ),
    "gptj": (
        "GPTJConfig",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=128,
            rotary_dim=4,
            attn_pdrop=DROPOUT,
            resid_pdrop=DROPOUT,
        ),
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        dict(
            vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128, attn_pdrop=DROPOUT, resid_pdrop=DROPOUT
        ),
    ),
    "mpt": ("MptConfig", dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, max_seq_len=128)),
    "stablelm": (
        "StableLmConfig",
        dict(_COMMON, num_key_value_heads=2, attention_dropout=DROPOUT, hidden_dropout=DROPOUT),
    ),
    "olmo2": ("Olmo2Config", dict(_COMMON, num_key_value_heads=2, attention_dropout=DROPOUT)),
    "cohere": ("CohereConfig", dict(_COMMON, num_key_value_heads=2, attention_dropout=DROPOUT)),
    "granite": ("GraniteConfig", dict(_COMMON, num_key_value_heads=2, attention_dropout=DROPOUT)),
    # an RNN whose blocks take a `state` list and return (hidden, state, attentions)
    "rwkv": (
        "RwkvConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            attention_hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            context_length=128,
        ),
    ),
}


def instantiate(config_class: str, kwargs: dict, seed: int = 0):
    """A randomly initialised fp32 causal LM from a transformers config class name and its arguments."""
    import torch

    config = getattr(transformers, config_class)(**kwargs)
    # Special tokens inside the tiny vocabulary (the families' defaults point past it).
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build(family: str, seed: int = 0):
    """A randomly initialised fp32 causal LM of `family` (same weights for the same seed)."""
    return instantiate(*FAMILIES[family], seed=seed)


# The shape of Llama-3.1-70B, for plans (never built with weights).
LLAMA_70B = dict(
    model_type="llama",
    hidden_size=8192,
    num_hidden_layers=80,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
)
