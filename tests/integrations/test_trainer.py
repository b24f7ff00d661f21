"""OffloadTrainer / OffloadTrainingArguments: same training as an ordinary LoRA run, checkpoints, refusals."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch
from faces import example_argv, logged, run_example, state_losses, tiny_args, tiny_t5, token_dataset
from families import build
from peft import get_peft_model
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

import hf_offload
from hf_offload import OffloadTrainer, OffloadTrainingArguments, UnsupportedModelError
from hf_offload.integrations.checkpoint import IncompatibleCheckpointError
from hf_offload.integrations.hub import save_merged
from hf_offload.integrations.plugin import ENV_VAR, LayerStreamingPlugin
from hf_offload.integrations.trainer import (
    HOOKS,
    PATCH_ATTRIBUTE,
    TRAINER_DEFAULT_OPTIM,
    patch_trainer,
    unpatch_trainer,
)

LAYERS = 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return build("llama")


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append("step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append("log")


def _plain_lora(base, args):
    """What a user's ordinary LoRA run does: peft applied in the script, same config, same RNG state."""
    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(base), args.lora_config())


def _run(model, args, **kwargs):
    trainer = OffloadTrainer(
        model=model, args=args, train_dataset=token_dataset(), eval_dataset=token_dataset(8, seed=3), **kwargs
    )
    trainer.train()
    return trainer


def test_flag_trains_exactly_like_an_ordinary_lora_run(base, tmp_path):
    """Gradient accumulation, clipping, bf16 autocast, eval, predict and callbacks, streamed and not."""
    common = dict(
        max_steps=3,
        gradient_accumulation_steps=2,
        max_grad_norm=0.05,  # small enough to clip
        bf16=True,  # on the CPU: bf16 autocast
        eval_strategy="steps",
        eval_steps=2,
    )
    plain_args = tiny_args(tmp_path / "plain", optim="adamw_bnb_8bit", **common)
    plain = _run(_plain_lora(base, plain_args), plain_args, callbacks=[plain_recorder := Recorder()])
    assert not hf_offload.is_streaming(plain.model)

    args = tiny_args(tmp_path / "streamed", layer_streaming=True, **common)  # default optimizer: 8-bit AdamW
    torch.manual_seed(0)  # the LoRA the trainer adds starts from the same RNG state as the plain run's
    streamed = _run(copy.deepcopy(base), args, callbacks=[recorder := Recorder()])
    assert hf_offload.is_streaming(streamed.model)
    assert type(streamed.optimizer.optimizer).__module__.startswith("bitsandbytes")

    assert logged(streamed) == logged(plain) and len(logged(plain)) == 3
    assert logged(streamed, "grad_norm") == logged(plain, "grad_norm")
    assert all(norm > common["max_grad_norm"] for norm in logged(plain, "grad_norm").values())  # clipping was on
    assert logged(streamed, "eval_loss") == logged(plain, "eval_loss") and logged(plain, "eval_loss")
    test = token_dataset(8, seed=5)
    torch.testing.assert_close(
        torch.as_tensor(streamed.predict(test).predictions), torch.as_tensor(plain.predict(test).predictions)
    )
    assert recorder.events == plain_recorder.events and "step" in recorder.events

    # every training log line carries the offload/ metrics, every evaluation eval_offload/; steps moved layers
    for line in streamed.state.log_history:
        prefix = "eval_" if "eval_loss" in line else ""
        assert {f"{prefix}offload/tokens_per_s", f"{prefix}offload/h2d_GB"} <= line.keys()
    step_lines = [h for h in streamed.state.log_history if "loss" in h]
    layer_bytes = hf_offload.summary(streamed.model)["host_store_bytes"]
    assert all(h["offload/h2d_GB"] * 1e9 >= layer_bytes for h in step_lines)  # at least one pass per step
    assert all(h["offload/tokens_per_s"] > 0 for h in step_lines)


