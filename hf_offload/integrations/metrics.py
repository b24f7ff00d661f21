"""`OffloadMetricsCallback`: the `offload/` numbers on Trainer log lines, from `hf_offload.stats` deltas.

Named as the Trainer names its own metrics, so that `all_results.json` keeps every number and reporting
integrations (whose `rewrite_logs` files `eval_*` keys under `eval/` and the rest under `train/`) plot each in its
own series:

- training lines carry `offload/<name>`: the interval since the previous training line, or, on the line that ends
  training (the one with `train_runtime`), the whole run. Evaluations run during training are left out of both
  (their tokens, bytes and time);
- an evaluation carries `<prefix>_offload/<name>` (`eval_offload/tokens_per_s`, or `test_` for `predict()`, the
  Trainer's `metric_key_prefix`), for that evaluation alone, in the metrics `evaluate()` / `predict()` return.

The names:
- `tokens_per_s`: tokens through the model (attention-mask ones, else every input id) per second of wall time;
- `h2d_GB`: layer weights copied into the compute slots. On an accelerator that is host->device traffic and
  `h2d_GBps` gives it over wall time (wall time includes compute and the optimizer step, so this is the rate the run
  sustained, not the link's peak). On the CPU the copy stays in host memory: there is no link, so no rate;
- `activations_GB`: boundary activations moved to host and back (only with offload_activations);
- `peak_device_memory_GB`: the device allocator's peak so far (only on an accelerator).

The trainer's `log` calls `collect()` before the Trainer records a training line, and its `evaluation_loop` runs
inside `evaluation()`, so the numbers reach `log_history`, the console and every reporting integration alike.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn
from transformers import TrainerCallback

from ..api import get_runtime, stats
from ..units import GB

PREFIX = "offload/"


def is_evaluation_line(logs: dict) -> bool:
    """Whether a Trainer log line reports an evaluation (`eval_runtime`, `test_loss`, ...), not training."""
    return any(key.endswith("_runtime") and key != "train_runtime" for key in logs) or any(
        f"_{PREFIX}" in key for key in logs
    )


class OffloadMetricsCallback(TrainerCallback):
    """Counts tokens through the model and reads `hf_offload.stats` deltas, training and evaluation apart.

    `collect()` gives a training line's metrics; `evaluation()` measures one evaluation.
    """

    def __init__(self):
        self._model: nn.Module | None = None
        self._hook = None
        self._interval = _Mark()
        self._run = _Mark()
        self._eval: _Mark | None = None  # set while an evaluation runs

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
        """The training metrics of the interval that ends now (or of the run so far); starts the next interval."""
        if model is not self._model:
            self.watch(model)
        mark = self._run if whole_run else self._interval
        metrics = self._measure(model, mark, PREFIX)
        self._interval = _Mark(stats(model))
        return metrics

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module, prefix: str = "eval") -> Iterator[dict[str, float]]:
        """Measure the evaluation run inside the block: the dict it yields is filled with `<prefix>_offload/...`.

        What the evaluation moves and the time it takes are taken out of the training interval and run.
        """
        if model is not self._model:
            self.watch(model)
        if self._eval is not None:  # an evaluation inside an evaluation: the outer one measures it
            yield {}
            return
        self._eval = mark = _Mark(stats(model))
        result: dict[str, float] = {}
        try:
            yield result
        finally:
            self._eval = None
            elapsed = time.perf_counter() - mark.since
            delta = _delta(stats(model), mark)
            for training in (self._interval, self._run):
                training.exclude(elapsed, delta)
            result.update(self._measure(model, mark, f"{prefix}_{PREFIX}", elapsed=elapsed, delta=delta))

    def _measure(self, model, mark, prefix, elapsed=None, delta=None) -> dict[str, float]:
        elapsed = max(time.perf_counter() - mark.since if elapsed is None else elapsed, 1e-9)
        delta = _delta(stats(model), mark) if delta is None else delta
        tokens = int(mark.tokens)  # one device sync per log line, not per step
        runtime = get_runtime(model)
        metrics = {"tokens_per_s": tokens / elapsed, "h2d_GB": delta["bytes_to_device"] / GB}
        if not runtime.ops.is_cpu:  # on the CPU the layers are copied within host memory: no link to rate
            metrics["h2d_GBps"] = delta["bytes_to_device"] / GB / elapsed
        if runtime.config.offload_activations:
            metrics["activations_GB"] = (delta["bytes_to_host"] + delta["bytes_from_host_activations"]) / GB
        peak = runtime.ops.memory_allocated_peak()
        if peak is not None:
            metrics["peak_device_memory_GB"] = peak / GB
        return {prefix + name: value for name, value in metrics.items()}

    def _count_tokens(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor):
            count = mask.sum()  # stays on the device: no sync per step
        elif isinstance(ids, torch.Tensor):
            count = ids.numel()
        else:
            return None
        marks = (self._eval,) if self._eval is not None else (self._interval, self._run)
        for mark in marks:
            mark.tokens = mark.tokens + count
        return None


def _delta(now: dict[str, int], mark: _Mark) -> dict[str, int]:
    return {key: now[key] - mark.stats.get(key, 0) for key in now}


class _Mark:
    """Where an interval started: the counters, the time, and the tokens seen since."""

    def __init__(self, counters: dict[str, int] | None = None):
        self.stats = counters or {}
        self.since = time.perf_counter()
        self.tokens: torch.Tensor | int = 0

    def exclude(self, elapsed: float, delta: dict[str, int]) -> None:
        """Leave out of this interval a part of it (an evaluation) that took `elapsed` seconds and moved `delta`."""
        self.since += elapsed
        self.stats = {key: self.stats.get(key, 0) + value for key, value in delta.items()}
