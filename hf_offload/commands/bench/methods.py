"""The training methods the benchmark compares, each set up the way its users run it, on the same model and batch.

Every method builds the same random-weight model (same seed), adds the same LoRA adapters (all linear layers,
no dropout, so losses are comparable), trains on the same batch with AdamW, and reports its steps to a
`StepClock`. A method that cannot run here says why instead of producing a number.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import api
from ...config import OffloadConfig
from ...units import GB
from ..model_sizes import ModelSizes
from .measure import StepClock
from .models import build_model, random_batch


@dataclass
class Setup:
    """What every method of one run shares."""

    config: Any  # transformers PretrainedConfig
    facts: ModelSizes
    dtype: torch.dtype
    device: torch.device
    batch: int
    seq: int
    lora_r: int
    prefetch: int
    offload_activations: bool
    deepspeed_optimizer: str = "deepspeed"  # "deepspeed" (CPU Adam op) or "torch" (AdamW, nothing to compile)
    lr: float = 1e-4
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Outcome:
    """What a method reports besides its step times (which the clock holds)."""

    h2d_bytes_per_step: int | None = None  # host->device bytes of weights per step, where the method counts them
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Session:
    """A method set up and ready to train: one `step()` per training step, `close()` once at the end."""

    def __init__(self, model, batch: dict, optimizer=None, outcome: Outcome | None = None, cleanup=None):
        self.model, self.batch, self.optimizer = model, batch, optimizer
        self.outcome = outcome if outcome is not None else Outcome()
        self._cleanup = cleanup

    def step(self) -> torch.Tensor:
        """One plain `model(**batch).loss.backward()` step, as any training loop runs it."""
        loss = self.model(**self.batch).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> Outcome:
        if self._cleanup is not None:
            self._cleanup()
        self.model = self.optimizer = self.batch = None
        return self.outcome


class Method:
    name = ""
    description = ""
    interleavable = True  # steps can alternate with other methods' steps (False: it drives its own loop)
    default = True  # runs when --methods is not given

    def unavailable(self, setup: Setup) -> str | None:
        """Why this method cannot run with `setup` (the row says so), or None."""
        return None

    def prepare(self, setup: Setup, clock: StepClock) -> Session:
        raise NotImplementedError

    def run(self, setup: Setup, clock: StepClock) -> Outcome:
        """Set up, run every step of the clock's schedule, clean up."""
        session = self.prepare(setup, clock)
        try:
            for _ in range(clock.total_steps):
                clock.begin()
                loss = session.step()
                clock.end(loss)
        finally:
            outcome = session.close()
        return outcome


def lora_model(setup: Setup, device: torch.device | str):
    return add_lora(build_model(setup.config, setup.dtype, device, seed=setup.seed), setup)


def add_lora(model, setup: Setup):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(setup.seed)  # LoRA A is drawn from the global generator: the same adapters for every method
    lora = LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, lora)


def _adamw(model, lr: float):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def _batch(setup: Setup, device) -> dict:
    return random_batch(setup.config.vocab_size, setup.batch, setup.seq, device, setup.seed)


class Resident(Method):
    name = "resident"
    description = "whole model on the device, ordinary LoRA step (no recompute): the speed of light"
    checkpointing = False

    def prepare(self, setup, clock):
        model = lora_model(setup, setup.device)
        if self.checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return Session(model, _batch(setup, setup.device), _adamw(model, setup.lr))


class ResidentCheckpointed(Resident):
    name = "resident-checkpointed"
    description = "whole model on the device with HF gradient checkpointing: the speed of light for one recompute"
    checkpointing = True


class HfOffload(Method):
    name = "hf_offload"
    description = "layer streaming from host memory (this library)"
    offload_activations = False  # on anyway with --offload_activations

    def prepare(self, setup, clock):
        model = lora_model(setup, "cpu")  # host memory holds the model; streaming moves only what computes
        config = OffloadConfig(
            device=setup.device,
            prefetch=setup.prefetch,
            offload_activations=setup.offload_activations or self.offload_activations,
            show_progress=False,
        )
        api.enable_layer_streaming(model, config)
        outcome = Outcome()

        def read_stats():
            stats = api.stats(model)
            timed = len(clock.times)
            outcome.h2d_bytes_per_step = stats["bytes_to_device"] // timed
            outcome.extra.update(stats=stats, summary=api.summary(model))
            outcome.notes.append(
                f"{stats['layer_loads'] / timed:.0f} layer loads and {stats['layer_reuses'] / timed:.0f} reuses per "
                f"step, at most {stats['peak_resident_layers']} layers on the device (prefetch={setup.prefetch})"
            )
            summary = api.summary(model)
            if summary["offload_activations"]:
                outcome.notes.append(
                    f"{stats['bytes_to_host'] / timed / GB:.3g} GB of saved activations to the host and "
                    f"{stats['bytes_from_host_activations'] / timed / GB:.3g} GB back per step, in "
                    f"{summary['activation_host_bytes'] / GB:.3g} GB of host buffers"
                    + (
                        " (page-locked)"
                        if setup.device.type == "cuda" and not summary["activation_unpinned_buffers"]
                        else ""
                    )
                )

        clock.on_first_timed_step.append(lambda: api.reset_stats(model))
        clock.after_timed_steps.append(read_stats)
        # Disabling unregisters the page-locked host store now rather than when the process exits.
        cleanup = lambda: api.disable_layer_streaming(model)
        return Session(model, _batch(setup, setup.device), _adamw(model, setup.lr), outcome, cleanup)


