"""The `hf_offload` logger, following `transformers.utils.logging`'s conventions, and its progress-bar switch.

Like transformers' library root logger, it has its own stderr handler and does not propagate, so the start-up
summary and notices show in any script without logging set up, and show once in scripts that configure the root
logger. Its level, first that applies:

1. `HF_OFFLOAD_VERBOSITY` (debug, info, warning, error, critical): hf_offload's own;
2. inside a Trainer, its `--log_level` (`--log_level_replica` on processes that do not log), unless "passive";
3. `TRANSFORMERS_VERBOSITY`, read as transformers reads it;
4. info: what hf_offload did to the model (LoRA added, layers streamed, the optimizer) shows by default.

An unknown value in either variable is warned about and ignored, as transformers does, never raised at import.
The packing progress bar shows only where transformers' (and huggingface_hub's) progress bars are on
(`transformers.utils.logging.disable_progress_bar()`, `HF_HUB_DISABLE_PROGRESS_BARS=1`) and, inside a Trainer,
not with `--disable_tqdm`.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "HF_OFFLOAD_VERBOSITY"
TRANSFORMERS_ENV_VAR = "TRANSFORMERS_VERBOSITY"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
DEFAULT_LEVEL = logging.INFO


def configure_library_logger() -> logging.Logger:
    """Give the `hf_offload` logger a stderr handler and its level from the environment, once per process."""
    logger = logging.getLogger("hf_offload")
    if getattr(logger, "_hf_offload_configured", False):
        return logger
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger._hf_offload_configured = True
    level, problems = level_from_environment()
    logger.setLevel(level)
    for problem in problems:
        logger.warning(problem)
    return logger


def level_from_environment(environ: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """The level the environment asks for (see the module docstring), and a warning for each unknown value."""
    environ = os.environ if environ is None else environ
    problems = []
    for variable in (ENV_VAR, TRANSFORMERS_ENV_VAR):
        raw = environ.get(variable)
        if not raw:
            continue
        name = raw.strip().lower()
        if name in LEVELS:
            return LEVELS[name], problems
        problems.append(
            f"hf_offload: {variable} should be one of {', '.join(LEVELS)}, but the value passed is {raw!r}; it is "
            "ignored. Set it to one of those, or unset it."
        )
    return DEFAULT_LEVEL, problems


def follow_trainer_log_level(args) -> None:
    """Give the `hf_offload` logger the level a Trainer's arguments choose (`--log_level`, `--log_level_replica`).

    "passive" (the Trainer's default) leaves it as the environment set it; so does `HF_OFFLOAD_VERBOSITY`, which
    is hf_offload's own and wins.
    """
    if os.environ.get(ENV_VAR, "").strip().lower() in LEVELS:
        return
    chosen = args.log_level if getattr(args, "should_log", True) else args.log_level_replica
    if isinstance(chosen, str) and chosen.lower() in LEVELS:
        logging.getLogger("hf_offload").setLevel(LEVELS[chosen.lower()])


def progress_bars_enabled() -> bool:
    """Whether the Hugging Face libraries' progress bars are on (transformers' switch, huggingface_hub's variable)."""
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None and not transformers_logging.is_progress_bar_enabled():
        return False
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() not in ("1", "ON", "YES", "TRUE")


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
