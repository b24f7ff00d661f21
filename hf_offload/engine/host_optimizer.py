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
parameter for fp32 masters). Those copies are made into tensors allocated on the first early step and reused by
every later one, so the cost is constant and `hf-offload plan --full_finetune` counts it (`early_step_backups`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch.optim.adam import adam

from .trainable import live_trainable_layers


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class HostAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` for full fine-tuning with layer streaming; see Note: [Stepping layers during backward].

    Args:
        params: as for `torch.optim.AdamW` (the model's parameters or parameter groups).
        lr, betas, eps, weight_decay: as for `torch.optim.AdamW`.
        threads: host threads stepping layers in parallel (default: the CPU count, at most 8).
        step_during_backward: a callable that says, while a backward runs, whether it completes the gradients of
            the next `step()` (then layers are stepped as their gradients arrive). None (the default) steps
            everything in `step()`.

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
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        threads = threads if threads is not None else min(8, os.cpu_count() or 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"`threads` should be a positive integer, but the value passed is {threads!r}")
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
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _apply(self, members: list, foreach: bool | None) -> None:
        """torch's AdamW update of `members` ([(group, param)]), group by group."""
        groups: dict[int, tuple[dict, list]] = {}
        for group, param in members:
            groups.setdefault(id(group), (group, []))[1].append(param)
        for group, params in groups.values():
            states = [self._state(p) for p in params]
            beta1, beta2 = group["betas"]
            adam(
                params,
                [p.grad for p in params],
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
                    weight, exp_avg, exp_avg_sq = self._backup_buffers(param, state)
                    weight.copy_(param)
                    exp_avg.copy_(state["exp_avg"])
                    exp_avg_sq.copy_(state["exp_avg_sq"])
                    # the step reads the gradient and never writes it: a later change of its version is clipping
                    saved.append((weight, state["step"].clone(), exp_avg, exp_avg_sq, param.grad._version))
                with self._lock:
                    self._backups[unit] = saved
            self._apply(members, foreach=False)
            self._layers[unit[0]].refresh_copy(unit[1])

    def _backup_buffers(self, param, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The host tensors that hold `param`'s weight and moments while its early step is a speculation: made once
        and reused every step (fresh copies every step would fragment the host heap).

        They and the optimizer state are made on the main thread before a layer's step is submitted: glibc gives
        each thread its own heap (arena), and long-lived tensors made by the workers would sit between their
        temporaries, keeping freed memory of the workers' heaps from being reused or returned."""
        buffers = self._backups_of.get(param)
        if buffers is None:
            buffers = tuple(torch.empty_like(t) for t in (param, state["exp_avg"], state["exp_avg_sq"]))
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
        return all(entry[4] == param.grad._version for entry, (_, param) in zip(self._backups[unit], members))

    def _roll_back(self, unit, members) -> None:
        for (weight, step, exp_avg, exp_avg_sq, _), (_, param) in zip(self._backups[unit], members):
            state = self.state[param]
            param.copy_(weight)
            state["step"].copy_(step)
            state["exp_avg"].copy_(exp_avg)
            state["exp_avg_sq"].copy_(exp_avg_sq)

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
