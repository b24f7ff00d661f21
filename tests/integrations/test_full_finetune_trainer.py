"""Full fine-tuning through the Trainer: an unmodified Trainer script, run plainly and under the launcher's patch with
full_finetune, logs the same losses, saves the same weights and resumes exactly (fp32, CPU, dropout on)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from faces import token_dataset
from families import build
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_offload
from hf_offload import OffloadTrainer, OffloadTrainingArguments
from hf_offload.api import get_runtime
from hf_offload.integrations.plugin import ENV_VAR, LayerStreamingPlugin
from hf_offload.integrations.trainer import TRAINER_DEFAULT_OPTIM, patch_trainer, unpatch_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5


@pytest.fixture(scope="module")
def base():
    return build("llama")


@pytest.fixture
def launched(monkeypatch):
    """What `hf-offload launch --full_finetune -- python train.py ...` sets up in the script's process."""
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(full_finetune=True).to_env()[ENV_VAR])
    patch_trainer()
    yield
    unpatch_trainer()


def script(model, output_dir, resume=None, **overrides) -> Trainer:
    """The user's training script: a plain Trainer, full fine-tuning, AdamW, default clipping (max_grad_norm=1)."""
    options = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        weight_decay=0.01,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
    )
    options.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=token_dataset(32))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


