"""A plain PyTorch + accelerate training loop with layer streaming: `OffloadAccelerator` instead of `Accelerator`.

`accelerator.prepare_model(model)` adds LoRA adapters (the model has none) and streams the decoder layers from host
memory instead of moving the model to the device; everything else is an ordinary accelerate loop. Runs offline on
hf_offload's embedded tiny Llama and bundled dataset:

    python examples/plain_loop.py --output-dir out
    accelerate launch examples/plain_loop.py --output-dir out --mixed-precision bf16
    python examples/plain_loop.py --model Qwen/Qwen2.5-7B --dtype bfloat16 --mixed-precision bf16 --output-dir out
"""

from __future__ import annotations

import argparse

import bitsandbytes as bnb
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, get_scheduler

import hf_offload
from hf_offload import LayerStreamingPlugin, OffloadAccelerator
from hf_offload.demo import DATASET, import_datasets, tiny_checkpoint

datasets = import_datasets()  # an extra: the hf_offload package itself does not need it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local path (default: the embedded tiny Llama)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--output-dir", required=True, help="where the trained adapter is saved")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    accelerator = OffloadAccelerator(
        mixed_precision=args.mixed_precision,
        layer_streaming_plugin=LayerStreamingPlugin(
            prefetch=args.prefetch, lora_r=args.lora_r, lora_alpha=2 * args.lora_r
        ),
    )
    model_path = args.model or str(tiny_checkpoint("tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype))
    model = accelerator.prepare_model(model)  # LoRA + streaming: the frozen layers stay in host memory

    texts = datasets.load_dataset("json", data_files=str(DATASET), split="train")
    tokenized = texts.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=texts.column_names,
    )
    dataloader = DataLoader(
        tokenized,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    # Created after prepare_model, so it sees the adapters; 8-bit state keeps the optimizer small.
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=args.steps)
    optimizer, dataloader, scheduler = accelerator.prepare(optimizer, dataloader, scheduler)

    model.train()
    step = 0
    while step < args.steps:
        for batch in dataloader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            moved = hf_offload.stats(model)["bytes_to_device"] / 1e9
            accelerator.print(f"step {step:3d}  loss {loss.item():.4f}  host->device so far {moved:.3f} GB")
            if step == args.steps:
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)  # the adapter, as with any peft model
        tokenizer.save_pretrained(args.output_dir)
        accelerator.print(f"adapter saved to {args.output_dir}")
    accelerator.end_training()  # ends the process group of a multi-process run cleanly


if __name__ == "__main__":
    main()
