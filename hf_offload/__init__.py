"""hf_offload: fine-tune Hugging Face causal LMs bigger than the GPU by streaming decoder layers from host memory.

>>> from hf_offload import OffloadConfig, enable_layer_streaming, stats
>>> model = enable_layer_streaming(peft_model, OffloadConfig(prefetch=1))
>>> model(**batch).loss.backward()
>>> stats(model)["bytes_to_device"]

A checkpoint bigger than host memory: `from_pretrained(..., quantization_config=HostStoreConfig("nf4"))` loads its
decoder layers straight into the host store.

With `transformers.Trainer`: `OffloadTrainingArguments` + `OffloadTrainer` and `--layer_streaming`, or an unchanged
script under `hf-offload launch -- python train.py ...`. With a plain accelerate loop: `OffloadAccelerator`.

Every public name loads on first use, so `import hf_offload` (and `hf-offload --help`) imports neither torch nor
transformers until something needs them.
"""

from __future__ import annotations

import importlib

from .verbosity import configure_library_logger, drop_third_party_noise

configure_library_logger()
drop_third_party_noise()

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_LAZY = {
    "disable_layer_streaming": "api",
    "enable_layer_streaming": "api",
    "is_streaming": "api",
    "reset_stats": "api",
    "stats": "api",
    "summary": "api",
    "OffloadConfig": "config",
    "UnsupportedModelError": "engine.errors",
    "HostMemoryError": "engine.hostmem",
    "evaluate_layer_major": "evaluation",
    "optimizer_state_report": "optimizer_state",
    "OffloadTrainingArguments": "integrations.trainer",
    "OffloadTrainer": "integrations.trainer",
    "LayerStreamingPlugin": "integrations.plugin",
    "OffloadAccelerator": "integrations.accelerator",
    "HostStoreConfig": "integrations.store_loading",
}


# submodules reachable as attributes (`hf_offload.api.get_runtime`), as when this package imported them eagerly
_SUBMODULES = {"api", "commands", "config", "demo", "engine", "evaluation", "integrations", "options", "units"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
