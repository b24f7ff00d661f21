"""What a fine-tune leaves for the Hub: a model card that says how it was trained and loaded, and a merged checkpoint.

`save_merged` writes base weights + LoRA deltas as ordinary safetensors shards that plain
`AutoModelForCausalLM.from_pretrained` loads. It walks the model tensor by tensor in host memory: streamed layer
weights are read from the host store, each LoRA delta is computed where the adapter lives (one weight matrix at a
time) and brought to the host, and a shard is written as soon as it is full. The whole model is never on the device
and host memory holds at most one shard beyond the model itself. The host weights are never modified (merging in
place and unmerging would round them).

Example:
    >>> from hf_offload.integrations.hub import save_merged
    >>> save_merged(trainer.model, "out/merged", processing_class=tokenizer)
    >>> AutoModelForCausalLM.from_pretrained("out/merged")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from ..api import is_streaming, summary
from ..engine import compat
from .atomic import atomic_directory, atomic_file

logger = logging.getLogger(__name__)

MERGED_SUBFOLDER = "merged"
CARD_TAG = "hf_offload"
_CARD_MARKER = "<!-- hf_offload -->"


# --- merged checkpoint ---------------------------------------------------------------------------------------------
def save_merged(
    model: nn.Module,
    output_dir: str,
    max_shard_size: int | str = "5GB",
    processing_class=None,
) -> list[str]:
    """Write `model` with its active LoRA adapter merged in as a plain transformers checkpoint. Returns the files.

    `model` may be streamed or not, a peft LoRA model or a plain transformers model (then its own weights are
    written). The config is written with the model's class and dtype; `processing_class` (a tokenizer) too if given.
    Everything is written into a temporary directory next to `output_dir` that then replaces it at once, so a kill
    leaves the previous merged model or the new one (see Note: [Atomic exports] in hf_offload/atomic.py).
    """
    with atomic_directory(output_dir) as tmp:
        files, shards, total_bytes = _write_merged(model, tmp, _parse_size(max_shard_size), processing_class)
    logger.info(
        "hf_offload: merged checkpoint written to %s (%d shard(s), %.2f GB)", output_dir, shards, total_bytes / 1e9
    )
    return files


def _write_merged(model: nn.Module, output_dir: str, limit: int, processing_class) -> tuple[list[str], int, int]:
    """Write the merged model into the empty directory `output_dir`: (files, shards, bytes)."""
    from safetensors.torch import save_file

    base = compat.peft_base_model(model)
    shard_keys: list[list[str]] = []  # tensor names of each shard written so far, in order
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            save_file(current, os.path.join(output_dir, f"tmp-{len(shard_keys):05d}.safetensors"), {"format": "pt"})
            shard_keys.append(list(current))
            current, current_bytes = {}, 0

    for name, tensor in merged_tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > limit:
            flush()
        current[name] = tensor
        current_bytes += nbytes
        total_bytes += nbytes
    flush()

    # HF names: model.safetensors for one shard, else model-0000i-of-0000n.safetensors plus an index.
    n = len(shard_keys)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        os.replace(os.path.join(output_dir, f"tmp-{i:05d}.safetensors"), os.path.join(output_dir, name))
    files = list(names)
    if n > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {key: name for name, keys in zip(names, shard_keys) for key in keys},
        }
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        files.append("model.safetensors.index.json")

    base.config.save_pretrained(output_dir)
    files.append("config.json")
    generation_config = getattr(base, "generation_config", None)
    if generation_config is not None and getattr(base, "can_generate", lambda: False)():
        generation_config.save_pretrained(output_dir)
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    return files, n, total_bytes


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, host tensor) of every weight of the merged model, in module order, one at a time."""
    base = compat.peft_base_model(model)
    if (is_streaming(model) and summary(model)["quantized_weights"]) or any(
        compat.is_quantized_parameter(p) for p in base.parameters()
    ):
        raise ValueError(
            "Cannot write a merged checkpoint of a model whose base weights are quantized (a quantized host store, "
            "base_weight_dtype, or a model loaded in 4/8 bits): there is no dense copy of them to merge into. Push "
            "the adapter, then merge it into the dense base model with peft's merge_and_unload()."
        )
    lora_layers, wrappers = _peft_modules(base, model)
    seen: set[int] = set()
    for key, tensor in base.state_dict(keep_vars=True).items():
        name = _merged_name(key, lora_layers, wrappers)
        if name is None:
            continue
        if id(tensor) in seen:  # a tied weight: written once, tied again by from_pretrained
            continue
        seen.add(id(tensor))
        value = tensor.detach()
        owner = name.rpartition(".")[0]
        if owner in lora_layers and name.endswith(".weight"):
            module, adapter = lora_layers[owner]
            delta = module.get_delta_weight(adapter)  # computed where the adapter lives; one matrix
            # promote, add, round once: what peft's in-place `weight.data += delta` computes
            value = (value + delta.to(value.device)).to(value.dtype)
        yield name, value.to("cpu", copy=True).contiguous()


