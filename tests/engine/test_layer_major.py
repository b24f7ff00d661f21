"""Layer-major evaluation: each decoder layer loaded once per group of batches, outputs exactly as batch by batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from faces import tiny_args
from families import VOCAB
from families import build as build_dense
from moe_families import build as build_moe
from parity import LOSS_RTOL, with_lora
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload import OffloadConfig, OffloadTrainer, evaluate_layer_major
from hf_offload.engine.runtime import is_streamed_layer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4  # every tiny family is 4 layers deep


def _batches(count: int = 5, seed: int = 0) -> list[dict]:
    """Batches of different lengths, left-padded rows (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(count):
        input_ids = torch.randint(3, VOCAB, (2, 8 + k), generator=g)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :3] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, 0)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batches.append(dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels))
    return batches


def _lora(base, moe: bool):
    if moe:  # peft refuses LoRA dropout on expert parameters; attention projections are enough here
        return with_lora(base, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return with_lora(base)


def _pair(base, moe: bool = False, **options):
    """An unstreamed LoRA model and a streamed copy with the same weights, both in eval mode."""
    reference = _lora(copy.deepcopy(base), moe).eval()
    streamed = _lora(copy.deepcopy(base), moe)
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu", show_progress=False, **options))
    return reference, streamed.eval()


CASES = [
    ("llama", False),
    ("gemma3", False),  # sliding and full attention layers
    ("gpt2", False),
    ("mixtral", True),
    ("qwen3_moe", True),
]


@pytest.mark.parametrize(("family", "moe"), CASES)
def test_each_layer_loads_once_and_outputs_are_exact(family, moe):
    base = (build_moe if moe else build_dense)(family)
    reference, streamed = _pair(base, moe)
    batches = _batches()
    with torch.no_grad():
        expected = [reference(**b) for b in batches]

    hf_offload.reset_stats(streamed)
    outputs = list(evaluate_layer_major(streamed, batches))
    layer_major_loads = hf_offload.stats(streamed)["layer_loads"]
    assert torch.is_grad_enabled()  # the caller's grad mode is untouched

    hf_offload.reset_stats(streamed)
    with torch.no_grad():
        batch_major = [streamed(**b) for b in batches]
    batch_major_loads = hf_offload.stats(streamed)["layer_loads"]

    assert layer_major_loads == LAYERS  # one group: every layer once
    assert batch_major_loads == LAYERS * len(batches)
    for got, by_batch, want in zip(outputs, batch_major, expected):
        torch.testing.assert_close(got.logits, want.logits, rtol=LOSS_RTOL, atol=1e-5)
        torch.testing.assert_close(got.loss, want.loss, rtol=LOSS_RTOL, atol=1e-6)
        assert torch.equal(got.logits, by_batch.logits)  # the same operations, only in another order


def test_group_size_bounds_the_loads_and_a_custom_forward_returns_what_it_keeps():
    reference, streamed = _pair(build_dense("llama"))
    batches = _batches(5)
    hf_offload.reset_stats(streamed)
    losses = list(evaluate_layer_major(streamed, batches, forward=lambda m, b: m(**b).loss, group_size=2))
    assert hf_offload.stats(streamed)["layer_loads"] <= LAYERS * 3  # groups of 2, 2, 1
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(losses), torch.stack([reference(**b).loss for b in batches]))

    # the configured group size is the default
    _, configured = _pair(build_dense("llama"), eval_group_size=1)
    hf_offload.reset_stats(configured)
    list(evaluate_layer_major(configured, batches))
    assert hf_offload.stats(configured)["layer_loads"] == LAYERS * len(batches)


def test_planned_groups_follow_the_memory_budget():
    from hf_offload.engine.layer_major import GroupPlan, plan_groups

    batches = _batches(5)  # 2 x 8, 2 x 9, ... tokens
    per_token = 32 * 4
    plan = GroupPlan(None, (16 + 18) * per_token, per_token)
    assert [len(g) for g in plan.groups(batches)] == [2, 1, 1, 1]
    assert [len(g) for g in GroupPlan(3, None, per_token).groups(batches)] == [3, 2]

    _, streamed = _pair(build_dense("llama"))
    runtime = hf_offload.api.get_runtime(streamed)
    # per token: the hidden state, masks and rotary tables (as much again) and, when kept, the logits (fp32)
    assert plan_groups(streamed, runtime, None, keeps_logits=False).bytes_per_token == 2 * 32 * 4
    planned = plan_groups(streamed, runtime, None, keeps_logits=True)
    assert planned.bytes_per_token == (2 * 32 + VOCAB) * 4
    assert planned.max_batches is None and planned.budget_bytes > 0  # the budget comes from available memory
    assert plan_groups(streamed, runtime, 2).max_batches == 2


