"""hf_offload: fine-tune Hugging Face causal LMs bigger than the GPU by streaming decoder layers from host memory.

>>> from hf_offload import OffloadConfig, enable_layer_streaming, stats
>>> model = enable_layer_streaming(peft_model, OffloadConfig(prefetch=1))
>>> model(**batch).loss.backward()
>>> stats(model)["bytes_to_device"]
>>> outputs = list(evaluate_layer_major(model.eval(), eval_batches))  # each layer loaded once per group

With `transformers.Trainer`: `OffloadTrainingArguments` + `OffloadTrainer` and `--layer_streaming`, or an unchanged
script under `hf-offload launch -- python train.py ...`. With a plain accelerate loop: `OffloadAccelerator`.
"""

from .api import (
    disable_layer_streaming,
    enable_layer_streaming,
    is_streaming,
    reset_stats,
    stats,
    summary,
)
from .config import OffloadConfig
from .engine.anatomy import UnsupportedModelError
from .engine.hostmem import HostMemoryError
from .evaluation import evaluate_layer_major
from .optimizer_state import optimizer_state_report
from .verbosity import configure_library_logger

configure_library_logger()

__version__ = "0.1.0"

# The Trainer and accelerate faces load on first use: `import hf_offload` does not import transformers.Trainer.
_LAZY = {
    "OffloadTrainingArguments": "trainer",
    "OffloadTrainer": "trainer",
    "LayerStreamingPlugin": "plugin",
    "OffloadAccelerator": "plugin",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HostMemoryError",
    "LayerStreamingPlugin",
    "OffloadAccelerator",
    "OffloadConfig",
    "OffloadTrainer",
    "OffloadTrainingArguments",
    "UnsupportedModelError",
    "disable_layer_streaming",
    "enable_layer_streaming",
    "evaluate_layer_major",
    "is_streaming",
    "optimizer_state_report",
    "reset_stats",
    "stats",
    "summary",
]
