"""Layer streaming inside `transformers.Trainer`: `OffloadTrainingArguments`, `OffloadTrainer`, and the Trainer patch.

Note: [Where streaming enters the Trainer]
Subclasses (TRL's `SFTTrainer` and friends) override `compute_loss` and `training_step`, and TRL wraps the model in
peft inside its own `__init__` before calling `Trainer.__init__`. So streaming is applied where no subclass
overrides: on entry to `Trainer.__init__` (after peft, before placement), and in `call_model_init`. A few more
small hooks keep the Trainer from undoing it or tripping over it:

- `_move_model_to_device` skips a streamed model and `create_accelerator_and_postprocess` turns off accelerate's
  `device_placement` on the accelerator it creates: either would copy every decoder layer to the device;
- `log` adds the `offload/` metrics to every log line;
- `_load_from_checkpoint` / `_load_optimizer_and_scheduler` refuse checkpoints a streamed run cannot resume from,
  before loading them (see `hf_offload.integrations.checkpoint`);
- `save_model` also writes a merged checkpoint when asked, and `create_model_card` says how the model was trained.

Every hook is a function `hook(call, trainer, *args, **kwargs)` where `call` runs the Trainer's own method. The
same functions serve `OffloadTrainer` (methods around `super()`) and `patch_trainer()`, which `hf-offload launch`
applies in place to `transformers.Trainer` so that every subclass, defined before or after, streams.

Example:
    >>> args = OffloadTrainingArguments(output_dir="out", layer_streaming=True)
    >>> OffloadTrainer(model=model, args=args, train_dataset=train).train()
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
from dataclasses import dataclass, field

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import OptimizerNames

from ..api import enable_layer_streaming, get_runtime, is_streaming
from ..engine import compat
from ..engine.anatomy import check_streamable
from ..engine.errors import UnsupportedModelError
from ..engine.overrides import Overrides
from ..options import declared, option_fields, trainer_flag, validate, with_options
from ..units import format_bytes
from ..verbosity import follow_trainer_log_level
from . import atomic, bad_steps, hub, recipe, token_safety, trainer_eval
from .checkpoint import check_adapter_checkpoint, check_optimizer_state
from .metrics import OffloadMetricsCallback, is_evaluation_line
from .plugin import ENV_VAR, STREAMING_DEFAULT_OPTIM, LayerStreamingPlugin, check_combinations, is_peft_model
from .resume import check_base_model_identity, resolve_resume_checkpoint, write_base_model_identity

logger = logging.getLogger(__name__)

PATCH_ATTRIBUTE = "_hf_offload_patch"  # on a patched Trainer class: the Overrides that restore it

TRAINER_DEFAULT_OPTIM = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
_INIT_SIGNATURE = inspect.signature(Trainer.__init__)
_LOOP_SIGNATURE = inspect.signature(Trainer.evaluation_loop)


@dataclass
@with_options(LayerStreamingPlugin, "trainer", rename=trainer_flag)
class OffloadTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus `--layer_streaming` and its options, parsed by `HfArgumentParser` like any other.

    Every option of `LayerStreamingPlugin` that shows on the Trainer is a field here, named `offload_<option>`
    (`--offload_prefetch`, `--offload_lora_r`, ...; see `docs/options.md`).

    Example:
        >>> parser = HfArgumentParser(OffloadTrainingArguments)
        >>> (args,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--layer_streaming"])
    """

    layer_streaming: bool = field(
        default=False,
        metadata={
            "help": "Keep the frozen decoder-layer weights in host memory and stream them to the device one layer "
            "at a time, training LoRA adapters (added if the model has none). For models bigger than the GPU."
        },
    )
    optim: str = field(
        default="auto",
        metadata={
            "help": "The optimizer to use (a transformers OptimizerNames value). 'auto': bitsandbytes 8-bit AdamW "
            f"({STREAMING_DEFAULT_OPTIM}) with --layer_streaming, else the Trainer's default ({TRAINER_DEFAULT_OPTIM})."
        },
    )

    def __post_init__(self):
        if self.layer_streaming and (self.deepspeed or self.fsdp):
            # before TrainingArguments' own checks, which would first ask to install DeepSpeed
            raise ValueError(
                f"--layer_streaming cannot be combined with --{'deepspeed' if self.deepspeed else 'fsdp'}: layer "
                "streaming does its own placement on one device per process. Drop one of the two."
            )
        self._hf_offload_optim_chosen = self.optim != "auto"
        if self.optim == "auto":
            # Full fine-tuning keeps the Trainer's own default: its optimizer state is host memory (fp32 AdamW).
            adapters = self.layer_streaming and not self.offload_full_finetune
            self.optim = STREAMING_DEFAULT_OPTIM if adapters else TRAINER_DEFAULT_OPTIM
        validate(self, "trainer")  # a bad offload option fails here, when the arguments are parsed
        check_combinations(self._option_values(), "trainer")
        recipe.warn_offload_options_without_streaming(self, option_fields(OffloadTrainingArguments))
        super().__post_init__()

    def _option_values(self) -> dict:
        return {
            opt.name: getattr(self, trainer_flag(opt.name))
            for opt in declared(LayerStreamingPlugin)
            if opt.on("trainer")
        }

    def _plugin(self) -> LayerStreamingPlugin:
        return LayerStreamingPlugin(**self._option_values(), default_optim=STREAMING_DEFAULT_OPTIM)

    @property
    def layer_streaming_plugin(self) -> LayerStreamingPlugin | None:
        """The plugin these arguments describe, or None without `--layer_streaming`."""
        return self._plugin() if self.layer_streaming else None

    def lora_config(self):
        """The `peft.LoraConfig` of the `offload_lora_*` options (what `--layer_streaming` adds to a plain model)."""
        return self._plugin().lora_config()

    @property
    def place_model_on_device(self) -> bool | None:
        return False if self.layer_streaming else super().place_model_on_device


