"""Write a random-weight safetensors checkpoint of a big model, one tensor at a time, for measurements.

Two shapes, each with the widths of a real model and any number of layers:
    llama     dense Llama with Llama-3.1-8B widths (hidden 4096, intermediate 14336, 32 heads, 8 kv heads)
    qwen3moe  Qwen3-MoE with Qwen3-30B-A3B widths (hidden 2048, 128 experts of intermediate 768, top-8, 32 heads,
              4 kv heads, head_dim 128), experts stored PER EXPERT as on the Hub
              (`model.layers.N.mlp.experts.E.gate_proj.weight`, ...), which transformers fuses on load.

The output folder gets config.json, model-0000N-of-0000M.safetensors shards (about --shard-gb each) and
model.safetensors.index.json. No tokenizer is written: a training script can use any small tokenizer whose
vocabulary fits (ids below the config's vocab_size). Memory stays at one tensor: each shard's header is planned
from the shapes first, then every tensor is generated and appended in turn.

    python tools/make_checkpoint.py llama /tmp/llama-4l --layers 4
    python tools/make_checkpoint.py qwen3moe /tmp/moe --target-gb 20
    python tools/make_checkpoint.py llama /tmp/tiny --layers 2 --hidden 64 --intermediate 128 --heads 4 \\
        --kv-heads 2 --vocab 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PRESETS = {
    "llama": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "qwen3moe": dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
}
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class Spec:
    """One tensor to write: its key, shape, and whether it is a norm (ones) or a weight (random)."""

    name: str
    shape: tuple[int, ...]
    norm: bool = False


def layer_specs(config: dict, index: int) -> list[Spec]:
    """The keys of decoder layer `index`, named as the Hub checkpoints of this model type name them."""
    h, heads, kv, hd = (
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    p = f"model.layers.{index}."
    specs = [
        Spec(p + "input_layernorm.weight", (h,), norm=True),
        Spec(p + "self_attn.q_proj.weight", (heads * hd, h)),
        Spec(p + "self_attn.k_proj.weight", (kv * hd, h)),
        Spec(p + "self_attn.v_proj.weight", (kv * hd, h)),
        Spec(p + "self_attn.o_proj.weight", (h, heads * hd)),
        Spec(p + "post_attention_layernorm.weight", (h,), norm=True),
    ]
    if config["model_type"] == "qwen3_moe":
        specs += [
            Spec(p + "self_attn.q_norm.weight", (hd,), norm=True),
            Spec(p + "self_attn.k_norm.weight", (hd,), norm=True),
        ]
        e, i = config["num_experts"], config["moe_intermediate_size"]
        specs.append(Spec(p + "mlp.gate.weight", (e, h)))
        for expert in range(e):
            q = f"{p}mlp.experts.{expert}."
            specs += [
                Spec(q + "gate_proj.weight", (i, h)),
                Spec(q + "up_proj.weight", (i, h)),
                Spec(q + "down_proj.weight", (h, i)),
            ]
    else:
        i = config["intermediate_size"]
        specs += [
            Spec(p + "mlp.gate_proj.weight", (i, h)),
            Spec(p + "mlp.up_proj.weight", (i, h)),
            Spec(p + "mlp.down_proj.weight", (h, i)),
        ]
    return specs


def all_specs(config: dict) -> list[Spec]:
    v, h = config["vocab_size"], config["hidden_size"]
    specs = [Spec("model.embed_tokens.weight", (v, h))]
    for index in range(config["num_hidden_layers"]):
        specs += layer_specs(config, index)
    return specs + [Spec("model.norm.weight", (h,), norm=True), Spec("lm_head.weight", (v, h))]


def nbytes(spec: Spec, dtype: torch.dtype) -> int:
    return math.prod(spec.shape) * dtype.itemsize


def plan_shards(specs: list[Spec], dtype: torch.dtype, shard_bytes: int) -> list[list[Spec]]:
    """Consecutive specs grouped into shards of about `shard_bytes` (a tensor never spans two)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + nbytes(spec, dtype) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes(spec, dtype)
    return shards


# Weights larger than this many values are tiled from a pool of random values drawn once, each tile at a random
# offset: random-looking rather than independent, which is all a checkpoint for measuring memory and speed needs,
# and a memory copy per tile instead of drawing (drawing 30 GB of normals takes tens of minutes on a busy machine).
POOL_VALUES = 1 << 22


