"""One rank of the partitioned-fetch test (run under torchrun, gloo): the same model streamed with replicated and
with partitioned fetch, on this rank's own tokens, must give the same losses, eval logits and adapter gradients bit
for bit, and each rank must have copied only its share of the layers from host memory.

Cases: a dense Llama with LoRA dropout (fp32 store, then nf4 on the simulated asynchronous device) and a Qwen3-MoE
with LoRA on its experts and routed expert fetch (int8 store, simulated device): the ranks route different tokens.
Writes `rank<N>.json` in the working directory: per case that passed, its byte counters (the two ranks' prints
would interleave on one pipe); any difference raises. With `--cuda`, each rank streams to its own GPU (LOCAL_RANK)
over NCCL, the simulated device off.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from families import build
from moe_families import build as build_moe
from moe_families import with_expert_lora
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload import OffloadConfig

CASES = {
    # name: (model, base_weight_dtype, simulated asynchronous device, prefetch)
    "llama-fp32": ("llama", None, False, 1),
    "llama-nf4-simulated": ("llama", "nf4", True, 2),
    "qwen3_moe-int8-routed-simulated": ("qwen3_moe", "int8", True, 1),
}


def lora_model(family: str):
    if family == "qwen3_moe":
        return with_expert_lora(build_moe(family), family)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(build(family), config)


CUDA = "--cuda" in sys.argv


def streamed(reference, dtype: str | None, simulated: bool, prefetch: int, partitioned: bool):
    os.environ["HF_OFFLOAD_SIMULATE_ASYNC"] = "1" if simulated and not CUDA else "0"  # read when ops are made
    device = f"cuda:{os.environ['LOCAL_RANK']}" if CUDA else "cpu"
    config = OffloadConfig(
        device=device,
        base_weight_dtype=dtype,
        prefetch=prefetch,
        partitioned_fetch=partitioned,
        shared_host_store=False,
    )
    return hf_offload.enable_layer_streaming(copy.deepcopy(reference), config)


def run(model, rank: int, vocab: int) -> dict:
    """Two training micro-steps and an eval forward on this rank's tokens; the gradients accumulate."""
    model.train()
    generator = torch.Generator().manual_seed(100 + rank)  # every rank its own tokens (and routing)
    losses = []
    for step in range(2):
        ids = torch.randint(3, vocab, (2, 10), generator=generator).to(model.device)
        torch.manual_seed(1000 * rank + step)  # the same dropout masks for both models of this rank
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, vocab, (1, 6), generator=generator).to(model.device)).logits
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"losses": losses, "logits": logits, "grads": grads, "stats": hf_offload.stats(model)}


def main() -> None:
    if CUDA:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if CUDA else "gloo")
    rank = torch.distributed.get_rank()
    passed = {}
    for name, (family, dtype, simulated, prefetch) in CASES.items():
        reference = lora_model(family)
        vocab = reference.config.vocab_size
        replicated = run(streamed(reference, dtype, simulated, prefetch, False), rank, vocab)
        partitioned = run(streamed(reference, dtype, simulated, prefetch, True), rank, vocab)
        for key in ("losses", "logits"):
            for got, want in zip(partitioned[key], replicated[key], strict=True):
                assert torch.equal(got, want), (name, key, got, want)
        assert partitioned["grads"].keys() == replicated["grads"].keys() and replicated["grads"], name
        for param, grad in replicated["grads"].items():
            assert torch.equal(partitioned["grads"][param], grad), (name, param)
        got, want = partitioned["stats"], replicated["stats"]
        assert want["bytes_from_peers"] == 0 and got["bytes_from_peers"] > 0, (name, got)
        # every byte arrives once, from the host or from a peer; the host share is this rank's chunk of each layer
        assert got["bytes_to_device"] + got["bytes_from_peers"] == want["bytes_to_device"], (name, got, want)
        assert got["bytes_to_device"] < want["bytes_to_device"], (name, got, want)
        figures = {k: got[k] for k in ("bytes_to_device", "bytes_from_peers", "layer_loads")}
        figures["replicated_bytes_to_device"] = want["bytes_to_device"]
        passed[name] = figures
        with open(f"rank{rank}.json", "w", encoding="utf-8") as f:
            json.dump(passed, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