def logged(trainer, key: str = "loss") -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def assert_close_values(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys() and expected
    torch.testing.assert_close(
        torch.tensor(list(found.values())), torch.tensor(list(expected.values())), rtol=RTOL, atol=0
    )


def saved_weights(folder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def assert_same_weights(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        rel = float((found[name] - value).norm() / value.norm())
        assert rel <= RTOL, f"{name}: relative error {rel:.2e}"


def test_the_same_trainer_script_trains_and_saves_the_same_model(base, tmp_path, monkeypatch):
    plain = script(copy.deepcopy(base), tmp_path / "plain")
    assert not hf_offload.is_streaming(plain.model)

    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(full_finetune=True).to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = script(copy.deepcopy(base), tmp_path / "streamed")
        assert hf_offload.is_streaming(streamed.model)
        assert get_runtime(streamed.model).trainable is not None
        assert not any("lora" in name for name, _ in streamed.model.named_parameters())
        assert type(streamed.optimizer.optimizer) is torch.optim.AdamW
        # the grad norm is above max_grad_norm=1 on some steps: clipping is exercised
        assert any(norm > 1.0 for norm in logged(plain, "grad_norm").values())

        assert_close_values(logged(streamed), logged(plain))
        assert_close_values(logged(streamed, "grad_norm"), logged(plain, "grad_norm"))
        files = set(os.listdir(tmp_path / "streamed"))
        assert "model.safetensors" in files or "model.safetensors.index.json" in files
        assert not any(name.startswith("adapter_") for name in files)
        card = (tmp_path / "streamed" / "README.md").read_text()
        assert "Every weight of this model was fine-tuned" in card and "PeftModel" not in card
        final = saved_weights(tmp_path / "plain")
        assert_same_weights(saved_weights(tmp_path / "streamed"), final)
        mid = saved_weights(tmp_path / "plain" / "checkpoint-2")
        assert_same_weights(saved_weights(tmp_path / "streamed" / "checkpoint-2"), mid)

        # resume from the mid-run checkpoint: the remaining steps log the uninterrupted losses
        checkpoint = str(tmp_path / "streamed" / "checkpoint-2")
        resumed = script(copy.deepcopy(build("llama", seed=5)), tmp_path / "resumed", resume=checkpoint)
        assert hf_offload.is_streaming(resumed.model)
        after = {step: loss for step, loss in logged(resumed).items() if step > 2}
        assert_close_values(after, {step: loss for step, loss in logged(plain).items() if step > 2})
        assert_same_weights(saved_weights(tmp_path / "resumed"), final)
    finally:
        unpatch_trainer()


def test_offload_trainer_flag_and_defaults(base, tmp_path):
    """--layer_streaming --offload_full_finetune: no LoRA, the Trainer's default optimizer, full checkpoints."""
    args = OffloadTrainingArguments(
        output_dir=str(tmp_path),
        layer_streaming=True,
        offload_full_finetune=True,
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    assert args.optim == TRAINER_DEFAULT_OPTIM  # 'auto' keeps the Trainer's default with full fine-tuning
    trainer = OffloadTrainer(model=copy.deepcopy(base), args=args, train_dataset=token_dataset())
    trainer.train()
    assert get_runtime(trainer.model).trainable is not None
    assert not any("lora" in name for name, _ in trainer.model.named_parameters())


def test_full_finetune_and_save_merged_are_refused_together():
    with pytest.raises(ValueError, match="full_finetune.*save_merged"):
        LayerStreamingPlugin(full_finetune=True, save_merged=True)


def test_the_default_host_adamw_equals_plain_adamw_torch(base, tmp_path, monkeypatch):
    """The Trainer's default under full fine-tuning is HostAdamW (layers stepped during the last backward of each
    accumulation): same losses, grad norms and weights as the plain run's adamw_torch, clipping active on some steps
    (max_grad_norm=1) and not on others; resume from its mid-run checkpoint reproduces the rest."""
    plain = script(copy.deepcopy(base), tmp_path / "plain")
    norms = logged(plain, "grad_norm").values()
    assert any(norm > 1.0 for norm in norms) and any(norm <= 1.0 for norm in norms)

    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(full_finetune=True).to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = script(copy.deepcopy(base), tmp_path / "streamed", optim=TRAINER_DEFAULT_OPTIM)
        optimizer = streamed.optimizer.optimizer
        assert type(optimizer).__name__ == "HostAdamW"
        # 4 layers x 4 steps stepped during backward; redone on the 3 steps that clipped
        assert optimizer.layers_stepped_during_backward == 16
        assert optimizer.layers_rolled_back == 4 * sum(norm > 1.0 for norm in norms)
        assert_close_values(logged(streamed), logged(plain))
        assert_close_values(logged(streamed, "grad_norm"), logged(plain, "grad_norm"))
        assert_same_weights(saved_weights(tmp_path / "streamed"), saved_weights(tmp_path / "plain"))

        checkpoint = str(tmp_path / "streamed" / "checkpoint-2")
        resumed = script(build("llama", seed=5), tmp_path / "resumed", resume=checkpoint, optim=TRAINER_DEFAULT_OPTIM)
        after = {step: loss for step, loss in logged(resumed).items() if step > 2}
        assert_close_values(after, {step: loss for step, loss in logged(plain).items() if step > 2})
        assert_same_weights(saved_weights(tmp_path / "resumed"), saved_weights(tmp_path / "plain"))
    finally:
        unpatch_trainer()


def test_offload_accelerator_full_finetune_with_an_optimizer_made_before(base):
    """A plain accelerate loop: the optimizer made before prepare() holds the parameters that train (no LoRA)."""
    from families import VOCAB
    from parity import left_padded_batch

    from hf_offload.integrations.accelerator import OffloadAccelerator

    model = copy.deepcopy(base)
    reference = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = OffloadAccelerator(cpu=True, layer_streaming_plugin=LayerStreamingPlugin(full_finetune=True))
    model, optimizer = accelerator.prepare(model, optimizer)
    assert get_runtime(model).trainable is not None
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    batch = left_padded_batch(VOCAB)
    model.eval()  # no dropout: the two loops draw random numbers differently around prepare()
    reference.eval()
    accelerator.backward(model(**batch).loss)
    optimizer.step()
    reference(**batch).loss.backward()
    ref_optimizer.step()
    weights = {name: p.detach() for name, p in model.named_parameters()}
    assert_same_weights(weights, {name: p.detach() for name, p in reference.named_parameters()})


def test_host_adamw_keeps_its_early_steps_without_clipping(base, tmp_path, monkeypatch):
    """max_grad_norm=0: the Trainer only measures the norm (a multiplication by 1.0); nothing is rolled back."""
    plain = script(copy.deepcopy(base), tmp_path / "plain", max_grad_norm=0.0, save_strategy="no", max_steps=2)
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(full_finetune=True).to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = script(
            copy.deepcopy(base), tmp_path / "streamed", max_grad_norm=0.0, save_strategy="no", max_steps=2,
            optim=TRAINER_DEFAULT_OPTIM,
        )  # fmt: skip
        optimizer = streamed.optimizer.optimizer
        assert optimizer.layers_stepped_during_backward == 8 and optimizer.layers_rolled_back == 0
        assert_close_values(logged(streamed), logged(plain))
        assert_same_weights(saved_weights(tmp_path / "streamed"), saved_weights(tmp_path / "plain"))
    finally:
        unpatch_trainer()


def test_bf16_autocast_trains_like_the_plain_run(base, tmp_path, monkeypatch):
    """--bf16 (autocast on the CPU) with an fp32 model: the recompute runs under the forward's autocast state."""
    common = dict(bf16=True, save_strategy="no", max_steps=2)
    plain = script(copy.deepcopy(base), tmp_path / "plain", **common)
    monkeypatch.setenv(ENV_VAR, LayerStreamingPlugin(full_finetune=True).to_env()[ENV_VAR])
    patch_trainer()
    try:
        streamed = script(copy.deepcopy(base), tmp_path / "streamed", **common)
        assert_close_values(logged(streamed), logged(plain))
        assert_same_weights(saved_weights(tmp_path / "streamed"), saved_weights(tmp_path / "plain"))
    finally:
        unpatch_trainer()


def test_early_layer_steps_off_gives_a_host_adamw_that_steps_everything_in_step():
    """--offload_early_layer_steps false: HostAdamW without step_during_backward (no rollback copies)."""
    from types import SimpleNamespace

    from hf_offload.engine.host_optimizer import HostAdamW
    from hf_offload.integrations.trainer import _host_adamw

    args = SimpleNamespace(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-7)
    assert LayerStreamingPlugin().early_layer_steps is True
    assert LayerStreamingPlugin(early_layer_steps=False).early_layer_steps is False
    cls, kwargs = _host_adamw(None, args, early=False)
    assert cls is HostAdamW and kwargs["step_during_backward"] is None
    assert kwargs["lr"] == 1e-4 and kwargs["betas"] == (0.9, 0.99) and kwargs["eps"] == 1e-7
    _, kwargs = _host_adamw(None, args)
    assert callable(kwargs["step_during_backward"])


def _wide_llama(seed=0):
    """The tiny llama, wide enough that its projections (>= 4096 values) get 8-bit moments."""
    from families import FAMILIES, instantiate

    config_class, kwargs = FAMILIES["llama"]
    return instantiate(config_class, dict(kwargs, hidden_size=64, intermediate_size=128), seed=seed)


def test_host_optimizer_bits_8_trains_and_resumes_exactly(tmp_path, monkeypatch):
    """host_optimizer_bits=8: the Trainer's HostAdamW keeps 8-bit moments; its checkpoint (optimizer.pt) resumes to
    the uninterrupted run's weights bit for bit."""
    plugin = LayerStreamingPlugin(full_finetune=True, host_optimizer_bits=8)
    monkeypatch.setenv(ENV_VAR, plugin.to_env()[ENV_VAR])
    patch_trainer()
    try:
        straight = script(_wide_llama(), tmp_path / "straight", optim=TRAINER_DEFAULT_OPTIM)
        optimizer = straight.optimizer.optimizer
        assert type(optimizer).__name__ == "HostAdamW" and optimizer.state_bits == 8
        q_proj = straight.model.model.layers[0].self_attn.q_proj.weight
        assert optimizer.state[q_proj]["exp_avg"].dtype == torch.uint8
        assert optimizer.layers_stepped_during_backward == 16

        checkpoint = str(tmp_path / "straight" / "checkpoint-2")
        resumed = script(_wide_llama(seed=5), tmp_path / "resumed", resume=checkpoint, optim=TRAINER_DEFAULT_OPTIM)
        after = {step: loss for step, loss in logged(resumed).items() if step > 2}
        assert after == {step: loss for step, loss in logged(straight).items() if step > 2}
        final, again = saved_weights(tmp_path / "straight"), saved_weights(tmp_path / "resumed")
        for name, tensor in final.items():
            assert torch.equal(again[name], tensor), name
    finally:
        unpatch_trainer()


def test_host_optimizer_bits_is_refused_without_host_adamw(base, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="host_optimizer_bits.*full_finetune"):
        LayerStreamingPlugin(host_optimizer_bits=8)
    plugin = LayerStreamingPlugin(full_finetune=True, host_optimizer_bits=8)
    monkeypatch.setenv(ENV_VAR, plugin.to_env()[ENV_VAR])
    patch_trainer()
    try:
        with pytest.raises(ValueError, match="host_optimizer_bits 8 sets the state of hf_offload's host AdamW"):
            script(copy.deepcopy(base), tmp_path, optim="adamw_torch")
    finally:
        unpatch_trainer()
