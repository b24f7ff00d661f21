"""What users did that once went silently wrong, lost data or failed deep inside torch; each test is named after it.

Every case either gives the result the unstreamed model gives, or stops up front with a clear error that names the
way out.
"""

from __future__ import annotations

import copy
import math
import os
import types

import pytest
import torch
from families import VOCAB, build
from parity import left_padded_batch, reference_and_streamed, with_lora
from torch import nn

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.engine import hostmem
from hf_offload.integrations.trainer import state_of

CPU = OffloadConfig(device="cpu")


# --- copies ----------
def test_deepcopy_of_a_streamed_model_is_refused():
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, CPU)
    for target in (model, model.get_base_model(), model.get_base_model().model):
        with pytest.raises(RuntimeError, match="deepcopy of a model whose decoder layers stream"):
            copy.deepcopy(target)


def test_deepcopy_of_an_experts_module_alone_of_a_streamed_model_is_refused():
    import moe_families

    model = moe_families.with_expert_lora(moe_families.build("qwen3_moe"), "qwen3_moe")
    hf_offload.enable_layer_streaming(model, CPU)
    experts = model.get_base_model().model.layers[1].mlp.experts
    assert hf_offload.stats(model) is not None and "forward" in vars(experts)  # routed fetch is installed on it
    with pytest.raises(RuntimeError, match=r"or of a module hf_offload runs for it \(an experts module"):
        copy.deepcopy(experts)
    hf_offload.disable_layer_streaming(model)
    clone = copy.deepcopy(experts)  # an ordinary module again: copies like one
    hidden, index = torch.randn(5, 32), torch.randint(0, 8, (5, 2))
    weights = torch.rand(5, 2)
    torch.testing.assert_close(clone(hidden, index, weights), experts(hidden, index, weights), rtol=0, atol=0)


@pytest.mark.parametrize("module", ["the tiled MLP of a layer", "the output head"])
def test_deepcopy_of_a_module_hf_offload_gave_its_own_forward_is_refused(module):
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", mlp_tile_tokens=4))
    base = model.get_base_model()
    target = base.model.layers[0].mlp if module == "the tiled MLP of a layer" else base.lm_head
    assert "forward" in vars(target)
    with pytest.raises(RuntimeError, match=r"runs for it \((an MLP|the output head) of a streamed"):
        copy.deepcopy(target)


def test_deepcopy_after_disabling_streaming_works():
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, CPU)
    hf_offload.disable_layer_streaming(model)
    clone = copy.deepcopy(model)
    assert not hf_offload.is_streaming(clone)


# --- KV caches with gradients enabled ----------
def _eval_pair():
    reference, streamed = reference_and_streamed(build("llama"))
    reference.eval()
    streamed.eval()
    return reference, streamed


def test_decoding_from_a_cache_filled_with_gradients_enabled_matches_vanilla():
    reference, streamed = _eval_pair()
    ids = left_padded_batch(VOCAB)["input_ids"][:1]
    prompt, nxt = ids[:, :8], ids[:, 8:9]
    logits = []
    for model in (reference, streamed):
        cache = model(input_ids=prompt, use_cache=True).past_key_values  # gradients enabled
        assert cache.get_seq_length() == prompt.shape[1]
        with torch.no_grad():
            logits.append(model(input_ids=nxt, past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)


def test_a_training_forward_with_use_cache_keeps_exact_gradients():
    reference, streamed = reference_and_streamed(build("llama"))
    batch = left_padded_batch(VOCAB)
    grads = []
    for model in (reference, streamed):
        model.train()
        torch.manual_seed(0)
        out = model(**batch, use_cache=True)
        assert out.past_key_values.get_seq_length() == batch["input_ids"].shape[1]
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_training_a_completion_on_a_prompts_cache_is_refused_clearly():
    _, streamed = _eval_pair()
    ids = left_padded_batch(VOCAB)["input_ids"][:1]
    cache = streamed(input_ids=ids[:, :8], use_cache=True).past_key_values
    with pytest.raises(NotImplementedError, match="pre-filled KV cache.*one sequence"):
        streamed(input_ids=ids[:, 8:], past_key_values=cache, use_cache=True).logits.sum().backward()


class _LegacyBlock(nn.Module):
    """A custom-code block in the old style: `layer_past=(k, v)` in, `(hidden, present)` out only with use_cache."""

    def __init__(self, hidden: int):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, hidden, layer_past=None, use_cache=False):
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        if layer_past is not None:
            k, v = torch.cat([layer_past[0], k], dim=1), torch.cat([layer_past[1], v], dim=1)
        attn = torch.softmax(q @ k.transpose(1, 2) / k.shape[-1] ** 0.5, dim=-1) @ v
        hidden = hidden + self.out(attn)
        return (hidden, (k, v)) if use_cache else (hidden,)


