"""Mixture-of-Experts layers: find their experts modules and move only the experts a batch routes tokens to.

Router logits keep their gradient through the layer Function itself (see Note: [Recorded outputs] in layer_fn.py);
this module is about routed-expert fetch.

Note: [Routed experts call]
An experts module of the standard form (compat: `num_experts`, direct parameters of shape [num_experts, ...],
forward(hidden_states, top_k_index, top_k_weights)) is called by its MoE block once the routing is known. Its
forward is replaced (on the instance, reversibly) by one that:
  1. reads the routed expert ids back to the host once: a per-expert mask built on the device, one small copy,
  2. asks the streamer for those experts; it returns the experts in the slot in ascending order and [k, ...] views
     of them (see Note: [Routed expert fetch] in streamer.py),
  3. maps expert ids to positions 0..k-1 on the device (a monotone map, so every implementation visits experts and
     sums in the same order as with all experts), tells the module it holds k experts, and runs its own forward
     (eager, grouped_mm, batched_mm: whichever the config selects) with its expert attributes parametrized to
     those views for the call (`torch.nn.utils.parametrize`).
The expert Parameters are never rebound (`.data` is not touched): an implementation may save the weight tensor it
was given for its backward (grouped_mm does), and the recompute's `autograd.grad` runs after the call returned; the
saved tensor must still be the loaded experts then, not whatever the Parameter points at by that time.
Nothing ever reads an expert that was not loaded: inside the call the expert attributes only span loaded experts.
peft LoRA on expert tensors (`target_parameters`, `lora.ParamWrapper`) folds `W + scaling * lhs @ rhs` over the
whole expert stack. Here the same fold runs over the loaded experts only (`lhs[order]`, `rhs[order]`), through the
same `torch.nn.utils.parametrize` mechanism, so compute and memory scale with the experts used; unrouted experts
get exactly zero LoRA gradient, as in ordinary training.

Note: [Routed experts under full fine-tuning]
With full fine-tuning the expert weights themselves train, but the routed call computes on [k, ...] views of the
loaded experts, never on the [num_experts, ...] Parameters. So when the call runs with grad enabled (the recompute
in backward), the views pass through `_ExpertRowGradients`, an identity whose backward hands the [k, ...] gradients
to the trainable layers (`sink.stash_rows`) with the expert ids of those rows; `TrainableLayers.accumulate` adds them
into those rows of the host fp32 `.grad` (zeros elsewhere). That is exactly the ordinary gradient: an unrouted
expert's gradient is exactly zero in an ordinary step too, and a routed expert's row is the same arithmetic whether
it was taken from k loaded experts or from all of them. The identity's other input is the trainable layers' anchor,
which the recompute's `autograd.grad` asks a gradient for: that puts the identity on the backward's path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import compat
from .overrides import InstalledForward, Overrides

logger = logging.getLogger(__name__)

# The dtypes peft folds LoRA into directly; for others (float8) it upcasts, which the routed fold does not mirror.
_FOLD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class ExpertGroup:
    """One experts module of one decoder layer whose experts can be fetched by routing."""

    layer_index: int
    region: int  # its index among the layer's expert regions in the host store
    entry: nn.Module  # the module the MoE block calls: the outermost peft ParamWrapper, or the experts module
    base: nn.Module  # the experts module itself
    wrappers: list[nn.Module]  # peft ParamWrappers around it, outside in
    params: list[nn.Parameter]  # its stacked expert parameters, in packing order
    names: list[str]  # their attribute names on `base`, in the same order
    num_experts: int
    index_argument: str
    signature: inspect.Signature


def _index_argument(module: nn.Module) -> str | None:
    """The name of the routed-expert-ids argument if `module.forward` has the experts signature, else None."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names[1] if len(names) >= 3 and names[1] in compat.EXPERT_INDEX_ARGUMENTS else None


def _ineligibility(base: nn.Module, wrappers: list[nn.Module]) -> str | None:
    """Why the experts of `base` cannot be fetched by routing, or None when they can."""
    num_experts = getattr(base, "num_experts", None)
    if not isinstance(num_experts, int) or num_experts < 1:
        return "it has no integer `num_experts` attribute"
    own = list(base.parameters(recurse=False))
    if not own or len(own) != len(list(base.parameters())):
        return "its expert weights are not direct parameters of the module"
    if any(p.dim() == 0 or p.shape[0] != num_experts for p in own):
        return f"not all of its parameters are stacked [num_experts={num_experts}, ...] tensors"
    if any(b.dim() > 0 and b.shape[0] == num_experts for b in base.buffers()):
        return "it holds per-expert buffers, which routed fetch would not narrow to the loaded experts"
    if any(p.requires_grad for p in own):
        return "its expert weights are trainable (only frozen weights are streamed)"
    if any(p.dtype not in _FOLD_DTYPES for p in own) and wrappers:
        return "it holds LoRA on expert weights stored in a dtype peft upcasts (float8)"
    return None


