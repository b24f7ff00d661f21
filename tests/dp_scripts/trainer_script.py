"""An ordinary data-parallel Trainer script with its own peft LoRA, for the data-parallel tests.

Plain `transformers.Trainer` and `TrainingArguments`, so `hf-offload launch` can stream it unchanged; with
`--layer_streaming` it uses `OffloadTrainer` / `OffloadTrainingArguments` instead (the Trainer flag). The data are
random token rows; the model is loaded from `--model_dir`. Run it under torchrun:

    torchrun --nproc_per_node 2 trainer_script.py --model_dir tiny --output_dir out --use_cpu --optim adamw_torch
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, HfArgumentParser, Trainer, TrainingArguments

STREAMING = "--layer_streaming" in sys.argv
if STREAMING:
    from hf_offload import OffloadTrainer as Trainer  # noqa: F811
    from hf_offload import OffloadTrainingArguments as TrainingArguments  # noqa: F811


@dataclass
class ScriptArguments:
    model_dir: str
    expert_lora: bool = False  # LoRA on the stacked expert tensors too (an MoE model)
    rows: int = 32
    length: int = 12


def token_rows(rows: int, length: int, vocab: int) -> Dataset:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (rows, length), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1::2, :3] = 0
    input_ids = input_ids.masked_fill(mask == 0, 0)
    labels = input_ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    model = AutoModelForCausalLM.from_pretrained(script.model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    if script.expert_lora:  # peft's ParamWrapper takes no dropout
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", target_parameters=["gate_up_proj", "down_proj"]
        )
    else:
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    lora.init_lora_weights = False  # B non-zero: every adapter gets a gradient from the first step
    model = get_peft_model(model, lora)
    trainer = Trainer(
        model=model, args=args, train_dataset=token_rows(script.rows, script.length, model.config.vocab_size)
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    # torch's advice for every distributed script: without it, gloo's worker threads can outlive the interpreter and
    # abort the process after it has finished ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