def plugin_for(args: TrainingArguments | None) -> LayerStreamingPlugin | None:
    """The plugin a Trainer built with `args` applies: `--layer_streaming`'s own, else `hf-offload launch`'s."""
    own = args.layer_streaming_plugin if isinstance(args, OffloadTrainingArguments) else None
    launched = LayerStreamingPlugin.from_env()
    if own is not None and launched is not None and own != launched:
        logger.warning(
            "hf_offload: this script passes --layer_streaming with its own options; they are used, and the options "
            "given to `hf-offload launch` are not."
        )
    return own if own is not None else launched


# --- what a Trainer carries -----------------------------------------------------------------------------------------
@dataclass
class StreamingState:
    """Everything hf_offload keeps on one Trainer, as one attribute (`STATE_ATTRIBUTE`)."""

    plugin: LayerStreamingPlugin | None  # None: this Trainer does not stream, every hook calls straight through
    metrics: OffloadMetricsCallback | None = None
    merged_at: tuple[str, int] | None = None  # (folder, global step) of the last merged export, written once a step
    bad_steps: bad_steps.BadStepGuard | None = None
    overrides: Overrides = field(default_factory=Overrides)  # methods replaced on the Trainer's objects


STATE_ATTRIBUTE = "_hf_offload"


def state_of(trainer) -> StreamingState:
    """The trainer's `StreamingState` (a Trainer built before the patch, or not by us: a non-streaming one)."""
    return getattr(trainer, STATE_ATTRIBUTE, None) or StreamingState(plugin=None)


