"""An ordinary `transformers.Trainer` script, nothing of hf_offload in it: its own `from_pretrained`, its own peft
LoRA, its own `Trainer`. Run it under `hf-offload launch` to stream it.

    hf-offload launch --base_weight_dtype nf4 -- python examples/plain_trainer.py MODEL OUTPUT_DIR --max_steps 2

The data are random token ids (the script is for trying a checkpoint, e.g. one written by tools/make_checkpoint.py,
which has no tokenizer): `--seq` tokens per example, `--batch` examples per step.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int, seq: int, count: int):
        self.ids = torch.randint(0, vocab_size, (count, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("output_dir")
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    data = RandomTokens(model.config.vocab_size, args.seq, args.max_steps * args.batch)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=args.dtype == "bfloat16",
    )
    Trainer(model=model, args=training, train_dataset=data).train()
    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
