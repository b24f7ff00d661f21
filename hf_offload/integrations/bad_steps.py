"""The bad-step guard: skip an optimizer step whose loss or gradient norm is non-finite or spikes, off by default.

Note: [Bad steps]
Long fine-tunes meet the odd batch whose loss or gradient explodes (a corrupt sample, an overflow in half precision).
One such step can wreck the adapters and the optimizer's moments for the rest of the run. The guard looks at each
optimizer step before it happens:
- the step's loss (the sum of its micro-batches' losses, as `training_step` returns them, averaged over
  data-parallel ranks so that every rank takes the same decision) and its gradient norm
  (before clipping: what `accelerator.clip_grad_norm_` returns, else computed from the gradients);
- a step is bad when either is NaN or infinite, or, once `spike_min_steps` good steps are known, above
  mean + `spike_sigmas` x standard deviation of the last `spike_window` good steps' values;
- a bad step is skipped: the optimizer's `step` is not called, so the adapter weights and the optimizer state stay
  exactly as they were (the Trainer then zeroes the gradients as after any step; the learning-rate schedule still
  advances, as it does for steps skipped by a gradient scaler);
- every skip is logged with its reason and counted in the `offload/skipped_steps` metric; after
  `max_consecutive_skips` bad steps in a row, training stops with an error, since the run is not recovering.
Bad steps never enter the statistics, so one spike does not raise the threshold for the next.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import torch

from ..engine.overrides import Overrides
from ..options import OptionError, boolean, option, spelled, validate

logger = logging.getLogger(__name__)


# The guard's options show where the Trainer does: the plugin (so `hf-offload launch` carries them), the Trainer's
# `--offload_*` flags and the launcher. They are declared here, next to what they control.
GUARD_FACES = frozenset({"plugin", "trainer", "launch"})


def _sigmas(value):
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise OptionError("a positive number")
    return value


def _at_least(low: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(f"an integer of at least {low}")
        return value

    return check


@dataclass
class BadStepOptions:
    """Options of the bad-step guard (see Note: [Bad steps]); independent of layer streaming."""

    skip_bad_steps: bool = option(
        False,
        "Skip an optimizer step whose loss or gradient norm is NaN/infinite or spikes above the rolling mean + "
        "spike_sigmas x std of recent steps; adapter and optimizer state stay untouched, the skip is counted in "
        "offload/skipped_steps, and training stops after max_consecutive_skips in a row.",
        faces=GUARD_FACES,
        check=boolean,
    )
    spike_sigmas: float = option(
        6.0, "A value above mean + spike_sigmas x std of the window is a spike.", faces=GUARD_FACES, check=_sigmas
    )
    spike_window: int = option(
        100, "Good steps the rolling mean and std are taken over.", faces=GUARD_FACES, check=_at_least(2)
    )
    spike_min_steps: int = option(
        20,
        "Good steps needed before spikes are judged (non-finite values always are).",
        faces=GUARD_FACES,
        check=_at_least(2),
    )
    max_consecutive_skips: int = option(
        10, "Stop training after this many bad steps in a row.", faces=GUARD_FACES, check=_at_least(1)
    )

    def __post_init__(self) -> None:
        validate(self, "plugin")
        check_window(vars(self), "plugin")


def check_window(values: dict, face: str) -> None:
    """`spike_min_steps` cannot exceed `spike_window`, each spelled as `face` spells it."""
    if values["spike_min_steps"] > values["spike_window"]:
        raise ValueError(
            f"{spelled('spike_min_steps', face)} should be at most {spelled('spike_window', face)} "
            f"({values['spike_window']}), but the value passed is {values['spike_min_steps']}"
        )


class TooManyBadStepsError(RuntimeError):
    """Raised when `max_consecutive_skips` optimizer steps in a row were bad."""


class _Rolling:
    """Mean and standard deviation of the last `size` values."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)

    def threshold(self, sigmas: float, min_count: int) -> float | None:
        if len(self.values) < min_count:
            return None
        mean = sum(self.values) / len(self.values)
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1))
        return mean + sigmas * std