def test_trainer_never_moves_the_streamed_model(base, tmp_path):
    moves = []

    def recording(model):
        original = model.to
        model.to = lambda *a, **k: moves.append((a, k)) or original(*a, **k)
        return model

    plain_args = tiny_args(tmp_path / "plain", max_steps=1)
    _run(recording(_plain_lora(base, plain_args)), plain_args)
    assert moves, "an ordinary Trainer moves the model: the check below would catch it"
    moves.clear()
    streamed_args = tiny_args(tmp_path / "streamed", max_steps=1, layer_streaming=True)
    model = hf_offload.LayerStreamingPlugin(lora_r=4).prepare_model(copy.deepcopy(base), device="cpu")
    _run(recording(model), streamed_args)
    assert moves == []


def test_gradient_checkpointing_flag_does_not_add_a_second_recompute(base, tmp_path):
    calls = []
    # transformers >= 5.2x names the flag activation_checkpointing, earlier 5.x releases gradient_checkpointing
    flag = (
        "activation_checkpointing"
        if hasattr(TrainingArguments, "activation_checkpointing")
        else "gradient_checkpointing"
    )
    args = tiny_args(tmp_path, layer_streaming=True, max_steps=2, **{flag: True})
    model = copy.deepcopy(base)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))

    class FlagWatcher(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = model.get_base_model().model.layers
            self.flag_on = all(layer.gradient_checkpointing for layer in layers)

    watcher = FlagWatcher()
    trainer = OffloadTrainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[watcher])
    trainer.train()
    assert watcher.flag_on, "the Trainer turned HF checkpointing on: the test exercises the flag"
    assert len(calls) == 2 * 2 * LAYERS  # per step: the forward and one recompute of each layer, no more


def test_default_optimizer_and_an_explicit_choice(base, tmp_path):
    def optimizer(args):
        trainer = OffloadTrainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset())
        return trainer.create_optimizer()

    eight_bit = optimizer(tiny_args(tmp_path, layer_streaming=True))
    assert type(eight_bit).__module__.startswith("bitsandbytes") and eight_bit.args.optim_bits == 8
    chosen = optimizer(tiny_args(tmp_path, layer_streaming=True, optim="adamw_torch"))
    assert type(chosen) is torch.optim.AdamW
    assert tiny_args(tmp_path).optim == TRAINER_DEFAULT_OPTIM  # without the flag: the Trainer's own default


