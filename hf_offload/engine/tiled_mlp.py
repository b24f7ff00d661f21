"""Tiled MLP: a streamed layer's MLP computes in sequence tiles, so its intermediate activations exist per tile.

Note: [Tiled MLP]
A dense MLP is per token: output row t depends on input row t only. Above `mlp_tile_tokens` tokens, the MLP of each
streamed decoder layer runs tile by tile along the sequence (the second-to-last dimension) and writes each tile's
output into one output tensor. In the layer's forward (no graph) that alone bounds the intermediates (gate, up,
activation: several times the hidden size per token) to one tile. In the layer's backward recompute each tile is an
`_MLPTile` autograd Function that saves only its input tile and recomputes the tile with a graph in its own
backward, one tile after the other, so the recompute's graph holds no intermediate of the MLP either.

Which modules: a direct child named `mlp`, `feed_forward` or `ffn` of a decoder layer, called with the hidden states
alone, with no parameters of its own and only linear layers (peft-wrapped or not), activations, dropouts and
identities as children. That excludes Mixture-of-Experts blocks (routers, experts modules: their router logits are
recorded per call, and some aux losses are per sequence), feed-forwards that mix tokens (RWKV's time shift) and
MLPs that take the residual as a second argument (Bloom, MPT): they compute whole. The dense layers of MoE models
(DeepSeek's first layers, Qwen2-MoE's `mlp_only_layers`) are tiled.

Exactness: tiling changes nothing but the blocking of the matmuls (float summation order), unless the MLP draws
random numbers: a dropout mask drawn per tile is not the mask the whole tensor would get. The first tile runs under
an `RngWatch`; when it drew, the generators are rewound and the MLP computes whole, exactly as in an ordinary step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from . import compat
from .device import DeviceOps
from .layer_fn import _autocast, _autocast_state
from .overrides import InstalledForward
from .rng_watch import RngWatch

MLP_NAMES = ("mlp", "feed_forward", "ffn")


def find_mlp(layer: nn.Module) -> nn.Module | None:
    """The dense, per-token MLP of a decoder layer (see Note: [Tiled MLP]).

    Args:
        layer: one decoder layer.

    Returns:
        Its `mlp`, `feed_forward` or `ffn` child when that is a dense MLP, else None.
    """
    for name in MLP_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module) and _is_dense_mlp(module):
            return module
    return None


def _is_dense_mlp(module: nn.Module) -> bool:
    """No parameters of its own, called with one tensor, children only linear layers, activations and dropout."""
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        return False
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(required) != 1 or required[0].kind is required[0].KEYWORD_ONLY:
        return False
    children = list(module.children())
    return any(_is_linear(c) for c in children) and all(_is_linear(c) or _is_stateless(c) for c in children)


def _is_linear(module: nn.Module) -> bool:
    """A linear layer, or a peft adapter layer around one (its adapters are per-token linear maps too)."""
    if compat.is_peft_tuner_layer(module):
        module = module.get_base_layer()
    return compat.is_linear(module)


def _is_stateless(module: nn.Module) -> bool:
    """An activation, a dropout or an identity: no parameters, no children, per-token."""
    if any(True for _ in module.children()) or any(True for _ in module.parameters()):
        return False
    if any(True for _ in module.buffers()):
        return False
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return True
    return type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations")


class _TileJob:
    """The MLP's forward and its trainable parameters, for `_MLPTile` to recompute a tile."""

    def __init__(self, mlp_forward, params: list):
        self.mlp_forward = mlp_forward
        self.params = params