class BadStepGuard:
    """Decides, step by step, whether the optimizer step about to happen is bad (see Note: [Bad steps])."""

    def __init__(self, options: BadStepOptions):
        self.options = options
        self.losses = _Rolling(options.spike_window)
        self.grad_norms = _Rolling(options.spike_window)
        self.step_loss: float = 0.0
        self.recorded_grad_norm: float | None = None
        self.skipped = 0
        self.consecutive = 0
        self.reasons: list[str] = []

    def add_loss(self, loss: torch.Tensor | float) -> None:
        """Count one micro-batch's loss (as `training_step` returns it) towards the coming step."""
        self.step_loss += float(loss)

    def record_grad_norm(self, norm: torch.Tensor | float) -> None:
        """The gradient norm before clipping, as the Trainer's clipping computed it."""
        self.recorded_grad_norm = float(norm)

    def judge(self, grad_norm: float) -> str | None:
        """Why the coming step is bad, or None when it is good; updates the statistics and counters.

        Raises:
            TooManyBadStepsError: this is the `max_consecutive_skips`-th bad step in a row.
        """
        loss, self.step_loss = _mean_over_ranks(self.step_loss), 0.0
        if self.recorded_grad_norm is not None:
            grad_norm, self.recorded_grad_norm = self.recorded_grad_norm, None
        reason = self._reason(loss, grad_norm)
        if reason is None:
            self.consecutive = 0
            self.losses.values.append(loss)
            self.grad_norms.values.append(grad_norm)
            return None
        self.skipped += 1
        self.consecutive += 1
        self.reasons.append(reason)
        if self.consecutive >= self.options.max_consecutive_skips:
            raise TooManyBadStepsError(
                f"hf_offload: {self.consecutive} optimizer steps in a row were bad (the last: {reason}); training "
                "stops because it is not recovering. Lower the learning rate, check the data around these steps, "
                "or raise max_consecutive_skips / spike_sigmas if the spikes are expected."
            )
        return reason

    def _reason(self, loss: float, grad_norm: float) -> str | None:
        o = self.options
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        for what, value, rolling in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.grad_norms)):
            limit = rolling.threshold(o.spike_sigmas, o.spike_min_steps)
            if limit is not None and value > limit:
                return f"the {what} {value:.4g} is above mean + {o.spike_sigmas:g} std of recent steps ({limit:.4g})"
        return None

    def metrics(self) -> dict[str, int]:
        return {"offload/skipped_steps": self.skipped}


def _mean_over_ranks(loss: float) -> float:
    """The step's loss averaged over data-parallel ranks: every rank must take the same decision (a step skipped on
    one rank only would leave the adapters different across ranks). The gradients, and so their norm, are already
    the same on every rank after DDP's all-reduce."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss)
    return sum(losses) / len(losses)


def gradient_norm(params) -> float:
    """L2 norm of the gradients of `params` (those that have one)."""
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def guard_optimizer(optimizer: torch.optim.Optimizer, guard: BadStepGuard, overrides: Overrides) -> None:
    """Make `optimizer.step()` (the innermost optimizer's, under accelerate's wrapper) consult `guard` first."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    if getattr(inner.step, "_hf_offload_guard", None) is guard:
        return
    original = inner.step

    def step(*args, **kwargs):
        params = [p for group in inner.param_groups for p in group["params"]]
        # the pre-clipping norm when the Trainer clipped (judge takes it), else the gradients' own
        reason = guard.judge(gradient_norm(params) if guard.recorded_grad_norm is None else math.nan)
        if reason is None:
            return original(*args, **kwargs)
        logger.warning("hf_offload: skipped a bad optimizer step (%s); %d skipped so far.", reason, guard.skipped)
        for p in params:  # nothing of this step may reach a later one
            p.grad = None
        return None

    step._hf_offload_guard = guard
    overrides.replace(inner, "step", step)


def install(trainer, options: BadStepOptions, overrides: Overrides) -> BadStepGuard | None:
    """Install the guard on a `transformers.Trainer` (before `train()`); None when `options` keep it off.

    The optimizer is wrapped when training begins (the Trainer creates it then), the pre-clipping gradient norm is
    taken from the accelerator's `clip_grad_norm_`, and the step's loss from `training_step` (see `add_loss`).
    Both replaced methods are recorded in `overrides`.
    """
    if not options.skip_bad_steps:
        return None
    from transformers import TrainerCallback

    guard = BadStepGuard(options)

    class _GuardCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            guard_optimizer(optimizer if optimizer is not None else trainer.optimizer, guard, overrides)

        def on_step_end(self, args, state, control, **kwargs):
            # a step a gradient scaler skipped never reached the guard: its loss must not count towards the next
            guard.step_loss, guard.recorded_grad_norm = 0.0, None

    trainer.add_callback(_GuardCallback())
    accelerator = trainer.accelerator
    clip = accelerator.clip_grad_norm_

    def clip_grad_norm_(*args, **kwargs):
        norm = clip(*args, **kwargs)
        if norm is not None:
            guard.record_grad_norm(norm)
        return norm

    overrides.replace(accelerator, "clip_grad_norm_", clip_grad_norm_)
    logger.info(
        "hf_offload: bad-step guard on (spikes above mean + %g std over %d steps, stop after %d in a row).",
        options.spike_sigmas,
        options.spike_window,
        options.max_consecutive_skips,
    )
    return guard
