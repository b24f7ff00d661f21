"""The embedded default: a tiny Llama checkpoint built offline, and a small bundled dataset.

The README's first command, the examples and the tests fine-tune this pair, so that everything runs on a fresh
machine with no network. The checkpoint is an ordinary `save_pretrained` directory (config, safetensors weights,
fast tokenizer), loaded like any Hub checkpoint by path.

    >>> from hf_offload.demo import tiny_checkpoint, DATASET
    >>> path = tiny_checkpoint("./tiny-llama")      # built once, reused afterwards
    >>> dataset = datasets.load_dataset("json", data_files=str(DATASET), split="train")
"""

from __future__ import annotations

import json
from pathlib import Path

DATASET = Path(__file__).parent / "data" / "arithmetic.jsonl"

TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def import_datasets():
    """The `datasets` library the example scripts read data with, or an exit that says how to install it.

    It is an extra (`pip install -e ".[examples]"`): the hf_offload package itself never imports it.
    """
    try:
        import datasets
    except ImportError as err:
        raise SystemExit(
            'This example reads its data with the `datasets` library. Install it: pip install -e ".[examples]" '
            "(or pip install datasets)."
        ) from err
    return datasets


def _texts() -> list[str]:
    with DATASET.open() as f:
        return [json.loads(line)["text"] for line in f]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the bundled dataset (deterministic, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_checkpoint(path: str | Path = "tiny-llama", seed: int = 0, **config_overrides) -> Path:
    """Build (once) and return a local checkpoint directory of a tiny random-weight Llama and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_LLAMA, **config_overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