class _MLPTile(torch.autograd.Function):
    """One tile of a tiled MLP under grad: saves the input tile, recomputes the tile in its backward."""

    @staticmethod
    def forward(ctx, job: _TileJob, tile: torch.Tensor, *params):
        ctx.job = job
        ctx.autocast_state = _autocast_state(tile.device.type)
        ctx.save_for_backward(tile)
        return job.mlp_forward(tile)

    @staticmethod
    def backward(ctx, grad_output):
        (tile,) = ctx.saved_tensors
        job: _TileJob = ctx.job
        need_tile = ctx.needs_input_grad[1]
        params = [p for p, need in zip(job.params, ctx.needs_input_grad[2:]) if need]
        # recomputed under the forward's autocast state; backpropagated under the caller's
        with torch.enable_grad(), _autocast(ctx.autocast_state):
            detached = tile.detach().requires_grad_(need_tile)
            output = job.mlp_forward(detached)
        wrt = [detached, *params] if need_tile else params
        grads = list(torch.autograd.grad(output, wrt, grad_output, allow_unused=True)) if wrt else []
        grad_tile = grads.pop(0) if need_tile else None
        by_param = dict(zip(map(id, params), grads))
        ctx.job = None
        return (None, grad_tile, *[by_param.get(id(p)) for p in job.params])


def _apply_tile(mlp_forward, tile: torch.Tensor, params: list) -> torch.Tensor:
    if not torch.is_grad_enabled() or not (tile.requires_grad or params):
        return mlp_forward(tile)
    return _MLPTile.apply(_TileJob(mlp_forward, params), tile, *params)


def _contiguous_input(forward):
    def contiguous_forward(tile: torch.Tensor):
        return forward(tile.contiguous())

    return contiguous_forward


class TiledMLPs:
    """The tiled forwards installed on the MLPs of the streamed layers; see Note: [Tiled MLP].

    Args:
        layers: the streamed decoder layers.
        ops: the device's operations (random generator state).
        tile_tokens: the threshold and tile size in tokens (batch x sequence); None installs nothing.
    """

    def __init__(self, layers: nn.ModuleList, ops: DeviceOps, tile_tokens: int | None):
        self.ops = ops
        self.tile_tokens = tile_tokens
        self.tiled_calls = 0  # MLP calls that ran in tiles (tests read it)
        self.whole_calls = 0  # calls above the threshold that computed whole (the MLP drew random numbers)
        self.mlps: list[nn.Module] = []
        self._saved: list[tuple[nn.Module, Any]] = []
        if tile_tokens is None:
            return
        for layer in layers:
            mlp = find_mlp(layer)
            if mlp is None:
                continue
            self.mlps.append(mlp)
            self._saved.append((mlp, mlp.__dict__.get("forward")))
            mlp.forward = self._tiled_forward(mlp, mlp.forward)

    def remove(self) -> None:
        """Give every MLP its forward back."""
        for mlp, previous in self._saved:
            if previous is None:
                del mlp.forward
            else:
                mlp.forward = previous
        self._saved, self.mlps = [], []

    def _tiled_forward(self, mlp: nn.Module, original):
        def forward(*args, **kwargs):
            if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
                return original(*args, **kwargs)
            return self._run(mlp, original, args[0])

        return InstalledForward(forward, original, "an MLP of a streamed decoder layer (tiled by mlp_tile_tokens)")

    def _run(self, mlp: nn.Module, original, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[-2]
        rows = hidden.numel() // max(1, length * hidden.shape[-1])
        if rows * length <= self.tile_tokens:
            return original(hidden)
        tile = max(1, self.tile_tokens // max(1, rows))
        if tile >= length:
            return original(hidden)
        params = [p for p in mlp.parameters() if p.requires_grad]
        original = _contiguous_input(original)  # a tile of a batch is a strided view; some MLPs `.view` their input
        watch = RngWatch(self.ops)
        first = _apply_tile(original, hidden[..., :tile, :], params)
        if watch.moved() or not isinstance(first, torch.Tensor) or first.shape[:-1] != hidden[..., :tile, :].shape[:-1]:
            watch.rewind()
            self.whole_calls += 1
            return original(hidden)
        tiles = range(tile, length, tile)
        if torch.is_grad_enabled():
            # under grad, concatenation has the simplest backward (one split); the tile outputs are not kept
            outputs = [first] + [_apply_tile(original, hidden[..., lo : lo + tile, :], params) for lo in tiles]
            self.tiled_calls += 1
            return torch.cat(outputs, dim=-2)
        output = first.new_empty((*first.shape[:-2], length, first.shape[-1]))
        output[..., :tile, :] = first
        del first
        for lo in tiles:
            output[..., lo : lo + tile, :] = original(hidden[..., lo : lo + tile, :])
        self.tiled_calls += 1
        return output
