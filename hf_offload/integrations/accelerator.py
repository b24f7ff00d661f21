"""`OffloadAccelerator`: a plain accelerate loop whose `prepare()` streams the model instead of moving it.

accelerate has no registry for third-party plugins (`Accelerator(...)` rejects unknown keywords and kwargs
handlers), so this subclass applies the `LayerStreamingPlugin` itself.

Example:
    >>> from hf_offload import LayerStreamingPlugin, OffloadAccelerator
    >>> accelerator = OffloadAccelerator(layer_streaming_plugin=LayerStreamingPlugin(prefetch=1, lora_r=16))
    >>> model = accelerator.prepare_model(model)  # LoRA + streaming; the weights stay in host memory
    >>> optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    >>> optimizer, dataloader = accelerator.prepare(optimizer, dataloader)
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from ..api import is_streaming
from .plugin import LayerStreamingPlugin, is_peft_model


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
        if self.layer_streaming_plugin.full_finetune:
            adds_lora = []  # nothing is added: an optimizer created before holds the very parameters that train
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