class HfOffloadActivations(HfOffload):
    name = "hf_offload-activations"
    description = "layer streaming with offload_activations: saved boundary states wait in page-locked host memory"
    offload_activations = True
    default = False  # a long-context row (--seq_lens, --long_context)


class ResidentFull(Method):
    name = "resident-full"
    description = "full fine-tuning, whole model on the device, torch AdamW over every weight"

    def prepare(self, setup, clock):
        model = build_model(setup.config, setup.dtype, setup.device, seed=setup.seed)
        return Session(model, _batch(setup, setup.device), torch.optim.AdamW(model.parameters(), lr=setup.lr))


class HfOffloadFull(Method):
    name = "hf_offload-full"
    description = "full fine-tuning with layer streaming: host master weights and HostAdamW stepping during backward"

    def prepare(self, setup, clock):
        from ...engine.host_optimizer import HostAdamW

        model = build_model(setup.config, setup.dtype, "cpu", seed=setup.seed)
        config = OffloadConfig(
            device=setup.device,
            prefetch=setup.prefetch,
            offload_activations=setup.offload_activations,
            show_progress=False,
            full_finetune=True,
        )
        api.enable_layer_streaming(model, config)
        # one micro-batch per step: every backward completes the gradients, so layers step as they arrive
        optimizer = HostAdamW(model.parameters(), lr=setup.lr, step_during_backward=lambda: True)
        trainable = api.get_runtime(model).trainable
        outcome = Outcome()
        start = {}

        def reset():
            api.reset_stats(model)
            start.update(grad_bytes=trainable.grad_bytes_to_host, early=optimizer.layers_stepped_during_backward)

        def read_stats():
            stats = api.stats(model)
            timed = len(clock.times)
            grad_bytes = (trainable.grad_bytes_to_host - start["grad_bytes"]) // timed
            outcome.h2d_bytes_per_step = stats["bytes_to_device"] // timed
            outcome.extra.update(stats=stats, grad_bytes_to_host_per_step=grad_bytes)
            outcome.notes.append(
                f"{grad_bytes / 1e6:.2f} MB of weight gradients to the host per step; "
                f"{(optimizer.layers_stepped_during_backward - start['early']) / timed:.0f} layers stepped during "
                "each backward"
            )

        clock.on_first_timed_step.append(reset)
        clock.after_timed_steps.append(read_stats)

        def cleanup():
            optimizer.close()
            api.disable_layer_streaming(model)

        return Session(model, _batch(setup, setup.device), optimizer, outcome, cleanup)


class AccelerateCpuOffload(Method):
    name = "accelerate-cpu-offload"
    description = "accelerate.cpu_offload hooks (weights in host memory, moved per module per call)"

    def prepare(self, setup, clock):
        from accelerate import cpu_offload

        model = lora_model(setup, "cpu")
        cpu_offload(model, execution_device=setup.device)
        # No optimizer: after cpu_offload every parameter of the model (LoRA included) is a meta placeholder, and
        # each forward creates new Parameter objects on the device, so gradients land on those temporaries and
        # never reach anything an optimizer holds (a known limitation of accelerate's offload hooks).
        note = (
            "forward+backward only, no optimizer step: cpu_offload makes new Parameter objects per call, so LoRA "
            "gradients land on temporaries (training with it does not learn; accelerate #3770/#3785)"
        )
        return Session(model, _batch(setup, setup.device), optimizer=None, outcome=Outcome(notes=[note]))


