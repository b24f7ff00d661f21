"""`OffloadMetricsCallback`: the `offload/` numbers on every Trainer log line, from `hf_offload.stats` deltas.

Each value covers the interval since the previous log line; on the line that ends training (the one with
`train_runtime`), the whole run since training began:

- `offload/tokens_per_s`: tokens through the model (attention-mask ones, else every input id) per second of wall
  time; a training line counts its steps, an evaluation line its evaluation;
- `offload/h2d_GB`, `offload/h2d_GBps`: layer weights copied host->device, and that over wall time. Wall time
  includes compute and the optimizer step, so this is the rate the run sustained, not the link's peak;
- `offload/activations_GB`: boundary activations moved to host and back (only with offload_activations);
- `offload/peak_device_memory_GB`: the device allocator's peak so far (only on an accelerator).

The trainer's `log` calls `collect()` before the Trainer records the line, so the numbers reach `log_history`, the
console and every reporting integration alike.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import TrainerCallback

from ..api import get_runtime, stats
from ..units import GB


class OffloadMetricsCallback(TrainerCallback):
    """Counts tokens through the model and reads `hf_offload.stats` deltas; `collect()` gives one line's metrics."""

    def __init__(self):
        self._model: nn.Module | None = None
        self._hook = None
        self._interval = _Mark()
        self._run = _Mark()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.watch(model)  # start the first interval when training starts, not when the trainer was built

    def watch(self, model: nn.Module) -> None:
        """Count the tokens through `model` and start a new interval and a new run now."""
        if self._hook is not None:
            self._hook.remove()
        self._model = model
        self._hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        self._interval = _Mark(stats(model))
        self._run = _Mark(stats(model))

    def collect(self, model: nn.Module, whole_run: bool = False) -> dict[str, float]:
        """The `offload/` metrics of the interval that ends now (or of the run so far); starts the next interval."""
        if model is not self._model:
            self.watch(model)
        mark = self._run if whole_run else self._interval
        elapsed = max(time.perf_counter() - mark.since, 1e-9)
        now = stats(model)
        delta = {key: now[key] - mark.stats.get(key, 0) for key in now}
        tokens = int(mark.tokens)  # one device sync per log line, not per step
        metrics = {
            "offload/tokens_per_s": tokens / elapsed,
            "offload/h2d_GB": delta["bytes_to_device"] / GB,
            "offload/h2d_GBps": delta["bytes_to_device"] / GB / elapsed,
        }
        runtime = get_runtime(model)
        if runtime.config.offload_activations:
            metrics["offload/activations_GB"] = (delta["bytes_to_host"] + delta["bytes_from_host_activations"]) / GB
        peak = runtime.ops.memory_allocated_peak()
        if peak is not None:
            metrics["offload/peak_device_memory_GB"] = peak / GB
        self._interval = _Mark(now)
        return metrics

    def _count_tokens(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor):
            count = mask.sum()  # stays on the device: no sync per step
        elif isinstance(ids, torch.Tensor):
            count = ids.numel()
        else:
            return None
        self._interval.tokens = self._interval.tokens + count
        self._run.tokens = self._run.tokens + count
        return None


class _Mark:
    """Where an interval started: the counters, the time, and the tokens seen since."""

    def __init__(self, counters: dict[str, int] | None = None):
        self.stats = counters or {}
        self.since = time.perf_counter()
        self.tokens: torch.Tensor | int = 0
