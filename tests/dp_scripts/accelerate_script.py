"""An ordinary accelerate loop with its own peft LoRA, for the data-parallel tests; `--streaming` swaps
`Accelerator` for `OffloadAccelerator`. Writes the mean loss over ranks of every micro-batch (and the number of
processes) to `<output_dir>/losses.json` and the adapter to `<output_dir>`, from the main process. On the CPU:

    accelerate launch --multi_gpu --num_processes 2 accelerate_script.py --model_dir tiny --output_dir out
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from hf_offload import LayerStreamingPlugin, OffloadAccelerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1)
    args = parser.parse_args()

    if args.streaming:
        accelerator = OffloadAccelerator(
            cpu=True, gradient_accumulation_steps=args.accumulation, layer_streaming_plugin=LayerStreamingPlugin()
        )
    else:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulation)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    vocab = model.config.vocab_size
    model = accelerator.prepare_model(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, vocab, (64, 12), generator=g)
    dataloader = DataLoader(
        TensorDataset(tokens), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer, dataloader = accelerator.prepare(optimizer, dataloader)
    torch.manual_seed(3 + accelerator.process_index)  # dropout masks differ per rank, the same in both runs
    losses = []
    model.train()
    for micro, (batch,) in enumerate(dataloader):
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        if micro + 1 == args.steps * args.accumulation:
            break
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "losses.json"), "w") as f:
            wrapped = type(model).__name__  # DistributedDataParallel when the ranks are really data parallel
            json.dump({"processes": accelerator.num_processes, "wrapper": wrapped, "losses": losses}, f)
    accelerator.end_training()  # destroys the process group (see trainer_script.py)


if __name__ == "__main__":
    main()
