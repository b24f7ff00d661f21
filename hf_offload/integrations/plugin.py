"""`LayerStreamingPlugin`: the offload settings, Accelerate-style, and how they prepare a model.

accelerate has no registry for third-party plugins (`Accelerator(...)` rejects unknown keywords and kwargs
handlers), so the plugin is applied by us: by `OffloadTrainer`, by every `Trainer` under `hf-offload launch`, and
by `OffloadAccelerator.prepare()`. Applying it to a model means: add LoRA adapters if the model has none, then
stream its decoder layers from host memory (`enable_layer_streaming`), leaving the model where it is otherwise.

The plugin also declares the options the integrations add to the engine's (LoRA, the default optimizer, merged
exports); `OffloadTrainingArguments` and `hf-offload launch` derive theirs from it (see `hf_offload.options`).

Example:
    >>> plugin = LayerStreamingPlugin(prefetch=2, lora_r=32)
    >>> model = plugin.prepare_model(model, device="cuda")  # LoRA + streaming; the weights stay in host memory
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..api import enable_layer_streaming, is_streaming
from ..config import OffloadConfig, check_engine_combinations
from ..engine import compat
from ..engine.anatomy import check_streamable
from ..options import (
    TRAINING_FACES,
    OptionError,
    boolean,
    declared,
    option,
    positive_int,
    positive_number,
    probability,
    spelled,
    validate,
    with_options,
)
from .bad_steps import BadStepOptions, check_window

logger = logging.getLogger(__name__)

# `hf-offload launch` carries the plugin to every Python process the command starts in this variable (JSON).
ENV_VAR = "HF_OFFLOAD_LAYER_STREAMING"

# The optimizer the integrations pick when a script keeps the Trainer's default: 8-bit AdamW state for the adapters.
STREAMING_DEFAULT_OPTIM = "adamw_bnb_8bit"
# The options of LoRA and of the integrations show on every face that trains but the engine's own config.
ADAPTER_FACES = TRAINING_FACES - {"config"}


def check_combinations(values: dict, face: str) -> None:
    """Rules between options, with each option spelled as `face` spells it.

    Raises:
        ValueError: two options that cannot go together, both named.
    """
    check_engine_combinations(values, face)
    check_window(values, face)
    if values.get("full_finetune") and values.get("save_merged"):
        raise ValueError(
            f"Can't provide both {spelled('full_finetune', face)} and {spelled('save_merged', face)}: with full "
            "fine-tuning the saved model is already a full checkpoint, and there are no adapters to merge. Drop "
            f"{spelled('save_merged', face)}."
        )
    if values.get("host_optimizer_bits", 32) != 32 and not values.get("full_finetune"):
        raise ValueError(
            f"{spelled('host_optimizer_bits', face)} {values['host_optimizer_bits']} sets the state of the host "
            f"optimizer of full fine-tuning, but {spelled('full_finetune', face)} is off. Turn full fine-tuning on, "
            f"or drop {spelled('host_optimizer_bits', face)}."
        )
    if values.get("save_merged") and values.get("base_weight_dtype") is not None:
        raise ValueError(
            f"Can't provide both {spelled('save_merged', face)} and {spelled('base_weight_dtype', face)} "
            f"({values['base_weight_dtype']!r}): a quantized host store keeps no dense copy of the base weights to "
            "merge into. Choose one; to merge later, load the base model dense and use peft's merge_and_unload() on "
            "the saved adapter."
        )


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft wrapper (whose adapters we train as they are)."""
    return compat.peft_base_model(model) is not model


def _lora_targets(value):
    if not isinstance(value, str) or not [name for name in value.split(",") if name.strip()]:
        raise OptionError("'all-linear' or a comma-separated list of module names")
    return value


def _host_optimizer_bits(value):
    if isinstance(value, bool) or value not in (32, 8):
        raise OptionError("32 (fp32 AdamW moments) or 8 (blockwise 8-bit moments)")
    return value