class _CheckpointingOff(TrainerCallback):
    """Clears HF's per-layer checkpointing flag that `--gradient_checkpointing` sets on the streamed layers.

    The layers clear it themselves when they run, but before transformers 5.2x `GradientCheckpointingLayer.__call__`
    reads it before the layer's forward does: the first step would recompute every layer a second time.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        runtime = get_runtime(model) if model is not None else None
        if runtime is not None:
            for layer in runtime.anatomy.layers:
                compat.keep_checkpointing_off(layer)


# --- the hooks (see Note: [Where streaming enters the Trainer]) ----------------------------------------------------
def _init(call, trainer, model=None, args=None, *rest, **kwargs):
    plugin = plugin_for(args)
    state = StreamingState(plugin)
    setattr(trainer, STATE_ATTRIBUTE, state)
    if plugin is None:
        call(model, args, *rest, **kwargs)
        _install_bad_step_guard(trainer, args, state)
        return None
    if args is None:
        args = TrainingArguments(output_dir="tmp_trainer")  # what Trainer would create; we need its device now
    bound = _INIT_SIGNATURE.bind(trainer, model, args, *rest, **kwargs).arguments
    optimizer = (bound.get("optimizers") or (None, None))[0]
    adds_lora = not plugin.full_finetune and model is not None and not is_peft_model(model)
    if optimizer is not None and adds_lora and not is_streaming(model):
        raise ValueError(
            "Layer streaming adds LoRA adapters to a model that is not a peft model, but the optimizer passed in "
            "`optimizers` was created before that and would not see them. Apply peft yourself before creating the "
            "optimizer, or let the Trainer create it (drop `optimizers`)."
        )
    _refuse_unsupported_arguments(args)
    follow_trainer_log_level(args)
    if args.disable_tqdm and plugin.show_progress is None:  # --disable_tqdm: no packing bar either
        plugin = state.plugin = dataclasses.replace(plugin, show_progress=False)
    chosen = optimizer is not None or bound.get("optimizer_cls_and_kwargs")
    _use_default_optimizer(args, plugin, chosen=chosen)
    host_adamw = not chosen and not _optim_chosen(args) and "optimizer_cls_and_kwargs" not in bound
    if plugin.full_finetune and plugin.host_optimizer_bits != 32 and not host_adamw:
        raise ValueError(
            f"--offload_host_optimizer_bits {plugin.host_optimizer_bits} sets the state of hf_offload's host AdamW, "
            "but this run chose its own optimizer (--optim, `optimizers` or `optimizer_cls_and_kwargs`). Drop one of "
            "the two."
        )
    if plugin.full_finetune and host_adamw:
        kwargs["optimizer_cls_and_kwargs"] = _host_adamw(
            trainer, args, early=plugin.early_layer_steps, state_bits=plugin.host_optimizer_bits
        )
    if model is not None:  # raises before training for unstreamable models
        model = plugin.prepare_model(model, device=args.device, learning_rate=args.learning_rate, face=_face(args))
    call(model, args, *rest, **kwargs)
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError(
            "Layer streaming cannot be combined with DeepSpeed or FSDP (set by the accelerate config or "
            "environment): it does its own placement on one device per process. Remove the DeepSpeed/FSDP setting."
        )
    _install_bad_step_guard(trainer, args, state)
    state.metrics = OffloadMetricsCallback()
    trainer.add_callback(state.metrics)
    trainer.add_callback(_CheckpointingOff())
    if is_streaming(trainer.model):
        state.metrics.watch(trainer.model)
        if trainer.is_world_process_zero():
            chosen_cls = (getattr(trainer, "optimizer_cls_and_kwargs", None) or (None, None))[0]
            logger.info(startup_summary(trainer.model, args, chosen_cls))


def _install_bad_step_guard(trainer, args, state: StreamingState) -> None:
    """The bad-step guard (see `bad_steps`), when the plugin or the arguments turn it on; it needs no streaming."""
    source = state.plugin or (args._plugin() if isinstance(args, OffloadTrainingArguments) else None)
    if source is not None and source.skip_bad_steps:
        state.bad_steps = bad_steps.install(trainer, source.bad_step_options(), state.overrides)


def _training_step(call, trainer, *args, **kwargs):
    loss = call(*args, **kwargs)
    guard = state_of(trainer).bad_steps
    if guard is not None:
        guard.add_loss(loss)
    return loss


def _call_model_init(call, trainer, trial=None):
    model = call(trial)
    plugin = state_of(trainer).plugin
    if plugin is None:
        return model
    args = trainer.args
    return plugin.prepare_model(model, device=args.device, learning_rate=args.learning_rate, face=_face(args))


def _face(args) -> str:
    """Where the plugin's options were given, to spell them in messages: the script's flags or the launcher's."""
    return "trainer" if isinstance(args, OffloadTrainingArguments) and args.layer_streaming else "launch"


def _move_model_to_device(call, trainer, model, device):
    if is_streaming(model):
        return None  # resident modules are on the device already; the layers stay in host memory
    return call(model, device)


