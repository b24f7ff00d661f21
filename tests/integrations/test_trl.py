"""TRL's trainers beyond SFT with streaming on (the in-place patch `hf-offload launch` installs): the same training
as without streaming. DPO needs no separate reference model: given a peft model, TRL computes the reference with a
copy of the initial adapter ("ref"), through the same streamed layers; when streaming adds LoRA itself, with the
adapter disabled. (`tools/trl_trainers.py` runs DPO, KTO, ORPO, reward modelling and GRPO under the launcher.)"""

from __future__ import annotations

import copy

import pytest
import torch

import hf_offload
from hf_offload.integrations.plugin import ENV_VAR, LayerStreamingPlugin
from hf_offload.integrations.trainer import patch_trainer, unpatch_trainer

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """A peft LoRA model over the tiny checkpoint, and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _preferences():
    from datasets import Dataset

    pairs = [(a, b) for a in range(4) for b in range(2)]
    return Dataset.from_list(
        [{"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"} for a, b in pairs]
    )


def _dpo(model, tokenizer, out, ref_model=None):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none",
        use_cpu=True, disable_tqdm=True, learning_rate=1e-2, optim="adamw_torch", max_length=32, save_strategy="no",
        bf16=False, gradient_checkpointing=False, seed=3,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer, train_dataset=_preferences()
    )
    trainer.train()
    return trainer


def test_dpo_streams_policy_and_reference_and_trains_as_without_streaming(policy, tmp_path, monkeypatch):
    model, tokenizer = policy
    plain = _dpo(copy.deepcopy(model), tokenizer, tmp_path / "plain")
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin().to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = _dpo(copy.deepcopy(model), tokenizer, tmp_path / "streamed")
    finally:
        unpatch_trainer()
    assert hf_offload.is_streaming(streamed.model) and streamed.ref_model is None  # no separate reference model
    keys = ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"]
    plain_lines = [[h[k] for k in keys] for h in plain.state.log_history if "loss" in h]
    streamed_lines = [[h[k] for k in keys] for h in streamed.state.log_history if "loss" in h]
    assert len(plain_lines) == 2
    for ours, theirs in zip(streamed_lines, plain_lines):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    assert plain_lines[1][1] != 0  # after a step the policy has moved away from the reference: rewards are not 0
    assert all("offload/h2d_GB" in h for h in streamed.state.log_history if "loss" in h)
    assert hf_offload.stats(streamed.model)["layer_loads"] > 0
    streamed.save_model()
    assert (tmp_path / "streamed" / "adapter_model.safetensors").is_file()


def test_dpo_with_a_separate_reference_model_streams_it_too(policy, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, tokenizer = policy

    def reference():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    plain = _dpo(copy.deepcopy(model), tokenizer, tmp_path / "plain", ref_model=reference())
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin().to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = _dpo(copy.deepcopy(model), tokenizer, tmp_path / "streamed", ref_model=reference())
    finally:
        unpatch_trainer()
    assert hf_offload.is_streaming(streamed.model) and hf_offload.is_streaming(streamed.ref_model)
    assert not any(p.requires_grad for p in streamed.ref_model.parameters())
    keys = ["loss", "rewards/chosen", "logps/chosen", "logps/rejected"]
    plain_lines = [[h[k] for k in keys] for h in plain.state.log_history if "loss" in h]
    streamed_lines = [[h[k] for k in keys] for h in streamed.state.log_history if "loss" in h]
    assert len(plain_lines) == 2
    for ours, theirs in zip(streamed_lines, plain_lines):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    assert hf_offload.stats(streamed.ref_model)["layer_loads"] > 0  # the reference computed through streaming


def test_a_reward_model_gets_sequence_classification_lora_with_its_score_head_trained(tiny_model_dir):
    """What TRL's reward script trains: LoRA of task SEQ_CLS, so peft also trains (and saves) the new score head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    streamed = LayerStreamingPlugin(lora_r=4).prepare_model(model, device="cpu")
    assert type(streamed).__name__ == "PeftModelForSequenceClassification" and hf_offload.is_streaming(streamed)
    score = [name for name, p in streamed.named_parameters() if "score" in name and p.requires_grad]
    assert score, "the score head must train"
    ids = torch.tensor([[5, 6, 7, 8]])
    streamed(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for name, p in streamed.named_parameters() if name in score)


def _length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