def test_a_failing_batch_raises_and_leaves_the_model_usable():
    _, streamed = _pair(build_dense("llama"))
    batches = _batches(3)
    bad = dict(batches[1], input_ids=batches[1]["input_ids"].clone())
    bad["input_ids"][0, 0] = VOCAB + 5  # out of the embedding's range: raises in that batch's forward
    with pytest.raises(IndexError):
        list(evaluate_layer_major(streamed, [batches[0], bad, batches[2]]))

    layers = streamed.base_model.model.model.layers
    down_proj = layers[2].mlp.down_proj

    def fails_in_layer_2(model, batch):
        if batch is batches[2]:  # this batch's forward starts after the others wait at layer 0
            down_proj.forward = None  # every batch fails inside layer 2, the first one raises
        return model(**batch)

    with pytest.raises(TypeError):
        list(evaluate_layer_major(streamed, batches, forward=fails_in_layer_2))
    del down_proj.forward
    # the layers' forwards are the runtime's again, and the model evaluates in both schedules
    assert all(is_streamed_layer(layer) for layer in layers)
    with torch.no_grad():
        streamed(**batches[0])
    assert list(evaluate_layer_major(streamed, batches[:2]))


def test_an_evaluation_inside_another_is_refused():
    _, streamed = _pair(build_dense("llama"))
    batches = _batches(2)

    def nested(model, batch):
        return list(evaluate_layer_major(model, [batch]))

    with pytest.raises(RuntimeError, match="started inside another one"):
        list(evaluate_layer_major(streamed, batches, forward=nested))
    assert len(list(evaluate_layer_major(streamed, batches))) == 2  # nothing was left behind


def test_refuses_a_model_that_does_not_stream_and_a_bad_group_size():
    model = _lora(build_dense("llama"), moe=False)
    with pytest.raises(RuntimeError, match="Layer streaming is not on"):
        evaluate_layer_major(model, _batches(1))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", show_progress=False))
    with pytest.raises(ValueError, match="`group_size` should be a positive integer"):
        evaluate_layer_major(model, _batches(1), group_size=0)
    with pytest.raises(ValueError, match="`eval_group_size` should be a positive integer"):
        OffloadConfig(eval_group_size=0)