def tensors(specs: list[Spec], dtype: torch.dtype, generator: torch.Generator, std: float) -> Iterator[torch.Tensor]:
    pool = (torch.randn(2 * POOL_VALUES, generator=generator) * std).to(dtype)
    for spec in specs:
        numel = math.prod(spec.shape)
        if spec.norm:
            yield torch.ones(spec.shape, dtype=dtype)
        elif numel <= POOL_VALUES:
            yield (torch.randn(spec.shape, generator=generator) * std).to(dtype)
        else:
            out = torch.empty(numel, dtype=dtype)
            offsets = torch.randint(0, POOL_VALUES, (math.ceil(numel / POOL_VALUES),), generator=generator)
            for start, offset in zip(range(0, numel, POOL_VALUES), offsets.tolist()):
                count = min(POOL_VALUES, numel - start)
                out[start : start + count] = pool[offset : offset + count]
            yield out.view(spec.shape)


def write_shard(path: str, specs: list[Spec], dtype: torch.dtype, generator: torch.Generator, std: float) -> None:
    """One safetensors file, header first (planned from the shapes), then each tensor as it is generated."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        size = nbytes(spec, dtype)
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path + ".partial", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors(specs, dtype, generator, std):
            f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
    os.replace(path + ".partial", path)


def layer_bytes(config: dict, dtype: torch.dtype) -> int:
    return sum(nbytes(s, dtype) for s in layer_specs(config, 0))


def layers_for_size(config: dict, dtype: torch.dtype, target_bytes: int) -> int:
    """The number of layers whose checkpoint (with embeddings and head) is about `target_bytes` (at least 1)."""
    outside = sum(nbytes(s, dtype) for s in all_specs({**config, "num_hidden_layers": 0}))
    return max(1, round((target_bytes - outside) / layer_bytes(config, dtype)))


def write_checkpoint(
    out: str,
    config: dict,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 4 * 10**9,
    seed: int = 0,
    std: float = 0.02,
) -> list[str]:
    """Write config.json, the shards and the index to `out`; returns the shard file names."""
    from transformers import AutoConfig

    os.makedirs(out, exist_ok=True)
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    AutoConfig.for_model(
        config["model_type"], tie_word_embeddings=False, dtype=str(dtype).removeprefix("torch."), **kwargs
    ).save_pretrained(out)
    shards = plan_shards(all_specs(config), dtype, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    names, weight_map, total = [], {}, 0
    for number, specs in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(out, name), specs, dtype, generator, std)
        names.append(name)
        for spec in specs:
            weight_map[spec.name] = name
            total += nbytes(spec, dtype)
        print(f"wrote {name} ({sum(nbytes(s, dtype) for s in specs) / 1e9:.2f} GB)", flush=True)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", help="output folder")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--layers", type=int)
    size.add_argument("--target-gb", type=float, help="pick the number of layers for about this total size")
    parser.add_argument("--shard-gb", type=float, default=4.0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    for flag, key in [
        ("--hidden", "hidden_size"),
        ("--intermediate", "intermediate_size"),
        ("--heads", "num_attention_heads"),
        ("--kv-heads", "num_key_value_heads"),
        ("--head-dim", "head_dim"),
        ("--vocab", "vocab_size"),
        ("--experts", "num_experts"),
        ("--expert-intermediate", "moe_intermediate_size"),
        ("--top-k", "num_experts_per_tok"),
    ]:
        parser.add_argument(flag, type=int, dest=key, help=f"override {key}")
    args = parser.parse_args(argv)
    config = dict(PRESETS[args.preset])
    for key in list(vars(args)):
        if key in config and getattr(args, key) is not None:
            config[key] = getattr(args, key)
    dtype = getattr(torch, args.dtype)
    layers = args.layers if args.layers is not None else layers_for_size(config, dtype, int(args.target_gb * 1e9))
    if layers < 1:
        parser.error(f"`--layers` should be at least 1, but the value passed is {layers}")
    config["num_hidden_layers"] = layers
    print(f"{args.preset}: {layers} layers of {layer_bytes(config, dtype) / 1e9:.2f} GB", flush=True)
    write_checkpoint(args.out, config, dtype, int(args.shard_gb * 1e9), args.seed)


if __name__ == "__main__":
    main()
