"""How small the optimizer state of adapter training is: bytes of the state against fp32 AdamW on full fine-tuning.

Definitions (per parameter of the model without its adapters, N of them, for the full fine-tuning reference; a
4-bit weight counts the weights it stands for):
- optimizer state of fp32 AdamW: the two moments `exp_avg` and `exp_avg_sq` in fp32, 8 bytes.
- training state of full fine-tuning (mixed precision): fp32 master weight + fp32 gradient + the two fp32 moments,
  16 bytes. The low-precision working copy of the weights is not counted (streaming keeps the base weights too).
For the adapters: their optimizer state (measured from the optimizer when it has stepped, else estimated for
bitsandbytes 8-bit AdamW, the default under streaming), and their training state = adapter weights + gradients
(in the adapters' own dtype) + optimizer state.

Example:
    >>> report = hf_offload.optimizer_state_report(model, optimizer)
    >>> report["optimizer_state_factor"]  # e.g. ~1000x for LoRA r=16 on a 7B model
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .engine import compat
from .records import Record

# bitsandbytes 0.50.2, Optimizer2State (AdamW8bit): tensors smaller than `min_8bit_size` keep fp32 state; larger ones
# keep each moment in uint8 with one fp32 absmax per block of 256 values.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
BNB_CODE_MAP_BYTES = 2 * 256 * 4  # the two 8-bit code maps (signed, unsigned), fp32, shared by every tensor


def adamw8bit_state_bytes(numel: int, min_8bit_size: int = BNB_MIN_8BIT_SIZE) -> int:
    """Bytes of bitsandbytes AdamW8bit state for one tensor of `numel` values."""
    if numel < min_8bit_size:
        return 2 * 4 * numel
    return 2 * (numel + 4 * math.ceil(numel / BNB_BLOCKSIZE))


def _unique(params) -> list[nn.Parameter]:
    return list({id(p): p for p in params}.values())


def _adapter_ids(model: nn.Module) -> set[int]:
    """Parameters peft added (inside tuner layers, outside their base layer): not part of the model fine-tuned."""
    ids: set[int] = set()
    for module in model.modules():
        if compat.is_peft_tuner_layer(module):
            base = {id(p) for p in module.get_base_layer().parameters()}
            ids |= {id(p) for p in module.parameters()} - base
    return ids


def _measured_state_bytes(optimizer: torch.optim.Optimizer) -> int | None:
    """Bytes of the tensors in `optimizer.state`, each storage once (8-bit code maps are shared), or None before
    the first step."""
    storages: dict[tuple[torch.device, int], int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.device, value.untyped_storage().data_ptr())
                storages[key] = max(storages.get(key, 0), value.untyped_storage().nbytes())
    return sum(storages.values()) if storages else None


def _estimated_state_bytes(params: list[nn.Parameter], optimizer: torch.optim.Optimizer | None) -> tuple[int, str]:
    min_8bit = _bnb_8bit_min_size(optimizer) if optimizer is not None else BNB_MIN_8BIT_SIZE
    if min_8bit is not None:
        state = sum(adamw8bit_state_bytes(p.numel(), min_8bit) for p in params)
        if any(p.numel() >= min_8bit for p in params):
            state += BNB_CODE_MAP_BYTES
        return state, "estimated (bitsandbytes 8-bit AdamW)"
    return sum(2 * 4 * p.numel() for p in params), "estimated (two fp32 moments per parameter)"


def _bnb_8bit_min_size(optimizer: torch.optim.Optimizer) -> int | None:
    """`min_8bit_size` of a bitsandbytes 8-bit optimizer (0.50.2: `optimizer.args`), None for any other optimizer."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:  # pragma: no cover
        return None
    args = getattr(optimizer, "args", None)
    if isinstance(optimizer, Optimizer8bit) and getattr(args, "optim_bits", 32) == 8:
        return int(getattr(args, "min_8bit_size", BNB_MIN_8BIT_SIZE))
    return None


@dataclass(frozen=True)
class OptimizerStateReport(Record):
    """What `optimizer_state_report` returns (definitions in the module docstring)."""

    trainable_parameters: int
    total_parameters: int  # the model without adapters: what full fine-tuning would train
    optimizer: str | None
    source: str  # "measured", or how it was estimated
    optimizer_state_bytes: int
    full_finetune_optimizer_state_bytes: int
    optimizer_state_factor: float
    training_state_bytes: int
    full_finetune_training_state_bytes: int
    training_state_factor: float


def optimizer_state_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> OptimizerStateReport:
    """Optimizer-state and training-state bytes of `model`'s trainable parameters, and the factors by which they
    are smaller than fp32 AdamW on full fine-tuning of the same model (definitions in the module docstring).

    Args:
        model: the model being trained (streamed or not, peft or not).
        optimizer: its optimizer. Once it has stepped, the state is measured from it; before that (or with None)
            it is estimated for bitsandbytes 8-bit AdamW (or two fp32 moments for an optimizer that is not 8-bit).

    Returns:
        An `OptimizerStateReport` (`.as_dict()` for a plain dict).
    """
    params = _unique(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    adapters = _adapter_ids(model)
    total = sum(compat.logical_numel(p) for p in params if id(p) not in adapters)
    measured = _measured_state_bytes(optimizer) if optimizer is not None else None
    if measured is not None:
        state_bytes, source = measured, "measured"
    else:
        state_bytes, source = _estimated_state_bytes(trainable, optimizer)
    full_state = 2 * 4 * total
    full_training = 4 * 4 * total
    training = sum(2 * p.numel() * p.element_size() for p in trainable) + state_bytes  # weights + grads + state
    return OptimizerStateReport(
        trainable_parameters=sum(p.numel() for p in trainable),
        total_parameters=total,
        optimizer=type(optimizer).__name__ if optimizer is not None else None,
        source=source,
        optimizer_state_bytes=state_bytes,
        full_finetune_optimizer_state_bytes=full_state,
        optimizer_state_factor=full_state / state_bytes if state_bytes else math.inf,
        training_state_bytes=training,
        full_finetune_training_state_bytes=full_training,
        training_state_factor=full_training / training if training else math.inf,
    )