def _create_accelerator_and_postprocess(call, trainer):
    result = call()
    state = state_of(trainer)
    if state.plugin is not None:
        accelerator = trainer.accelerator
        # what `Accelerator(device_placement=False)` sets; read by every `prepare()` that is not told otherwise
        state.overrides.replace(accelerator, "device_placement", False)
        prepare = _streaming_frozen_models(accelerator.prepare_model, trainer, state.plugin)
        state.overrides.replace(accelerator, "prepare_model", prepare)
    return result


def _streaming_frozen_models(prepare_model, trainer, plugin: LayerStreamingPlugin):
    """The accelerator's `prepare_model`, streaming the other models a subclass prepares for evaluation only.

    TRL prepares a separate reference model (DPO/KTO `ref_model=`) or a reward model that way; with device placement
    off it would stay where it was loaded. It is frozen and streamed with the same options instead; a model that
    cannot be streamed is placed on the device as accelerate would have.
    """

    @functools.wraps(prepare_model)
    def prepare(model, device_placement=None, evaluation_mode=False):
        other = evaluation_mode and model is not trainer.model and model is not getattr(trainer, "model_wrapped", None)
        if other and not is_streaming(model):
            try:
                check_streamable(model)
            except UnsupportedModelError:
                return prepare_model(model, device_placement=True, evaluation_mode=evaluation_mode)
            model.requires_grad_(False)  # a reference: every layer weight streams
            model = enable_layer_streaming(model, plugin.offload_config(trainer.args.device))
        return prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    return prepare


def _load_from_checkpoint(call, trainer, resume_from_checkpoint, model=None):
    target = model if model is not None else trainer.model
    plugin = state_of(trainer).plugin
    # Full fine-tuning resumes from full weights, which the Trainer loads into the host masters in place.
    if plugin is not None and not plugin.full_finetune and is_streaming(target):
        check_adapter_checkpoint(resume_from_checkpoint, target)
        check_base_model_identity(resume_from_checkpoint, target)
    return call(resume_from_checkpoint, model)


def _load_optimizer_and_scheduler(call, trainer, checkpoint):
    if checkpoint is not None and state_of(trainer).plugin is not None:
        check_optimizer_state(checkpoint, trainer.optimizer)
    return call(checkpoint)


def _clip_grad_norm(call, trainer, model):
    total = call(model)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if hasattr(inner, "note_clipping"):  # HostAdamW: whether the layers it stepped during backward stand
        inner.note_clipping(total, trainer.args.max_grad_norm)
    return total


def _get_grad_norm(call, trainer, model, grad_norm=None):
    total = call(model, grad_norm)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if grad_norm is None and hasattr(inner, "note_clipping"):  # measured with max_norm=inf: nothing was scaled
        inner.note_clipping(total, float("inf"))
    return total


def _log(call, trainer, logs, start_time=None):
    metrics = state_of(trainer).metrics
    training = not is_evaluation_line(logs)  # evaluations carry their own eval_-prefixed numbers
    if metrics is not None and is_streaming(trainer.model) and training:
        # the line that closes training (train_runtime, train_loss, ...) reports the whole run
        logs.update(metrics.collect(trainer.model, whole_run="train_runtime" in logs))
    guard = state_of(trainer).bad_steps
    if guard is not None and training:
        logs.update(guard.metrics())
    return call(logs, start_time)


def _evaluation_loop(call, trainer, *args, **kwargs):
    """Layer-major evaluation, measured apart from training: `<prefix>_offload/...` in the metrics it returns."""
    metrics = state_of(trainer).metrics
    if metrics is None or not is_streaming(trainer.model):
        return trainer_eval.evaluation_loop(call, trainer, *args, **kwargs)
    try:
        prefix = _LOOP_SIGNATURE.bind(trainer, *args, **kwargs).arguments.get("metric_key_prefix", "eval")
    except TypeError:  # a subclass's own loop arguments
        prefix = kwargs.get("metric_key_prefix", "eval")
    with metrics.evaluation(trainer.model, prefix) as measured:
        output = trainer_eval.evaluation_loop(call, trainer, *args, **kwargs)
    if isinstance(getattr(output, "metrics", None), dict):
        output.metrics.update(measured)
    return output