def _grpo(model, tokenizer, out):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none",
        use_cpu=True, disable_tqdm=True, learning_rate=1e-2, optim="adamw_torch", save_strategy="no", bf16=False,
        gradient_checkpointing=False, seed=3, num_generations=2, max_completion_length=6, generation_batch_size=4,
    )  # fmt: skip
    prompts = Dataset.from_list([{"prompt": f"{a} + {b} ="} for a in range(4) for b in range(2)])
    trainer = GRPOTrainer(
        model=model, reward_funcs=_length_reward, args=args, processing_class=tokenizer, train_dataset=prompts
    )
    trainer.train()
    return trainer


def test_grpo_generates_through_streaming_and_trains_as_without(policy, tmp_path, monkeypatch):
    model, tokenizer = policy
    plain = _grpo(copy.deepcopy(model), tokenizer, tmp_path / "plain")
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin().to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = _grpo(copy.deepcopy(model), tokenizer, tmp_path / "streamed")
    finally:
        unpatch_trainer()
    assert hf_offload.is_streaming(streamed.model)
    keys = ["loss", "reward", "completions/mean_length", "grad_norm"]
    plain_lines = [[h[k] for k in keys] for h in plain.state.log_history if "loss" in h]
    streamed_lines = [[h[k] for k in keys] for h in streamed.state.log_history if "loss" in h]
    assert len(plain_lines) == 2
    for ours, theirs in zip(streamed_lines, plain_lines):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    # generate() runs the layers once per generated token: many more layer acquisitions than 2 training steps' own
    counts = hf_offload.stats(streamed.model)
    layers = hf_offload.summary(streamed.model).layers
    assert counts["layer_loads"] + counts["layer_reuses"] > 2 * 2 * 2 * layers


def _streamed_and_plain(run, model, tmp_path, monkeypatch):
    """`run(model, out)` without streaming, then under the launcher's patch, each on its own copy of `model`."""
    plain = run(copy.deepcopy(model), tmp_path / "plain")
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin().to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = run(copy.deepcopy(model), tmp_path / "streamed")
    finally:
        unpatch_trainer()
    assert hf_offload.is_streaming(streamed.model)
    return plain, streamed


def _assert_same_lines(plain, streamed, keys):
    plain_lines = [[h[k] for k in keys] for h in plain.state.log_history if "loss" in h]
    streamed_lines = [[h[k] for k in keys] for h in streamed.state.log_history if "loss" in h]
    assert len(plain_lines) == 2
    for ours, theirs in zip(streamed_lines, plain_lines):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    assert all("offload/h2d_GB" in h for h in streamed.state.log_history if "loss" in h)
    assert hf_offload.stats(streamed.model)["layer_loads"] > 0


COMMON = dict(
    max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
    learning_rate=1e-2, optim="adamw_torch", save_strategy="no", bf16=False, seed=3,
)  # fmt: skip


def test_kto_trains_as_without_streaming(policy, tmp_path, monkeypatch):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    model, tokenizer = policy
    pairs = [(a, b) for a in range(4) for b in range(2)]
    data = Dataset.from_list(
        [
            {"prompt": f"{a} + {b} =", "completion": f" {a + b + k % 2}", "label": k % 2 == 0}
            for k, (a, b) in enumerate(pairs)
        ]
    )

    def run(model, out):
        args = KTOConfig(output_dir=str(out), max_length=32, gradient_checkpointing=False, **COMMON)
        trainer = KTOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data)
        trainer.train()
        return trainer

    plain, streamed = _streamed_and_plain(run, model, tmp_path, monkeypatch)
    _assert_same_lines(plain, streamed, ["loss", "logps/chosen", "logps/rejected", "kl"])


def test_orpo_trains_as_without_streaming(policy, tmp_path, monkeypatch):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tokenizer = policy

    def run(model, out):
        args = ORPOConfig(output_dir=str(out), max_length=32, **COMMON)
        trainer = ORPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=_preferences())
        trainer.train()
        return trainer

    plain, streamed = _streamed_and_plain(run, model, tmp_path, monkeypatch)
    _assert_same_lines(plain, streamed, ["loss", "log_odds_ratio", "nll_loss"])


def test_reward_modelling_trains_as_without_streaming(tiny_model_dir, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"))

    def run(model, out):
        args = RewardConfig(output_dir=str(out), max_length=32, gradient_checkpointing=False, **COMMON)
        trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=_preferences())
        trainer.train()
        return trainer

    plain, streamed = _streamed_and_plain(run, model, tmp_path, monkeypatch)
    _assert_same_lines(plain, streamed, ["loss", "grad_norm"])
