"""The `hf_offload` logger follows transformers' logging conventions; the packing bar follows its progress switch."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from faces import tiny_args, token_dataset
from families import build

import hf_offload
from hf_offload import OffloadTrainer
from hf_offload.engine import store
from hf_offload.verbosity import ENV_VAR, level_from_environment

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def library_logger(monkeypatch):
    """The `hf_offload` logger with a handler that records, its level restored afterwards; no verbosity variable."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    logger = logging.getLogger("hf_offload")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_levels_from_the_environment():
    assert level_from_environment({}) == (logging.INFO, [])
    assert level_from_environment({"TRANSFORMERS_VERBOSITY": "error"}) == (logging.ERROR, [])
    assert level_from_environment({ENV_VAR: "debug", "TRANSFORMERS_VERBOSITY": "error"}) == (logging.DEBUG, [])
    level, problems = level_from_environment({ENV_VAR: "verbose", "TRANSFORMERS_VERBOSITY": "warning"})
    assert level == logging.WARNING and len(problems) == 1 and "'verbose'" in problems[0]


def test_an_unknown_verbosity_warns_at_import_instead_of_raising():
    env = {**os.environ, ENV_VAR: "verbose", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", "import hf_offload, logging; print(logging.getLogger('hf_offload').level)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(logging.INFO)
    assert f"{ENV_VAR} should be one of debug, info, warning, error, critical, but the value passed is" in done.stderr


def _build_trainer(tmp_path, **overrides):
    args = tiny_args(tmp_path, layer_streaming=True, max_steps=1, **overrides)
    return OffloadTrainer(model=copy.deepcopy(build("llama")), args=args, train_dataset=token_dataset(4))


@pytest.mark.usefixtures("one_thread")
def test_the_trainers_log_level_applies_to_hf_offload(library_logger, tmp_path):
    _build_trainer(tmp_path / "passive")  # the Trainer's default: hf_offload's notices at info show
    assert any("the Trainer keeps" in r.getMessage() for r in library_logger)
    library_logger.clear()
    _build_trainer(tmp_path / "error", log_level="error")
    assert not [r for r in library_logger if r.levelno < logging.ERROR]
    assert logging.getLogger("hf_offload").level == logging.ERROR


@pytest.mark.usefixtures("one_thread")
def test_hf_offload_verbosity_wins_over_the_trainers_log_level(library_logger, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "info")
    logging.getLogger("hf_offload").setLevel(logging.INFO)
    _build_trainer(tmp_path, log_level="error")
    assert any("the Trainer keeps" in r.getMessage() for r in library_logger)


def test_the_packing_bar_follows_the_progress_bar_switch(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert store._tqdm_disable(None) is None  # on: tqdm shows it on a terminal
    transformers.utils.logging.disable_progress_bar()
    try:
        assert store._tqdm_disable(None) is True
        assert store._tqdm_disable(True) is False  # asked for explicitly: shown
    finally:
        transformers.utils.logging.enable_progress_bar()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert store._tqdm_disable(None) is True


@pytest.mark.usefixtures("one_thread")
def test_disable_tqdm_turns_the_packing_bar_off(tmp_path):
    trainer = _build_trainer(tmp_path / "quiet", disable_tqdm=True)
    assert hf_offload.api.get_runtime(trainer.model).config.show_progress is False
    trainer = _build_trainer(tmp_path / "bars", disable_tqdm=False)
    assert hf_offload.api.get_runtime(trainer.model).config.show_progress is None