class _LegacyModel(nn.Module):
    def __init__(self, hidden: int = 16, layers: int = 3):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=layers)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.h = nn.ModuleList(_LegacyBlock(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, ids, past=None, use_cache=False):
        hidden, presents = self.embed(ids), []
        for i, block in enumerate(self.h):
            outputs = block(hidden, layer_past=None if past is None else past[i], use_cache=use_cache)
            hidden = outputs[0]
            if use_cache:
                presents.append(outputs[1])  # IndexError if use_cache were rewritten inside the block
        return self.head(hidden), presents


def test_a_custom_model_with_legacy_tuple_caches_trains_through_its_cache_like_vanilla():
    torch.manual_seed(0)
    base = _LegacyModel()
    models = [with_lora(copy.deepcopy(base), target_modules=["qkv", "out"], lora_dropout=0.0) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    hf_offload.enable_layer_streaming(models[1], CPU)
    ids = left_padded_batch(VOCAB)["input_ids"][:2]
    results = []
    for model in models:
        model.zero_grad()
        _, past = model(ids[:, :6], use_cache=True)
        logits, presents = model(ids[:, 6:], past=past, use_cache=True)
        assert presents[0][0].shape[1] == ids.shape[1]
        loss = logits.square().mean() + sum(k.sum() * 1e-3 for k, _ in presents)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    for name, g in results[0][1].items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-4, atol=1e-7, msg=name)


# --- trainable weights changed between forward and backward ----------
def test_changing_lora_weights_in_place_between_forward_and_backward_raises_like_vanilla():
    reference, streamed = reference_and_streamed(build("llama"))
    batch = left_padded_batch(VOCAB)
    for model in (reference, streamed):
        loss = model(**batch).loss
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# --- loading weights ----------
def test_load_state_dict_with_assign_into_streamed_weights_is_refused():
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, CPU)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="assign=True"):
        model.load_state_dict(state, assign=True)
    adapters = {k: v for k, v in state.items() if "lora_" in k}
    model.load_state_dict(adapters, strict=False, assign=True)  # adapters live on the device: assigning is fine
    model.load_state_dict(state)  # copying into the store is fine


# --- streaming twice ----------
def test_enabling_streaming_on_the_inner_model_of_a_streamed_model_is_refused():
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, CPU)
    with pytest.raises(RuntimeError, match="already stream"):
        hf_offload.enable_layer_streaming(model.get_base_model().model, CPU)


def test_enabling_streaming_on_a_model_whose_inner_model_streams_is_refused():
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model.get_base_model().model, CPU)
    with pytest.raises(RuntimeError, match="already stream"):
        hf_offload.enable_layer_streaming(model, CPU)


def test_weights_shared_across_layers_are_refused_with_a_way_out():
    base = build("llama")
    base.model.layers[1].mlp.up_proj.weight = base.model.layers[0].mlp.up_proj.weight
    for p in base.parameters():
        p.requires_grad_(False)
    base.model.layers[0].input_layernorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="shared by decoder layers 0 and 1.*own copy"):
        hf_offload.enable_layer_streaming(base, CPU)


