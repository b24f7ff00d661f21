"""Full fine-tuning of streamed decoder layers: host master weights, their compute copy, gradients back to the host.

Note: [Trainable streamed weights]
With `OffloadConfig(full_finetune=True)` the decoder layers' trainable weights are streamed like frozen ones: the
store packs them (so each layer is still one host->device copy), and the streamer binds them to their slot inside the
layer's window. What changes:
- Master weights. Between windows a trainable parameter's `.data` is its master in host memory: fp32 for a bf16/fp16
  layer (a new fp32 buffer per layer), or the store's own bytes for any other dtype (fp32 models: master and compute
  copy are one tensor, no extra memory). Any torch optimizer over `model.parameters()` steps these host tensors.
- The compute copy. The store's bytes are what streams. After an optimizer step (a global post-step hook) and before
  each forward, the layers whose parameters changed in place (their version counters moved) get their compute copy
  rounded from the master (nothing to copy when they are one tensor), and the streamer is told to forget those
  layers' slots: a layer whose host bytes changed must be copied again.
- Gradients. The parameters are not inputs of the layer's autograd Function (autograd would accumulate a
  device/compute-dtype gradient into a host/fp32 parameter). The recompute in backward asks `autograd.grad` for
  them along with the rest, and `accumulate` adds them into the master's `.grad` (the master's dtype) once the
  layer is released: on the CPU directly; on an accelerator via a copy to pinned host memory enqueued on a stream of
  its own, completed while the next layer computes (`flush` finishes them; it runs at the end of the backward of the
  first layer and before any optimizer step).
- Gradient buffers. Each trainable tensor keeps the host tensor its `.grad` was (`grad_buffer`) and the next first
  gradient after `zero_grad(set_to_none=True)` is copied into it rather than into a new tensor: a step allocates no
  gradient memory, and the freed and re-allocated gradients of every step do not fragment the host heap (glibc keeps
  freed memory of the size of weight tensors in its heap). The buffer is reused only when nothing but the tensor holds
  it: a caller that kept last step's `.grad` keeps its values, as in ordinary training.
- A zero-element `anchor` tensor that requires grad is an input of every such layer's Function, so its backward runs
  even when nothing else entering the layer needs a gradient (frozen embeddings).
- Mixture-of-Experts with expert_fetch='routed': an experts call computes on [k, ...] views of the loaded experts,
  so their gradients come back as rows (`stash_rows`, see Note: [Routed experts under full fine-tuning] in moe.py)
  and are added into those rows of the master's `.grad`, the other rows being zero as in an ordinary step.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..units import format_bytes
from . import compat, hostmem
from .device import DeviceOps

logger = logging.getLogger(__name__)

# Layers stored in these dtypes train against an fp32 master: small updates would round away in place.
LOW_PRECISION = (torch.bfloat16, torch.float16)

_LIVE: weakref.WeakSet = weakref.WeakSet()  # every TrainableLayers not yet removed, for optimizers to find


def live_trainable_layers() -> list:
    """The `TrainableLayers` of every model streamed with full fine-tuning now (an optimizer finds its own)."""
    return list(_LIVE)


# torch's optimizer hooks are global and hold what they are given: one pair for the process, reaching the models
# through the weak set, so that a model dropped without disable_layer_streaming is still freed.
_GLOBAL_HOOKS: list = []


def _before_any_step(optimizer, args, kwargs) -> None:
    for trainable in list(_LIVE):
        trainable.before_step(optimizer)


def _after_any_step(optimizer, args, kwargs) -> None:
    for trainable in list(_LIVE):
        trainable.after_step(optimizer)


def _install_global_hooks() -> None:
    if not _GLOBAL_HOOKS:
        _GLOBAL_HOOKS.append(register_optimizer_step_pre_hook(_before_any_step))
        _GLOBAL_HOOKS.append(register_optimizer_step_post_hook(_after_any_step))


@dataclass
class TrainableTensor:
    """One trainable streamed parameter: its master (what the optimizer steps) and its compute copy in the store."""

    param: nn.Parameter
    master: torch.Tensor  # host; is `host` itself when the layer's dtype needs no separate master
    host: torch.Tensor  # the view of the store's bytes that streams
    grad_buffer: torch.Tensor | None = None  # host, the master's dtype: what `.grad` is, step after step

    def add_grad(self, grad: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """What autograd's gradient accumulation does: the first gradient becomes `.grad`, later ones add in place.

        `grad` is on the host or the device, in the compute dtype; `.grad` is in the master's dtype. With `rows`,
        `grad` holds only those rows of the gradient (routed experts), the others being zero. See Note: [Trainable
        streamed weights]."""
        param = self.param
        if param.grad is not None:
            if rows is None:
                param.grad.add_(grad.to(param.device))  # adds in the master's dtype, as `grad.to(dtype)` would
            else:
                param.grad.index_add_(0, rows, grad.to(device=param.device, dtype=param.dtype))
            return
        buffer = self.grad_buffer
        # 3 references: `buffer`, the attribute, getrefcount's argument. More: the caller still holds the gradient
        # of an earlier step (after zero_grad(set_to_none=True)), which must keep its values: a new buffer.
        if buffer is None or sys.getrefcount(buffer) > 3:
            buffer = self.grad_buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
        if rows is None:
            buffer.copy_(grad)
        else:
            buffer.zero_()
            buffer.index_add_(0, rows, grad.to(device=param.device, dtype=param.dtype))
        param.grad = buffer

    @property
    def separate(self) -> bool:
        return self.master is not self.host


def trainable_decoder_weights(layers: nn.ModuleList, keep_resident: frozenset[int]) -> list[nn.Parameter]:
    """The trainable parameters of the decoder layers that full fine-tuning streams (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for param in layers.parameters():
        if param.requires_grad and id(param) not in keep_resident:
            seen.setdefault(id(param), param)
    return list(seen.values())


@contextlib.contextmanager
def packed_as_frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """The store packs (and validates, and lays out) frozen parameters: show it `params` frozen while it builds."""
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


def check_full_finetune(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Refuse what full fine-tuning cannot train: a peft model, no trainable decoder weight, quantized ones.

    Raises:
        ValueError: with what to do instead.
    """
    if compat.peft_base_model(model) is not model:
        raise ValueError(
            "`full_finetune` trains the model's own weights, but this is a peft model (adapters over a frozen base). "
            "Pass the plain transformers model for full fine-tuning, or turn full_finetune off to train the adapters."
        )
    if not params:
        raise ValueError(
            "`full_finetune` is on, but no weight of the decoder layers requires grad (a peft model freezes them). "
            "Pass the plain model (all weights trainable) for full fine-tuning, or turn full_finetune off to train "
            "the adapters."
        )
    quantized = [p for p in params if compat.is_quantized_parameter(p) or not p.is_floating_point()]
    if quantized:
        raise ValueError(
            "`full_finetune` needs floating-point decoder weights, but this model holds quantized ones (loaded in "
            "4/8 bits). Load the model in bf16 or fp32 for full fine-tuning, or train adapters over it (QLoRA)."
        )


def training_host_bytes(params: list[nn.Parameter], state_bits: int = 32) -> dict[str, int]:
    """Host bytes full fine-tuning adds to the store for `params` once training runs: fp32 masters (bf16/fp16
    weights), gradients and AdamW's two moments (in the master's dtype; with `state_bits=8`, HostAdamW's 8-bit
    moments for fp32 masters)."""
    from .host_optimizer import moment_bytes  # host_optimizer imports this module

    low = sum(p.numel() for p in params if p.dtype in LOW_PRECISION)
    master = sum(p.numel() * max(4, p.element_size()) for p in params)
    state = sum(moment_bytes(p.numel(), max(4, p.element_size()), state_bits) for p in params)
    return {"fp32_masters": 4 * low, "gradients": master, "optimizer_state": state}


def warn_if_host_memory_short(params: list[nn.Parameter]) -> None:
    """Warn before training starts when host memory cannot hold what full fine-tuning will add to the store."""
    available = hostmem.available_bytes()
    needs = training_host_bytes(params)
    if available is not None and sum(needs.values()) > available:
        logger.warning(
            "hf_offload: full fine-tuning will need %s of host memory besides the layer store (%s), but %s is "
            "available: training is likely to be stopped by the out-of-memory killer. Use a machine with more host "
            "memory, or train adapters instead (full_finetune=False). `hf-offload plan --full_finetune` shows the "
            "whole budget.",
            format_bytes(sum(needs.values())),
            ", ".join(f"{name} {format_bytes(n)}" for name, n in needs.items()),
            format_bytes(available),
        )


class TrainableLayers:
    """The trainable streamed weights of every layer; see Note: [Trainable streamed weights]."""

    def __init__(self, store, streamer, ops: DeviceOps, params: list[nn.Parameter]):
        self.store = store
        self.streamer = streamer
        self.ops = ops
        wanted = {id(p) for p in params}
        self.layers: list[list[TrainableTensor]] = []
        for pack in store.packs:
            packed = [t for t in pack.tensors if id(t.param) in wanted]
            self.layers.append(_masters(pack, packed))
        self._by_param = {id(t.param): index for index, tensors in enumerate(self.layers) for t in tensors}
        # Version counter bumps inside layer windows (parametrizations), which are not weight changes.
        self._window_bumps = [0] * len(self.layers)
        self._versions = [self.content_version(index) for index in range(len(self.layers))]
        # Per layer: its calls whose backward has not run yet. Its gradients are complete, and listeners are told,
        # only once none is left (a layer called twice in one forward gets gradients from both).
        self.open_calls = [0] * len(self.layers)
        self.anchor = torch.empty(0, requires_grad=True)  # see the Note
        self.grad_bytes_to_host = 0  # weight gradients returned by the layers since streaming began (compute dtype)
        self._pending: list[tuple[object, list[tuple[TrainableTensor, torch.Tensor, torch.Tensor, object]], int]] = []
        self._rows: dict[int, list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] = {}  # routed experts' gradients
        self._grad_stream = None if ops.is_cpu else torch.get_device_module(ops.device.type).Stream(device=ops.device)
        for index in range(len(self.layers)):
            self.bind_masters(index)
        # Called as listener(self, index) on the main thread once layer `index`'s gradients are complete in `.grad`.
        # (weak references: an optimizer dropped without close() is freed with its state)
        self.listeners: list[weakref.WeakMethod] = []
        _LIVE.add(self)
        _install_global_hooks()

    def listen(self, method) -> None:
        """Call the bound `method(self, index)` once layer `index`'s gradients are complete in `.grad`."""
        self.listeners.append(weakref.WeakMethod(method))

    def unlisten(self, method) -> None:
        self.listeners = [ref for ref in self.listeners if ref() is not None and ref() != method]

    def layer_of(self, param) -> int | None:
        """The layer whose trainable streamed weight `param` is, or None."""
        return self._by_param.get(id(param))

    # --- layer windows ---------------------------------------------------------------------------------------------
    def params(self, index: int) -> list[nn.Parameter]:
        """Layer `index`'s trainable streamed parameters, in a fixed order."""
        return [t.param for t in self.layers[index]]

    def bind_masters(self, index: int) -> None:
        """Point layer `index`'s trainable parameters at their masters (after the streamer bound them to the host)."""
        for tensor in self.layers[index]:
            if tensor.separate:
                tensor.param.data = tensor.master

    # --- gradients -------------------------------------------------------------------------------------------------
    def stash_rows(self, index: int, entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]) -> None:
        """Gradients of some rows of layer `index`'s expert weights: (parameter, row ids on the host, [k, ...]
        gradient on the device), from a routed experts call's backward; `accumulate` adds them into `.grad`."""
        self._rows.setdefault(index, []).extend(entries)

    def discard_rows(self, index: int) -> None:
        """Before layer `index`'s recompute: row gradients of an earlier, failed backward must not be added."""
        self._rows.pop(index, None)

    def accumulate(self, index: int, grads: list[torch.Tensor | None]) -> None:
        """Add layer `index`'s gradients (device, compute dtype; None for unused weights) into the masters' `.grad`,
        and the row gradients its routed experts calls stashed (see `stash_rows`)."""
        by_param = {id(t.param): t for t in self.layers[index]}
        items = [(t, g, None) for t, g in zip(self.layers[index], grads, strict=True) if g is not None]
        items += [(by_param[id(p)], g, rows) for p, rows, g in self._rows.pop(index, [])]
        self.grad_bytes_to_host += sum(g.numel() * g.element_size() for _, g, _ in items)
        if self.ops.is_cpu or not items:
            self.flush()  # in arrival order: a layer's earlier copies still in flight come first
            for tensor, grad, rows in items:
                tensor.add_grad(grad, rows)
            self._arrived(index)
            return
        # Complete the previous layer's copies (they ran while this layer computed), then start this layer's.
        self.flush()
        computed = self.ops.record_event()
        copies = []
        with torch.get_device_module(self.ops.device.type).stream(self._grad_stream):
            self.ops.wait_event(computed, self._grad_stream)
            for tensor, grad, rows in items:
                host = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
                host.copy_(grad, non_blocking=True)
                copies.append((tensor, host, grad, rows))  # `grad` is kept alive until its copy has completed
            done = self.ops.record_event(self._grad_stream)
        self._pending.append((done, copies, index))

    def flush(self) -> None:
        """Finish the gradient copies still in flight and add them into `.grad`."""
        pending, self._pending = self._pending, []
        for done, copies, index in pending:
            done.synchronize()
            for tensor, host, _, rows in copies:
                tensor.add_grad(host, rows)
            self._arrived(index)

    def call_opened(self, index: int) -> None:
        """A forward with grad called layer `index`: its gradients are not complete until that call's backward."""
        self.open_calls[index] += 1

    def _arrived(self, index: int) -> None:
        self.open_calls[index] = max(0, self.open_calls[index] - 1)
        if self.open_calls[index]:
            return  # another call of this layer has gradients still to come
        for ref in list(self.listeners):
            listener = ref()
            if listener is not None:
                listener(self, index)

    # --- after the weights changed ---------------------------------------------------------------------------------
    def sync(self) -> list[int]:
        """Refresh the compute copy of every layer whose trainable weights changed in place; returns those layers.

        The streamer forgets their slots, so the next use copies the new bytes.
        """
        changed = []
        for index in range(len(self.layers)):
            version = self.content_version(index)
            if version == self._versions[index]:
                continue
            self.refresh_copy(index)  # rounds to the compute dtype
            self._versions[index] = version
            changed.append(index)
        if changed:
            self.streamer.forget(changed)
        return changed

    def refresh_copy(self, index: int) -> None:
        """Round layer `index`'s masters into its compute copy (any thread; the layer must not be computing)."""
        with torch.no_grad():
            for tensor in self.layers[index]:
                if tensor.separate:
                    tensor.host.copy_(tensor.master)

    def mark_refreshed(self, layers: list[int]) -> None:
        """`layers` were stepped and their compute copies refreshed (main thread): forget their slots."""
        for index in layers:
            self._versions[index] = self.content_version(index)
        if layers:
            self.streamer.forget(layers)

    def version(self, index: int) -> int:
        """The sum of the version counters of layer `index`'s trainable weights (before a window opens)."""
        return self._version(index)

    def window_closed(self, index: int, version_before: int) -> None:
        """Layer `index`'s window closed: counter bumps inside it are not weight changes (the routed experts call
        parametrizes the expert weights for the call, which bumps them without writing)."""
        self._window_bumps[index] += self._version(index) - version_before

    def content_version(self, index: int) -> int:
        """A number that changes exactly when layer `index`'s trainable weights were written in place (an optimizer
        step, load_state_dict), outside the layer's windows."""
        return self._version(index) - self._window_bumps[index]

    def _version(self, index: int) -> int:
        # Every in-place write through a parameter (optimizer steps, load_state_dict, copy_) bumps its own counter.
        return sum(t.param._version for t in self.layers[index])

    def _steps_ours(self, optimizer) -> bool:
        return any(id(p) in self._by_param for group in optimizer.param_groups for p in group["params"])

    def before_step(self, optimizer) -> None:
        """Any optimizer is about to step: gradients still in flight must be in `.grad` if it steps ours."""
        if self._pending and self._steps_ours(optimizer):
            self.flush()

    def after_step(self, optimizer) -> None:
        """Any optimizer has stepped: refresh the compute copies of our layers it changed."""
        if self._steps_ours(optimizer):
            self.sync()
            # a forward whose graph was dropped without backward must not hold its layers' gradients back forever
            self.open_calls = [0] * len(self.layers)

    # --- bytes and removal -----------------------------------------------------------------------------------------
    @property
    def master_bytes(self) -> int:
        """Host bytes of the separate fp32 masters (0 when the layers train in their own dtype)."""
        return sum(t.master.numel() * t.master.element_size() for ts in self.layers for t in ts if t.separate)

    def remove(self) -> None:
        """Before the store unpacks: finish gradients, bring the compute copies up to date, drop the hooks."""
        self.flush()
        _LIVE.discard(self)
        self.listeners = []
        self.sync()
        for tensors in self.layers:
            for tensor in tensors:
                if tensor.separate:
                    tensor.param.data = tensor.host  # the store gives each parameter its own storage back
                    if tensor.param.grad is not None and tensor.param.grad.dtype != tensor.host.dtype:
                        tensor.param.grad = None  # an fp32 gradient cannot stay on a bf16 parameter
        self.layers = []


def _masters(pack, packed: list) -> list[TrainableTensor]:
    """The masters of one layer's trainable tensors: one fp32 buffer for the low-precision ones."""
    views = [t.view_in(pack.host) for t in packed]
    low = [k for k, t in enumerate(packed) if t.dtype in LOW_PRECISION]
    buffer = torch.empty(sum(packed[k].param.numel() for k in low), dtype=torch.float32)
    masters, offset = list(views), 0
    for k in low:
        numel = views[k].numel()
        masters[k] = buffer[offset : offset + numel].view(views[k].shape)
        masters[k].copy_(views[k])
        offset += numel
    return [TrainableTensor(t.param, master, view) for t, master, view in zip(packed, masters, views)]
