"""`evaluate_layer_major`: evaluate an iterable of batches with each decoder layer streamed once per group of batches.

For loops that do not use the Trainer (whose `evaluate()` / `predict()` do the same by themselves). See
Note: [Layer-major schedule] in engine/layer_major.py for how the model's own forward runs layer-major.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .api import get_runtime
from .engine.layer_major import LayerMajorSchedule, plan_groups

logger = logging.getLogger(__name__)


def evaluate_layer_major(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    group_size: int | None = None,
) -> Iterator[Any]:
    """Evaluate `batches` layer-major: a group of batches goes through layer 0, then layer 1, and so on.

    Each decoder layer is loaded once per group instead of once per batch; every batch still runs the model's own
    forward (its masks, rotary tables, attention types and MoE routing) and gets exactly the outputs it gets alone.
    Runs under `torch.no_grad()`. Put the model in eval mode first, as for any evaluation: with dropout on, the
    batches would draw their random numbers in another order than one after the other.

    Args:
        model: A model streamed by `enable_layer_streaming` (or a peft wrapper of one).
        batches: Batches on the model's device, read one group ahead: dicts of model arguments (`model(**batch)`),
            tuples (`model(*batch)`) or tensors of input ids (`model(batch)`).
        forward: `forward(model, batch)` computes what is yielded for a batch, by calling the model once. Default:
            the model's outputs. Return only what you keep (say, the loss): the outputs of a whole group are held
            until its last batch is done, and the planned group size counts the logits only for the default.
        group_size: At most this many batches per group. Default: the model's `OffloadConfig.eval_group_size`, and
            when that is None, as many batches as the memory budget holds the boundary hidden states of (a quarter
            of the available host memory, and of the free device memory on an accelerator).

    Returns:
        An iterator of `forward(model, batch)` for each batch, in order; a group is computed when its first batch
        is asked for.

    Raises:
        RuntimeError: Layer streaming is not on for `model`.
        ValueError: `group_size` is not a positive integer.

    Example:
        >>> model.eval()
        >>> losses = [loss.item() for loss in evaluate_layer_major(model, batches, lambda m, b: m(**b).loss)]
    """
    runtime = get_runtime(model)
    if runtime is None:
        raise RuntimeError(
            "Layer streaming is not on for this model; call hf_offload.enable_layer_streaming first, or evaluate it "
            "batch by batch."
        )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(
            f"`group_size` should be a positive integer (batches per layer load) or None (planned from memory), but "
            f"the value passed is {group_size!r}"
        )
    if model.training:
        logger.warning(
            "hf_offload: evaluate_layer_major with the model in training mode: dropout draws its random numbers in "
            "another order than batch by batch. Call model.eval() first."
        )
    size = group_size if group_size is not None else runtime.config.eval_group_size
    plan = plan_groups(model, runtime, size, keeps_logits=forward is None)  # a custom forward keeps what it returns
    forward = forward if forward is not None else _call_model
    return _evaluate(model, batches, forward, plan, LayerMajorSchedule(runtime))


def _evaluate(model, batches, forward, plan, schedule) -> Iterator[Any]:
    for group in plan.groups(batches):
        with torch.no_grad():  # not around the yield: grad mode would stay off in the caller between batches
            results = schedule.run([functools.partial(forward, model, batch) for batch in group])
        yield from results
        del results


def _call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