def test_model_it_cannot_stream_fails_at_construction(tmp_path):
    model = tiny_t5()
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        OffloadTrainer(model=model, args=tiny_args(tmp_path, layer_streaming=True), train_dataset=token_dataset())
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--offload_prefetch", "two"], "argument --offload_prefetch/--offload-prefetch: invalid int value: 'two'"),
        (["--layer_streaming", "maybe"], "argument --layer_streaming/--layer-streaming: Truthy value expected"),
        (["--offload_lora_dropout", "lots"], "--offload_lora_dropout/--offload-lora-dropout: invalid float value"),
    ],
)
def test_option_of_the_wrong_type_is_an_argument_error(tmp_path, capsys, argv, message):
    parser = HfArgumentParser(OffloadTrainingArguments)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_option_of_a_bad_value_names_the_option(tmp_path):
    parser = HfArgumentParser(OffloadTrainingArguments)
    with pytest.raises(ValueError, match="--offload_prefetch .* non-negative integer"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--offload_prefetch", "-1"])
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--layer_streaming"])
    assert args.layer_streaming and args.optim == "adamw_bnb_8bit"


def test_refuses_options_that_would_move_or_cast_the_whole_model(base, tmp_path):
    args = tiny_args(tmp_path, layer_streaming=True, bf16_full_eval=True)
    with pytest.raises(ValueError, match="bf16_full_eval"):
        OffloadTrainer(model=copy.deepcopy(base), args=args)


# --- checkpoints ---------------------------------------------------------------------------------------------------
def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_resume_continues_exactly_as_if_never_stopped(base, tmp_path):
    # r=64 makes the MLP's lora_B 64x64: bitsandbytes keeps 8-bit state for tensors of 4096 elements or more
    args = dict(layer_streaming=True, max_steps=4, save_strategy="steps", save_steps=2, offload_lora_r=64)
    torch.manual_seed(0)
    full = _run(copy.deepcopy(base), tiny_args(tmp_path / "full", **args))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= saved
    assert not {"model.safetensors", "pytorch_model.bin"} & saved  # adapters only, never the host store
    states = torch.load(checkpoint / "optimizer.pt")["state"].values()
    quant = [s["__bnb_optimizer_quant_state__"] for s in states]
    assert any(q["state1"].dtype == torch.uint8 for q in quant)  # real 8-bit moments, on the CPU

    torch.manual_seed(123)  # a different LoRA init: resuming must overwrite it from the checkpoint
    resumed = OffloadTrainer(
        model=copy.deepcopy(base), args=tiny_args(tmp_path / "resumed", **args), train_dataset=token_dataset()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    new_steps = {step: loss for step, loss in logged(resumed).items() if step > 2}
    assert new_steps == {3: logged(full)[3], 4: logged(full)[4]}


def test_resume_from_an_ordinary_lora_checkpoint(base, tmp_path):
    """Documented: a compatible LoRA checkpoint made without streaming resumes; the optimizer family must match."""
    plain_args = tiny_args(tmp_path / "plain", optim="adamw_torch", max_steps=4, save_strategy="steps", save_steps=2)
    plain = _run(_plain_lora(base, plain_args), plain_args)
    checkpoint = tmp_path / "plain" / "checkpoint-2"
    before = _fingerprint(checkpoint)

    def resume(**overrides):
        args = tiny_args(tmp_path / "resumed", layer_streaming=True, max_steps=4, **overrides)
        trainer = OffloadTrainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset())
        trainer.train(resume_from_checkpoint=str(checkpoint))
        return trainer

    # the streamed default (8-bit AdamW) cannot take torch AdamW state: a clear error before any step
    with pytest.raises(IncompatibleCheckpointError, match="holds the state of a torch optimizer.*--optim"):
        resume()
    assert _fingerprint(checkpoint) == before

    resumed = resume(optim="adamw_torch")
    new_steps = {step: loss for step, loss in logged(resumed).items() if step > 2}
    assert new_steps == {3: logged(plain)[3], 4: logged(plain)[4]}
    assert _fingerprint(checkpoint) == before


def test_resume_refuses_full_weight_and_mismatched_adapter_checkpoints(base, tmp_path):
    full_args = tiny_args(tmp_path / "full", max_steps=2, save_strategy="steps", save_steps=2)
    _run(copy.deepcopy(base), full_args)  # an ordinary run that trains every weight
    lora_args = tiny_args(tmp_path / "lora", max_steps=2, save_strategy="steps", save_steps=2, offload_lora_r=8)
    _run(_plain_lora(base, lora_args), lora_args)

    for checkpoint, message in [
        (tmp_path / "full" / "checkpoint-2", "holds full model weights"),
        (tmp_path / "lora" / "checkpoint-2", r"does not match this model's .*shape|r is 8 there and 4 here"),
    ]:
        before = _fingerprint(checkpoint)
        args = tiny_args(tmp_path / "resumed", layer_streaming=True, max_steps=4)
        trainer = OffloadTrainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset())
        with pytest.raises(IncompatibleCheckpointError, match=message):
            trainer.train(resume_from_checkpoint=str(checkpoint))
        assert _fingerprint(checkpoint) == before


# --- the in-place patch (what hf-offload launch installs) ----------------------------------------------------------
@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(lora_r=4, lora_alpha=8, lora_dropout=0.1).to_env()[ENV_VAR])
    patch_trainer()
    yield
    unpatch_trainer()


def test_patch_streams_a_plain_trainer_and_unpatch_restores_it(base, tmp_path, patched):
    from transformers import Trainer, TrainingArguments

    originals = {n: Trainer.__dict__[n].__wrapped__ for n in HOOKS if n in Trainer.__dict__}  # ours wrap them
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset())
    assert hf_offload.is_streaming(trainer.model) and args.optim == "adamw_bnb_8bit"
    trainer.train()
    assert "offload/h2d_GB" in trainer.state.log_history[0]
    unpatch_trainer()
    assert all(Trainer.__dict__[name] is original for name, original in originals.items())
    assert PATCH_ATTRIBUTE not in Trainer.__dict__


