"""Quickstart: fine-tune LoRA adapters on a model whose decoder layers stream from host memory, in a plain loop.

Runs offline on the embedded default (a tiny Llama the repo builds, and a bundled arithmetic dataset):

    python examples/quickstart.py

Point it at any causal LM by id or path: `python examples/quickstart.py --model Qwen/Qwen2.5-0.5B`.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_offload
from hf_offload.demo import DATASET, import_datasets, tiny_checkpoint

datasets = import_datasets()  # an extra: the hf_offload package itself does not need it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local path (default: the embedded tiny Llama)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: the accelerator if present, else the CPU")
    args = parser.parse_args()

    torch.manual_seed(0)
    model_path = args.model or tiny_checkpoint("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    model = hf_offload.enable_layer_streaming(
        model, hf_offload.OffloadConfig(device=args.device, prefetch=args.prefetch)
    )
    info = hf_offload.summary(model)
    print(
        f"streaming {info['layers']} layers from host memory to {info['device']}: "
        f"{info['host_store_bytes'] / 1e6:.1f} MB in host memory, {info['bytes_per_train_step'] / 1e6:.1f} MB per step"
    )

    texts = datasets.load_dataset("json", data_files=str(DATASET), split="train")["text"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    device = torch.device(info["device"])
    model.train()
    tokens, start = 0, time.perf_counter()
    for step in range(args.steps):
        rows = texts[(step * args.batch_size) % len(texts) :][: args.batch_size]
        batch = tokenizer(rows, return_tensors="pt", padding=True).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        if step % 5 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:3d}  loss {loss.item():.4f}  {tokens / elapsed:,.0f} tokens/s")
    stats = hf_offload.stats(model)
    print(
        f"done: {stats['layer_loads']} layer loads, {stats['bytes_to_device'] / 1e6:.1f} MB host->device, "
        f"peak {stats['peak_resident_layers']} layers on the device at once"
    )


if __name__ == "__main__":
    main()