def _save_model(call, trainer, output_dir=None, _internal_call=False):
    state = state_of(trainer)
    plugin = state.plugin
    target = output_dir if output_dir is not None else trainer.args.output_dir
    # The final model gets a merged copy and a model card: a save the user asks for, or push_to_hub's (internal,
    # into output_dir), but not a checkpoint's (internal, into checkpoint-N). The merged copy is written once per
    # step and before the Trainer's own save, which may push to the Hub.
    final = not _internal_call or output_dir is None
    mark = (os.path.abspath(target), trainer.state.global_step)
    wanted = plugin is not None and plugin.save_merged and final and trainer.args.should_save
    if wanted and state.merged_at != mark:
        merged_dir = os.path.join(target, hub.MERGED_SUBFOLDER)
        hub.save_merged(trainer.model, merged_dir, processing_class=trainer.processing_class)
        state.merged_at = mark
    # The Trainer pickles its arguments into every save: written with tokens masked (token_safety), and the push
    # that a user's save_model does afterwards runs with the token restored, as the Trainer's own would. The final
    # save is staged beside the output directory and committed into it as one set (see Note: [The final save into
    # output_dir] in atomic.py); checkpoints are written in place (resume skips incomplete ones).
    staged = atomic.staged_files(target) if final and trainer.args.should_save else contextlib.nullcontext(output_dir)
    with token_safety.tokens_masked(trainer.args), staged as save_dir:
        result = call(save_dir, True)
    if not _internal_call and trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)
    if plugin is not None and final and trainer.args.should_save and os.path.isdir(target):
        _add_card(trainer, target)  # the saved adapter says how it was trained and how to load it
    if plugin is not None and not final and trainer.args.should_save and os.path.isdir(target):
        write_base_model_identity(target, trainer.model)  # a checkpoint: resuming checks its base model
    return result


def _train(call, trainer, resume_from_checkpoint=None, *args, **kwargs):
    if trainer.args.should_save:
        atomic.finish_staged_save(trainer.args.output_dir)  # a final save a kill interrupted after its commit point
    if resume_from_checkpoint is True and state_of(trainer).plugin is not None:
        # the newest complete checkpoint, not a half-written newer one (see `resume`)
        resume_from_checkpoint = resolve_resume_checkpoint(trainer.args.output_dir)
    return call(resume_from_checkpoint, *args, **kwargs)


def _create_model_card(call, trainer, *args, **kwargs):
    result = call(*args, **kwargs)
    if state_of(trainer).plugin is not None and trainer.is_world_process_zero():
        _add_card(trainer, trainer.args.output_dir)
    return result


def _add_card(trainer, folder: str) -> None:
    hub.add_to_model_card(
        folder,
        base_model=hub.base_model_name(trainer.model),
        repo_id=getattr(trainer, "hub_model_id", None),
        merged=os.path.isdir(os.path.join(folder, hub.MERGED_SUBFOLDER)),
        full_finetune=state_of(trainer).plugin.full_finetune,
    )


# Trainer methods wrapped, private ones included (`_move_model_to_device`, `_load_from_checkpoint`,
# `_load_optimizer_and_scheduler`, `_clip_grad_norm`, `_get_grad_norm`): checked against every transformers release
# from MINIMUM_VERSIONS (versions.py) to 5.24, and TRL 1.16. The OPTIONAL_HOOKS are newer than the oldest release:
# without them the host AdamW of full fine-tuning is not told about clipping and finds out from the gradients.
OPTIONAL_HOOKS = frozenset({"_clip_grad_norm", "_get_grad_norm"})  # not in transformers 5.0.0
HOOKS = {
    "__init__": _init,
    "call_model_init": _call_model_init,
    "_move_model_to_device": _move_model_to_device,
    "create_accelerator_and_postprocess": _create_accelerator_and_postprocess,
    "_load_from_checkpoint": _load_from_checkpoint,
    "_load_optimizer_and_scheduler": _load_optimizer_and_scheduler,
    "_clip_grad_norm": _clip_grad_norm,
    "_get_grad_norm": _get_grad_norm,
    "log": _log,
    "train": _train,
    "training_step": _training_step,
    "save_model": _save_model,
    "create_model_card": _create_model_card,
    "evaluation_loop": _evaluation_loop,  # evaluate() and predict() run layer-major
}


