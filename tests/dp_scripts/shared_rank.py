"""One rank of the shared-store tests: streams a tiny Llama with LoRA, its store shared with the node's other
ranks (LOCAL_RANK / LOCAL_WORLD_SIZE / HF_OFFLOAD_JOB from the environment, the tmpfs directory as argv[1]).

Prints one JSON line: the loss of one forward, the inodes of the store files this process maps, and whether the
segment's directory still exists. With argv[2] == "hold", then sleeps until killed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from families import build
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload.engine import shared_store


def mapped_inodes(root: str) -> list[int]:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return sorted({int(line.split()[4]) for line in f if root in line})


def main() -> None:
    root = sys.argv[1]
    shared_store.ROOT = root
    torch.manual_seed(0)
    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    hf_offload.enable_layer_streaming(model)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    model.eval()
    loss = model(input_ids=ids, labels=ids).loss.item()
    runtime = hf_offload.api.get_runtime(model)
    report = {
        "loss": loss,
        "inodes": mapped_inodes(root),
        "segment": str(runtime.shared_store.path),
        "segment_exists": os.path.exists(runtime.shared_store.path),
    }
    print(json.dumps(report), flush=True)
    if sys.argv[2:] == ["hold"]:
        time.sleep(600)


if __name__ == "__main__":
    main()