def _optimizer_name(value):
    """A `TrainingArguments.optim` name; 'none' / 'keep' (from a command line) mean None: the Trainer's default."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "keep")):
        return None
    from transformers.training_args import OptimizerNames

    try:
        return OptimizerNames(value).value
    except ValueError:
        raise OptionError("a TrainingArguments `optim` name such as 'adamw_bnb_8bit', or None") from None


@dataclass
@with_options(BadStepOptions, "plugin")
@with_options(OffloadConfig, "plugin")
class LayerStreamingPlugin:
    """How a model is prepared for layer streaming: the offload options and the LoRA used when it has no adapters.

    Besides the fields below, every `OffloadConfig` option but `device` is a field (`prefetch`,
    `base_weight_dtype`, ...) and so is every option of the bad-step guard (`skip_bad_steps`, ...; see
    `docs/options.md`).

    Example:
        >>> plugin = LayerStreamingPlugin(prefetch=2, lora_r=32, lora_alpha=64)
        >>> model = plugin.prepare_model(model, device="cuda")
    """

    lora_r: int = option(
        16,
        "LoRA rank, used when the model is not already a peft model.",
        faces=ADAPTER_FACES | {"plan", "bench"},
        check=positive_int,
    )
    lora_alpha: float = option(32, "LoRA alpha (scaling = alpha / r).", faces=ADAPTER_FACES, check=positive_number)
    lora_dropout: float = option(0.05, "Dropout on the LoRA branch.", faces=ADAPTER_FACES, check=probability)
    lora_target_modules: str = option(
        "all-linear",
        "Modules that get LoRA adapters: 'all-linear' (every linear layer but the output head) or a comma-separated "
        "list of module names such as 'q_proj,v_proj'.",
        faces=ADAPTER_FACES,
        check=_lora_targets,
    )
    default_optim: str | None = option(
        STREAMING_DEFAULT_OPTIM,
        "Optimizer used in place of the Trainer's default when the script did not choose one (a TrainingArguments "
        "`optim` name). None ('none' on a command line) keeps the Trainer's default. The Trainer's own face is its "
        "`--optim` flag, whose 'auto' means this.",
        faces={"plugin", "launch"},
        check=_optimizer_name,
        aliases=("optim",),
    )
    load_into_store: bool = option(
        True,
        "Under `hf-offload launch`: every causal LM the command loads with `from_pretrained` goes straight into the "
        "host store (decoder weights in base_weight_dtype, one tensor at a time), so host memory holds the store "
        "rather than the checkpoint. False loads models the ordinary way; streaming then packs them.",
        faces={"plugin", "launch"},
        check=boolean,
    )
    early_layer_steps: bool = option(
        True,
        "Full fine-tuning with the default optimizer (hf_offload's HostAdamW): step each decoder layer on host "
        "threads during the last backward of an optimizer step, as soon as its gradients are complete, so the "
        "optimizer overlaps the backward. To stay exact when gradient clipping scales the gradients afterwards, it "
        "keeps a copy of every layer's weights and AdamW moments (12 bytes of host memory per parameter; `plan` "
        "counts it). False: every layer is stepped in optimizer.step(), without those copies.",
        faces=ADAPTER_FACES | {"plan"},
        check=boolean,
    )
    host_optimizer_bits: int = option(
        32,
        "Full fine-tuning with the default optimizer (hf_offload's HostAdamW): bits per value of its AdamW moments "
        "in host memory. 32 keeps torch AdamW's fp32 moments (8 bytes per parameter); 8 keeps them blockwise "
        "quantized like bitsandbytes' 8-bit AdamW (about 2 bytes per parameter, and the early steps' copies shrink "
        "the same way; tensors under 4096 values keep fp32). `plan` counts it.",
        faces=ADAPTER_FACES | {"plan"},
        check=_host_optimizer_bits,
    )
    save_merged: bool = option(
        False,
        "When the final model is saved (save_model, push_to_hub), also write a merged full checkpoint "
        "(safetensors shards, merged layer by layer in host memory) to `<output_dir>/merged`.",
        faces=ADAPTER_FACES,
        check=boolean,
    )

    def __post_init__(self) -> None:
        validate(self, "plugin")
        check_combinations(vars(self), "plugin")

    # --- what the plugin configures ------------------------------------------------------------------------------
    def bad_step_options(self) -> BadStepOptions:
        """The bad-step guard's options among the plugin's fields."""
        return BadStepOptions(**{opt.name: getattr(self, opt.name) for opt in declared(BadStepOptions)})

    def offload_config(self, device: str | torch.device | None = None) -> OffloadConfig:
        """The engine's options among the plugin's fields, for `device`."""
        names = [opt.name for opt in declared(OffloadConfig) if opt.on("plugin")]
        return OffloadConfig(device=device, **{name: getattr(self, name) for name in names})

    def target_modules(self) -> str | list[str]:
        names = [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def lora_config(self, task_type: str = "CAUSAL_LM"):
        """The `peft.LoraConfig` of the `lora_*` options; `task_type` "SEQ_CLS" for a sequence classifier."""
        from peft import LoraConfig

        return LoraConfig(
            task_type=task_type,
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules(),
        )

    def prepare_model(
        self,
        model: nn.Module,
        device: str | torch.device | None = None,
        *,
        learning_rate: float | None = None,
        face: str = "plugin",
    ) -> nn.Module:
        """Add LoRA if `model` has no peft adapters (unless `full_finetune`), then stream its decoder layers.

        Adding LoRA is said at WARNING level, with the learning rate in use (see Note: [The recipe, stated] in
        `hf_offload.integrations.recipe`).

        Args:
            model: a causal LM or a peft model over one; a model already streaming is returned unchanged.
            device: where layers compute (None: the accelerator if any, else the CPU).
            learning_rate: the rate the adapters will train at, when known (the Trainer's), for the notice.
            face: where the options were given ("trainer", "launch", "plugin"), to spell them in messages.

        Returns:
            The model to train: the peft model when LoRA was added, else `model`.

        Raises:
            UnsupportedModelError: before anything about the model is changed, when it cannot be streamed.
            HostMemoryError: the host store would not fit in available host memory.
        """
        from . import recipe

        if is_streaming(model):
            return model
        check_streamable(model)  # refuse an unstreamable model before LoRA changes it
        if self.full_finetune:  # every weight trains: no LoRA
            model = enable_layer_streaming(model, self.offload_config(device))
            recipe.note_launch_event(recipe.STREAMED)
            return model
        if is_peft_model(model):
            recipe.warn_unused_lora_options(model, self, face)
        else:
            # a sequence classifier (a reward model) keeps its task: peft then also trains its new score head
            task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
            model = compat.add_lora(model, self.lora_config(task))
            recipe.announce_lora(model, self, learning_rate, face)
        model = enable_layer_streaming(model, self.offload_config(device))
        recipe.note_launch_event(recipe.STREAMED)
        return model

    # --- carrying the plugin to child processes ------------------------------------------------------------------
    def to_env(self) -> dict[str, str]:
        """Environment variables that make `from_env()` rebuild this plugin in another process."""
        return {ENV_VAR: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> LayerStreamingPlugin | None:
        """The plugin `hf-offload launch` set for this process, or None when streaming was not asked for."""
        environ = os.environ if environ is None else environ
        raw = environ.get(ENV_VAR)
        if not raw:
            return None
        try:
            values = json.loads(raw)
            return cls(**values)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"The environment variable {ENV_VAR} (set by `hf-offload launch`) does not hold valid layer-streaming "
                f"settings: {err}. Unset it, or start the command through `hf-offload launch` again."
            ) from err