def _refuse_unsupported_arguments(args: TrainingArguments) -> None:
    refusals = [
        (args.deepspeed, "--deepspeed", "layer streaming does its own placement; drop --deepspeed"),
        (args.fsdp, "--fsdp", "layer streaming does its own placement; drop --fsdp"),
        (
            args.fp16_full_eval or args.bf16_full_eval,
            "--fp16_full_eval/--bf16_full_eval",
            "they cast the whole model with .to(dtype); load the model in that dtype instead",
        ),
        (
            args.n_gpu > 1,
            f"{args.n_gpu} GPUs in one process (nn.DataParallel)",
            "make one GPU visible per process (CUDA_VISIBLE_DEVICES) or launch one process per GPU",
        ),
    ]
    for on, what, way_out in refusals:
        if on:
            raise ValueError(f"Layer streaming cannot be combined with {what}: {way_out}.")


def _optim_chosen(args: TrainingArguments) -> bool:
    """Whether the script chose its optimizer: `--optim` other than 'auto' (OffloadTrainingArguments); for plain
    TrainingArguments, an optimizer other than the default, or the default passed on the command line."""
    explicit = getattr(args, "_hf_offload_optim_chosen", None)
    if explicit is not None:
        return bool(explicit)
    current = getattr(args.optim, "value", args.optim)
    return current != TRAINER_DEFAULT_OPTIM or recipe.optimizer_chosen_on_command_line()


def _host_adamw(trainer, args: TrainingArguments, early: bool = True, state_bits: int = 32):
    """The Trainer's `optimizer_cls_and_kwargs` for full fine-tuning: `HostAdamW` with the AdamW settings of `args`,
    stepping layers during the backward of the last micro-batch of each accumulation when `early` (the plugin's
    `early_layer_steps`; see host_optimizer.py), its moments in `state_bits` (the plugin's `host_optimizer_bits`)."""
    from ..engine.host_optimizer import HostAdamW

    def completes_the_gradients() -> bool:
        accelerator = trainer.accelerator
        # A gradient scaler (fp16) may skip the step after the backward: never speculate then.
        return accelerator.gradient_state.sync_gradients and accelerator.scaler is None

    logger.info(
        "hf_offload: full fine-tuning with hf_offload's host AdamW (torch AdamW arithmetic, layers stepped on host "
        "threads as their gradients arrive); pass --optim to choose another optimizer."
    )
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    step_during_backward = completes_the_gradients if early else None
    return HostAdamW, dict(kwargs, step_during_backward=step_during_backward, state_bits=state_bits)


def _use_default_optimizer(args: TrainingArguments, plugin: LayerStreamingPlugin, chosen) -> None:
    """Use the plugin's optimizer (8-bit AdamW) in place of the Trainer's default unless the script chose one; say so.

    `chosen`: the script passed an optimizer (or its class) to the Trainer itself.
    """
    if plugin.full_finetune:
        return  # the Trainer's default stays (or hf_offload's host AdamW, see `_host_adamw`)
    current = getattr(args.optim, "value", args.optim)
    plain = getattr(args, "_hf_offload_optim_chosen", None) is None  # a plain TrainingArguments
    explicit = _optim_chosen(args)
    target = plugin.default_optim
    if chosen or explicit:
        if plain and target not in (None, STREAMING_DEFAULT_OPTIM, current):  # the launcher's own --optim
            logger.warning(
                "hf_offload: the script chose its optimizer (%s), so the --optim %s given to `hf-offload launch` is "
                "not used.",
                "passed to the Trainer" if chosen else current,
                target,
            )
        return
    if target is None:
        return
    args.optim = OptimizerNames(target)
    logger.warning(
        "hf_offload: layer streaming trains with %s instead of the Trainer's default %s, to keep the optimizer state "
        "small (pass --optim to choose).",
        target,
        TRAINER_DEFAULT_OPTIM,
    )


