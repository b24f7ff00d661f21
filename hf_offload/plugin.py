"""`LayerStreamingPlugin` (the offload settings, Accelerate-style) and `OffloadAccelerator` (a plain accelerate loop).

accelerate has no registry for third-party plugins (`Accelerator(...)` rejects unknown keywords and kwargs
handlers), so the plugin is applied by us: by `OffloadTrainer`, by every `Trainer` under `hf-offload launch`, and
by `OffloadAccelerator.prepare()`. Applying it to a model means: add LoRA adapters if the model has none, then
stream its decoder layers from host memory (`enable_layer_streaming`), leaving the model where it is otherwise.

Example:
    >>> from hf_offload import LayerStreamingPlugin, OffloadAccelerator
    >>> accelerator = OffloadAccelerator(layer_streaming_plugin=LayerStreamingPlugin(prefetch=1, lora_r=16))
    >>> model = accelerator.prepare_model(model)  # LoRA + streaming; the weights stay in host memory
    >>> optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    >>> optimizer, dataloader = accelerator.prepare(optimizer, dataloader)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from .api import enable_layer_streaming, is_streaming
from .config import OffloadConfig
from .engine import compat
from .engine.anatomy import find_decoder_layers

logger = logging.getLogger(__name__)

# `hf-offload launch` carries the plugin to every Python process the command starts in this variable (JSON).
ENV_VAR = "HF_OFFLOAD_LAYER_STREAMING"


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft wrapper (whose adapters we train as they are)."""
    return compat.peft_base_model(model) is not model


