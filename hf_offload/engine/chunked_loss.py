"""Chunked head and loss in training: the logits of the whole sequence never exist at once.

Note: [Chunked loss]
At long sequence lengths the logits are the biggest tensors of a step (128k tokens x 152k vocabulary x 4 bytes is
78 GB, and an ordinary step holds the logits, their log-softmax and their gradient). When a streamed model runs a
training forward with labels (training mode, grad enabled, `labels` passed, the model's loss is transformers'
`ForCausalLMLoss`), this module, for that forward only:

1. replaces the output head's forward (the module `get_output_embeddings()` returns: `lm_head`, RWKV's `head`, a
   peft wrapper of it) by one that records its input hidden states and returns a small placeholder of "probe"
   values, one row per token, instead of the logits;
2. lets the model's own code run on: the family's logit transform (Gemma2's final softcapping, Cohere's
   `logit_scale`, Granite's `logits_scaling`) turns the placeholder into transformed probe values, and the model
   calls `self.loss_function`, which for this forward is `_ChunkedLoss.loss`;
3. that loss checks that the family transformed the probe exactly as `LOGIT_TRANSFORMS` says it does (else it
   stops with an error: the model does something to its logits this module does not know), shifts the labels as
   `ForCausalLMLoss` does, and runs `_HeadLoss`: an autograd Function whose forward computes head -> transform ->
   float32 -> cross-entropy sum (with `ignore_index`) chunk by chunk without a graph, and whose backward recomputes
   each chunk with a graph and backprops it before the next. Only one chunk's logits and their gradient exist at a
   time. The sum is divided by `num_items_in_batch` when given (the Trainer's count), else by the number of tokens
   whose label is not ignored, as `ForCausalLMLoss` does. With one chunk, the operations are those of
   `ForCausalLMLoss` on the same tensors (the loss and gradients are bitwise those of an ordinary step); with
   several, they differ only in the order of float summation;
4. the model's code adds what it adds after the loss (the MoE router aux loss) as in an ordinary step, and
   `outputs.logits` is replaced by an empty tensor of shape (batch, sequence, 0): the full logits were never built.

Eval, predict and `generate()` (eval mode or no grad), and forwards without labels, get full logits as always.
A head that draws random numbers (LoRA dropout on `lm_head`) could not be chunked exactly: it is detected on the
first token and that forward runs unchunked. A chunk whose labels are all ignored (a long masked prompt) skips the
head altogether (its loss and gradient are zero either way). The head is called through its module (its hooks run),
once per chunk, so tied heads and trainable heads (LoRA on `lm_head`, `modules_to_save`) get their gradients summed
over chunks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import compat
from .device import DeviceOps
from .layer_fn import _autocast, _autocast_state
from .overrides import InstalledForward
from .rng_watch import RngWatch

logger = logging.getLogger(__name__)

# Float32 logits of one chunk, when `loss_chunk_tokens` is not set: tokens per chunk = this // (4 * vocabulary).
DEFAULT_CHUNK_BYTES = 256 * 2**20


# --- what each family does between the head and the loss -------------------------------------------------------------
def _softcap(attribute: str, upcast: bool = False) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """logits / cap -> tanh -> * cap, the final logit softcapping of the Gemma line (in float32 when `upcast`)."""

    def transform(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        cap = getattr(config, attribute, None)  # multimodal Gemmas read it from their text config
        if cap is None:
            return logits
        if upcast:
            logits = logits.float()
        return torch.tanh(logits / cap) * cap

    return transform


def _cohere_scale(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits * model.logit_scale


def _granite_scale(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits / model.config.logits_scaling


def _inkling2_softcap(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return model.logit_softcap(logits)


def _unpadded_vocabulary(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    size = model.config.unpadded_vocab_size
    return logits[..., :size] if size is not None and size < logits.shape[-1] else logits


# Checked against transformers 5.24: the causal LMs whose forward transforms the head's output before calling
# `self.loss_function`, keyed by `config.model_type`, with the same operations in the same order and dtype. Every
# other family passes the head's output as it is. A family missing here that transforms its logits elementwise is
# caught by the probe check (see Note: [Chunked loss]) with a clear error, never computed wrong silently.
LOGIT_TRANSFORMS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    **dict.fromkeys(
        (
            "gemma2",
            "gemma3_text",
            "gemma3n",
            "gemma3n_text",
            "gemma4",
            "gemma4_text",
            "gemma4_unified",
            "gemma4_unified_text",
            "vaultgemma",
            "nanochat",
        ),
        _softcap("final_logit_softcapping"),
    ),
    "beam": _softcap("final_logit_softcapping", upcast=True),
    "recurrent_gemma": _softcap("logits_soft_cap"),
    "xlstm": _softcap("output_logit_soft_cap", upcast=True),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), _cohere_scale),
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared"),
        _granite_scale,
    ),
    **dict.fromkeys(("inkling2_text", "inkling2_loop_text"), _inkling2_softcap),
    "inkling_text": _unpadded_vocabulary,
}


def _identity(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return logits


def logit_transform(model: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """What `model`'s forward does to the head's output before its loss.

    Args:
        model: a transformers causal LM (not a peft wrapper).

    Returns:
        A function (model, logits) -> logits: its entry in `LOGIT_TRANSFORMS`, else the identity.
    """
    return LOGIT_TRANSFORMS.get(getattr(getattr(model, "config", None), "model_type", None), _identity)


# Logit values one placeholder row holds; the family's transform of them is checked against the table's.
_PROBE = (-300.0, -30.0, -3.25, -0.5, 0.0, 0.75, 6.5, 45.0)


# --- one training forward ---------------------------------------------------------------------------------------------
@dataclass
class _Step:
    """State of one armed forward, from the model's pre-hook to its post-hook."""

    hidden: torch.Tensor | None = None  # the head's input
    placeholder: torch.Tensor | None = None  # what the head returned instead of logits
    received: torch.Tensor | None = None  # what the loss function got (the transformed placeholder)
    vocab: int = 0
    restore_loss_function: Callable[[], None] | None = None
    passthrough: bool = False  # the head computes for real (the chunks of _HeadLoss)


