"""Saying how streaming changes the training recipe: the LoRA it adds, the optimizer it picks, the options it
ignores, and what a launched command did.

Note: [The recipe, stated]
`--layer_streaming` and `hf-offload launch` turn a script's run into a LoRA run with 8-bit AdamW. That is the
point, but it changes the recipe: a full fine-tuning script's learning rate (5e-5, the Trainer's default) is far too
low for LoRA, which usually trains at 1e-4 to 3e-4. So every change is said at WARNING level, with the numbers in
use, where the user sees it before training starts; options that do nothing are named rather than dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from ..options import declared, spelled

logger = logging.getLogger(__name__)

# Below this, a learning rate is a full fine-tuning one; LoRA usually trains in LORA_LEARNING_RATES.
FULL_FINE_TUNING_RATE_BELOW = 1e-4
LORA_LEARNING_RATES = (1e-4, 3e-4)
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def announce_lora(model, plugin, learning_rate: float | None, face: str) -> None:
    """Say, at WARNING, that LoRA was added to `model` (the peft model), with what, and at which learning rate."""
    from ..engine import compat

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    message = (
        f"hf_offload: {type(compat.peft_base_model(model)).__name__} is not a peft model, so layer streaming added "
        f"LoRA adapters (r={plugin.lora_r}, alpha={plugin.lora_alpha:g}, dropout={plugin.lora_dropout:g}, "
        f"targets={plugin.lora_target_modules}): {trainable:,} trainable parameters; the base weights are frozen "
        f"(change them with {spelled('lora_r', face)} and friends)."
    )
    low, high = LORA_LEARNING_RATES
    if learning_rate is None:
        message += f" Give the optimizer a LoRA learning rate, usually {low:g} to {high:g}."
    elif learning_rate < FULL_FINE_TUNING_RATE_BELOW:
        message += (
            f" The learning rate in use, {learning_rate:g}, is a full fine-tuning rate and too low for LoRA, which "
            f"usually trains at {low:g} to {high:g}: pass --learning_rate {2 * low:g}, for example."
        )
    else:
        message += f" Learning rate in use: {learning_rate:g}."
    logger.warning(message)


def warn_unused_lora_options(model, plugin, face: str) -> None:
    """When `model` already has peft adapters, name the LoRA options given to hf_offload that therefore do nothing."""
    defaults = {opt.name: opt.default for opt in declared(type(plugin))}
    given = {name: getattr(plugin, name) for name in LORA_OPTIONS if getattr(plugin, name) != defaults[name]}
    if not given:
        return
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    own = f" (r={config.r})" if getattr(config, "r", None) is not None else ""
    logger.warning(
        "hf_offload: the model is already a peft model%s, so its own adapters train and %s %s not used. Give the "
        "LoRA settings in one place: drop hf_offload's, or let hf_offload add LoRA by not applying peft in the "
        "script (e.g. without TRL's --use_peft).",
        own,
        ", ".join(f"{spelled(name, face)} {value}" for name, value in given.items()),
        "is" if len(given) == 1 else "are",
    )


def warn_offload_options_without_streaming(args, fields: dict) -> None:
    """`--offload_*` options given without `--layer_streaming` do nothing: say which.

    Args:
        args: `OffloadTrainingArguments` (or a subclass).
        fields: its option fields, field name -> `Option` (`hf_offload.options.option_fields`).
    """
    if args.layer_streaming:
        return
    given = [name for name, opt in fields.items() if getattr(args, name, opt.default) != opt.default]
    if given:
        logger.warning(
            "hf_offload: %s %s given without --layer_streaming, so %s no effect. Add --layer_streaming to stream "
            "the model.",
            ", ".join(f"--{name}" for name in given),
            "is" if len(given) == 1 else "are",
            "it has" if len(given) == 1 else "they have",
        )


def optimizer_chosen_on_command_line(argv: list[str] | None = None) -> bool:
    """Whether the process's command line passes `--optim` (so even the Trainer's default value was chosen)."""
    argv = sys.argv if argv is None else argv
    return any(arg == "--optim" or arg.startswith("--optim=") for arg in argv[1:])


# --- what a launched command did ------------------------------------------------------------------------------------
# `hf-offload launch` points this variable at an empty folder; each process of the command notes there what it did,
# one empty file per event and process, and the launcher reads the folder when the command has ended.
REPORT_ENV_VAR = "HF_OFFLOAD_LAUNCH_REPORT"
STARTED, TRAINER_IMPORTED, STREAMED = "started", "trainer-imported", "streamed"


def note_launch_event(event: str) -> None:
    """Record `event` for `hf-offload launch`, if this process runs under it (else do nothing)."""
    folder = os.environ.get(REPORT_ENV_VAR)
    if folder and os.path.isdir(folder):
        with contextlib.suppress(OSError):  # a report is a courtesy: never fail the user's command over it
            Path(folder, f"{event}.{os.getpid()}").touch()


def launch_report(folder: str | os.PathLike) -> str | None:
    """What to tell the user after a launched command in which nothing streamed, or None if something did."""
    events = {name.split(".")[0] for name in os.listdir(folder)}
    if STREAMED in events:
        return None
    if STARTED not in events:
        why = (
            "no Python process of the command ran hf_offload's start-up hook: the command did not start Python, or "
            "started it with -I, -E or -S (which ignore PYTHONPATH or site), or in an environment where this "
            "hf_offload is not installed"
        )
    elif TRAINER_IMPORTED not in events:
        why = (
            "no process imported transformers' Trainer. Streaming applies to a transformers Trainer (TRL's "
            "included) or an hf_offload.OffloadAccelerator; a custom training loop can use OffloadAccelerator or "
            "hf_offload.enable_layer_streaming"
        )
    else:
        why = (
            "transformers' Trainer was imported, but no Trainer was created with a model (or the command ended "
            "before that)"
        )
    return f"hf-offload launch: the command ended and nothing streamed: {why}."
