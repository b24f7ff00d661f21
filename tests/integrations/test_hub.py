"""The Hub: merged checkpoints that plain transformers loads, the model card, and push_to_hub (upload intercepted)."""

from __future__ import annotations

import copy
import fnmatch
import os
import shutil
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
from faces import tiny_args, token_dataset
from families import VOCAB, build
from parity import eval_logits, left_padded_batch, with_lora
from peft import PeftModel
from transformers import AutoModelForCausalLM

import hf_offload
from hf_offload import OffloadConfig, OffloadTrainer
from hf_offload.integrations.hub import add_to_model_card, save_merged

pytestmark = pytest.mark.usefixtures("one_thread")


def _streamed_lora(family="llama", **lora):
    model = with_lora(build(family), **lora)  # B initialised non-zero: the merge really changes the weights
    return hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))


@pytest.mark.parametrize(
    "family, lora",
    [("llama", {}), ("gpt2", {}), ("llama", {"modules_to_save": ["lm_head"]})],
    ids=["llama", "gpt2-conv1d", "llama-modules-to-save"],
)
def test_merged_checkpoint_loads_with_plain_transformers_and_gives_the_same_logits(tmp_path, family, lora):
    model = _streamed_lora(family, **lora)
    batch = left_padded_batch(VOCAB)
    host_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = eval_logits(model, batch)

    files = save_merged(model, str(tmp_path), max_shard_size=20_000)  # small shards: several files and an index
    assert "model.safetensors.index.json" in files and len(files) > 3

    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in n or "base_layer" in n or "modules_to_save" in n for n in merged.state_dict())
    torch.testing.assert_close(eval_logits(merged, batch), expected, rtol=1e-5, atol=1e-5)
    # the streamed model is untouched: same host weights, same logits
    for name, param in model.named_parameters():
        assert torch.equal(param, host_before[name]), name
    torch.testing.assert_close(eval_logits(model, batch), expected, rtol=0, atol=0)


def test_merge_differs_from_the_base_model(tmp_path):
    """Proves the logits test above can fail: the merged weights are not the base weights."""
    model = _streamed_lora()
    save_merged(model, str(tmp_path))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    batch = left_padded_batch(VOCAB)
    assert not torch.allclose(eval_logits(merged, batch), eval_logits(build("llama"), batch), atol=1e-4)


def test_a_second_merged_save_leaves_no_stale_shards(tmp_path):
    model = _streamed_lora()
    save_merged(model, str(tmp_path), max_shard_size=20_000)
    assert save_merged(model, str(tmp_path)) == ["model.safetensors", "config.json"]
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    batch = left_padded_batch(VOCAB)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(eval_logits(merged, batch), eval_logits(model, batch), rtol=1e-5, atol=1e-5)


def test_merge_refuses_dora(tmp_path):
    model = _streamed_lora(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        save_merged(model, str(tmp_path))


def test_model_card_section_is_added_once(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n# my model\n\nSome words.\n")
    for _ in range(2):
        add_to_model_card(str(tmp_path), base_model="org/base", repo_id="me/tuned", merged=True)
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Trained with hf_offload") == 1
    assert "Some words." in text and "- hf_offload" in text and "base_model: org/base" in text
    assert 'PeftModel.from_pretrained(base, "me/tuned")' in text
    assert 'from_pretrained("me/tuned", subfolder="merged")' in text


class FakeHub:
    """Stands in for the Hub: create_repo answers, upload_folder copies what would be uploaded into `remote`."""

    def __init__(self, remote):
        self.remote = remote
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, **kwargs):
        self.uploads.append(repo_id)
        target = os.path.join(self.remote, path_in_repo or "")
        for root, _, files in os.walk(folder_path):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), folder_path)
                if any(fnmatch.fnmatch(rel, pattern) for pattern in ignore_patterns or []):
                    continue
                os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
                shutil.copy(os.path.join(root, name), os.path.join(target, rel))
        info = SimpleNamespace(repo_id=repo_id)
        if kwargs.get("run_as_future"):
            future = Future()
            future.set_result(info)
            return future
        return info


def test_push_to_hub_uploads_an_adapter_plain_peft_loads_and_a_merged_model(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(str(tmp_path / "remote"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, *a, **k: hub.upload_folder(*a, **k))
    base_dir = tmp_path / "base"
    build("llama").save_pretrained(base_dir)  # a local "Hub checkpoint", loaded by path

    args = tiny_args(
        tmp_path / "out",
        layer_streaming=True,
        push_to_hub=True,
        hub_model_id="me/tiny-streamed",
        offload_save_merged=True,
    )
    trainer = OffloadTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir),
        args=args,
        train_dataset=token_dataset(),
        eval_dataset=token_dataset(8, seed=3),
    )
    trainer.train()
    streamed_eval = trainer.evaluate()["eval_loss"]
    trainer.push_to_hub()

    remote = tmp_path / "remote"
    assert hub.uploads and set(hub.uploads) == {"me/tiny-streamed"}
    assert (remote / "adapter_model.safetensors").is_file() and (remote / "adapter_config.json").is_file()
    card = (remote / "README.md").read_text()
    assert "Trained with hf_offload" in card and f'AutoModelForCausalLM.from_pretrained("{base_dir}")' in card
    assert not any(name.startswith("checkpoint-") for name in os.listdir(remote))

    # plain peft, plain base model, nothing from hf_offload: the same eval loss as the streamed model
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), remote)
    check = OffloadTrainer(model=plain, args=tiny_args(tmp_path / "check"), eval_dataset=token_dataset(8, seed=3))
    assert not hf_offload.is_streaming(check.model)
    assert check.evaluate()["eval_loss"] == pytest.approx(streamed_eval, rel=1e-6)

    merged = AutoModelForCausalLM.from_pretrained(remote / "merged")
    batch = left_padded_batch(VOCAB)
    torch.testing.assert_close(eval_logits(merged, batch), eval_logits(trainer.model, batch), rtol=1e-5, atol=1e-5)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), remote)
    torch.testing.assert_close(eval_logits(merged, batch), eval_logits(adapted, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eval_logits(merged, batch), eval_logits(copy.deepcopy(build("llama")), batch))
