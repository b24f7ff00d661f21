"""Helpers for the tests of the faces (trainer, plugin, launcher, hub): tiny data, models and arguments, logged
losses, running the example scripts."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch
import transformers
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


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, argv: list[str], monkeypatch) -> None:
    """Run examples/<script> in this process, as `python examples/<script> ARGV...` would."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def state_losses(output_dir) -> dict[int, float]:
    """{step: loss} from the trainer_state.json a script saved in `output_dir`."""
    with open(Path(output_dir) / "trainer_state.json", encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def example_argv(model_dir, output_dir, *extra) -> list[str]:
    """examples/finetune.py arguments for 3 quick CPU steps with a small LoRA (dropout on)."""
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "3",
        "--logging_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--use_cpu", "true",
        "--disable_tqdm", "true", "--report_to", "none", "--offload_lora_r", "4", "--offload_lora_alpha", "8",
        "--offload_lora_dropout", "0.1", *extra,
    ]  # fmt: skip


def tiny_t5():
    """An encoder-decoder model: something layer streaming refuses."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return transformers.T5ForConditionalGeneration(config)
