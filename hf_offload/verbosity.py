"""The `hf_offload` logger: what the library tells the user, on stderr, at INFO unless `HF_OFFLOAD_VERBOSITY` says.

Like transformers' library root logger, it has its own handler and does not propagate, so the start-up summary
and notices ("LoRA adapters were added", "optimizer ...") show in any script without logging set up, and show once
in scripts that configure the root logger. `HF_OFFLOAD_VERBOSITY=warning` (or debug, error) changes the level.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "HF_OFFLOAD_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_library_logger() -> logging.Logger:
    """Give the `hf_offload` logger a stderr handler and its level, once per process."""
    logger = logging.getLogger("hf_offload")
    if getattr(logger, "_hf_offload_configured", False):
        return logger
    name = os.environ.get(ENV_VAR, "info").strip().lower()
    if name not in LEVELS:
        raise ValueError(f"{ENV_VAR} should be one of {', '.join(LEVELS)}, but it is {name!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[name])
    logger.propagate = False
    logger._hf_offload_configured = True
    return logger


# Note: [Third-party noise]
# Lines other libraries log while hf_offload imports or uses them that tell a user of hf_offload nothing they can act
# on. Each is dropped by a filter on the logger that emits it, matched by the start of its message, so every other
# line of that logger still shows. Logger name -> message prefix.
THIRD_PARTY_NOISE = {
    # bitsandbytes >= 0.48 on CPUs with AVX512-BF16, at import (peft and transformers import it): an optional 4-bit
    # CPU matmul kernel it could not download. hf_offload dequantizes nf4 weights itself and never calls that kernel.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def drop_third_party_noise() -> None:
    """Install the filters of Note: [Third-party noise], once per process."""
    for name, prefix in THIRD_PARTY_NOISE.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in target.filters):
            target.addFilter(_DropPrefix(prefix))