class DeepSpeedZero3Offload(Method):
    name = "deepspeed-zero3-offload"
    description = "transformers Trainer + DeepSpeed ZeRO-3, parameters and optimizer offloaded to CPU"
    interleavable = False
    adapters = True  # LoRA, as the other rows; the -full row trains every weight

    def unavailable(self, setup):
        if setup.device.type != "cuda":
            return "DeepSpeed ZeRO-3 CPU offload needs a CUDA device (run with --device cuda)"
        try:
            import deepspeed  # noqa: F401
        except Exception as err:  # ImportError, or deepspeed's own checks (no CUDA toolkit, ...)
            return f"deepspeed cannot be imported ({type(err).__name__}: {err}); install it to compare"
        return None

    def run(self, setup, clock):
        from transformers import (
            AutoModelForCausalLM,
            Trainer,
            TrainerCallback,
            TrainingArguments,
            default_data_collator,
        )
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        losses = clock.losses

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.begin()

            def on_step_end(self, args, state, control, **kwargs):
                clock.end()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        dataset = _RepeatedBatch(_batch(setup, "cpu"), setup.batch * clock.total_steps)
        with tempfile.TemporaryDirectory() as output_dir, _restored_environment():
            _single_process_distributed_env()
            distributed_before = torch.distributed.is_available() and torch.distributed.is_initialized()
            try:
                args = TrainingArguments(
                    output_dir=output_dir,
                    per_device_train_batch_size=setup.batch,
                    max_steps=clock.total_steps,
                    learning_rate=setup.lr,
                    lr_scheduler_type="constant",
                    bf16=setup.dtype == torch.bfloat16,
                    fp16=setup.dtype == torch.float16,
                    # Users of ZeRO-3 offload on models this size turn checkpointing on; streaming recomputes too.
                    activation_checkpointing=True,
                    activation_checkpointing_kwargs={"use_reentrant": False},
                    deepspeed=deepspeed_config(setup.deepspeed_optimizer),
                    optim="adamw_torch",  # used only with --deepspeed_optimizer torch
                    logging_steps=1,
                    save_strategy="no",
                    report_to="none",
                    disable_tqdm=True,
                    remove_unused_columns=False,
                )
                # As DeepSpeed users do: TrainingArguments first, then the model, which transformers then builds
                # under deepspeed.zero.Init (each module partitioned to CPU as it is created, so it never has to fit
                # on the GPU), then peft. Its weights come from transformers' own init, not the shared random fill;
                # the values do not change a dense model's speed.
                model = AutoModelForCausalLM.from_config(setup.config, dtype=setup.dtype)
                model = add_lora(model, setup) if self.adapters else model
                trainer = Trainer(
                    model=model,
                    args=args,
                    train_dataset=dataset,
                    data_collator=default_data_collator,
                    callbacks=[Clock()],
                )
                trainer.train()
                destroy = getattr(trainer.model_wrapped, "destroy", None)
                if callable(destroy):
                    destroy()
                trainer.accelerator.free_memory()
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                hint = ""
                if setup.deepspeed_optimizer == "deepspeed":
                    hint = " (if DeepSpeedCPUAdam failed to build, try --deepspeed_optimizer torch)"
                raise RuntimeError(f"{type(err).__name__}: {err}{hint}") from err
            finally:
                unset_hf_deepspeed_config()
                # the world of one this row made (accelerate or DeepSpeed starts it) ends with the row
                if not distributed_before and torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
        optimizer = "DeepSpeedCPUAdam" if setup.deepspeed_optimizer == "deepspeed" else "torch AdamW on CPU"
        note = f"ZeRO-3, parameters and optimizer ({optimizer}) offloaded to pinned CPU memory, HF checkpointing on"
        return Outcome(notes=[note if self.adapters else note + ", every weight trained"])


class DeepSpeedZero3OffloadFull(DeepSpeedZero3Offload):
    name = "deepspeed-zero3-offload-full"
    description = "full fine-tuning with the Trainer + DeepSpeed ZeRO-3, parameters and optimizer offloaded to CPU"
    adapters = False


def deepspeed_config(optimizer: str = "deepspeed") -> dict:
    """A standard ZeRO-3 CPU-offload config; "auto" values are filled in by transformers from TrainingArguments.

    optimizer "deepspeed": DeepSpeed's CPU Adam (its usual setup; a C++ op DeepSpeed compiles on first use).
    optimizer "torch": the Trainer's torch AdamW runs on the offloaded fp32 partition instead (no compilation).
    """
    config = {
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": True},
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }
    if optimizer == "torch":
        del config["optimizer"]
        config["zero_force_ds_cpu_optimizer"] = False
    elif optimizer != "deepspeed":
        raise ValueError(f"the DeepSpeed optimizer should be 'deepspeed' or 'torch', not {optimizer!r}")
    return config


class _RepeatedBatch(torch.utils.data.Dataset):
    """The benchmark batch's rows, repeated: every Trainer step sees the same data as the other methods."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        row = i % self.batch["input_ids"].shape[0]
        return {k: v[row] for k, v in self.batch.items()}


@contextlib.contextmanager
def _restored_environment():
    """Environment variables set for DeepSpeed (world of one, ACCELERATE_USE_DEEPSPEED) do not outlive its row."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _single_process_distributed_env() -> None:
    """DeepSpeed initialises torch.distributed; one process on one GPU needs a world of one."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with contextlib.closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Resident(),
        ResidentCheckpointed(),
        HfOffload(),
        HfOffloadActivations(),
        AccelerateCpuOffload(),
        DeepSpeedZero3Offload(),
        ResidentFull(),
        HfOffloadFull(),
        DeepSpeedZero3OffloadFull(),
    )
}
DEFAULT_METHODS = [name for name, method in METHODS.items() if method.default]