def _peft_modules(base: nn.Module, model: nn.Module):
    """LoRA layers {prefix: (module, adapter)} and modules_to_save wrappers {prefix: adapter} of a peft model."""
    if base is model:
        return {}, {}
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    adapters = model.active_adapters
    if len(adapters) != 1:
        raise ValueError(f"A merged checkpoint needs exactly one active adapter; this model has {adapters}.")
    adapter = adapters[0]
    config = model.peft_config[adapter]
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA":
        raise ValueError(
            f"A merged checkpoint can be written for LoRA adapters only; this model's adapter is {config.peft_type}. "
            "Push the adapter itself instead (offload_save_merged=False)."
        )
    lora_layers, wrappers = {}, {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            unsupported = [
                label
                for label, on in (
                    ("a LoRA variant such as DoRA", getattr(module, "lora_variant", {}).get(adapter) is not None),
                    ("lora_bias", getattr(module, "lora_bias", {}).get(adapter, False)),
                    ("target_parameters", hasattr(module, "parameter_name")),
                )
                if on
            ]
            if unsupported:
                raise ValueError(
                    f"Cannot write a merged checkpoint: {name} uses {unsupported[0]}, which hf_offload does not merge "
                    "yet. Push the adapter instead (offload_save_merged=False) and merge it with peft's "
                    "merge_and_unload() on a machine that holds the whole model."
                )
            lora_layers[name] = (module, adapter)
        elif isinstance(module, ModulesToSaveWrapper):
            wrappers[name] = adapter
    return lora_layers, wrappers


def _merged_name(key: str, lora_layers: dict, wrappers: dict) -> str | None:
    """The plain-model name of a state-dict key of a peft-injected model, or None for adapter-only tensors."""
    owner, _, leaf = key.rpartition(".")
    parts = owner.split(".")
    for cut in range(len(parts), 0, -1):  # the innermost peft module that contains this tensor
        prefix, rest = ".".join(parts[:cut]), parts[cut:]
        if prefix in lora_layers:
            # base_layer.weight is the merged weight's place; lora_A.default.weight etc. have no merged tensor
            return f"{prefix}.{leaf}" if rest == ["base_layer"] else None
        if prefix in wrappers:
            trained = ["modules_to_save", wrappers[prefix]]
            if rest[:2] != trained:
                return None  # original_module.*, other adapters' copies
            return ".".join([prefix, *rest[2:], leaf])
    return key


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


# --- model card ----------------------------------------------------------------------------------------------------
def model_card_section(base_model: str | None, repo_id: str | None, merged: bool, full_finetune: bool = False) -> str:
    """The part of README.md that says the model was trained with hf_offload and how to load it."""
    base = base_model or "<base model id or path>"
    repo = repo_id or "<this repo id or local path>"
    if full_finetune:
        return _full_finetune_card(repo)
    lines = [
        _CARD_MARKER,
        "## Trained with hf_offload",
        "",
        "This model was fine-tuned with hf_offload (the `hf-offload` Python package): the frozen base weights "
        "stayed in host memory and streamed to the GPU one decoder layer at a time while LoRA adapters trained. "
        "Nothing about the result depends on hf_offload: it is an ordinary peft LoRA adapter.",
        "",
        "Load the adapter onto its base model:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        "```",
    ]
    if merged:
        lines += [
            "",
            f"The `{MERGED_SUBFOLDER}/` folder holds the same model with the adapter merged into the weights:",
            "",
            "```python",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="{MERGED_SUBFOLDER}")',
            "```",
        ]
    lines += [
        "",
        "To keep fine-tuning a model bigger than your GPU, add `--layer_streaming` to a script that uses "
        "`hf_offload.OffloadTrainingArguments`, or run an unchanged script under `hf-offload launch -- ...`.",
    ]
    return "\n".join(lines) + "\n"


def _full_finetune_card(repo: str) -> str:
    lines = [
        _CARD_MARKER,
        "## Trained with hf_offload",
        "",
        "Every weight of this model was fine-tuned with [hf_offload](https://pypi.org/project/hf-offload/): the "
        "master weights, gradients and optimizer state stayed in host memory and the decoder layers streamed to the "
        "GPU one at a time. Nothing about the result depends on hf_offload: it is an ordinary transformers checkpoint.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        "```",
        "",
        "To keep fine-tuning it on a GPU smaller than the model, run the training script under "
        "`hf-offload launch --full_finetune -- ...`.",
    ]
    return "\n".join(lines) + "\n"


def add_to_model_card(
    output_dir: str, base_model: str | None, repo_id: str | None, merged: bool, full_finetune: bool = False
) -> str:
    """Add the hf_offload section and tag to `output_dir/README.md` (creating it if needed). Returns the path."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.isfile(path) else ModelCard("---\n---\n")
    if card.data is None:
        card.data = ModelCardData()
    tags = list(card.data.tags or [])
    if CARD_TAG not in tags:
        card.data.tags = [*tags, CARD_TAG]
    if base_model and not getattr(card.data, "base_model", None):
        card.data.base_model = base_model
    text = card.text
    if _CARD_MARKER in text:  # written again on every push: replace our section, keep the rest
        text = text[: text.index(_CARD_MARKER)].rstrip() + "\n"
    card.text = text.rstrip() + "\n\n" + model_card_section(base_model, repo_id, merged, full_finetune)
    with atomic_file(path) as tmp:  # a kill leaves the old card or the new one
        card.save(tmp)
    return path


def base_model_name(model: nn.Module) -> str | None:
    """The id or path the base model was loaded from, as peft and transformers recorded it."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        name = next(iter(peft_config.values())).base_model_name_or_path
        if name:
            return name
    return getattr(getattr(compat.peft_base_model(model), "config", None), "_name_or_path", None) or None
