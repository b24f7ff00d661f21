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
