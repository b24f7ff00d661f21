"""hf_offload: fine-tune Hugging Face causal LMs bigger than the GPU by streaming decoder layers from host memory.

>>> from hf_offload import OffloadConfig, enable_layer_streaming, stats
>>> model = enable_layer_streaming(peft_model, OffloadConfig(prefetch=1))
>>> model(**batch).loss.backward()
>>> stats(model)["bytes_to_device"]
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
from .optimizer_state import optimizer_state_report

__version__ = "0.1.0"

__all__ = [
    "HostMemoryError",
    "OffloadConfig",
    "UnsupportedModelError",
    "disable_layer_streaming",
    "enable_layer_streaming",
    "is_streaming",
    "optimizer_state_report",
    "reset_stats",
    "stats",
    "summary",
]