class _Job:
    """What `_HeadLoss` needs to compute one chunk again in backward."""

    def __init__(self, owner: ChunkedLoss, step: _Step, targets: torch.Tensor, ignore_index: int, bounds, params):
        self.owner = owner
        self.step = step
        self.targets = targets
        self.ignore_index = ignore_index
        self.bounds = bounds  # (lo, hi) of the chunks that hold at least one label that is not ignored
        self.params = params
        self.autocast_state = _autocast_state(targets.device.type)

    def chunk_loss(self, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Cross-entropy summed over tokens lo:hi, computed from their hidden states as the model's forward would."""
        owner = self.owner
        self.step.passthrough = True
        try:
            logits = owner.head(hidden)
        finally:
            self.step.passthrough = False
        logits = owner.transform(owner.model, logits)
        targets = self.targets[lo:hi]
        return nn.functional.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index, reduction="sum")


class _HeadLoss(torch.autograd.Function):
    """Cross-entropy summed over `rows` (the hidden states of every token), chunk by chunk.

    See Note: [Chunked loss].
    """

    @staticmethod
    def forward(ctx, job: _Job, rows: torch.Tensor, *params):
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for lo, hi in job.bounds:
            total += job.chunk_loss(rows[lo:hi], lo, hi)
        ctx.save_for_backward(rows)
        ctx.job = job
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (rows,) = ctx.saved_tensors
        job: _Job = ctx.job
        need_rows = ctx.needs_input_grad[1]
        params = [p for p, need in zip(job.params, ctx.needs_input_grad[2:]) if need]
        grad_rows = torch.zeros_like(rows) if need_rows else None  # rows of skipped chunks: zero
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        if need_rows or params:
            for lo, hi in job.bounds:
                # The chunk is recomputed under the forward's autocast state; the backward runs under the caller's.
                with torch.enable_grad(), _autocast(job.autocast_state):
                    chunk = rows[lo:hi].detach().requires_grad_(need_rows)
                    loss = job.chunk_loss(chunk, lo, hi)
                wrt = [chunk, *params] if need_rows else params
                grads = torch.autograd.grad(loss, wrt, grad_total, allow_unused=True)
                if need_rows:
                    grad_rows[lo:hi] = grads[0]
                    grads = grads[1:]
                for k, g in enumerate(grads):
                    if g is not None:
                        grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
        by_param = dict(zip(map(id, params), grad_params))
        return (None, grad_rows, *[by_param.get(id(p)) for p in job.params])


