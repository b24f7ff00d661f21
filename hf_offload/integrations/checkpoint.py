"""Checks that a Trainer checkpoint can be resumed by a layer-streamed run, before anything is loaded from it.

A streamed run trains peft adapters, so it resumes from adapter checkpoints: its own, or those of an ordinary
(unstreamed) LoRA run with the same adapter layout. `Trainer` itself would load a full-weights checkpoint into a
peft model with `strict=False` (matching nothing, silently) and an optimizer state of another family without
complaint until the first step. These checks turn both into clear errors; they only read the checkpoint.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
OPTIMIZER_FILE = "optimizer.pt"
# LoRA settings that must agree for the resumed run to compute what the checkpoint's run computed.
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias")


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that a layer-streamed run cannot resume from; the message says why and what to do."""


def check_adapter_checkpoint(checkpoint: str, model: nn.Module) -> None:
    """Refuse `checkpoint` unless it holds an adapter with the same layout and settings as `model`'s own."""
    from peft import get_peft_model_state_dict

    files = set(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else set()
    adapter_file = next((name for name in ADAPTER_FILES if name in files), None)
    if adapter_file is None:
        if files & set(FULL_WEIGHT_FILES):
            raise IncompatibleCheckpointError(
                f"{checkpoint} holds full model weights, written by a run that trained the whole model rather than "
                "LoRA adapters. A layer-streamed run trains adapters and cannot resume from it. To keep training "
                "from those weights, load them as the base model "
                f"(AutoModelForCausalLM.from_pretrained({checkpoint!r})) and start a new run without "
                "resume_from_checkpoint."
            )
        return  # nothing we recognise: Trainer raises its own "Can't find a valid checkpoint"

    adapter = getattr(model, "active_adapter", "default")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    found = _readable(checkpoint, adapter_file, _tensor_shapes)
    problems = []
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing:
        problems.append(f"{len(missing)} adapter tensors of this model are not in it (first: {missing[0]})")
    if unexpected:
        problems.append(f"it holds {len(unexpected)} tensors this model has no place for (first: {unexpected[0]})")
    for key in sorted(expected.keys() & found.keys()):
        if expected[key] != found[key]:
            problems.append(f"{key} has shape {found[key]} there and {expected[key]} here")
            break
    saved_config = _read_json(os.path.join(checkpoint, "adapter_config.json"))
    ours = model.peft_config[adapter]
    for name in LORA_FIELDS:
        if name in saved_config and hasattr(ours, name) and saved_config[name] != getattr(ours, name):
            problems.append(f"{name} is {saved_config[name]!r} there and {getattr(ours, name)!r} here")
    if problems:
        raise IncompatibleCheckpointError(
            f"Cannot resume from {checkpoint}: its adapter does not match this model's ("
            + "; ".join(problems)
            + "). Resume with the LoRA settings of the run that wrote it (with --layer_streaming: "
            "--offload_lora_r, --offload_lora_alpha, --offload_lora_dropout, --offload_lora_target_modules), "
            "or start a new run."
        )


def check_optimizer_state(checkpoint: str, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer state written by another optimizer family (bitsandbytes vs. torch) than `optimizer`."""
    path = os.path.join(checkpoint, OPTIMIZER_FILE)
    if not os.path.isfile(path):
        return
    saved = _readable(checkpoint, OPTIMIZER_FILE, _load_state)
    states = [s for s in saved.get("state", {}).values() if s]
    if not states:
        return
    # bitsandbytes names its moments state1/state2 and keeps 8-bit ones under a quant-state key (bnb 0.50)
    saved_is_bnb = any("state1" in s or any(str(k).startswith("__bnb") for k in s) for s in states)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    ours_is_bnb = type(inner).__module__.startswith("bitsandbytes")
    if saved_is_bnb != ours_is_bnb:
        family = {True: "a bitsandbytes optimizer", False: "a torch optimizer"}
        raise IncompatibleCheckpointError(
            f"Cannot resume from {checkpoint}: {OPTIMIZER_FILE} holds the state of {family[saved_is_bnb]}, but this "
            f"run uses {type(inner).__module__}.{type(inner).__name__} ({family[ours_is_bnb]}). With layer streaming "
            "the default optimizer is bitsandbytes 8-bit AdamW; pass the `--optim` of the run that wrote the "
            "checkpoint (for example --optim adamw_torch_fused), or start a new run."
        )


def _readable(checkpoint: str, name: str, read):
    """`read(path)` of file `name` of `checkpoint`, or a clear error naming both when the file is damaged."""
    try:
        return read(os.path.join(checkpoint, name))
    except Exception as err:  # safetensors, pickle and zip errors of a truncated file have no common type
        raise IncompatibleCheckpointError(
            f"Cannot resume from {checkpoint}: {name} cannot be read ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}); it is damaged or was cut short by an "
            "interrupted save. Resume from an earlier checkpoint (or resume_from_checkpoint=True, which skips "
            "incomplete ones), or start a new run."
        ) from err


def _load_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - not a dict
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
