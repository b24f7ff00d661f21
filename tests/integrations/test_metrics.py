"""The `offload/` metrics: named as the Trainer names its own, training and evaluation apart, none overwritten."""

from __future__ import annotations

import copy
import json

import pytest
from faces import tiny_args, token_dataset
from families import build
from transformers.integrations.integration_utils import rewrite_logs

import hf_offload
from hf_offload import OffloadTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A streamed run that evaluates during training, then once more at the end, its metrics saved as scripts do."""
    out = tmp_path_factory.mktemp("metrics")
    args = tiny_args(
        out, layer_streaming=True, max_steps=4, eval_strategy="steps", eval_steps=2, offload_skip_bad_steps=True
    )
    trainer = OffloadTrainer(
        model=copy.deepcopy(build("llama")), args=args, train_dataset=token_dataset(), eval_dataset=token_dataset(8)
    )
    train_metrics = trainer.train().metrics
    trainer.save_metrics("train", train_metrics)
    eval_metrics = trainer.evaluate()
    trainer.save_metrics("eval", eval_metrics)
    return trainer, train_metrics, eval_metrics, out


def _offload_keys(line: dict) -> set[str]:
    return {key for key in line if "offload/" in key}


def test_training_lines_carry_training_keys_and_evaluations_eval_keys(trained):
    trainer, train_metrics, eval_metrics, _ = trained
    steps = [line for line in trainer.state.log_history if "loss" in line]
    evals = [line for line in trainer.state.log_history if "eval_loss" in line]
    assert len(steps) == 4 and len(evals) == 3  # two during training, one after
    for line in steps:
        assert _offload_keys(line) == {"offload/tokens_per_s", "offload/h2d_GB", "offload/skipped_steps"}
    for line in evals:
        assert _offload_keys(line) == {"eval_offload/tokens_per_s", "eval_offload/h2d_GB"}
        assert line["eval_offload/h2d_GB"] > 0 and line["eval_offload/tokens_per_s"] > 0
    assert _offload_keys(train_metrics) == {"offload/tokens_per_s", "offload/h2d_GB", "offload/skipped_steps"}
    assert _offload_keys(eval_metrics) == {"eval_offload/tokens_per_s", "eval_offload/h2d_GB"}
    # what reporting integrations plot: evaluation numbers in the eval series, training ones in the train series
    assert set(rewrite_logs(evals[0])) >= {"eval/offload/tokens_per_s", "eval/offload/h2d_GB"}
    assert set(rewrite_logs(steps[0])) >= {"train/offload/tokens_per_s", "train/offload/h2d_GB"}


def test_evaluations_are_left_out_of_the_training_numbers(trained):
    trainer, train_metrics, _, _ = trained
    evals = [line for line in trainer.state.log_history if "eval_loss" in line]
    steps = [line for line in trainer.state.log_history if "loss" in line]
    # the whole run is the sum of its steps, and not of the evaluations run during it
    assert train_metrics["offload/h2d_GB"] == pytest.approx(sum(line["offload/h2d_GB"] for line in steps))
    # every byte copied is counted once: in the step or in the evaluation that moved it
    counted = sum(line["offload/h2d_GB"] for line in steps) + sum(line["eval_offload/h2d_GB"] for line in evals)
    assert counted * 1e9 == pytest.approx(hf_offload.stats(trainer.model)["bytes_to_device"], rel=1e-9)
    assert all(line["eval_offload/h2d_GB"] > 0 for line in evals)


def test_all_results_keeps_training_and_evaluation_numbers(trained):
    _, train_metrics, eval_metrics, out = trained
    with open(out / "all_results.json") as f:
        results = json.load(f)
    assert results["offload/tokens_per_s"] == pytest.approx(train_metrics["offload/tokens_per_s"])
    assert results["eval_offload/tokens_per_s"] == pytest.approx(eval_metrics["eval_offload/tokens_per_s"])
    assert results["offload/h2d_GB"] != results["eval_offload/h2d_GB"]


def test_predict_metrics_use_the_test_prefix(trained):
    trainer = trained[0]
    metrics = trainer.predict(token_dataset(8, seed=3)).metrics
    assert _offload_keys(metrics) == {"test_offload/tokens_per_s", "test_offload/h2d_GB"}
    assert "offload/h2d_GB" not in metrics
