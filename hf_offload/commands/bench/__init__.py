"""`hf-offload bench`: hf_offload against resident training and the offload options users have today.

Runs every method side by side in one process on the same random-weight model (presets shaped like real
checkpoints, or a config.json), the same LoRA and the same batch, and prints tokens/s, model TFLOP/s, step time,
host->device bandwidth against a plain pinned copy, copy/compute overlap and peak memory.

    hf-offload bench --device cpu --preset tiny          # anywhere, in seconds (CI smoke test)
    hf-offload bench --preset 8b --batch 4 --seq 4096    # on a GPU
    hf-offload bench --long_context                      # on a GPU: 32k to 512k tokens, a row per length and method
"""

from .command import main, register

__all__ = ["main", "register"]
