"""tools/make_checkpoint.py writes checkpoints transformers loads with every key matched (dense and per-expert MoE)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_checkpoint.py"
TINY = ["--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--vocab", "256"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("make_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    return model


def stored(path, key):
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())
    with safe_open(Path(path) / index["weight_map"][key], "pt") as f:
        return f.get_tensor(key)


def test_dense_llama_loads_from_several_shards(tool, tmp_path):
    tool.main(["llama", str(tmp_path), "--layers", "3", "--intermediate", "128", "--shard-gb", "0.00005", *TINY])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    model = load(tmp_path)
    assert model.config.num_hidden_layers == 3 and model.dtype == torch.bfloat16
    for name, param in model.state_dict().items():
        assert torch.equal(param, stored(tmp_path, name)), name


def test_qwen3_moe_per_expert_keys_are_fused_on_load(tool, tmp_path):
    tool.main(
        [
            "qwen3moe",
            str(tmp_path),
            "--layers",
            "2",
            "--experts",
            "4",
            "--expert-intermediate",
            "32",
            "--top-k",
            "2",
            *TINY,
        ]
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]  # as on the Hub: one key per expert
    model = load(tmp_path)
    experts = model.model.layers[1].mlp.experts
    for e in range(4):
        gate = stored(tmp_path, f"model.layers.1.mlp.experts.{e}.gate_proj.weight")
        up = stored(tmp_path, f"model.layers.1.mlp.experts.{e}.up_proj.weight")
        assert torch.equal(experts.gate_up_proj[e], torch.cat([gate, up]))
        assert torch.equal(experts.down_proj[e], stored(tmp_path, f"model.layers.1.mlp.experts.{e}.down_proj.weight"))


def test_target_size_picks_the_layer_count(tool):
    config = {**tool.PRESETS["llama"], "num_hidden_layers": 0}
    per_layer = tool.layer_bytes(config, torch.bfloat16)
    outside = 2 * 128256 * 4096 * 2 + 4096 * 2  # embeddings, head, final norm
    assert per_layer == 2 * (4096 * 4096 * 2 + 1024 * 4096 * 2 + 3 * 4096 * 14336 + 2 * 4096)
    assert tool.layers_for_size(config, torch.bfloat16, outside + 10 * per_layer) == 10
    assert tool.layers_for_size(config, torch.bfloat16, 1) == 1
