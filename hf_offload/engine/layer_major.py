"""Layer-major evaluation: a group of batches goes through layer 0, then layer 1, ..., each layer loaded once.

Batch by batch, an evaluation streams every decoder layer once per batch. Here each batch's forward still runs as
the model's own code (masks, rotary tables, sliding/full attention per layer, MoE routing are the model's), but
the forwards of a group of batches advance in lockstep, layer by layer, so that a layer, once on the device, serves
every batch of the group before the next layer is loaded.

Note: [Layer-major schedule]
Each batch's forward runs in its own worker thread. The streamed decoder layers' `forward` is wrapped for the time
of the schedule: a worker that calls layer i hands control back to the scheduler and waits. The scheduler always
resumes the waiting worker that made the fewest layer calls (ties: the lowest layer, then the earliest batch), so
every worker first runs up to layer 0, then each runs layer 0 and whatever the model does until layer 1, and so
on; after the last layer each worker runs the final norm, head and loss, and returns (a generate() goes on with its
next token's pass, in lockstep with the others). Exactly one thread runs at any time (a hand-off under one
condition variable), so the order of every operation is deterministic and each batch computes exactly what it
computes alone: the schedule only changes *when* the model's code runs, not what it runs. The device slots stay
valid across the batches' forwards as across training steps: a slot is reloaded only when its host bytes change.

Why threads and not generators or a re-implemented forward: a Python generator can only pause in its own frame,
but the pause point is deep inside the model's forward (its loop over `self.layers`), and re-implementing that loop
per family would lose masks, per-layer attention types, shared KV and routing details that differ between
families. A thread pauses anywhere. Torch keeps grad mode, inference mode, autocast and the current stream and
device per thread, and transformers' output collectors live in context variables: each worker starts with the
scheduling thread's values of all of them (see `_ThreadState`).

Between layers a worker's boundary hidden state (the first tensor argument of its layer call) waits. On an
accelerator it stays in device memory while the waiting states of the group fit in `MEMORY_FRACTION` of the memory
free when the group starts: then the link carries nothing but each layer's weights, once. Beyond that it waits in
page-locked host memory, copied out and back in on the compute stream (2 x its bytes per layer, still far less than
a layer's weights for eval-sized batches). It is swapped with `tensor.data`, so every reference the model's frames
hold (the `hidden_states` variable, collected hidden states) sees the same tensor again when the worker resumes.
Other per-batch tensors (masks, rotary tables) stay on the device; all layers of the batch share them. On the CPU
the hidden states already are in host memory and stay where they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from . import hostmem
from .layer_fn import _autocast, _autocast_state, tree_flatten
from .overrides import Overrides

T = TypeVar("T")
logger = logging.getLogger(__name__)

# Part of the available host memory and, on an accelerator, of the free device memory that a planned group may
# hold (see `plan_groups`), and of the free device memory that waiting hidden states may keep on the device.
MEMORY_FRACTION = 0.25


class _Abandoned(BaseException):
    """Raised inside a worker that must unwind because another worker failed (never seen by callers)."""


@dataclass
class _ThreadState:
    """The per-thread torch state a worker must share with the thread that scheduled it."""

    grad: bool
    inference: bool
    autocast: list
    threads: int
    stream: Any

    @classmethod
    def capture(cls, ops) -> _ThreadState:
        return cls(
            grad=torch.is_grad_enabled(),
            inference=torch.is_inference_mode_enabled(),
            autocast=_autocast_state(ops.device.type),
            threads=torch.get_num_threads(),
            stream=ops.compute_stream(),
        )

    def apply(self, ops) -> contextlib.ExitStack:
        torch.set_num_threads(self.threads)  # OpenMP's thread count is per thread: keep the same reductions
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(self.inference))
        stack.enter_context(torch.set_grad_enabled(self.grad))
        stack.enter_context(_autocast(self.autocast))
        stack.enter_context(ops.use_stream(self.stream))
        return stack


class _Worker:
    def __init__(self, position: int, task: Callable[[], Any]):
        self.position = position
        self.task = task
        self.started = False
        self.done = False
        self.waiting_at: int | None = None  # the layer this worker waits to run
        self.calls = 0  # layer calls it made so far (a generate() makes one pass over the layers per token)
        self.result: Any = None
        self.error: BaseException | None = None
        self.kept_bytes = 0  # its boundary hidden state kept on the device while it waits
        self.thread: threading.Thread | None = None


class LayerMajorSchedule:
    """Runs tasks (each one batch's forward of the model, or a generate(), or anything calling it) layer-major.

    See Note: [Layer-major schedule].
    """

    def __init__(self, runtime, park: bool | None = None):
        """`park`: keep the boundary hidden states of waiting batches in host memory (True), on the device (False),
        or (None, the default) on the device while they fit in `MEMORY_FRACTION` of its free memory and in host
        memory beyond that. On the CPU, None keeps them where they are (they are in host memory already)."""
        self.runtime = runtime
        self.park = park
        self._device_budget: int | None = None
        self._kept: int = 0  # bytes of hidden states kept on the device by waiting workers
        self._cond = threading.Condition()
        self._turn: _Worker | None = None  # the worker allowed to run; None: the scheduler
        self._aborting = False
        self._local = threading.local()

    def run(self, tasks: list[Callable[[], T]]) -> list[T]:
        """Results of `tasks`, in order; the first exception a task raised is raised here."""
        if not tasks:
            return []
        self._aborting = False
        self._kept = 0
        if self.park is None and not self.runtime.ops.is_cpu:
            self._device_budget = int(self.runtime.ops.free_memory() * MEMORY_FRACTION)
        state = _ThreadState.capture(self.runtime.ops)
        workers = [_Worker(k, task) for k, task in enumerate(tasks)]
        for worker in workers:
            context = contextvars.copy_context()  # one copy per worker: a context runs in one thread at a time
            worker.thread = threading.Thread(
                target=self._work,
                args=(worker, state, context),
                name=f"hf_offload-layer-major-{worker.position}",
                daemon=True,
            )
        with self._gated_layers():
            for worker in workers:
                worker.thread.start()
            try:
                self._drive(workers)
            finally:
                self._abandon(workers)
                for worker in workers:
                    worker.thread.join()
        failed = next((w.error for w in workers if w.error is not None), None)
        if failed is not None:
            raise failed
        return [w.result for w in workers]

    # --- the scheduler's side --------------------------------------------------------------------------------------
    def _drive(self, workers: list[_Worker]) -> None:
        while True:
            live = [w for w in workers if not w.done]
            if not live:
                return
            worker = min(live, key=self._priority)
            self._hand_to(worker)
            if worker.error is not None:
                return  # the others are abandoned by `run`

    @staticmethod
    def _priority(worker: _Worker) -> tuple[int, int, int]:
        """Not started yet: run to the first layer. Then the fewest layer calls made, the lowest layer, the earliest
        batch: every batch's k-th layer call runs before anyone's (k+1)-th, so a forward is one pass over the layers
        for the whole group and a generate() one pass per token."""
        if not worker.started:
            return (-1, -1, worker.position)
        return (worker.calls, worker.waiting_at, worker.position)

    def _hand_to(self, worker: _Worker) -> None:
        with self._cond:
            self._turn = worker
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn is None)

    def _abandon(self, workers: list[_Worker]) -> None:
        """Let every unfinished worker unwind (it raises `_Abandoned` where it waits)."""
        with self._cond:  # a worker still running (the scheduler was interrupted) finishes its turn first
            self._cond.wait_for(lambda: self._turn is None)
        self._aborting = True
        for worker in workers:
            if not worker.done:
                self._hand_to(worker)

    # --- the worker's side -----------------------------------------------------------------------------------------
    def _work(self, worker: _Worker, state: _ThreadState, context: contextvars.Context) -> None:
        self._wait_for_turn(worker)
        worker.started = True
        self._local.worker = worker
        try:
            if self._aborting:
                raise _Abandoned
            with state.apply(self.runtime.ops):
                worker.result = context.run(worker.task)
        except _Abandoned:
            pass
        except BaseException as err:  # handed to the scheduling thread, which raises it
            worker.error = err
        finally:
            self._local.worker = None
            worker.done = True
            self._give_back()

    def _wait_for_turn(self, worker: _Worker) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn is worker)

    def _give_back(self) -> None:
        with self._cond:
            self._turn = None
            self._cond.notify_all()

    def _pause(self, worker: _Worker, index: int) -> None:
        worker.waiting_at = index
        worker.calls += 1
        self._give_back()
        self._wait_for_turn(worker)
        worker.waiting_at = None
        if self._aborting:
            raise _Abandoned

    # --- the layers' side ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _gated_layers(self):
        """Wrap each streamed layer's forward so that a worker's call waits for the layer's turn."""
        layers = self.runtime.anatomy.layers
        if any(getattr(layer.__dict__["forward"], "_layer_major_gate", False) for layer in layers):
            raise RuntimeError(
                "hf_offload: a layer-major evaluation was started inside another one (a task called "
                "evaluate_layer_major or Trainer.evaluate); run them one after the other."
            )
        overrides = Overrides()
        for index, layer in enumerate(layers):
            streamed = layer.__dict__["forward"]  # installed by the runtime
            overrides.replace(layer, "forward", self._gate(index, streamed))
        try:
            yield
        finally:
            overrides.restore()

    def _gate(self, index: int, streamed: Callable):
        def forward(*args, **kwargs):
            worker = getattr(self._local, "worker", None)
            if worker is None:  # a call from outside the schedule
                return streamed(*args, **kwargs)
            boundary = self._park(worker, args, kwargs)
            self._pause(worker, index)
            self._unpark(worker, boundary)
            return streamed(*args, **kwargs)

        forward.__wrapped__ = streamed
        forward._layer_major_gate = True
        return forward

    def _park(self, worker: _Worker, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Move the boundary hidden state to host memory while the worker waits, if it should not stay."""
        if self.park is False or (self.park is None and self.runtime.ops.is_cpu):
            return None
        leaves, _ = tree_flatten((args, kwargs))
        tensor = next((x for x in leaves if isinstance(x, torch.Tensor)), None)
        if tensor is None or tensor.device != self.runtime.device or tensor.requires_grad:
            return None
        nbytes = tensor.numel() * tensor.element_size()
        if self.park is None and self._kept + nbytes <= self._device_budget:
            worker.kept_bytes = nbytes  # fits: the link carries only weights
            self._kept += nbytes
            return None
        tensor.data = self.runtime.activations_to_host(tensor)
        return tensor

    def _unpark(self, worker: _Worker, tensor: torch.Tensor | None) -> None:
        self._kept -= worker.kept_bytes
        worker.kept_bytes = 0
        if tensor is not None:
            tensor.data = self.runtime.activations_to_device(tensor.data)


# --- planning groups ---------------------------------------------------------------------------------------------
@dataclass
class GroupPlan:
    """How many batches run layer-major together: at most `max_batches`, and at most `budget_bytes` of what they
    hold while the group runs (`bytes_per_token` per token of each batch; see `plan_groups`)."""

    max_batches: int | None
    budget_bytes: int | None
    bytes_per_token: int

    def batch_bytes(self, batch: Any) -> int:
        return _tokens(batch) * self.bytes_per_token

    def groups(self, items: Iterable[T], batch_of: Callable[[T], Any] | None = None) -> Iterator[list[T]]:
        """Consecutive groups of `items` (batches, or records holding one: `batch_of` finds it), in order.

        A group is complete when it has `max_batches`, or when the next batch would not fit in the budget (that
        batch is then read before the group is handed out). A batch alone larger than the budget is a group of one.
        """
        group: list[T] = []
        used = 0
        for item in items:
            need = self.batch_bytes(item if batch_of is None else batch_of(item))
            if group and self.budget_bytes is not None and used + need > self.budget_bytes:
                yield group
                group, used = [], 0
            group.append(item)
            used += need
            if self.max_batches is not None and len(group) >= self.max_batches:
                yield group
                group, used = [], 0
        if group:
            yield group


def plan_groups(model: nn.Module, runtime, group_size: int | None, keeps_logits: bool = True) -> GroupPlan:
    """The group plan of `model`: `group_size` batches at most, or (None) as many as the memory budget allows.

    The budget is `MEMORY_FRACTION` of the available host memory and, when the layers compute on an accelerator, of
    its free memory too. A batch of the group holds, per token, its boundary hidden state, its masks and rotary
    tables (counted at the size of a hidden state) and, when the caller keeps them (`keeps_logits`), its logits:
    a group's results are all held until its last batch is done.
    """
    itemsize = _activation_dtype(model).itemsize
    bytes_per_token = 2 * _text_config_size(model, "hidden_size") * itemsize
    if keeps_logits:
        bytes_per_token += _text_config_size(model, "vocab_size") * itemsize
    if group_size is not None:
        return GroupPlan(group_size, None, bytes_per_token)
    if runtime.streamer.partition is not None:
        # Groups sized by each rank's free memory and batch lengths would differ between ranks, and so would the
        # layer loads whose all-gather every rank of the node must join (Note: [Partitioned fetch]).
        logger.info(
            "hf_offload: evaluation runs batch by batch under partitioned_fetch; set eval_group_size to run it "
            "layer-major (groups of that many batches on every rank)"
        )
        return GroupPlan(1, None, bytes_per_token)
    budgets = [hostmem.available_bytes()]
    if not runtime.ops.is_cpu:
        budgets.append(runtime.ops.free_memory())
    known = [int(b * MEMORY_FRACTION) for b in budgets if b is not None]
    return GroupPlan(None, min(known) if known else None, bytes_per_token)


def _tokens(batch: Any) -> int:
    """Tokens of a batch: batch x sequence of its first tensor (input_ids, or inputs_embeds' first two dims)."""
    leaves, _ = tree_flatten(batch)
    tensor = next((x for x in leaves if isinstance(x, torch.Tensor) and x.dim() >= 1), None)
    if tensor is None:
        return 1
    return tensor.shape[0] * (tensor.shape[1] if tensor.dim() >= 2 else 1)


def _text_config_size(model: nn.Module, name: str) -> int:
    """`hidden_size` or `vocab_size` of the model's text config (1 when it has none: the plan counts batches)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), name, None)
        if isinstance(size, int):
            return size
    return 1


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The hidden states' dtype: the input embeddings' (autocast may compute layers in another, rarely wider)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