# --- host memory under cgroup v1 and v2 ----------
def _fake_tree(tmp_path, cgroup_lines: str, files: dict[str, str], mem_available_kb: int = 20_000_000):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 30000000 kB\nMemAvailable: {mem_available_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(proc), str(root)


def test_host_memory_check_reads_a_cgroup_v1_limit(tmp_path):
    proc, root = _fake_tree(
        tmp_path,
        "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
        {
            "memory/docker/abc/memory.limit_in_bytes": "800000000",
            "memory/docker/abc/memory.usage_in_bytes": "100000000",
        },
    )
    assert hostmem.available_bytes(proc, root) == 700_000_000


def test_host_memory_check_reads_a_cgroup_v1_limit_at_the_mount_root_inside_a_container(tmp_path):
    proc, root = _fake_tree(
        tmp_path,
        "4:memory:/docker/abc\n",
        {"memory/memory.limit_in_bytes": "800000000", "memory/memory.usage_in_bytes": "300000000"},
    )
    assert hostmem.available_bytes(proc, root) == 500_000_000


def test_host_memory_check_ignores_an_unlimited_cgroup_v1(tmp_path):
    proc, root = _fake_tree(
        tmp_path,
        "4:memory:/\n",
        {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "5"},
    )
    assert hostmem.available_bytes(proc, root) == 20_000_000 * 1024


def test_host_memory_check_reads_a_cgroup_v2_limit(tmp_path):
    proc, root = _fake_tree(
        tmp_path, "0::/user.slice\n", {"user.slice/memory.max": "1000000000", "user.slice/memory.current": "1"}
    )
    assert hostmem.available_bytes(proc, root) == 999_999_999


# --- hf-offload plan and bench ----------------------------------------------------------------------------------
@pytest.fixture
def tiny_config_json(tmp_path):
    path = tmp_path / "config.json"
    build("llama").config.to_json_file(str(path))
    return path


@pytest.mark.parametrize(
    "option, value",
    [
        ("--gpu_mem", "0"),
        ("--host_mem", "0"),
        ("--gpu_mem", "-8"),
        ("--pcie_gbps", "0"),
        ("--gpu_tflops", "-1"),
        ("--prefetch", "-1"),
        ("--pcie_gbps", "nan"),
    ],
)
def test_plan_with_a_zero_or_negative_number_is_refused(tiny_config_json, capsys, option, value):
    from hf_offload.commands.cli import main

    assert main(["plan", str(tiny_config_json), option, value]) == 2
    err = capsys.readouterr().err
    assert f"{option} should be" in err and "value passed" in err


def _deep_config(family: str, depth: int, **changes):
    """A moe_families config `depth` layers deep; a per-layer list in `changes` is repeated to the depth."""
    import transformers
    from moe_families import FAMILIES

    config_class, kwargs = FAMILIES[family]
    changes = {k: (v * depth)[:depth] if isinstance(v, list) and k == "layer_types" else v for k, v in changes.items()}
    return getattr(transformers, config_class)(**dict(kwargs, num_hidden_layers=depth, **changes))


MIXED_STACKS = {
    "qwen2_moe": dict(mlp_only_layers=[3, 10], decoder_sparse_step=2, max_window_layers=5),
    "deepseek_v3": dict(first_k_dense_replace=3),
    "jamba": dict(attn_layer_period=4, attn_layer_offset=2),
    "qwen3_next": dict(layer_types=["linear_attention"] * 3 + ["full_attention"]),
}


@pytest.mark.parametrize("family", sorted(MIXED_STACKS))
def test_plan_of_a_40_layer_mixed_config_gives_the_same_figures_by_layer_kind_as_layer_by_layer(family):
    from hf_offload.commands.model_sizes import measure
    from hf_offload.commands.plan import estimate

    config = _deep_config(family, 40, **MIXED_STACKS[family])
    by_kind, whole = measure(config), measure(config, every_layer=True)
    assert 1 < len(by_kind.kinds) < 40 and len(whole.kinds) == 40  # the shallow build was used, and it mixes kinds
    assert by_kind.layer_bytes == whole.layer_bytes and len(set(whole.layer_bytes)) > 1
    for name in ("total_params", "resident_bytes", "compute_params", "lora_tensors", "intermediate"):
        assert getattr(by_kind, name) == getattr(whole, name), name
    for options in ({}, {"base_weight_dtype": "nf4"}, {"base_weight_dtype": "int8"}, {"full_finetune": True}):
        assert estimate(by_kind, **options).as_dict() == estimate(whole, **options).as_dict(), options


@pytest.mark.parametrize("family", ["llama", "qwen3_next"])
def test_plan_of_a_config_with_100000_layers_plans_in_seconds(tmp_path, capsys, family):
    import json
    import time

    from hf_offload.commands.cli import main

    def plan(depth: int) -> dict:
        if family == "llama":
            config = build("llama").config
            config.num_hidden_layers = depth
        else:  # linear-attention layers, every fourth one full attention
            config = _deep_config(family, depth, **MIXED_STACKS[family])
        path = tmp_path / f"{depth}.json"
        config.to_json_file(str(path))
        start = time.perf_counter()
        assert main(["plan", str(path), "--host_mem", "1", "--json"]) == 0
        return dict(json.loads(capsys.readouterr().out), seconds=time.perf_counter() - start)

    four, eight = plan(4), plan(8)  # the first one imports everything, before the clock that counts
    deep = plan(100_000)
    # seconds, not the minutes of building 100,000 layers; an 8-layer plan's time allows for a loaded machine
    assert deep["seconds"] < max(5, 4 * eight["seconds"]), (deep["seconds"], eight["seconds"])
    assert deep["layers"] == 100_000
    # every four layers of either stack are like the first four
    assert deep["host_bytes"] == 25_000 * four["host_bytes"]
    assert deep["parameters"] - four["parameters"] == 24_999 * (eight["parameters"] - four["parameters"])


def test_plan_of_a_100000_layer_config_whose_last_layer_is_its_own_kind_is_refused_naming_the_setting():
    from hf_offload.commands import model_sizes

    config = _deep_config("ernie4_5_moe", 100_000)  # MoE layers up to moe_layer_end_index, by default the last
    with pytest.raises(model_sizes.ConfigError, match=r"first appears at layer 99,999 \(set apart by moe_layer_end"):
        model_sizes.measure(config)
    shallow = _deep_config("ernie4_5_moe", 40)  # at a depth that can be built whole, it is
    assert model_sizes.measure(shallow).layer_bytes == model_sizes.measure(shallow, every_layer=True).layer_bytes


@pytest.mark.parametrize("depth", [40, 100_000])
def test_plan_of_a_config_whose_layer_kinds_the_config_does_not_name(monkeypatch, depth):
    """A layer rule the config's names do not reveal: caught by the check of the shallow build, never mis-planned."""
    from hf_offload.commands import model_sizes

    monkeypatch.setattr(model_sizes, "_PERIOD_WORDS", ())  # decoder_sparse_step no longer read as a period
    config = _deep_config("qwen2_moe", depth, decoder_sparse_step=2, mlp_only_layers=[])
    if depth > model_sizes.MAX_MEASURED_LAYERS:
        with pytest.raises(
            model_sizes.ConfigError, match="cannot be told from the config: layer 1 is built unlike layer 0"
        ):
            model_sizes.measure(config)
        return
    by_kind, whole = model_sizes.measure(config), model_sizes.measure(config, every_layer=True)
    assert len(by_kind.kinds) == 40  # built whole
    assert by_kind.layer_bytes == whole.layer_bytes and len(set(whole.layer_bytes)) == 2


@pytest.mark.parametrize("what", ["missing path", "non-JSON config", "empty directory", "JSON list"])
def test_plan_on_a_bad_path_says_what_is_wrong_with_it(tmp_path, capsys, what, monkeypatch):
    from hf_offload.commands.cli import main

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the Hub")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_hub)
    target = tmp_path / "model"
    expected = {
        "missing path": "does not exist",
        "non-JSON config": "is not a JSON file",
        "empty directory": "directory without a config.json",
        "JSON list": "not an object",
    }[what]
    if what == "non-JSON config":
        target = tmp_path / "config.json"
        target.write_text("model_type: llama\n")
    elif what == "empty directory":
        target.mkdir()
    elif what == "JSON list":
        target = tmp_path / "config.json"
        target.write_text("[1, 2]")
    assert main(["plan", str(target)]) == 2
    assert expected in capsys.readouterr().err


def test_bench_with_a_missing_config_file_says_so(tmp_path):
    from hf_offload.commands.cli import main

    with pytest.raises(SystemExit, match="does not exist"):
        main(["bench", "--config", str(tmp_path / "nope.json"), "--device", "cpu"])


# --- resuming --------------------------------------------------------------------------------------------------------
def _trainer(model, output_dir, **overrides):
    from faces import tiny_args, token_dataset

    args = tiny_args(output_dir, layer_streaming=True, save_strategy="steps", save_steps=2, **overrides)
    return hf_offload.OffloadTrainer(model=model, args=args, train_dataset=token_dataset())


def _named(model, name: str):
    model.config._name_or_path = name
    return model


def test_resuming_on_another_base_model_with_the_same_shapes_is_refused(tmp_path, monkeypatch):
    from hf_offload.integrations.resume import BASE_MODEL_FILE, BaseModelMismatchError

    _trainer(_named(build("llama"), "org/tiny-base"), tmp_path / "run", max_steps=2).train()
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    assert (tmp_path / "run" / "checkpoint-2" / BASE_MODEL_FILE).is_file()

    other_config = _named(build("llama"), "org/tiny-base")
    other_config.config.rope_theta = 1234.0  # same shapes, another model
    other_name = _named(build("llama"), "org/tiny-instruct")  # same config, another model
    for model, message in [(other_config, "config differs"), (other_name, "trained on 'org/tiny-base'")]:
        trainer = _trainer(model, tmp_path / "again", max_steps=4)
        with pytest.raises(BaseModelMismatchError, match=message):
            trainer.train(resume_from_checkpoint=checkpoint)

    moved = _named(build("llama"), "/local/copy/tiny-base")  # the same model from another directory resumes
    _trainer(moved, tmp_path / "moved", max_steps=4).train(resume_from_checkpoint=checkpoint)
    monkeypatch.setenv("HF_OFFLOAD_ALLOW_OTHER_BASE_MODEL", "1")  # the override
    _trainer(_named(build("llama"), "org/tiny-instruct"), tmp_path / "forced", max_steps=4).train(
        resume_from_checkpoint=checkpoint
    )


def test_resume_true_after_a_kill_mid_checkpoint_resumes_from_the_newest_complete_one(tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    _trainer(build("llama"), run, max_steps=4).train()
    # what a kill during the save of checkpoint-6 leaves: the adapter written, the trainer state not yet
    partial = run / "checkpoint-6"
    partial.mkdir()
    shutil.copy(run / "checkpoint-4" / "adapter_model.safetensors", partial)
    (partial / "optimizer.pt").write_bytes(b"\x80\x02truncated")
    trainer = _trainer(build("llama"), run, max_steps=6)
    steps = _record_steps(trainer)
    with caplog.at_level("WARNING", logger="hf_offload.integrations.resume"):
        trainer.train(resume_from_checkpoint=True)
    assert "checkpoint-6" in caplog.text and "incomplete" in caplog.text
    assert "resuming from" in caplog.text and str(run / "checkpoint-4") in caplog.text
    assert steps == [5, 6]  # resumed after step 4


def _record_steps(trainer) -> list[int]:
    from transformers import TrainerCallback

    steps: list[int] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer.add_callback(Steps())
    return steps


# --- saves killed at random moments ---------------------------------------------------------------------------------
def _kill_saves():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "kill_saves.py"
    spec = importlib.util.spec_from_file_location("kill_saves", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merged_export_killed_at_20_random_moments_always_leaves_a_loadable_model(tmp_path):
    results = _kill_saves().merged_trials(trials=20, seed=0, workdir=str(tmp_path))
    lost = [r for r in results if not r["loadable"]]
    assert not lost, lost


def test_trainer_final_save_killed_at_8_random_moments_always_leaves_one_whole_save(tmp_path):
    results = _kill_saves().final_trials(trials=8, seed=0, workdir=str(tmp_path))
    lost = [r for r in results if not r["loadable"]]
    assert not lost, lost


def test_a_final_save_killed_after_its_commit_point_is_finished_by_the_next_training_run(tmp_path, monkeypatch):
    from hf_offload.integrations import atomic

    trainer = _trainer(build("llama"), tmp_path / "out", max_steps=1)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(exist_ok=True)
    (out / "notes.txt").write_text("the user's")
    lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)

    def killed(staged, target):  # the process dies after the commit point, before any file is moved
        raise SystemExit("killed")

    monkeypatch.setattr(atomic, "_move_in", killed)
    with torch.no_grad():
        lora_b.add_(1.0)
    with pytest.raises(SystemExit):
        trainer.save_model()
    monkeypatch.undo()
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.staged-")]
    assert len(staged) == 1 and (staged[0] / atomic.COMPLETE_MARKER).is_file()  # committed, not yet moved
    new = (staged[0] / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() != new
    trainer.train()  # what the user does next: training again (or saving again) into that output directory
    assert (out / "adapter_model.safetensors").read_bytes() == new  # the interrupted save finished first
    assert (out / "notes.txt").read_text() == "the user's" and (out / "checkpoint-1").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_export_that_fails_half_way_leaves_the_previous_one_in_place(tmp_path, monkeypatch):
    import safetensors.torch

    from hf_offload.integrations.hub import save_merged

    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, CPU)
    target = tmp_path / "merged"
    save_merged(model, str(target), max_shard_size="20kB")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def dies_on_third_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what an interrupt half-way through looks like to the code
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_on_third_shard)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_merged(model, str(target), max_shard_size="20kB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the temporary directory is gone
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    save_merged(model, str(target), max_shard_size="20kB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} != before


def test_a_swap_interrupted_between_renames_is_recovered_by_the_next_export(tmp_path, monkeypatch):
    from hf_offload.integrations import atomic

    target = tmp_path / "export"
    with atomic.atomic_directory(str(target)) as tmp, open(f"{tmp}/a.txt", "w") as f:
        f.write("old")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # the fallback: rename aside, then rename in
    real_rename = os.rename
    calls = {"n": 0}

    def killed_after_first_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_after_first_rename)
    with pytest.raises(SystemExit), atomic.atomic_directory(str(target)) as tmp, open(f"{tmp}/a.txt", "w") as f:
        f.write("new")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists()  # the window the fallback has; the next export or recover_directory closes it
    atomic.recover_directory(str(target))
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_model_card_is_replaced_whole(tmp_path, monkeypatch):
    from hf_offload.integrations import hub

    hub.add_to_model_card(str(tmp_path), base_model="org/base", repo_id=None, merged=False)
    before = (tmp_path / "README.md").read_text()

    def dies(self, path):
        with open(path, "w") as f:
            f.write("half a card")
        raise KeyboardInterrupt

    monkeypatch.setattr("huggingface_hub.ModelCard.save", dies)
    with pytest.raises(KeyboardInterrupt):
        hub.add_to_model_card(str(tmp_path), base_model="org/base", repo_id="me/model", merged=True)
    assert (tmp_path / "README.md").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


# --- bad steps ----------
def test_bad_step_guard_judges_non_finite_values_and_spikes_and_keeps_them_out_of_its_statistics():
    from hf_offload.integrations.bad_steps import BadStepGuard, BadStepOptions, TooManyBadStepsError

    options = BadStepOptions(True, spike_sigmas=4, spike_window=6, spike_min_steps=4, max_consecutive_skips=2)
    guard = BadStepGuard(options)

    def step(loss, norm):
        guard.add_loss(loss)
        return guard.judge(norm)

    assert "loss is nan" in step(float("nan"), 1.0)  # non-finite values are bad from the first step
    for loss in (2.0, 2.1, 1.9, 2.05):
        assert step(loss, 1.0 + loss / 10) is None
    assert "gradient norm is inf" in step(2.0, float("inf"))
    assert step(2.0, 1.2) is None  # a good step resets the run of bad ones
    assert "loss 50 is above mean" in step(50.0, 1.2)
    assert step(2.0, 1.2) is None  # the spike did not enter the mean: 2.0 is still normal
    assert "gradient norm 90" in step(2.0, 90.0)
    with pytest.raises(TooManyBadStepsError, match="2 optimizer steps in a row were bad"):
        step(float("inf"), 1.0)
    assert guard.metrics() == {"offload/skipped_steps": 5}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(spike_sigmas=0), "`spike_sigmas` should be a positive number"),
        (dict(spike_window=1), "`spike_window` should be an integer of at least 2"),
        (dict(max_consecutive_skips=0), "`max_consecutive_skips` should be"),
        (dict(spike_min_steps=50, spike_window=10), "`spike_min_steps` should be at most"),
        (dict(skip_bad_steps="yes"), "`skip_bad_steps` should be True or False"),
    ],
)
def test_bad_step_options_out_of_range_are_refused(options, message):
    from hf_offload.integrations.bad_steps import BadStepOptions

    with pytest.raises(ValueError, match=message):
        BadStepOptions(**options)


