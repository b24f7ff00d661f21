"""The recipe, stated: LoRA added, the optimizer switched, options that do nothing, and a launch that streamed
nothing are all said at WARNING level, with the numbers in use."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faces import tiny_args, token_dataset
from families import build
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import hf_offload
from hf_offload import OffloadTrainer
from hf_offload.integrations import recipe
from hf_offload.integrations.plugin import ENV_VAR, LayerStreamingPlugin
from hf_offload.integrations.trainer import TRAINER_DEFAULT_OPTIM, patch_trainer, unpatch_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base():
    return build("llama")


@pytest.fixture
def warnings_logged():
    """The messages the `hf_offload` logger emits at WARNING and above during the test."""
    logger = logging.getLogger("hf_offload")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    yield lambda: [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    logger.removeHandler(handler)


def _launched(monkeypatch, **options):
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(**options).to_env()[ENV_VAR])
    patch_trainer()


@pytest.fixture
def unpatch():
    yield
    unpatch_trainer()


def test_adding_lora_is_a_warning_with_rank_targets_and_the_learning_rate(base, tmp_path, warnings_logged):
    args = tiny_args(tmp_path, layer_streaming=True, learning_rate=5e-5, offload_lora_target_modules="q_proj,v_proj")
    OffloadTrainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset(4))
    [added] = [m for m in warnings_logged() if "added LoRA adapters" in m]
    assert "r=4" in added and "targets=q_proj,v_proj" in added and "--offload_lora_r" in added
    assert "5e-05, is a full fine-tuning rate" in added and "0.0001 to 0.0003" in added

    args = tiny_args(tmp_path, layer_streaming=True, learning_rate=2e-4)
    OffloadTrainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset(4))
    added = [m for m in warnings_logged() if "added LoRA adapters" in m][-1]
    assert "Learning rate in use: 0.0002." in added and "full fine-tuning" not in added


def test_the_optimizer_switch_is_said_on_the_flag_and_under_the_launcher(
    base, tmp_path, warnings_logged, monkeypatch, unpatch
):
    OffloadTrainer(model=copy.deepcopy(base), args=tiny_args(tmp_path, layer_streaming=True))
    switch = f"trains with adamw_bnb_8bit instead of the Trainer's default {TRAINER_DEFAULT_OPTIM}"
    assert sum(switch in m for m in warnings_logged()) == 1

    _launched(monkeypatch, lora_r=4)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    Trainer(model=copy.deepcopy(base), args=args)
    assert args.optim == "adamw_bnb_8bit" and sum(switch in m for m in warnings_logged()) == 2


def test_an_explicit_optim_on_the_command_line_wins_under_the_launcher(base, tmp_path, monkeypatch, unpatch):
    """`--optim adamw_torch_fused` is the Trainer's default value, but chosen: it must not become 8-bit AdamW."""
    _launched(monkeypatch, lora_r=4)
    monkeypatch.setattr(sys, "argv", ["train.py", "--optim", TRAINER_DEFAULT_OPTIM])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, optim=TRAINER_DEFAULT_OPTIM)
    trainer = Trainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset(4))
    assert hf_offload.is_streaming(trainer.model)
    assert args.optim == TRAINER_DEFAULT_OPTIM and type(trainer.create_optimizer()) is torch.optim.AdamW


def test_the_launchers_optim_overridden_by_the_script_is_said(base, tmp_path, warnings_logged, monkeypatch, unpatch):
    _launched(monkeypatch, lora_r=4, default_optim="adafactor")
    monkeypatch.setattr(sys, "argv", ["train.py", "--optim", "adamw_torch"])
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, optim="adamw_torch")
    Trainer(model=copy.deepcopy(base), args=args)
    assert args.optim == "adamw_torch"
    assert any("--optim adafactor given to `hf-offload launch` is not used" in m for m in warnings_logged())


def test_lora_options_a_peft_model_overrides_are_named(base, warnings_logged):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["q_proj"]))
    LayerStreamingPlugin(lora_r=32).prepare_model(model, device="cpu", face="launch")
    [message] = [m for m in warnings_logged() if "already a peft model" in m]
    assert "(r=8)" in message and "--lora_r 32 is not used" in message
    other = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["q_proj"]))
    LayerStreamingPlugin().prepare_model(other, device="cpu", face="launch")  # nothing given: nothing to say
    assert len([m for m in warnings_logged() if "already a peft model" in m]) == 1


def test_offload_options_without_layer_streaming_warn(tmp_path, warnings_logged):
    tiny_args(tmp_path, offload_prefetch=2)  # tiny_args also gives --offload_lora_r 4 and friends
    [message] = [m for m in warnings_logged() if "without --layer_streaming" in m]
    assert "--offload_prefetch" in message and "--offload_lora_r" in message
    tiny_args(tmp_path, offload_prefetch=2, layer_streaming=True)
    assert len([m for m in warnings_logged() if "without --layer_streaming" in m]) == 1


def test_launch_report(tmp_path):
    assert "start-up hook" in recipe.launch_report(tmp_path)
    (tmp_path / f"{recipe.STARTED}.1").touch()
    assert "no process imported transformers' Trainer" in recipe.launch_report(tmp_path)
    (tmp_path / f"{recipe.TRAINER_IMPORTED}.2").touch()
    assert "no Trainer was created with a model" in recipe.launch_report(tmp_path)
    (tmp_path / f"{recipe.STREAMED}.2").touch()
    assert recipe.launch_report(tmp_path) is None


def _launch(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "hf_offload", "launch", "--", *command], env=env, capture_output=True, text=True
    )


def test_a_launched_command_that_streams_nothing_says_so():
    done = _launch(sys.executable, "-c", "print('no trainer here')")
    assert done.returncode == 0 and done.stdout == "no trainer here\n"
    assert "nothing streamed: no process imported transformers' Trainer" in done.stderr
    done = _launch(sys.executable, "-I", "-c", "raise SystemExit(4)")
    assert done.returncode == 4 and "start-up hook" in done.stderr