def find_expert_groups(layers: nn.ModuleList) -> tuple[list[list[ExpertGroup]], list[str]]:
    """Per layer, its experts modules that can be fetched by routing; and why others cannot (one line each)."""
    groups: list[list[ExpertGroup]] = []
    refused: dict[tuple[str, str], list[int]] = {}  # (class, reason) -> layers
    for index, layer in enumerate(layers):
        inner = {id(m.base_layer) for m in layer.modules() if compat.is_param_wrapper(m)}
        found: list[ExpertGroup] = []
        for module in layer.modules():
            if id(module) in inner:
                continue  # reached through its wrapper
            wrappers, base = compat.param_wrapper_chain(module)
            argument = _index_argument(base)
            if argument is None:
                continue
            reason = _ineligibility(base, wrappers)
            if reason is not None:
                refused.setdefault((type(base).__name__, reason), []).append(index)
                continue
            found.append(
                ExpertGroup(
                    layer_index=index,
                    region=len(found),
                    entry=module,
                    base=base,
                    wrappers=wrappers,
                    params=[p for _, p in base.named_parameters(recurse=False)],
                    names=[n for n, _ in base.named_parameters(recurse=False)],
                    num_experts=base.num_experts,
                    index_argument=argument,
                    signature=inspect.signature(base.forward),
                )
            )
        groups.append(found)
    reasons = [f"{cls} in layers {', '.join(map(str, layers))}: {why}" for (cls, why), layers in refused.items()]
    return groups, reasons


def has_unroutable_experts(layers: nn.ModuleList) -> bool:
    """Whether some module of the layers declares several experts (for a warning when none can be routed)."""
    return any(isinstance(getattr(m, "num_experts", None), int) and m.num_experts > 1 for m in layers.modules())


class RoutedExperts:
    """Installs the routed experts call (Note: [Routed experts call]) on every group, and removes it."""

    def __init__(self, groups: list[list[ExpertGroup]], streamer):
        self.streamer = streamer
        self.groups = [g for layer_groups in groups for g in layer_groups]
        self._overrides = Overrides()
        # Full fine-tuning: the trainable layers, which take the routed experts' gradients (Note: [Routed experts
        # under full fine-tuning]); None when the experts are frozen.
        self.gradient_sink = None

    def install(self) -> None:
        for group in self.groups:
            original = group.base.forward  # bound class forward (the experts implementation dispatch included)
            self._overrides.replace(group.entry, "forward", _routed_forward(self, group, original))

    def remove(self) -> None:
        self._overrides.restore()


def _routed_forward(routed: RoutedExperts, group: ExpertGroup, original: Callable) -> InstalledForward:
    streamer = routed.streamer

    def forward(*args, **kwargs):
        bound = group.signature.bind(*args, **kwargs)
        expert_index = bound.arguments[group.index_argument]
        experts = _routed_expert_ids(streamer, group, expert_index)
        order, views = streamer.load_experts(group.layer_index, group.region, experts)
        sink = routed.gradient_sink
        if sink is not None and torch.is_grad_enabled() and any(p.requires_grad for p in group.params):
            # See Note: [Routed experts under full fine-tuning]
            rows = torch.tensor(order, dtype=torch.int64)
            views = list(_ExpertRowGradients.apply(sink, group, rows, sink.anchor, *views))
        device, dtype = expert_index.device, expert_index.dtype
        selected = streamer.ops.to_device(torch.tensor(order, dtype=torch.int64))
        positions = torch.zeros(group.num_experts, dtype=dtype, device=device)
        positions[selected] = torch.arange(len(order), dtype=dtype, device=device)
        bound.arguments[group.index_argument] = positions[expert_index]  # expert id -> its position in the slot
        with compat.experts_count(group.base, len(order)), _LoadedExperts(group, views, selected):
            if not group.wrappers:
                return original(*bound.args, **bound.kwargs)
            return group.base(*bound.args, **bound.kwargs)

    return InstalledForward(forward, original, "an experts module of a streamed decoder layer (routed expert fetch)")


