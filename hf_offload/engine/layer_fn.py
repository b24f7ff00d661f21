"""The per-layer autograd Function: forward without a graph, backward by reloading and recomputing the layer.

Note: [Streamed layer call]
A streamed decoder layer runs its forward under no_grad inside `StreamedLayerFunction.forward`, keeping only
its boundary inputs and the RNG/autocast state. Backward acquires the layer again (the streamer finds it still on
the device at the turnaround, or reloads it), recomputes the forward under grad with the same RNG state (dropout
masks match), and backprops the incoming gradient through it with `torch.autograd.grad`. Trainable parameters of
the layer (LoRA adapters, resident on the device) are inputs of the Function, so their gradients come back
through ordinary autograd: they accumulate into `.grad`, fire hooks, and work with `torch.autograd.grad`.
The layer's weights stay bound to the slot until `autograd.grad` has returned, because autograd keeps references
to them (a Linear saves its weight; RMSNorm saves `weight`).

Note: [Trainable weights changed before backward]
Autograd refuses a backward through a tensor that was modified in place after it was saved ("modified by an
inplace operation"). A streamed layer saves no graph in the forward, so the recompute would silently use the new
values of a LoRA weight changed between forward and backward. The version counter of each trainable parameter
(`Tensor._version`, what autograd's own check reads) is recorded in the forward and compared before the recompute.

Note: [Recorded outputs]
transformers records some outputs with forward hooks on submodules while the model's forward runs (MoE router
logits, attention weights; see `compat.recorded_output_keys`). Hooks firing inside our no_grad forward would hand the
model tensors without a gradient, and the router aux loss would lose its gradient. So the layer call collects what
its submodules record, returns it as extra outputs of the Function (they get a grad_fn like the hidden state), and
hands those to the model's collector; the recompute collects the same tensors again, with grad, and backprops their
incoming gradients together with the hidden state's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from . import compat

Forward = Callable[..., Any]


# --- flattening (args, kwargs) and layer outputs into leaves --------------------------------------------------------
def tree_flatten(obj: Any) -> tuple[list[Any], Any]:
    """Leaves of nested tuples/lists/dicts (ModelOutput and namedtuples included) and a spec to rebuild them."""
    leaves: list[Any] = []

    def go(o):
        if isinstance(o, tuple) and hasattr(o, "_fields"):  # namedtuple
            return (type(o), [go(x) for x in o])
        if type(o) in (tuple, list):
            return (type(o), [go(x) for x in o])
        if isinstance(o, dict):  # dict, OrderedDict, transformers ModelOutput
            return (type(o), {k: go(v) for k, v in o.items()})
        leaves.append(o)
        return None

    return leaves, go(obj)


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    it = iter(leaves)

    def go(s):
        if s is None:
            return next(it)
        kind, children = s
        if isinstance(children, dict):
            return (
                kind(**{k: go(v) for k, v in children.items()})
                if kind is not dict
                else {k: go(v) for k, v in children.items()}
            )
        items = [go(c) for c in children]
        return kind._make(items) if hasattr(kind, "_fields") else kind(items)

    return go(spec)


def _autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    types = {"cpu", device_type}
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in sorted(types)]


def _autocast(state) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type, enabled, dtype in state:
        stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled))
    return stack


class LayerCall:
    """One call of one streamed layer: what the Function needs to run it again in backward."""

    def __init__(
        self,
        runtime,
        index: int,
        forward: Forward,
        leaves: list[Any],
        spec: Any,
        params: list,
        recorded_keys: list[str],
        param_names: list[str] | None = None,
        streamed_params: list | None = None,
    ):
        self.runtime = runtime
        self.index = index
        self.forward = forward
        self.spec = spec
        self.grad_positions = [k for k, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
        # The boundary hidden state (the first positional tensor) is saved like the grad inputs even when it needs
        # no gradient (the first layer's input, from frozen embeddings): it is this layer's own activation, the one
        # `offload_activations` moves to host memory. Other tensors (masks, rotary tables) are shared by all layers.
        boundary = next((k for k, x in enumerate(leaves) if isinstance(x, torch.Tensor)), None)
        self.saved_positions = sorted({*self.grad_positions, *([] if boundary is None else [boundary])})
        # Saved inputs go through ctx (or host memory); never keep a second reference to them here.
        self.leaves = [None if k in self.saved_positions else x for k, x in enumerate(leaves)]
        self.params = params
        self.param_names = param_names or [f"parameter {k}" for k in range(len(params))]
        # See Note: [Trainable weights changed before backward]
        self.param_versions = [p._version for p in params]
        # Trainable weights that stream (full fine-tuning): not Function inputs; their gradients go to the host.
        self.streamed_params = streamed_params or []
        self.streamed_version = runtime.trainable.content_version(index) if self.streamed_params else None
        self.rng_state = None
        self.autocast_state = None
        self.recorded_keys = recorded_keys  # see Note: [Recorded outputs]
        self.out_spec = None
        self.out_leaves: list[Any] = []
        self.out_tensor_positions: list[int] = []
        self.out_first: list[int] = []  # for each output tensor, the index of its first occurrence among them

    def run(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, list]]:
        """The layer's output and what its submodules recorded (see Note: [Recorded outputs])."""
        if not self.recorded_keys:
            return self.forward(*args, **kwargs), {}
        with compat.collect_recorded_outputs(self.recorded_keys) as recorded:
            output = self.forward(*args, **kwargs)
        return output, recorded

    def output_tensors(self, output: Any, recorded: dict) -> list[torch.Tensor]:
        """The distinct tensors of (output, recorded), one per Function output, in a fixed order."""
        out_leaves, _ = tree_flatten((output, recorded))
        tensors = [out_leaves[k] for k in self.out_tensor_positions]
        return [tensors[k] for k in sorted(set(self.out_first))]

    def arguments(self, saved_inputs, recompute: bool = False) -> tuple[tuple, dict]:
        """The layer's (args, kwargs); for the `recompute` in backward, without KV cache objects (see
        Note: [KV caches in a streamed layer] in compat.py)."""
        leaves = compat.without_caches(self.leaves) if recompute else list(self.leaves)
        for k, tensor in zip(self.saved_positions, saved_inputs):
            leaves[k] = tensor
        return tree_unflatten(leaves, self.spec)

    def check_param_versions(self) -> None:
        """Raise as autograd does when a trainable weight of this layer was changed in place since the forward."""
        for name, param, version in zip(self.param_names, self.params, self.param_versions):
            if param._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: {name} of streamed decoder layer {self.index} ({type(param).__name__} "
                    f"{list(param.shape)}) is at version {param._version}; expected version {version} instead. "
                    "Change trainable weights only after backward (as optimizer.step() does), or run the forward "
                    "again after changing them."
                )

    def check_streamed_version(self) -> None:
        """Raise as autograd does when this layer's streamed trainable weights were changed in place since the
        forward (an optimizer step between forward and backward, or between two backwards of a retained graph)."""
        if self.streamed_params and self.runtime.trainable.content_version(self.index) != self.streamed_version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"the trainable weights of streamed decoder layer {self.index} were changed (an optimizer step, "
                "load_state_dict) after the forward that this backward goes through. Step the optimizer only after "
                "the last backward of a forward; with HostAdamW, step_during_backward must be True only during the "
                "last backward before step()."
            )

    def rebuild_output(self, tensors) -> tuple[Any, dict[str, list]]:
        distinct = dict(zip(sorted(set(self.out_first)), tensors))
        leaves = list(self.out_leaves)
        for k, first in zip(self.out_tensor_positions, self.out_first):
            leaves[k] = distinct[first]
        return tree_unflatten(leaves, self.out_spec)


