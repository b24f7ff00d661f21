"""Layer-major `Trainer.evaluate()` / `predict()` for a streamed model: each decoder layer loaded once per group.

Note: [Layer-major evaluation loop]
`Trainer.evaluation_loop` reads a batch, calls `prediction_step`, and does its own bookkeeping with the result
(losses repeated per example, padding across batches, `preprocess_logits_for_metrics`, gathering, callbacks,
`eval_accumulation_steps`, `batch_eval_metrics`, `compute_metrics` at the end). All of that stays the Trainer's.
Only the prediction steps run differently:

- the dataloader the loop iterates is wrapped (`_ReadAhead`): it reads the batches of a group ahead of the loop;
- `prediction_step` is wrapped on the instance for the time of the loop: at the first step of a group, the steps
  of the whole group run layer-major (each one the Trainer's own `prediction_step`, a subclass's override
  included, in a worker of the schedule; see Note: [Layer-major schedule] in engine/layer_major.py), and the loop
  then receives each batch's result, in order, as if it had just been computed.

Reading ahead changes one thing the loop can see: accelerate's record of the dataloader being iterated
(`GradientState.end_of_dataloader` and `.remainder`, read by `gather_for_metrics`, which truncates the last batch,
and by `batch_eval_metrics`). Its state as of each batch is recorded when the batch is read, and put back when the
loop receives that batch (engine/compat.py).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers import Trainer

from ..api import get_runtime
from ..engine import compat
from ..engine.layer_major import LayerMajorSchedule, plan_groups

_LOOP_SIGNATURE = inspect.signature(Trainer.evaluation_loop)


def evaluation_loop(call, trainer, dataloader, *args, **kwargs):
    """The Trainer hook: run the Trainer's own loop with its prediction steps layer-major (see the Note above)."""
    runtime = get_runtime(trainer.model)
    if runtime is None:
        return call(dataloader, *args, **kwargs)
    try:
        loss_only = _LOOP_SIGNATURE.bind(trainer, dataloader, *args, **kwargs).arguments.get("prediction_loss_only")
    except TypeError:  # a subclass's own loop arguments: plan as if predictions were kept
        loss_only = False
    loss_only = trainer.args.prediction_loss_only if loss_only is None else loss_only
    # the loop's results of a group wait on the device until its last batch is done: logits unless loss only
    plan = plan_groups(trainer.model, runtime, runtime.config.eval_group_size, keeps_logits=not loss_only)
    if plan.max_batches == 1:
        return call(dataloader, *args, **kwargs)  # batch by batch, as asked
    reader = _ReadAhead(dataloader, plan, getattr(trainer.accelerator, "gradient_state", None))
    schedule = LayerMajorSchedule(runtime)
    own = trainer.__dict__.get("prediction_step")
    trainer.prediction_step = _grouped_prediction_step(trainer.prediction_step, reader, schedule)
    try:
        return call(reader, *args, **kwargs)
    finally:
        if own is None:
            del trainer.prediction_step
        else:
            trainer.prediction_step = own


def _grouped_prediction_step(prediction_step, reader: _ReadAhead, schedule: LayerMajorSchedule):
    running = []  # non-empty while a group runs: a nested call is a worker's own, passed through

    @functools.wraps(prediction_step)
    def step(model, inputs, prediction_loss_only, ignore_keys=None):
        if running or not reader.holds(inputs) or reader.taken(inputs):
            return prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if reader.results is None:  # the first step of this group: run all of its steps
            tasks = [
                functools.partial(prediction_step, model, batch, prediction_loss_only, ignore_keys=ignore_keys)
                for batch in reader.group
            ]
            running.append(True)
            try:
                reader.results = schedule.run(tasks)
            finally:
                running.clear()
        return reader.take(inputs)

    return step


class _ReadAhead:
    """The loop's dataloader, read one group ahead. Everything but iteration is the wrapped dataloader's."""

    def __init__(self, dataloader, plan, gradient_state):
        self._dataloader = dataloader
        self._plan = plan
        self._gradient_state = gradient_state
        self.group: list[Any] = []
        self.results: list[Any] | None = None

    def __len__(self) -> int:
        return len(self._dataloader)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_dataloader":
            raise AttributeError(name)
        return getattr(self._dataloader, name)

    def __iter__(self):
        state = self._gradient_state
        readded: list = []
        records = ((batch, compat.dataloader_position(state)) for batch in self._dataloader)
        try:
            for group in self._plan.groups(records, batch_of=lambda record: record[0]):
                self.group, self.results = [batch for batch, _ in group], None
                for batch, position in group:
                    compat.restore_dataloader_position(state, position, readded)
                    yield batch
        finally:
            if state is not None:
                compat.forget_readded_dataloaders(state, readded)
            self.group, self.results = [], None

    def holds(self, inputs) -> bool:
        return any(inputs is batch for batch in self.group)

    def taken(self, inputs) -> bool:
        return self.results is not None and self.results[self._position(inputs)] is _TAKEN

    def take(self, inputs):
        """The result of `inputs`' prediction step, handed out once (a second step of the same batch computes)."""
        position = self._position(inputs)
        result, self.results[position] = self.results[position], _TAKEN
        return result

    def _position(self, inputs) -> int:
        return next(k for k, batch in enumerate(self.group) if batch is inputs)


_TAKEN = object()
