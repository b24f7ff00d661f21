"""Bytes moved per training step with routed vs. all-expert fetch, on a Qwen3-MoE-shaped model (runs on the CPU).

The model keeps Qwen3-30B-A3B's routing shape (128 experts, top-8, experts a small slice of hidden) at a width that
trains on a CPU in seconds; bytes are counted by `hf_offload.stats`, so the ratio is what a GPU run would move
over the host-to-device link for the same batch. Randomly initialised routers spread tokens almost uniformly,
which hits more distinct experts than trained routers usually do: the ratios are a pessimistic estimate.

Usage:
    python examples/bench_moe_fetch.py                # a few batch shapes
    python examples/bench_moe_fetch.py --tokens 1x64  # batch x sequence length

Until `hf-offload bench` exists, `measure_expert_fetch` is the function it can call.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import transformers
from peft import LoraConfig, get_peft_model

import hf_offload


def qwen3_moe_shaped(layers: int = 4, scale: int = 8, experts: int = 128, top_k: int = 8):
    """Qwen3-30B-A3B (hidden 2048, 32 query / 4 key-value heads of 128, 128 experts of width 768, top-8) with every
    width divided by `scale`: the attention-to-experts byte ratio of a layer and the routing stay those of the model.
    """
    config = transformers.Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=2048 // scale,
        intermediate_size=6144 // scale,
        moe_intermediate_size=768 // scale,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128 // scale,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=0.001,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def measure_expert_fetch(base: torch.nn.Module, batch: int, length: int, device: str = "cpu") -> dict:
    """Stream one LoRA training step of `base` with each `expert_fetch` mode; return the counters of both."""
    ids = torch.randint(0, base.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    result = {}
    for mode in ("all", "routed"):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device=device, expert_fetch=mode))
        hf_offload.reset_stats(model)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        stats = hf_offload.stats(model)
        result[mode] = dict(stats, seconds=time.perf_counter() - start, **hf_offload.summary(model))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", nargs="*", default=["1x8", "1x64", "4x128", "8x512"], help="BATCHxLENGTH")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    base = qwen3_moe_shaped()
    cfg = base.config
    print(
        f"Qwen3-MoE-shaped: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts, "
        f"top-{cfg.num_experts_per_tok}, expert width {cfg.moe_intermediate_size}; fp32 on the CPU; bytes per "
        "training step (forward + backward, prefetch=1)"
    )
    print(f"{'tokens':>10} {'all: MB/step':>13} {'routed: MB/step':>16} {'ratio':>7} {'experts moved':>14}")
    for shape in args.tokens:
        batch, length = (int(x) for x in shape.lower().split("x"))
        r = measure_expert_fetch(base, batch, length)
        moved = r["routed"]["experts_loaded"] / (r["routed"]["experts_loaded"] + r["routed"]["experts_skipped"])
        print(
            f"{batch * length:>10} {r['all']['bytes_to_device'] / 1e6:>13.1f} "
            f"{r['routed']['bytes_to_device'] / 1e6:>16.1f} "
            f"{r['routed']['bytes_to_device'] / r['all']['bytes_to_device']:>7.3f} {moved:>13.1%}"
        )


if __name__ == "__main__":
    main()
