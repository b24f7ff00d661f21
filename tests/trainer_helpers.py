"""Helpers for the Trainer tests: a tiny token dataset, tiny OffloadTrainingArguments, and the logged losses."""

from __future__ import annotations

import torch
from datasets import Dataset
from families import VOCAB

from hf_offload import OffloadTrainingArguments


def token_dataset(rows: int = 16, length: int = 12, seed: int = 1) -> Dataset:
    """Random token rows, every other one left-padded by 3 (labels -100 there), ready for the default collator."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1::2, :3] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )


def tiny_args(output_dir, **overrides) -> OffloadTrainingArguments:
    """Arguments for a few fast CPU steps, logging every step."""
    options = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
        offload_lora_r=4,
        offload_lora_alpha=8,
        offload_lora_dropout=0.1,
    )
    options.update(overrides)
    return OffloadTrainingArguments(**options)


def logged(trainer, key: str = "loss") -> dict[int, float]:
    """{step: value} of `key` in the trainer's log lines."""
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}