def _injecting_trainer(tmp_path, nan_steps=(), spike_steps=(), **overrides):
    """A streamed Trainer whose loss is NaN / 1000x on the given steps (1-based, as global_step after them)."""
    from faces import tiny_args, token_dataset

    class Injecting(hf_offload.OffloadTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            step = self.state.global_step + 1
            if step in nan_steps:
                return loss * float("nan")
            if step in spike_steps:
                return loss * 1000.0
            return loss

    options = dict(layer_streaming=True, optim="adamw_torch", max_steps=12, logging_steps=1)
    options.update(overrides)
    return Injecting(model=build("llama"), args=tiny_args(tmp_path, **options), train_dataset=token_dataset(48))


def test_training_with_injected_nan_and_spike_steps_skips_them_untouched_and_goes_on(tmp_path):
    from transformers import TrainerCallback

    trainer = _injecting_trainer(
        tmp_path,
        nan_steps={3},
        spike_steps={9},
        offload_skip_bad_steps=True,
        offload_spike_sigmas=6,
        offload_spike_window=8,
        offload_spike_min_steps=4,
    )
    guard = state_of(trainer).bad_steps
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            inner = getattr(optimizer, "optimizer", optimizer)
            moments = {k: {n: v.clone() for n, v in s.items()} for k, s in enumerate(inner.state.values())}
            snapshots[state.global_step] = (adapters, moments)

    trainer.add_callback(Snapshot())
    trainer.train()
    assert guard.skipped == 2 and len(guard.reasons) == 2
    assert "loss is nan" in guard.reasons[0] and "above mean" in guard.reasons[1]
    for skipped in (3, 9):
        before, after = snapshots[skipped - 1], snapshots[skipped]
        for name, value in before[0].items():
            assert torch.equal(after[0][name], value), name  # adapters untouched
        for k, state in before[1].items():
            for name, value in state.items():
                assert torch.equal(after[1][k][name], value), (k, name)  # optimizer state untouched
    changed = snapshots[4][0]
    assert any(not torch.equal(changed[n], v) for n, v in snapshots[3][0].items())  # good steps do update
    skipped = {h["step"]: h["offload/skipped_steps"] for h in trainer.state.log_history if "loss" in h}
    assert [skipped[step] for step in (2, 3, 8, 9, 12)] == [0, 1, 1, 2, 2]
    later = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > 9]
    assert later and all(math.isfinite(x) for x in later)