# --- through the Trainer ----------------------------------------------------------------------------------------------
def _token_rows(rows: int, seed: int) -> list[dict]:
    """Rows of different lengths (the collator pads each batch to its longest row: padding differs across batches)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(rows):
        length = 6 + (k * 5) % 9
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append(dict(input_ids=ids, labels=ids))
    return out


def _collate(rows: list[dict]) -> dict:
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for k, row in enumerate(rows):  # left padding
        n = len(row["input_ids"])
        input_ids[k, length - n :] = torch.tensor(row["input_ids"])
        attention_mask[k, length - n :] = 1
        labels[k, length - n :] = torch.tensor(row["labels"])
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _metrics(prediction):
    logits, labels = prediction.predictions, prediction.label_ids
    if isinstance(logits, tuple):  # MoE models also hand out their aux loss
        logits = next(array for array in logits if array.ndim == 3)
    mask = labels[:, 1:] != -100
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask
    return {"accuracy": float(hits.sum() / mask.sum()), "logit_sum": float(np.abs(logits[logits != -100]).sum())}


def _trainer(model, tmp_path, name, compute_metrics=_metrics, **overrides):
    args = tiny_args(tmp_path / name, per_device_eval_batch_size=3, **overrides)
    return OffloadTrainer(model=model, args=args, data_collator=_collate, compute_metrics=compute_metrics)


def _trainer_models(base, moe: bool, **options):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    reference = get_peft_model(copy.deepcopy(base), lora)
    streamed = get_peft_model(copy.deepcopy(base), lora)
    streamed.load_state_dict(reference.state_dict())
    hf_offload.enable_layer_streaming(streamed, OffloadConfig(device="cpu", show_progress=False, **options))
    return reference, streamed


@pytest.mark.parametrize(("family", "moe"), [("llama", False), ("mixtral", True)])
def test_trainer_evaluate_and_predict_are_exact_and_load_each_layer_once(family, moe, tmp_path):
    base = (build_moe if moe else build_dense)(family)
    reference, streamed = _trainer_models(base, moe)
    eval_rows, test_rows = _token_rows(10, seed=3), _token_rows(7, seed=4)  # 4 and 3 batches, the last one short
    plain = _trainer(reference, tmp_path, "plain")
    ours = _trainer(streamed, tmp_path, "streamed")

    hf_offload.reset_stats(streamed)
    metrics = ours.evaluate(eval_rows)
    assert hf_offload.stats(streamed)["layer_loads"] == LAYERS  # 4 batches, one group
    want = plain.evaluate(eval_rows)
    for key in ("eval_loss", "eval_accuracy", "eval_logit_sum"):
        assert metrics[key] == pytest.approx(want[key], rel=LOSS_RTOL), key

    hf_offload.reset_stats(streamed)
    got = ours.predict(test_rows)
    assert hf_offload.stats(streamed)["layer_loads"] == LAYERS
    expected = plain.predict(test_rows)
    got_predictions, expected_predictions = _arrays(got.predictions), _arrays(expected.predictions)
    assert len(got_predictions) == len(expected_predictions)
    for array, want_array in zip(got_predictions, expected_predictions):
        assert array.shape == want_array.shape  # padded across batches with -100 alike
        np.testing.assert_allclose(array, want_array, rtol=LOSS_RTOL, atol=1e-5)
    np.testing.assert_array_equal(got.label_ids, expected.label_ids)
    assert got.metrics["test_loss"] == pytest.approx(expected.metrics["test_loss"], rel=LOSS_RTOL)
    assert "prediction_step" not in ours.__dict__  # the loop's wrapper is gone
    assert not ours.accelerator.gradient_state.in_dataloader  # accelerate's record is as after a plain loop


def _arrays(predictions) -> list[np.ndarray]:
    """The arrays of (nested tuples of) predictions, in order."""
    if isinstance(predictions, (tuple, list)):
        return [array for item in predictions for array in _arrays(item)]
    return [predictions]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(prediction_loss_only=True),
        dict(eval_accumulation_steps=2),
        dict(batch_eval_metrics=True),
    ],
    ids=["prediction_loss_only", "eval_accumulation_steps", "batch_eval_metrics"],
)
def test_trainer_options_behave_as_batch_by_batch(overrides, tmp_path):
    reference, streamed = _trainer_models(build_dense("llama"), moe=False, eval_group_size=3)
    rows = _token_rows(10, seed=5)  # 4 batches: groups of 3 and 1
    calls = {"plain": [], "streamed": []}

    def batch_metrics(name):
        def compute(prediction, compute_result):
            calls[name].append((prediction.predictions.shape, compute_result))
            return {"last": float(compute_result)}

        return compute

    def build(model, name):
        metrics = batch_metrics(name) if overrides.get("batch_eval_metrics") else _metrics
        return _trainer(model, tmp_path, name, compute_metrics=metrics, **overrides)

    hf_offload.reset_stats(streamed)
    got = build(streamed, "streamed").evaluate(rows)
    assert hf_offload.stats(streamed)["layer_loads"] <= LAYERS * 2
    want = build(reference, "plain").evaluate(rows)
    assert got.keys() == want.keys()
    for key in want:
        if not key.endswith(("_time", "_runtime", "_per_second")):
            assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL), key
    assert calls["streamed"] == calls["plain"]  # batch_eval_metrics: compute_result only on the last batch


def test_bench_compares_the_two_schedules_side_by_side():
    from hf_offload.commands.bench.eval_schedule import compare, table

    result = compare(preset="tiny", batches=3, batch=1, seq=8, device="cpu", repeats=1)
    batch_major, layer_major = result["rows"]
    assert batch_major["layer_loads"] == 3 * layer_major["layer_loads"] == 3 * result["settings"]["layers"]
    assert batch_major["bytes_to_device"] == 3 * layer_major["bytes_to_device"] > 0
    assert result["max_loss_difference"] == 0
    assert "layer-major / batch-major" in table(result)


def test_parked_hidden_states_come_back_unchanged():
    """Parking (what an accelerator does between layers) forced on the CPU: the same tensors come back."""
    from hf_offload.engine.layer_major import LayerMajorSchedule

    reference, streamed = _pair(build_dense("qwen3"))
    batches = _batches(3)
    runtime = hf_offload.api.get_runtime(streamed)
    schedule = LayerMajorSchedule(runtime, park=True)
    hf_offload.reset_stats(streamed)
    with torch.no_grad():
        outputs = schedule.run([lambda b=b: streamed(**b, output_hidden_states=True) for b in batches])
        expected = [reference(**b, output_hidden_states=True) for b in batches]
    stats = hf_offload.stats(streamed)
    # at every layer each batch waits with its [batch, tokens, hidden] state parked: out once and back once
    hidden_bytes = sum(b["input_ids"].numel() for b in batches) * 32 * 4
    assert stats["bytes_to_host"] == stats["bytes_from_host_activations"] == LAYERS * hidden_bytes
    assert stats["layer_loads"] == LAYERS
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got.logits, want.logits, rtol=LOSS_RTOL, atol=1e-5)
        for got_state, want_state in zip(got.hidden_states, want.hidden_states, strict=True):
            torch.testing.assert_close(got_state, want_state, rtol=LOSS_RTOL, atol=1e-5)


def test_plan_reports_an_evaluation_both_ways(tmp_path):
    """A 70B-shaped evaluation of 63 batches of 8 x 512 tokens: 8.6 TB batch by batch, a group's worth layer-major."""
    import json
    import math

    from hf_offload.commands.plan import format_plan, load_config, make_plan

    path = tmp_path / "config.json"
    shape = dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64)
    path.write_text(json.dumps(dict(model_type="llama", num_key_value_heads=8, vocab_size=128256, **shape)))
    config = load_config(str(path))
    plan = make_plan(config, gpu_mem_gb=80, host_mem_gb=1000, batch=8, seq=512, eval_batches=63)
    evaluation = plan["evaluation"]
    store = plan["host_bytes"]  # the layers' bytes (no offloaded activations)
    assert evaluation["batch_major_bytes"] == 63 * store and 8.4e12 < 63 * store < 8.9e12
    assert 1 < evaluation["group_size"] < 63  # the logits of a group must fit in the GPU's spare memory
    assert evaluation["layer_major_bytes"] == math.ceil(63 / evaluation["group_size"]) * store
    assert evaluation["layer_major_seconds"] < evaluation["batch_major_seconds"] / 3
    assert "layer-major (groups of" in format_plan(plan)
    unbounded = make_plan(config, host_mem_gb=1000, batch=8, seq=512, eval_batches=63)["evaluation"]
    assert unbounded["group_size"] == 63 and unbounded["layer_major_bytes"] == store