class StreamedLayerFunction(torch.autograd.Function):
    """See Note: [Streamed layer call]."""

    @staticmethod
    def forward(ctx, call: LayerCall, *inputs):
        saved_inputs = inputs[: len(call.saved_positions)]
        runtime = call.runtime
        if runtime.config.preserve_rng_state:
            call.rng_state = runtime.ops.get_rng_state()
        call.autocast_state = _autocast_state(runtime.ops.device.type)
        args, kwargs = call.arguments(saved_inputs)
        # Saved through ctx either way (host copies too), so autograd frees them after backward, or keeps them for
        # another backward under retain_graph=True, exactly as it does for its own saved tensors. Offloaded inputs
        # start their copy to the host before the layer computes, so that it overlaps the layer's compute (see
        # Note: [Offloaded activations] in activations.py).
        ctx.offloaded = runtime.activations is not None
        if ctx.offloaded:
            hosts, ctx.activations = runtime.activations.to_host(list(saved_inputs), call.index)
            ctx.save_for_backward(*hosts)
        else:
            ctx.save_for_backward(*saved_inputs)
        output, recorded = runtime.run_layer(call.index, +1, lambda: call.run(args, kwargs))

        out_leaves, call.out_spec = tree_flatten((output, recorded))
        call.out_tensor_positions = [k for k, x in enumerate(out_leaves) if isinstance(x, torch.Tensor)]
        # A tensor returned twice by a Function would get one grad_fn slot and lose the other's gradient: each
        # distinct tensor is one output, and repeats are rebuilt from it.
        first_seen: dict[int, int] = {}
        call.out_first = [first_seen.setdefault(id(out_leaves[k]), j) for j, k in enumerate(call.out_tensor_positions)]
        all_tensors = [out_leaves[k] for k in call.out_tensor_positions]
        tensors = tuple(all_tensors[j] for j in sorted(set(call.out_first)))
        call.out_leaves = [None if k in call.out_tensor_positions else x for k, x in enumerate(out_leaves)]
        ctx.mark_non_differentiable(*[t for t in tensors if not (t.is_floating_point() or t.is_complex())])
        ctx.set_materialize_grads(False)
        ctx.call = call
        return tensors

    @staticmethod
    def backward(ctx, *grad_outputs):
        call: LayerCall = ctx.call
        runtime = call.runtime
        saved = ctx.saved_tensors  # raises autograd's own error on a second backward without retain_graph
        if ctx.offloaded:
            saved = runtime.activations.to_device(ctx.activations)
        detached = [t.detach().requires_grad_(k in call.grad_positions) for k, t in zip(call.saved_positions, saved)]
        call.check_param_versions()
        call.check_streamed_version()
        args, kwargs = call.arguments(detached, recompute=True)
        grad_inputs = [t for k, t in zip(call.saved_positions, detached) if k in call.grad_positions]
        wrt = [*grad_inputs, *call.params, *call.streamed_params]

        def recompute_and_backprop():
            # The recompute runs under the forward's autocast state; autograd.grad does not, so the backward ops
            # run as in an ordinary backward (under the caller's state, usually none), as reentrant checkpointing
            # does. Backward inside the forward's autocast casts gradient matmuls to bf16 as well.
            with _autocast(call.autocast_state):
                tensors = call.output_tensors(*call.run(args, kwargs))
            pairs = [(t, g) for t, g in zip(tensors, grad_outputs) if g is not None and t.requires_grad]
            if not pairs:
                return [None] * len(wrt)
            outs, grads = zip(*pairs)
            return torch.autograd.grad(outs, wrt, grads, allow_unused=True)

        if call.streamed_params:
            runtime.trainable.discard_rows(call.index)
        rng = runtime.ops.replay_rng(call.rng_state) if call.rng_state is not None else contextlib.nullcontext()
        with rng, torch.enable_grad():
            grads = runtime.run_layer(call.index, -1, recompute_and_backprop)
        if call.streamed_params:  # the layer is released: its weights are bound to their host masters again
            # A second backward through a retained graph recomputes and adds its gradients again, as autograd does.
            grads, streamed_grads = grads[: -len(call.streamed_params)], grads[-len(call.streamed_params) :]
            runtime.gradients_to_host(call.index, list(streamed_grads))
        # One gradient per Function input: saved inputs (None where no gradient is needed), then parameters.
        grads_by_position = dict(zip(call.grad_positions, grads[: len(grad_inputs)]))
        input_grads = [grads_by_position.get(k) for k in call.saved_positions]
        return (None, *input_grads, *grads[len(grad_inputs) :])