def test_training_that_keeps_producing_bad_steps_stops_with_a_clear_message(tmp_path):
    from hf_offload.integrations import bad_steps

    trainer = _injecting_trainer(
        tmp_path, nan_steps=set(range(2, 13)), offload_skip_bad_steps=True, offload_max_consecutive_skips=3
    )
    with pytest.raises(bad_steps.TooManyBadStepsError, match="3 optimizer steps in a row were bad"):
        trainer.train()
    assert trainer.state.global_step == 3  # steps 2 and 3 skipped, the third bad one stops before counting


def test_skip_bad_steps_flag_installs_the_guard_and_is_off_by_default(tmp_path):
    assert state_of(_injecting_trainer(tmp_path)).bad_steps is None
    trainer = _injecting_trainer(tmp_path, nan_steps={2}, max_steps=3, offload_skip_bad_steps=True)
    trainer.train()
    assert state_of(trainer).bad_steps.skipped == 1


# --- secrets ---------------------------------------------------------------------------------------------------------
def test_hub_token_passed_as_an_argument_reaches_no_file_and_no_log_line(tmp_path, caplog, capsys):
    from faces import tiny_args, token_dataset

    token = "hf_" + "Zq9" * 8  # shaped like a token, not one
    args = tiny_args(
        tmp_path / "out",
        layer_streaming=True,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        hub_token=token,
        offload_save_merged=True,
        offload_skip_bad_steps=True,
    )
    with caplog.at_level("DEBUG"):
        trainer = hf_offload.OffloadTrainer(model=build("llama"), args=args, train_dataset=token_dataset())
        trainer.train()
        trainer.save_model()
    assert trainer.args.hub_token == token  # still there for a push
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and any("checkpoint-" in str(p) for p in files)
    leaked = [str(p) for p in files if token.encode() in p.read_bytes()]
    assert not leaked
    saved = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert saved.hub_token == "<HUB_TOKEN>"
    out = capsys.readouterr()
    assert token not in caplog.text and token not in out.out and token not in out.err


