"""`HostAdamW`: torch's AdamW, stepping each streamed layer on host threads as soon as its gradients are complete.

Note: [Stepping layers during backward]
With full fine-tuning the decoder layers' master weights, gradients and AdamW state are host tensors, and a host
AdamW step over the whole model can take as long as the backward. `HostAdamW` is a `torch.optim.AdamW` (same
state, same `state_dict`, same arithmetic: it calls torch's functional `adam` on the same tensors) that:
- steps the parameters of different layers in parallel on a thread pool (torch's CPU kernels release the GIL);
- when told that the running backward completes the gradients (`step_during_backward`: the last micro-batch of a
  gradient accumulation; the Trainer integration says so from accelerate's `sync_gradients`), steps each layer as
  soon as its gradients have been added into `.grad`, while the backward of the layers below runs. That step is a
  speculation: gradient clipping, which needs the global norm of all gradients, comes later. Before speculating,
  the layer's weights and moments are copied aside. In `step()`, when the gradients were left as they were (no
  clipping: `clip_grad_norm_` multiplies by exactly 1.0), the speculation stands; when clipping scaled them (or
  anything else wrote them in place since: their version counters moved), the layer is rolled back from its copy
  and stepped again with the gradients as they are now. Both outcomes equal torch's AdamW after
  `clip_grad_norm_` exactly. Only `HostAdamW.clip_grad_norm_` (which the Trainer integration calls) knows whether
  the coefficient was 1.0; after a plain `torch.nn.utils.clip_grad_norm_` the version check redoes every
  speculated layer, which is exact but gives the overlap back.
The speculation costs host memory: a copy of the weights and both moments of the layers stepped early (12 bytes per
parameter for fp32 masters; about 6 with 8-bit state, see Note: [8-bit state]). Those copies are made into tensors
allocated on the first early step and reused by every later one, so the cost is constant and
`hf-offload plan --full_finetune` counts it (`early_step_backups`).

Note: [8-bit state]
With `state_bits=8` the two moments of every tensor of at least 4096 values are kept as bitsandbytes keeps them in
its 8-bit AdamW: blockwise quantized with bitsandbytes' dynamic maps (signed for `exp_avg`, unsigned for
`exp_avg_sq`), one uint8 code per value and one fp32 absmax per block of 256 values (`exp_avg_absmax`,
`exp_avg_sq_absmax` in the state), about 2 bytes per parameter instead of 8. Smaller tensors (norms, biases) keep
fp32 moments, as bitsandbytes does. A step dequantizes a chunk of whole blocks of both moments to fp32, runs torch's
AdamW arithmetic on that chunk of the weight, and quantizes the moments back, so the temporary fp32 moments are one
chunk per thread. The quantization is deterministic, so early steps, rollbacks (the copies then hold the codes and
absmaxes: fewer bytes), threads and a `state_dict` round trip give the same weights bit for bit as this optimizer
stepping everything in `step()`; against fp32 AdamW the moments carry quantization error (as with bitsandbytes).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.optim.adam import adam

from .trainable import live_trainable_layers

STATE_BITS = (32, 8)
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments (bitsandbytes' `min_8bit_size`)
BLOCKSIZE = 256  # values per absmax block (bitsandbytes' 8-bit optimizers)
CHUNK = 1 << 20  # values dequantized at once per tensor step: a multiple of BLOCKSIZE
_MOMENTS = ("exp_avg", "exp_avg_sq")
_ABSMAX = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def moment_bytes(numel: int, master_size: int, state_bits: int) -> int:
    """Bytes of HostAdamW's two moments for a tensor of `numel` values whose master has `master_size` bytes each."""
    if state_bits == 8 and master_size == 4 and numel >= MIN_8BIT_SIZE:
        return 2 * (numel + 4 * -(-numel // BLOCKSIZE))  # uint8 codes and one fp32 absmax per block, per moment
    return 2 * master_size * numel


def _quantized(state: dict) -> bool:
    return "exp_avg_absmax" in state


class _Codes:
    """bitsandbytes' dynamic 8-bit maps (signed for `exp_avg`, unsigned for `exp_avg_sq`), made once."""

    _maps: dict | None = None

    @classmethod
    def get(cls) -> dict:
        if cls._maps is None:
            functional = _bnb_functional()
            cls._maps = {
                "exp_avg": functional.create_dynamic_map(signed=True),
                "exp_avg_sq": functional.create_dynamic_map(signed=False),
            }
        return cls._maps


def _bnb_functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError as error:
        raise ImportError(
            "HostAdamW(state_bits=8) quantizes the AdamW moments with bitsandbytes, which is not installed. "
            "Install it (`pip install bitsandbytes`), or keep fp32 state (state_bits=32)."
        ) from error
    return functional


class HostAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` for full fine-tuning with layer streaming; see Note: [Stepping layers during backward].

    Args:
        params: as for `torch.optim.AdamW` (the model's parameters or parameter groups).
        lr, betas, eps, weight_decay: as for `torch.optim.AdamW`.
        threads: host threads stepping layers in parallel (default: the CPU count, at most 8).
        step_during_backward: a callable that says, while a backward runs, whether it completes the gradients of
            the next `step()` (then layers are stepped as their gradients arrive). None (the default) steps
            everything in `step()`.
        state_bits: 32 (the default) keeps torch AdamW's fp32 moments; 8 keeps them blockwise quantized like
            bitsandbytes' 8-bit AdamW (about 2 bytes per parameter instead of 8); see Note: [8-bit state].

    Raises:
        ValueError: `threads` or `state_bits` is not one of the accepted values.

    Example:
        >>> optimizer = HostAdamW(model.parameters(), lr=1e-5, step_during_backward=lambda: True)
        >>> model(**batch).loss.backward()  # layers are stepped while the backward runs
        >>> optimizer.clip_grad_norm_(model.parameters(), 1.0)
        >>> optimizer.step()  # the resident parameters, and a redo of the layers if clipping scaled gradients
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        threads: int | None = None,
        step_during_backward: Callable[[], bool] | None = None,
        state_bits: int = 32,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        threads = threads if threads is not None else min(8, os.cpu_count() or 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"`threads` should be a positive integer, but the value passed is {threads!r}")
        if isinstance(state_bits, bool) or state_bits not in STATE_BITS:
            raise ValueError(
                f"`state_bits` should be 32 (fp32 AdamW moments) or 8 (blockwise quantized moments), but the value "
                f"passed is {state_bits!r}"
            )
        if state_bits == 8:
            _Codes.get()  # bitsandbytes is needed: say so now rather than at the first step
        self.state_bits = state_bits
        self.step_during_backward = step_during_backward
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hf_offload-adamw")
        self._lock = threading.Lock()
        # Per speculated layer (trainable layers object, index): the future of its step, and what a rollback needs.
        self._speculated: dict[tuple[int, int], Future] = {}
        self._backups: dict[tuple[int, int], list] = {}
        self._stale: set[tuple[int, int]] = set()  # speculated layers whose gradients grew afterwards: always redone
        self._backups_of: dict = {}  # parameter -> its backup tensors (weight, exp_avg, exp_avg_sq), kept
        self._coefficient_was_one: bool | None = None
        # Counters: layer steps made during backward, and those of them redone in step() because clipping scaled.
        self.layers_stepped_during_backward = 0
        self.layers_rolled_back = 0
        self._layers = []  # the TrainableLayers whose parameters this optimizer steps
        ours = {id(p) for group in self.param_groups for p in group["params"]}
        for trainable in live_trainable_layers():
            if any(id(t.param) in ours for tensors in trainable.layers for t in tensors):
                self._layers.append(trainable)
                trainable.listen(self._layer_gradients_ready)

    # --- what the step is made of ---------------------------------------------------------------------------------
    def _units(self) -> tuple[dict[tuple[int, int], list], list]:
        """Parameters with a gradient, by streamed layer ((layers object, index) -> [(group, param)]), and the rest."""
        by_layer: dict[tuple[int, int], list] = {}
        rest = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                where = self._where(param)
                if where is None:
                    rest.append((group, param))
                else:
                    by_layer.setdefault(where, []).append((group, param))
        return by_layer, rest

    def _where(self, param) -> tuple[int, int] | None:
        for k, trainable in enumerate(self._layers):
            index = trainable.layer_of(param)
            if index is not None:
                return k, index
        return None

    def _state(self, param) -> dict:
        state = self.state[param]
        if len(state) == 0:  # as torch's AdamW initialises it
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            if self._quantizes(param):  # codes of 0.0 (its index in the map) and absmax 0: moments of zero
                for name, code in _Codes.get().items():
                    zero = int(torch.argmin(code.abs()))
                    state[name] = torch.full(param.shape, zero, dtype=torch.uint8)
                    state[_ABSMAX[name]] = torch.zeros(-(-param.numel() // BLOCKSIZE), dtype=torch.float32)
            else:
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _quantizes(self, param) -> bool:
        return (
            self.state_bits == 8
            and param.numel() >= MIN_8BIT_SIZE
            and param.dtype == torch.float32
            and param.device.type == "cpu"
            and param.is_contiguous()
        )

    def _apply(self, members: list, foreach: bool | None) -> None:
        """torch's AdamW update of `members` ([(group, param)]), group by group."""
        groups: dict[int, tuple[dict, list]] = {}
        plain = []
        for group, param in members:
            if _quantized(self._state(param)):
                self._apply_quantized(group, param)
            else:
                plain.append((group, param))
        for group, param in plain:
            groups.setdefault(id(group), (group, []))[1].append(param)
        for group, params in groups.values():
            states = [self._state(p) for p in params]
            self._adam(group, params, [p.grad for p in params], states, foreach)

    def _apply_quantized(self, group: dict, param) -> None:
        """torch's AdamW update of one parameter with 8-bit moments, a chunk of whole blocks at a time: dequantize
        the chunk's moments to fp32, update, quantize them back (see Note: [8-bit state])."""
        functional, codes = _bnb_functional(), _Codes.get()
        state = self.state[param]
        weight, grad = param.detach().view(-1), param.grad.reshape(-1)
        before = state["step"].clone()
        for start in range(0, weight.numel(), CHUNK):
            stop = min(start + CHUNK, weight.numel())
            blocks = slice(start // BLOCKSIZE, -(-stop // BLOCKSIZE))
            moments = {}
            for name in _MOMENTS:
                codes_of = state[name].view(-1)[start:stop]
                absmax = state[_ABSMAX[name]][blocks]
                moments[name] = functional.dequantize_blockwise(
                    codes_of, absmax=absmax, code=codes[name], blocksize=BLOCKSIZE
                )
            step = before.clone()  # every chunk makes the same step: from the count before it
            chunk_state = dict(moments, step=step)
            self._adam(group, [weight[start:stop]], [grad[start:stop]], [chunk_state], foreach=False)
            for name in _MOMENTS:
                functional.quantize_blockwise(
                    moments[name],
                    code=codes[name],
                    absmax=state[_ABSMAX[name]][blocks],
                    out=state[name].view(-1)[start:stop],
                    blocksize=BLOCKSIZE,
                )
        state["step"].copy_(step)

    @staticmethod
    def _adam(group: dict, params: list, grads: list, states: list, foreach: bool | None) -> None:
        beta1, beta2 = group["betas"]
        adam(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=foreach,
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=None,
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=True,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _step_layer(self, unit: tuple[int, int], members: list, backup: bool) -> None:
        with torch.no_grad():
            if backup:
                saved = []
                for _, param in members:
                    state = self._state(param)
                    weight, moments = self._backup_buffers(param, state)
                    weight.copy_(param)
                    for name, buffer in moments.items():
                        buffer.copy_(state[name])
                    # the step reads the gradient and never writes it: a later change of its version is clipping
                    saved.append((weight, state["step"].clone(), moments, param.grad._version))
                with self._lock:
                    self._backups[unit] = saved
            self._apply(members, foreach=False)
            self._layers[unit[0]].refresh_copy(unit[1])

    def _backup_buffers(self, param, state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The host tensors that hold `param`'s weight and moments (8-bit state: their codes and absmaxes) while its
        early step is a speculation: made once and reused every step (fresh copies every step would fragment the
        host heap).

        They and the optimizer state are made on the main thread before a layer's step is submitted: glibc gives
        each thread its own heap (arena), and long-lived tensors made by the workers would sit between their
        temporaries, keeping freed memory of the workers' heaps from being reused or returned."""
        buffers = self._backups_of.get(param)
        if buffers is None:
            moments = {name: torch.empty_like(value) for name, value in state.items() if name != "step"}
            buffers = (torch.empty_like(param), moments)
            self._backups_of[param] = buffers
        return buffers

    # --- during backward --------------------------------------------------------------------------------------------
    def _layer_gradients_ready(self, trainable, index: int) -> None:
        """Called by the trainable layers (main thread) once layer `index`'s gradients are complete in `.grad`."""
        if self.step_during_backward is None or not self.step_during_backward():
            return
        k = self._layers.index(trainable)
        members = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        members = [(g, p) for g, p in members if trainable.layer_of(p) == index]
        if not members:
            return
        if (k, index) in self._speculated:  # more gradient for a layer already stepped (a layer called twice)
            self._stale.add((k, index))
            return
        for _, param in members:  # persistent host tensors are made here, on the main thread (see `_backup_buffers`)
            self._backup_buffers(param, self._state(param))
        self._speculated[(k, index)] = self._pool.submit(self._step_layer, (k, index), members, True)
        self.layers_stepped_during_backward += 1

    def synchronize(self) -> None:
        """Wait until the layer steps started during backward have finished (`step()` does this itself)."""
        for future in list(self._speculated.values()):
            future.result()

    # --- clipping and the step --------------------------------------------------------------------------------------
    def clip_grad_norm_(self, parameters: Iterable, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_`, remembering whether it scaled the gradients (then speculated layers are
        stepped again in `step()`). Returns the total norm, as torch's does."""
        total = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type)
        self.note_clipping(total, max_norm)
        return total

    def note_clipping(self, total_norm: torch.Tensor | float, max_norm: float) -> None:
        """Tell the optimizer that `torch.nn.utils.clip_grad_norm_(..., max_norm)` returned `total_norm` since the
        backward (the Trainer integration calls it): whether it scaled the gradients decides the speculation."""
        total = torch.as_tensor(total_norm, dtype=torch.float32)
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # what clip_grad_norm_ multiplied by
        self._coefficient_was_one = bool(coefficient == 1.0)

    @torch.no_grad()
    def step(self, closure=None):
        """Finish the layers stepped during backward (keep, or roll back and redo), then step everything else."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for trainable in self._layers:
            trainable.flush()
        self.synchronize()  # a failed speculative step raises here
        by_layer, rest = self._units()
        futures = []
        for unit, members in by_layer.items():
            if unit in self._speculated:
                if self._speculation_stands(unit, members):
                    continue
                self._roll_back(unit, members)
                self.layers_rolled_back += 1
            for _, param in members:
                self._state(param)  # made on the main thread, as above
            futures.append(self._pool.submit(self._step_layer, unit, members, False))
        if rest:
            self._apply(rest, foreach=None)  # resident parameters: torch's default kernels for their device
        for future in futures:
            future.result()
        for k, trainable in enumerate(self._layers):
            trainable.mark_refreshed(sorted({index for (j, index) in by_layer if j == k}))
        self._speculated, self._backups, self._stale, self._coefficient_was_one = {}, {}, set(), None
        return loss

    def _speculation_stands(self, unit, members) -> bool:
        if unit in self._stale:
            return False
        if self._coefficient_was_one is not None:
            return self._coefficient_was_one
        return all(entry[3] == param.grad._version for entry, (_, param) in zip(self._backups[unit], members))

    def _roll_back(self, unit, members) -> None:
        for (weight, step, moments, _), (_, param) in zip(self._backups[unit], members):
            state = self.state[param]
            param.copy_(weight)
            state["step"].copy_(step)
            for name, buffer in moments.items():
                state[name].copy_(buffer)

    def load_state_dict(self, state_dict: dict) -> None:
        """`torch.optim.AdamW.load_state_dict`, keeping 8-bit moments as they were saved (torch would cast their
        codes and absmaxes to the parameter's dtype). State saved with the other `state_bits` is refused.

        Raises:
            ValueError: the state's moments are 8-bit and this optimizer keeps fp32 ones, or the other way round.
        """
        state_dict = dict(state_dict)
        states = {key: dict(value) for key, value in state_dict["state"].items()}
        kept = {
            key: {name: value.pop(name) for name in (*_MOMENTS, *_ABSMAX.values())}
            for key, value in states.items()
            if _quantized(value)
        }
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for key, param in zip(saved_ids, params):
            if key in states and (key in kept) != self._quantizes(param):
                raise ValueError(
                    f"The optimizer state passed keeps {'8-bit' if key in kept else 'fp32'} moments for a parameter "
                    f"of shape {tuple(param.shape)}, but this HostAdamW (state_bits={self.state_bits}) keeps "
                    f"{'8-bit' if self._quantizes(param) else 'fp32'} ones. Create the optimizer with the "
                    "`state_bits` the state was saved with."
                )
        super().load_state_dict(dict(state_dict, state=states))
        for key, param in zip(saved_ids, params):
            for name, value in kept.get(key, {}).items():
                self.state[param][name] = value.to(device=param.device, copy=True)

    def close(self) -> None:
        """Stop the worker threads and stop listening to the layers' gradients."""
        for trainable in self._layers:
            trainable.unlisten(self._layer_gradients_ready)
        self._pool.shutdown(wait=True)

    def __getstate__(self):
        state = super().__getstate__()
        not_state = ("_pool", "_lock", "_speculated", "_backups", "_backups_of", "_layers", "step_during_backward")
        for name in not_state:
            state.pop(name, None)
        return state