@dataclass
class LayerStreamingPlugin:
    """How a model is prepared for layer streaming: the offload options and the LoRA used when it has no adapters.

    Example:
        >>> plugin = LayerStreamingPlugin(prefetch=2, lora_r=32, lora_alpha=64)
        >>> model = plugin.prepare_model(model, device="cuda")
    """

    prefetch: int = field(
        default=1,
        metadata={"help": "Decoder layers loaded ahead of the one computing (device memory holds prefetch + 1)."},
    )
    offload_activations: bool = field(
        default=False,
        metadata={"help": "Keep the layer-boundary hidden states saved for backward in host memory (long contexts)."},
    )
    pin_memory: bool | None = field(
        default=None,
        metadata={"help": "Page-lock the host store for asynchronous copies. None: on when the device is CUDA."},
    )
    base_weight_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Keep the frozen linear weights quantized in host memory and over the link: 'nf4' or 'int8' "
            "(see OffloadConfig.base_weight_dtype). None keeps them as loaded."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank, used when the model is not already a peft model."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Modules that get LoRA adapters: 'all-linear' (every linear layer but the output head) or a "
            "comma-separated list of module names such as 'q_proj,v_proj'."
        },
    )
    default_optim: str | None = field(
        default="adamw_bnb_8bit",
        metadata={
            "help": "Optimizer used in place of the Trainer's default when the script did not choose one "
            "(a TrainingArguments `optim` name). None keeps the Trainer's default."
        },
    )
    save_merged: bool = field(
        default=False,
        metadata={
            "help": "When the final model is saved (save_model, push_to_hub), also write a merged full checkpoint "
            "(safetensors shards, merged layer by layer in host memory) to `<output_dir>/merged`."
        },
    )

    def __post_init__(self) -> None:
        self.offload_config()  # validates the streaming options with OffloadConfig's rules
        if self.save_merged and self.base_weight_dtype is not None:
            raise ValueError(
                f"Can't provide both `save_merged` and `base_weight_dtype` ({self.base_weight_dtype!r}): a quantized "
                "host store keeps no dense copy of the base weights to merge into. Choose one; to merge later, load "
                "the base model dense and use peft's merge_and_unload() on the saved adapter."
            )
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise ValueError(f"`lora_r` should be a positive integer, but the value passed is {self.lora_r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` should be a positive number, but the value passed is {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` should be in [0, 1), but the value passed is {self.lora_dropout!r}")
        if not isinstance(self.lora_target_modules, str) or not self.target_modules():
            raise ValueError(
                "`lora_target_modules` should be 'all-linear' or a comma-separated list of module names, but the "
                f"value passed is {self.lora_target_modules!r}"
            )
        if self.default_optim is not None:
            from transformers.training_args import OptimizerNames

            try:
                OptimizerNames(self.default_optim)
            except ValueError as err:
                raise ValueError(
                    f"`default_optim` should be a TrainingArguments `optim` name such as 'adamw_bnb_8bit', but the "
                    f"value passed is {self.default_optim!r}"
                ) from err

    # --- what the plugin configures ------------------------------------------------------------------------------
    def offload_config(self, device: str | torch.device | None = None) -> OffloadConfig:
        return OffloadConfig(
            device=device,
            prefetch=self.prefetch,
            offload_activations=self.offload_activations,
            pin_memory=self.pin_memory,
            base_weight_dtype=self.base_weight_dtype,
        )

    def target_modules(self) -> str | list[str]:
        names = [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules(),
        )

    def prepare_model(self, model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
        """Add LoRA if `model` has no peft adapters, then stream its decoder layers. Returns the model to train.

        A model that is already streamed is returned unchanged. A model that cannot be streamed raises
        `UnsupportedModelError` before anything about it is changed.
        """
        if is_streaming(model):
            return model
        find_decoder_layers(model)  # refuse an unstreamable model before LoRA changes it
        if not is_peft_model(model):
            from peft import get_peft_model

            model = get_peft_model(model, self.lora_config())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info(
                "hf_offload: %s is not a peft model, so LoRA adapters were added (r=%d, alpha=%g, dropout=%g, "
                "targets=%s): %s trainable parameters; the base weights are frozen.",
                type(compat.peft_base_model(model)).__name__,
                self.lora_r,
                self.lora_alpha,
                self.lora_dropout,
                self.lora_target_modules,
                f"{trainable:,}",
            )
        return enable_layer_streaming(model, self.offload_config(device))

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


class OffloadAccelerator(Accelerator):
    """An `Accelerator` whose `prepare()` streams a model's decoder layers instead of moving the model to the device.

    Everything else (dataloaders, optimizers, schedulers, mixed precision, `backward`, `save_state`) is accelerate's
    own. Without `layer_streaming_plugin`, the settings of `hf-offload launch` are used, else the defaults.

    Example:
        >>> accelerator = OffloadAccelerator(mixed_precision="bf16")
        >>> model = accelerator.prepare_model(model)  # adds LoRA if needed, then streams
        >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        >>> optimizer, dataloader = accelerator.prepare(optimizer, dataloader)
    """

    def __init__(self, *args, layer_streaming_plugin: LayerStreamingPlugin | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if layer_streaming_plugin is None:
            layer_streaming_plugin = LayerStreamingPlugin.from_env() or LayerStreamingPlugin()
        if not isinstance(layer_streaming_plugin, LayerStreamingPlugin):
            raise TypeError(
                "`layer_streaming_plugin` should be an hf_offload.LayerStreamingPlugin, but the value passed is "
                f"{type(layer_streaming_plugin)}"
            )
        self.layer_streaming_plugin = layer_streaming_plugin

    def prepare(self, *args, device_placement=None):
        adds_lora = [m for m in args if isinstance(m, nn.Module) and not is_peft_model(m) and not is_streaming(m)]
        if adds_lora and any(isinstance(obj, torch.optim.Optimizer) for obj in args):
            raise ValueError(
                "OffloadAccelerator.prepare() would add LoRA adapters to a model that is not a peft model, but an "
                "optimizer created before that is prepared with it and would not see the adapters. Prepare the model "
                "first (`model = accelerator.prepare_model(model)`), create the optimizer over "
                "`[p for p in model.parameters() if p.requires_grad]`, then prepare the optimizer and dataloaders."
            )
        return super().prepare(*args, device_placement=device_placement)

    def prepare_model(self, model: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False):
        if device_placement:
            raise ValueError(
                "OffloadAccelerator does not move models to the device (device_placement=True): a streamed model "
                "keeps its decoder layers in host memory. Leave device_placement unset."
            )
        model = self.layer_streaming_plugin.prepare_model(model, device=self.device)
        # The streamed model is placed already: resident modules on the device, decoder layers in host memory.
        # accelerate's `model.to(device)` would copy every layer to the device.
        return super().prepare_model(model, device_placement=False, evaluation_mode=evaluation_mode)