# --- clear errors up front, or it works ---------------------------------------------------------------------------
def test_prefetch_beyond_the_number_of_layers_is_clamped_with_a_warning(caplog):
    from parity import assert_same_step

    with caplog.at_level("WARNING", logger="hf_offload.engine.runtime"):
        reference, streamed = reference_and_streamed(build("llama"), OffloadConfig(device="cpu", prefetch=1000))
    assert "prefetch=1000 is more than the 3 other decoder layers" in caplog.text
    facts = hf_offload.summary(streamed)
    assert facts["prefetch"] == 3 and facts["device_slot_bytes"] == 4 * facts["max_layer_bytes"]
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))


@pytest.mark.parametrize("device", ["cuda", "mps", "cuda:7"])
def test_a_device_this_machine_does_not_have_is_refused_before_any_work(device):
    kind = device.split(":")[0]
    if kind == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    if kind == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has that device")
    model = with_lora(build("llama"))
    weight = model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight
    pointer = weight.data_ptr()
    with pytest.raises(ValueError, match="`device` should be"):
        hf_offload.enable_layer_streaming(model, OffloadConfig(device=device))
    assert not hf_offload.is_streaming(model) and weight.data_ptr() == pointer  # nothing was packed


def test_meta_weights_outside_the_layers_are_refused_before_the_store_is_built():
    base = build("llama")
    base.lm_head.weight = nn.Parameter(torch.empty_like(base.lm_head.weight, device="meta"))
    model = with_lora(base, target_modules=["q_proj"])
    weight = model.get_base_model().model.layers[0].mlp.up_proj.weight
    pointer = weight.data_ptr()
    with pytest.raises(ValueError, match=r"meta device \(.*lm_head.weight\)"):
        hf_offload.enable_layer_streaming(model, CPU)
    assert not hf_offload.is_streaming(model) and weight.data_ptr() == pointer