def test_generate_runs_one_pass_over_the_layers_per_token_for_the_whole_group():
    reference, streamed = _pair(build_dense("llama"))
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _batches(3)]
    new_tokens = 3

    def generate(model, batch):
        return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    expected = [generate(reference, b) for b in batches]
    hf_offload.reset_stats(streamed)
    outputs = list(evaluate_layer_major(streamed, batches, forward=generate))
    assert hf_offload.stats(streamed)["layer_loads"] == LAYERS * new_tokens  # not x 3 batches
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)


def test_the_launch_patch_evaluates_a_plain_trainer_layer_major(tmp_path):
    """`hf-offload launch` patches transformers.Trainer in place: its evaluate() runs layer-major too."""
    from transformers import Trainer, TrainingArguments

    from hf_offload.integrations.trainer import patch_trainer, unpatch_trainer

    reference, streamed = _trainer_models(build_dense("llama"), moe=False)
    rows = _token_rows(10, seed=6)
    args = dict(per_device_eval_batch_size=3, report_to="none", use_cpu=True, disable_tqdm=True)
    want = Trainer(
        model=reference, args=TrainingArguments(tmp_path / "plain", **args), data_collator=_collate
    ).evaluate(rows)
    patch_trainer()
    try:
        trainer = Trainer(model=streamed, args=TrainingArguments(tmp_path / "patched", **args), data_collator=_collate)
        hf_offload.reset_stats(streamed)
        got = trainer.evaluate(rows)
    finally:
        unpatch_trainer()
    assert hf_offload.stats(streamed)["layer_loads"] == LAYERS
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=LOSS_RTOL)