def test_trl_sft_trainer_trains_with_the_patch(tmp_path, patched):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = _word_tokenizer()
    model = build("llama")
    data = Dataset.from_dict({"text": ["one two three four five six"] * 8})
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        max_length=16,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert hf_offload.is_streaming(trainer.model)
    hf_offload.reset_stats(trainer.model)
    trainer.train()
    assert hf_offload.stats(trainer.model)["layer_loads"] >= 2 * LAYERS
    assert [h for h in trainer.state.log_history if "loss" in h][0]["offload/h2d_GB"] > 0


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "one", "two", "three", "four", "five", "six"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# --- the example script ------------------------------------------------------------------------------------------
def test_example_script_with_the_flag_matches_the_ordinary_lora_run(tiny_model_dir, tmp_path, monkeypatch):
    # the same optimizer on both sides: --layer_streaming's default is 8-bit AdamW
    plain_argv = example_argv(tiny_model_dir, tmp_path / "plain", "--lora", "--optim", "adamw_bnb_8bit")
    run_example("finetune.py", plain_argv, monkeypatch)
    run_example("finetune.py", example_argv(tiny_model_dir, tmp_path / "flag", "--layer_streaming"), monkeypatch)
    plain, flag = state_losses(tmp_path / "plain"), state_losses(tmp_path / "flag")
    assert flag == plain and len(plain) == 3
    with open(tmp_path / "flag" / "trainer_state.json", encoding="utf-8") as f:
        assert "offload/h2d_GB" in f.read()  # streamed for real; the plain run has no such metric
    assert "Trained with hf_offload" in (tmp_path / "flag" / "README.md").read_text()
    assert (tmp_path / "flag" / "adapter_model.safetensors").is_file()


def test_model_init_is_streamed_too(base, tmp_path):
    args = tiny_args(tmp_path, layer_streaming=True, max_steps=1)
    trainer = OffloadTrainer(model_init=lambda: copy.deepcopy(base), args=args, train_dataset=token_dataset())
    assert hf_offload.is_streaming(trainer.model)
    trainer.train()  # model_init runs again in train(): the new model is streamed as well
    assert hf_offload.is_streaming(trainer.model) and "offload/h2d_GB" in trainer.state.log_history[0]


def test_quantized_host_store_through_the_flag(base, tmp_path):
    args = tiny_args(tmp_path, layer_streaming=True, max_steps=2, offload_base_weight_dtype="int8")
    trainer = _run(copy.deepcopy(base), args)
    facts = hf_offload.summary(trainer.model)
    assert facts["base_weight_dtype"] == "int8" and facts["quantized_weights"] > 0
    assert all(h["loss"] == h["loss"] for h in trainer.state.log_history if "loss" in h)  # no NaN from the store
    with pytest.raises(ValueError, match="base weights are quantized"):
        save_merged(trainer.model, str(tmp_path / "merged"))
    with pytest.raises(ValueError, match="both --offload_save_merged and --offload_base_weight_dtype"):
        tiny_args(tmp_path, offload_base_weight_dtype="nf4", offload_save_merged=True)


def test_the_readme_example_logs_no_third_party_noise(tiny_model_dir, tmp_path):
    """README command 1's script, in a fresh process: every line it prints is ours, the Trainer's or the loss."""
    import subprocess
    import sys

    from faces import EXAMPLES

    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), "--model_name_or_path", tiny_model_dir, "--max_steps", "1"]
        + ["--output_dir", str(tmp_path / "out"), "--layer_streaming", "--report_to", "none"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "hf_offload: streaming" in output
    for noise in ("kernels-community", "Warning:", "warnings.warn"):
        assert noise not in output, [line for line in output.splitlines() if noise in line]