@pytest.mark.parametrize("cast", ["half", "to_bf16", "to_float64"])
def test_casting_the_model_after_enabling_is_refused_and_leaves_it_working(cast):
    from parity import assert_same_step

    reference, streamed = reference_and_streamed(build("llama"))
    do = {
        "half": lambda m: m.half(),
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "to_float64": lambda m: m.get_base_model().model.to(dtype=torch.float64),
    }[cast]
    with pytest.raises(RuntimeError, match="would convert the streamed decoder-layer weights"):
        do(streamed)
    streamed.to("cpu")  # changes nothing: allowed
    streamed.float()
    assert_same_step(reference, streamed, left_padded_batch(VOCAB))
    hf_offload.disable_layer_streaming(streamed)
    streamed.half()  # after disabling, an ordinary model again


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_of_a_streamed_model_compiles_the_resident_parts_and_keeps_exact_gradients(backend):
    from parity import train_step

    torch._dynamo.reset()
    reference, streamed = reference_and_streamed(build("llama"))
    compiled = torch.compile(streamed, backend=backend)
    for seed in (0, 1):
        batch = left_padded_batch(VOCAB, seed=7 + seed)
        loss_ref, grads_ref = train_step(reference, batch, seed)
        loss_c, grads_c = train_step(compiled, batch, seed)
        torch.testing.assert_close(loss_c, loss_ref, rtol=1e-5, atol=0)
        grads_c = {n.removeprefix("_orig_mod."): g for n, g in grads_c.items()}
        assert grads_c.keys() == grads_ref.keys()
        for name, g in grads_ref.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_torch_compile_flag_through_the_trainer_trains_like_the_compiled_plain_lora_run(tmp_path):
    """`--torch_compile --torch_compile_backend eager` with `--layer_streaming`: the resident parts compile, the
    streamed layers run eagerly, and the run matches the plain peft run compiled the same way, step by step."""
    from faces import logged, tiny_args, token_dataset
    from peft import get_peft_model

    torch._dynamo.reset()
    base = build("llama")
    common = dict(max_steps=2, optim="adamw_torch", torch_compile=True, torch_compile_backend="eager")
    plain_args = tiny_args(tmp_path / "plain", **common)
    torch.manual_seed(0)
    plain = hf_offload.OffloadTrainer(
        model=get_peft_model(copy.deepcopy(base), plain_args.lora_config()),
        args=plain_args,
        train_dataset=token_dataset(),
    )
    plain.train()
    torch.manual_seed(0)  # the LoRA the trainer adds starts from the same RNG state as the plain run's
    streamed_args = tiny_args(tmp_path / "streamed", layer_streaming=True, **common)
    streamed = hf_offload.OffloadTrainer(model=copy.deepcopy(base), args=streamed_args, train_dataset=token_dataset())
    streamed.train()
    assert hf_offload.is_streaming(streamed.model)
    assert type(streamed.model_wrapped).__name__ == "OptimizedModule"  # compiled, as the plain run's
    assert logged(streamed) == logged(plain) and len(logged(plain)) == 2
    assert logged(streamed, "grad_norm") == logged(plain, "grad_norm")
    torch._dynamo.reset()