def call_streamed_layer(runtime, index: int, layer: torch.nn.Module, forward: Forward, args: tuple, kwargs: dict):
    """The body of a streamed layer's `forward`: stream it with or without recompute, as autograd needs."""
    compat.keep_checkpointing_off(layer)
    streamed = runtime.streamed_trainable(index)
    streamed_ids = {id(p) for p in streamed}
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad and id(p) not in streamed_ids]
    params = [p for _, p in named]
    names = [n for n, _ in named]
    if streamed:
        params.append(runtime.trainable.anchor)  # its backward must run (Note: [Trainable streamed weights])
        names.append("the anchor of the streamed trainable weights")
    if not (torch.is_grad_enabled() and _any_grad(params, args, kwargs)):
        # Nothing needs a gradient through this layer: stream it once, save nothing (eval, generate, no_grad).
        return runtime.run_layer(index, +1, lambda: forward(*args, **kwargs))
    compat.check_cache_arguments(args, kwargs, index)
    leaves, spec = tree_flatten((args, kwargs))
    call = LayerCall(runtime, index, forward, leaves, spec, params, compat.recorded_output_keys(), names, streamed)
    saved_inputs = [leaves[k] for k in call.saved_positions]
    if streamed:
        runtime.trainable.call_opened(index)
    outputs = StreamedLayerFunction.apply(call, *saved_inputs, *params)
    output, recorded = call.rebuild_output(outputs)
    if recorded:
        compat.extend_recorded_outputs(recorded)
    return output


def _any_grad(params, args, kwargs) -> bool:
    if params:
        return True
    leaves, _ = tree_flatten((args, kwargs))
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)
