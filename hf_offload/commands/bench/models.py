"""Benchmark models: presets shaped like real checkpoints, built from a config with random weights.

Nothing is downloaded. A model is created on the meta device (buffers such as rotary tables are computed for
real), then materialised once on its target device and filled with deterministic random values, so a 30B model
never occupies host memory twice. Every method of a run builds the same weights from the same seed.
"""

from __future__ import annotations

import os
import zlib

import torch
import transformers
from transformers import PretrainedConfig

from ..model_sizes import empty_model
from ..model_sizes import load_config as read_config

# Presets: the shapes of well-known checkpoints (what matters for speed: widths, depth, heads, vocabulary).
# `tiny` and `small` are CPU-sized. Dense presets are Llama-shaped (q/k/v/o + SwiGLU MLP, RMSNorm, no biases).
PRESETS: dict[str, tuple[str, str, dict]] = {
    "tiny": (
        "LlamaConfig",
        "CPU smoke test: 4 layers, hidden 64",
        dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512),
    ),
    "small": (
        "LlamaConfig",
        "CPU, compute-dominated with a few hundred tokens: 8 layers, hidden 512 (28M parameters)",
        dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=4096),
    ),
    "8b": (
        "LlamaConfig",
        "Llama-3.1-8B shapes",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    ),
    "14b": (
        "LlamaConfig",
        "Qwen2.5-14B widths and depth, Llama-shaped (no qkv bias)",
        dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
             num_key_value_heads=8, vocab_size=152064, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    "32b": (
        "LlamaConfig",
        "Qwen2.5-32B widths and depth, Llama-shaped (no qkv bias)",
        dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
             num_key_value_heads=8, vocab_size=152064, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
    "70b": (
        "LlamaConfig",
        "Llama-3.1-70B shapes (141 GB in bf16: use --layers to fit host memory)",
        dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
             num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    ),
    "moe-30b-a3b": (
        "Qwen3MoeConfig",
        "Qwen3-30B-A3B shapes: 48 layers, 128 experts, 8 active",
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
             num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
}  # fmt: skip

# Random weights: uniform with this standard deviation (a usual init scale; keeps 80-layer activations finite).
WEIGHT_STD = 0.02
_CHUNK = (1 << 20) + 7  # random values drawn once per model, then tiled (drawing 70B normals would take minutes)


def load_config(preset: str | None, config_path: str | None, layers: int | None = None) -> PretrainedConfig:
    """The model config of a preset or of a `config.json` file, optionally with another number of layers."""
    if (preset is None) == (config_path is None):
        raise ValueError("Give exactly one of --preset and --config.")
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise ValueError(f"--config {config_path} does not exist; pass the path of a transformers config.json.")
        config = read_config(config_path)
    else:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or pass --config.")
        class_name, _, values = PRESETS[preset]
        config = getattr(transformers, class_name)(**values, tie_word_embeddings=False)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers should be a positive integer, but the value passed is {layers}")
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = (list(config.layer_types) * layers)[:layers]
    config.use_cache = False
    return config


def build_model(config: PretrainedConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """The model with deterministic random weights, allocated once on `device` (never twice in host memory)."""
    model = empty_model(config, dtype).requires_grad_(True)  # trainable, as from_config makes it
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)  # one allocation per tensor; buffers come back uninitialised: restore them
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)
    fill_random_(model, seed)
    model.tie_weights()
    model.train()
    return model


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int) -> None:
    """Finite random values in every parameter: matrices uniform (std WEIGHT_STD), norm scales 1, biases 0.

    One chunk of random numbers is drawn and each matrix is filled with it, rotated by an offset derived from the
    parameter's name, so two builds of a model are identical on any device and filling runs at memory speed.
    """
    generator = torch.Generator().manual_seed(seed)
    bound = WEIGHT_STD * 3**0.5
    chunk = torch.empty(_CHUNK).uniform_(-bound, bound, generator=generator)
    chunks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            param.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        key = (param.device, param.dtype)
        if key not in chunks:
            chunks[key] = chunk.to(device=param.device, dtype=param.dtype)
        source = chunks[key].roll(zlib.crc32(name.encode()) % _CHUNK)
        flat = param.view(-1)
        for start in range(0, flat.numel(), _CHUNK):
            n = min(_CHUNK, flat.numel() - start)
            flat[start : start + n].copy_(source[:n])


def random_batch(vocab_size: int, batch: int, seq: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids, no padding; labels are the inputs (the model shifts them)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator).to(device)
    return {"input_ids": input_ids, "labels": input_ids}