@pytest.mark.parametrize("offload_activations", [False, True])
def test_a_second_backward_through_a_retained_graph_matches_vanilla(offload_activations):
    config = OffloadConfig(device="cpu", offload_activations=offload_activations)
    reference, streamed = reference_and_streamed(build("llama"), config)
    batch = left_padded_batch(VOCAB)
    grads = []
    for model in (reference, streamed):
        model.train()
        torch.manual_seed(0)
        loss = model(**batch).loss
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()  # a third one without a retained graph: autograd's own error
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_layer_streaming_with_deepspeed_is_refused_by_our_message_first(tmp_path):
    from faces import tiny_args

    with pytest.raises(ValueError, match="--layer_streaming cannot be combined with --deepspeed"):
        tiny_args(tmp_path, layer_streaming=True, deepspeed=str(tmp_path / "ds.json"))


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt"])
def test_resuming_from_a_truncated_file_names_the_file_and_the_checkpoint(tmp_path, damaged):
    from hf_offload.integrations.checkpoint import IncompatibleCheckpointError

    _trainer(build("llama"), tmp_path / "run", max_steps=2, optim="adamw_torch").train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    path = checkpoint / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trainer = _trainer(build("llama"), tmp_path / "again", max_steps=4, optim="adamw_torch")
    with pytest.raises(IncompatibleCheckpointError, match=f"{checkpoint}: {damaged} cannot be read"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("prefetch", -1, "`prefetch` should be a non-negative integer"),
        ("base_weight_dtype", "nf5", "`base_weight_dtype` should be one of"),
        ("expert_fetch", "some", "`expert_fetch` should be one of"),
        ("device", "gpu", "`device` should be a torch device"),
    ],
)
def test_an_option_changed_on_a_config_after_construction_is_validated_before_any_work(option, value, message):
    config = OffloadConfig(device="cpu")
    setattr(config, option, value)
    model = with_lora(build("llama"))
    with pytest.raises(ValueError, match=message):
        hf_offload.enable_layer_streaming(model, config)
    assert not hf_offload.is_streaming(model)


def test_the_runtime_keeps_the_options_it_started_with():
    config = OffloadConfig(device="cpu", prefetch=1)
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, config)
    config.prefetch = 2
    assert hf_offload.api.get_runtime(model).config.prefetch == 1 and hf_offload.summary(model)["prefetch"] == 1


def test_saving_full_weights_from_an_nf4_store_is_refused_before_writing_anything(tmp_path):
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu", base_weight_dtype="nf4"))
    with pytest.raises(RuntimeError, match="nothing was written"):
        model.get_base_model().save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists()
    model.save_pretrained(tmp_path / "adapter")  # the adapter saves as usual
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    hf_offload.disable_layer_streaming(model)
    model.get_base_model().save_pretrained(tmp_path / "full")  # dequantized weights after disabling
    assert (tmp_path / "full" / "config.json").is_file()


def test_a_final_save_interrupted_half_way_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    import peft.peft_model

    from hf_offload.integrations import hub

    trainer = _trainer(build("llama"), tmp_path / "out", max_steps=2)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "adapter_model.safetensors" in before and hub._CARD_MARKER in before["README.md"].decode()
    real = peft.peft_model.safe_save_file

    def cut_short(tensors, filename, *args, **kwargs):  # peft writing the adapter when the process dies
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "safe_save_file", cut_short)
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real)
    trainer.save_model()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    assert after["README.md"].decode().count(hub._CARD_MARKER) == 1