class ChunkedLoss:
    """Installed on a streamed causal LM (the transformers model, inside any peft wrapper); see Note: [Chunked loss].

    Args:
        model: the transformers model (its head is replaced on the instance, hooks go on the model; `remove` undoes).
        ops: the device's operations (random generator state).
        chunk_tokens: tokens per chunk; None: as many as keep a chunk's float32 logits under `DEFAULT_CHUNK_BYTES`.
    """

    def __init__(self, model: nn.Module, ops: DeviceOps, chunk_tokens: int | None):
        self.model = model
        self.ops = ops
        self.chunk_tokens = chunk_tokens
        self.transform = logit_transform(model)
        self.head: nn.Module | None = None
        self.step: _Step | None = None
        self.chunked_forwards = 0  # training forwards whose loss ran chunked (tests and stats read it)
        self._handles: list[Any] = []
        self._saved_head_forward = None
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(head, nn.Module):
            logger.info("hf_offload: %s has no output head to chunk; its loss runs unchunked.", type(model).__name__)
            return
        self.head = head
        self._signature = inspect.signature(model.forward)
        self._saved_head_forward = head.__dict__.get("forward")
        original = head.forward

        def forward(*args, **kwargs):
            return self._head_forward(original, args, kwargs)

        head.forward = InstalledForward(forward, original, "the output head of a streamed model (chunked loss)")
        self._handles.append(model.register_forward_pre_hook(self._arm, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._disarm, always_call=True))

    def remove(self) -> None:
        """Give the head its forward back and remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.head is not None:
            if self._saved_head_forward is None:
                del self.head.forward
            else:
                self.head.forward = self._saved_head_forward
            self.head = None
        self._end_step()

    # --- hooks ------------------------------------------------------------------------------------------------------
    def _arm(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self._end_step()
        if not (model.training and torch.is_grad_enabled()) or self._labels(args, kwargs) is None:
            return
        if not compat.uses_causal_lm_loss(model):
            _log_once(
                f"hf_offload: {type(model).__name__} computes its loss with {getattr(model, 'loss_function', None)!r}"
                ", not transformers' ForCausalLMLoss: its head and loss run unchunked."
            )
            return
        self.step = _Step()
        self.step.restore_loss_function = compat.replace_loss_function(model, self.loss)

    def _disarm(self, model: nn.Module, args: tuple, output: Any) -> Any:
        step = self.step
        self._end_step()
        if step is None or step.hidden is None or output is None:  # output is None when the forward raised
            return None
        if step.received is None:
            raise RuntimeError(
                f"hf_offload: {type(model).__name__}'s forward called its output head but not `self.loss_function`, "
                "so it computed its loss from something else than the logits hf_offload's chunked loss provides. "
                "Pass OffloadConfig(chunked_loss=False) for this model."
            )
        self.chunked_forwards += 1
        empty = step.received.new_empty((*step.hidden.shape[:-1], 0))
        if isinstance(output, dict):  # ModelOutput
            for key, value in list(output.items()):
                if value is step.received:
                    output[key] = empty
            return output
        if isinstance(output, tuple):
            return tuple(empty if value is step.received else value for value in output)
        return None

    def _end_step(self) -> None:
        step, self.step = self.step, None
        if step is not None and step.restore_loss_function is not None:
            step.restore_loss_function()

    def _labels(self, args: tuple, kwargs: dict):
        if kwargs.get("labels") is not None:
            return kwargs["labels"]
        if not args:
            return None
        try:
            return self._signature.bind_partial(*args, **kwargs).arguments.get("labels")
        except TypeError:
            return None

    # --- the head while armed ---------------------------------------------------------------------------------------
    def _head_forward(self, original, args: tuple, kwargs: dict):
        step = self.step
        if step is None or step.passthrough or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return original(*args, **kwargs)
        hidden = args[0]
        if step.hidden is not None:
            raise RuntimeError(
                f"hf_offload: {type(self.model).__name__} calls its output head twice in one training forward; the "
                "chunked loss supports one call. Pass OffloadConfig(chunked_loss=False) for this model."
            )
        # The first token's logits give the head's output dtype and width; drawing random numbers shows dropout.
        watch = RngWatch(self.ops)
        with torch.no_grad():
            first = original(hidden.reshape(-1, hidden.shape[-1])[:1])
        if watch.moved():
            watch.rewind()
            self._end_step()
            _log_once(
                "hf_offload: the output head draws random numbers in training (dropout, e.g. LoRA dropout on lm_head);"
                " chunks would draw other masks than the whole logits, so its loss runs unchunked."
            )
            return original(hidden)
        step.hidden = hidden
        step.vocab = first.shape[-1]
        probe = torch.tensor(_PROBE, dtype=first.dtype, device=first.device)
        step.placeholder = probe.expand(*hidden.shape[:-1], len(_PROBE))
        return step.placeholder

    # --- the loss function while armed ------------------------------------------------------------------------------
    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`ForCausalLMLoss` computed from the recorded hidden states in chunks (same arguments, same result)."""
        step = self.step
        if step is None or step.hidden is None or step.received is not None:
            return compat.ForCausalLMLoss(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        self._check_transform(logits)
        step.received = logits
        hidden = step.hidden
        if shift_labels is None:
            # as ForCausalLMLoss: pad with ignore_index, then tokens < n predict n
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] != targets.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({rows.shape[0]}) to match target batch_size ({targets.shape[0]})."
            )
        chunk = self.chunk_tokens or max(1, DEFAULT_CHUNK_BYTES // (4 * step.vocab))
        kept = (targets != ignore_index).cpu()  # one transfer: which chunks to compute, and the mean's count
        bounds = [(lo, lo + chunk) for lo in range(0, rows.shape[0], chunk) if kept[lo : lo + chunk].any()]
        params = [p for p in self.head.parameters() if p.requires_grad]
        job = _Job(self, step, targets, ignore_index, bounds, params)
        total = _HeadLoss.apply(job, rows, *params)
        if num_items_in_batch is None:
            return total / torch.tensor(int(kept.sum()), dtype=total.dtype, device=total.device)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def _check_transform(self, received: torch.Tensor) -> None:
        placeholder = self.step.placeholder
        expected = self.transform(self.model, placeholder[(0,) * (placeholder.dim() - 1)])
        same = tuple(received.shape) == tuple(placeholder.shape) and torch.equal(
            received[(0,) * (received.dim() - 1)].float(), expected.float()
        )
        if not same:
            model_type = getattr(self.model.config, "model_type", None)
            raise RuntimeError(
                f"hf_offload: {type(self.model).__name__} (model_type {model_type!r}) transforms "
                "its head's output before the loss in a way hf_offload's chunked loss does not know (see "
                "hf_offload.engine.chunked_loss.LOGIT_TRANSFORMS). Pass OffloadConfig(chunked_loss=False) for this "
                "model, and report it so the family can be added."
            )


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


_logged: set[str] = set()