def _routed_expert_ids(streamer, group: ExpertGroup, expert_index: torch.Tensor) -> list[int]:
    """The expert ids `expert_index` routes to, ascending: built on the device, read back to the host once."""
    ids = expert_index.reshape(-1).long()  # some routers give int32 ids; index_fill_ takes int64
    outside = (ids < 0) | (ids >= group.num_experts)
    ids = torch.where(outside, group.num_experts, ids)  # out-of-range ids land in one extra bucket
    routed = torch.zeros(group.num_experts + 1, dtype=torch.uint8, device=ids.device)
    routed.index_fill_(0, ids, 1)
    routed = streamer.read_to_host(routed)  # the one device-to-host sync of routed fetch
    if routed[group.num_experts]:
        raise RuntimeError(
            f"hf_offload: {type(group.base).__name__} of layer {group.layer_index} was routed to expert ids outside "
            f"0..{group.num_experts - 1}; routed expert fetch cannot serve them. Use "
            "OffloadConfig(expert_fetch='all') and please report this model."
        )
    return routed[: group.num_experts].nonzero().flatten().tolist()  # a host tensor: no device sync


class _ExpertRowGradients(torch.autograd.Function):
    """Identity on the loaded experts' views; backward hands their [k, ...] gradients to `sink` (see Note: [Routed
    experts under full fine-tuning]). `anchor` puts it on the path of the recompute's `autograd.grad`."""

    @staticmethod
    def forward(ctx, sink, group: ExpertGroup, rows: torch.Tensor, anchor: torch.Tensor, *views: torch.Tensor):
        ctx.sink, ctx.group, ctx.rows = sink, group, rows
        ctx.set_materialize_grads(False)
        return tuple(view.view_as(view) for view in views)

    @staticmethod
    def backward(ctx, *grads):
        trained = [(p, g) for p, g in zip(ctx.group.params, grads) if g is not None and p.requires_grad]
        ctx.sink.stash_rows(ctx.group.layer_index, [(p, ctx.rows, g) for p, g in trained])
        return (None, None, None, None, *([None] * len(grads)))


class _Loaded(nn.Module):
    """A parametrization that stands for the loaded experts: the parameter reads as `tensor` (a slot view)."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.tensor = tensor

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.tensor


class _LoraFold(nn.Module):
    """A parametrization: W (the loaded experts) + the LoRA deltas of those experts."""

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor, float]]):
        super().__init__()
        self.factors = factors

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # As peft: the fold runs in the weight's dtype, outside autocast (a parametrization keeps the dtype).
        with torch.autocast(device_type=weight.device.type, enabled=False):
            if len(self.factors) == 1:
                lhs, rhs, scaling = self.factors[0]
                return torch.baddbmm(weight, lhs, rhs, alpha=scaling)
            delta = sum(torch.bmm(lhs, rhs) * scaling for lhs, rhs, scaling in self.factors)
            return weight + delta.to(weight.dtype)


class _LoadedExperts:
    """Context: `group`'s expert parameters read as the loaded experts (`views`), plus their LoRA deltas.

    See Note: [Routed experts call]. The Parameters themselves are never touched: while the context is open, the
    module's attributes are parametrized to the slot views (fresh tensors of this call), so whatever autograd saves
    in this call (grouped_mm saves the weight tensor it was given) stays the loaded experts after the call returns.
    """

    def __init__(self, group: ExpertGroup, views: list[torch.Tensor], selected: torch.Tensor):
        self.group = group
        self.views = views
        self.folds: dict[str, list] = {}
        for wrapper in group.wrappers:
            for lhs, rhs, scaling in compat.param_wrapper_deltas(wrapper):
                self.folds.setdefault(wrapper.parameter_name, []).append((lhs[selected], rhs[selected], scaling))
        self._cache = parametrize.cached()

    def __enter__(self):
        base = self.group.base
        for name, view in zip(self.group.names, self.views):
            parametrize.register_parametrization(base, name, _Loaded(view), unsafe=True)
        for name, factors in self.folds.items():
            parametrize.register_parametrization(base, name, _LoraFold(factors), unsafe=True)
        self._cache.__enter__()
        return self

    def __exit__(self, *exc):
        self._cache.__exit__(*exc)
        for name in self.group.names:
            parametrize.remove_parametrizations(self.group.base, name, leave_parametrized=False)
        return False