def startup_summary(model, args: TrainingArguments, optimizer_cls: type | None = None) -> str:
    """What the Trainer adds to the engine's own start-up line: what stays on the device, and the optimizer."""
    runtime = get_runtime(model)
    streamed = {id(t.param) for pack in runtime.store.packs for t in (*pack.tensors, *pack.encoded)}
    tensors = [*model.parameters(), *model.buffers()]
    resident = sum(t.numel() * t.element_size() for t in tensors if id(t) not in streamed)
    optim = getattr(args.optim, "value", args.optim)
    if optimizer_cls is not None:
        optim = optimizer_cls.__name__
    if runtime.trainable is not None:
        return (
            f"hf_offload: full fine-tuning; the Trainer keeps {format_bytes(resident)} resident on the device "
            f"(embeddings, head, norms) and trains every weight with {optim}: the decoder layers' master weights, "
            "gradients and optimizer state are in host memory."
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (
        f"hf_offload: the Trainer keeps {format_bytes(resident)} resident on the device (embeddings, head, norms and "
        f"{trainable:,} trainable adapter parameters) and trains them with {optim}; device memory also holds the "
        "layer slots above, the optimizer state and the activations."
    )


# --- OffloadTrainer and the in-place patch -------------------------------------------------------------------------
class OffloadTrainer(Trainer):
    """A `Trainer` that streams the model's decoder layers when its arguments (or `hf-offload launch`) ask for it.

    Without `--layer_streaming` (and outside `hf-offload launch`) it is exactly a `Trainer`.

    Example:
        >>> args = OffloadTrainingArguments(output_dir="out", layer_streaming=True, bf16=True)
        >>> trainer = OffloadTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        >>> trainer.train()
        >>> trainer.push_to_hub()
    """

    def __init__(self, model=None, args=None, *rest, **kwargs):
        _init(super().__init__, self, model, args, *rest, **kwargs)

    def call_model_init(self, trial=None):
        return _call_model_init(super().call_model_init, self, trial)

    def _move_model_to_device(self, model, device):
        return _move_model_to_device(super()._move_model_to_device, self, model, device)

    def create_accelerator_and_postprocess(self):
        return _create_accelerator_and_postprocess(super().create_accelerator_and_postprocess, self)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        return _load_from_checkpoint(super()._load_from_checkpoint, self, resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        return _load_optimizer_and_scheduler(super()._load_optimizer_and_scheduler, self, checkpoint)

    def _clip_grad_norm(self, model):
        return _clip_grad_norm(super()._clip_grad_norm, self, model)

    def _get_grad_norm(self, model, grad_norm=None):
        return _get_grad_norm(super()._get_grad_norm, self, model, grad_norm)

    def log(self, logs, start_time=None):
        return _log(super().log, self, logs, start_time)

    def training_step(self, *args, **kwargs):
        return _training_step(super().training_step, self, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        return _train(super().train, self, resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        return _save_model(super().save_model, self, output_dir, _internal_call)

    def create_model_card(self, *args, **kwargs):
        return _create_model_card(super().create_model_card, self, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        return _evaluation_loop(super().evaluation_loop, self, *args, **kwargs)


def patch_trainer(cls: type = Trainer) -> None:
    """Make every `cls` (default `transformers.Trainer`) and subclass stream when a plugin is configured.

    Installed in place on the class, so subclasses defined before or after (TRL's) are covered. A Trainer streams
    when `hf-offload launch` set the environment or its arguments say `--layer_streaming`; otherwise each hook
    calls straight through. `unpatch_trainer` restores the class exactly.
    """
    if PATCH_ATTRIBUTE in cls.__dict__:
        return
    overrides = Overrides()
    for name, hook in HOOKS.items():
        if name in OPTIONAL_HOOKS and name not in cls.__dict__:
            continue  # a release without this method never calls it
        overrides.replace(cls, name, _patched(cls.__dict__[name], hook))
    overrides.replace(cls, PATCH_ATTRIBUTE, overrides)  # removed by its own restore()


def unpatch_trainer(cls: type = Trainer) -> None:
    """Undo `patch_trainer`: the class's own methods again."""
    overrides = cls.__dict__.get(PATCH_ATTRIBUTE)
    if overrides is not None:
        overrides.restore()


def _patched(original, hook):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if isinstance(self, OffloadTrainer):  # it applies the same hooks itself, around super()
            return original(self, *args, **kwargs)
        return hook(functools.partial(original, self), self, *args, **kwargs)

    return method


if os.environ.get(ENV_VAR):
    # Under `hf-offload launch`, when this module is what imports transformers.trainer, the start-up hook cannot
    # import it half-initialised and leaves the patch to it (hf_offload/_startup/sitecustomize.py).
    patch_trainer()
