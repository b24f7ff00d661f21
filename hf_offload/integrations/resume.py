"""Resuming safely: which checkpoint of an output directory is complete, and whether it was trained on this base model.

Note: [Complete checkpoints]
`Trainer._save_checkpoint` (transformers 5.24) writes a checkpoint-N directory in this order: the model (adapter,
training_args.bin), the optimizer, scheduler and RNG states, then `trainer_state.json`, last. A process killed while
saving leaves a directory without a readable `trainer_state.json`; transformers' `get_last_checkpoint` would still
pick it (the highest N) and resuming would stop with "Can't find a valid checkpoint", or load a half-written file.
So `resume_from_checkpoint=True` goes to the newest checkpoint whose `trainer_state.json` parses, and names the
incomplete ones it passed over.

Note: [Base model identity]
An adapter checkpoint fits any base model with the same shapes, so resuming on another base model (an instruct
variant, another fine-tune) would silently train a different model. Each checkpoint a streamed run writes records the
base model's name or path and a fingerprint of its config (`BASE_MODEL_FILE`); resuming compares them and refuses a
mismatch. The fingerprint leaves out what does not change the weights' meaning (dtype, cache and output switches,
the transformers version, private keys), so loading the same model in another dtype resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

from torch import nn

from ..engine import compat

logger = logging.getLogger(__name__)

BASE_MODEL_FILE = "hf_offload_base_model.json"
TRAINER_STATE_FILE = "trainer_state.json"
ALLOW_OTHER_BASE_ENV = "HF_OFFLOAD_ALLOW_OTHER_BASE_MODEL"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_NOT_FINGERPRINTED = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "quantization_config",
}


class BaseModelMismatchError(ValueError):
    """A checkpoint written for another base model than the one this run trains."""


# --- complete checkpoints ------------------------------------------------------------------------------------------
def is_complete_checkpoint(path: str) -> bool:
    """Whether `path` holds a checkpoint whose save finished (see Note: [Complete checkpoints])."""
    try:
        with open(os.path.join(path, TRAINER_STATE_FILE), encoding="utf-8") as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """(the newest complete checkpoint-N directory of `output_dir` or None, the newer incomplete ones skipped).

    Args:
        output_dir: the Trainer's output directory.

    Returns:
        The path of the checkpoint to resume from (None when there is none), and the paths of incomplete checkpoint
        directories newer than it, newest first.
    """
    if not os.path.isdir(output_dir):
        return None, []
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    skipped = []
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete_checkpoint(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def resolve_resume_checkpoint(output_dir: str) -> str:
    """The checkpoint `resume_from_checkpoint=True` resumes from, saying which incomplete ones it skipped.

    Raises:
        ValueError: `output_dir` has no complete checkpoint.
    """
    checkpoint, skipped = newest_complete_checkpoint(output_dir)
    if skipped:
        names = ", ".join(os.path.basename(p) for p in skipped)
        message = (
            f"hf_offload: {names} in {output_dir} {'is' if len(skipped) == 1 else 'are'} incomplete (no readable "
            f"{TRAINER_STATE_FILE}: the save was interrupted)"
        )
        if checkpoint is not None:
            logger.warning("%s; resuming from %s, the newest complete checkpoint.", message, checkpoint)
        else:
            raise ValueError(f"{message}, and there is no complete checkpoint to resume from. Start without resuming.")
    if checkpoint is None:
        raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
    return checkpoint


# --- base model identity -------------------------------------------------------------------------------------------
def base_model_identity(model: nn.Module) -> dict:
    """{"base_model": name or path the base model was loaded from, "config_fingerprint": sha256 of its config}."""
    base = compat.peft_base_model(model)
    config = getattr(base, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None) or ""
    values = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    canonical = json.dumps(_fingerprinted(values), sort_keys=True, default=str)
    return {"base_model": str(name), "config_fingerprint": hashlib.sha256(canonical.encode()).hexdigest()}


def _fingerprinted(value):
    if isinstance(value, dict):
        return {
            k: _fingerprinted(v) for k, v in value.items() if not str(k).startswith("_") and k not in _NOT_FINGERPRINTED
        }
    if isinstance(value, list | tuple):
        return [_fingerprinted(v) for v in value]
    return value


def write_base_model_identity(checkpoint: str, model: nn.Module) -> None:
    """Record the base model of `model` in `checkpoint` (a directory that exists)."""
    with open(os.path.join(checkpoint, BASE_MODEL_FILE), "w", encoding="utf-8") as f:
        json.dump(base_model_identity(model), f, indent=2)


def check_base_model_identity(checkpoint: str, model: nn.Module) -> None:
    """Refuse to resume `model` from `checkpoint` when the checkpoint records another base model.

    Checkpoints without the record (written by an unstreamed run or an older version) are accepted. Setting the
    environment variable HF_OFFLOAD_ALLOW_OTHER_BASE_MODEL=1 turns a refusal into a warning.

    Raises:
        BaseModelMismatchError: the recorded name or config fingerprint differs from `model`'s.
    """
    path = os.path.join(checkpoint, BASE_MODEL_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        raise BaseModelMismatchError(f"{path} is unreadable ({err}); the checkpoint {checkpoint} is damaged.") from err
    ours = base_model_identity(model)
    problems = []
    if saved.get("config_fingerprint") != ours["config_fingerprint"]:
        problems.append("its config differs from this model's")
    same_name = _short_name(saved.get("base_model", "")) == _short_name(ours["base_model"])
    if not same_name and saved.get("base_model") and ours["base_model"]:
        problems.append(f"it was trained on {saved['base_model']!r}, and this run loads {ours['base_model']!r}")
    if not problems:
        return
    message = (
        f"Cannot resume from {checkpoint}: its adapter was trained on another base model ("
        + "; ".join(problems)
        + "). Load the base model the checkpoint was trained on, or start a new run. If it is the same model "
        f"(moved or renamed), set the environment variable {ALLOW_OTHER_BASE_ENV}=1 to resume anyway."
    )
    if os.environ.get(ALLOW_OTHER_BASE_ENV, "").lower() in ("1", "true", "yes"):
        logger.warning("hf_offload: %s (resuming anyway: %s is set)", message, ALLOW_OTHER_BASE_ENV)
        return
    raise BaseModelMismatchError(message)


def _short_name(name: str) -> str:
    """The last component of a Hub id or path: the same model moved to another directory keeps it."""
    return os.path.basename(os.path.normpath(name)) if name else ""
