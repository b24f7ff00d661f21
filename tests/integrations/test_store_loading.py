"""Loading a checkpoint straight into the host store (`HostStoreConfig`) gives the store and the training step that
loading the ordinary way and then streaming gives, for dense and MoE families, in every base_weight_dtype."""

from __future__ import annotations

import pytest
import torch
import transformers
from families import build as build_dense
from moe_families import build as build_moe
from moe_families import with_expert_lora
from parity import assert_step_matches, left_padded_batch, train_step, with_lora

import hf_offload
from hf_offload import HostStoreConfig
from hf_offload.engine import hostmem
from hf_offload.engine.prebuilt import PREBUILT_ATTRIBUTE, PrebuiltLayer

DTYPES = [None, "nf4", "int8"]


def _runtime(model):
    return hf_offload.api.get_runtime(model)


def _save(model, tmp_path) -> str:
    path = str(tmp_path / "checkpoint")
    model.save_pretrained(path)
    return path


def _load(path: str, base_weight_dtype=None, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=HostStoreConfig(base_weight_dtype), **kwargs
    )


def _streamed(model, base_weight_dtype, lora):
    model = lora(model)
    config = hf_offload.OffloadConfig(device="cpu", base_weight_dtype=base_weight_dtype)
    hf_offload.enable_layer_streaming(model, config)
    return model


def _check_same_store_and_step(path: str, base_weight_dtype, lora, vocab: int) -> None:
    """Loaded into the store vs loaded then packed: same bytes per layer, every layer adopted, the same step."""
    direct = _streamed(_load(path, base_weight_dtype), base_weight_dtype, lora)
    packed = _streamed(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), base_weight_dtype, lora
    )
    direct_packs, packed_packs = _runtime(direct).store.packs, _runtime(packed).store.packs
    assert all(pack.adopted for pack in direct_packs), "a layer was packed again instead of adopted"
    assert not any(pack.adopted for pack in packed_packs)
    for a, b in zip(direct_packs, packed_packs, strict=True):
        assert torch.equal(a.host, b.host), f"layer {a.index}: the store bytes differ"
    batch = left_padded_batch(vocab)
    assert_step_matches(train_step(packed, batch), direct, batch)


# every dtype on one family of each kind; other families in one dtype each (the suite stays quick)
DENSE = [("llama", dtype) for dtype in DTYPES] + [("gpt2", "nf4"), ("gemma2", None)]
MOE = [("qwen3_moe", dtype) for dtype in DTYPES] + [("mixtral", "nf4"), ("deepseek_v3", "int8")]


@pytest.mark.parametrize(("family", "base_weight_dtype"), DENSE)
def test_dense_checkpoint_loads_into_the_store(family, base_weight_dtype, tmp_path):
    path = _save(build_dense(family), tmp_path)
    _check_same_store_and_step(path, base_weight_dtype, with_lora, vocab=96)


@pytest.mark.parametrize(("family", "base_weight_dtype"), MOE)
def test_moe_checkpoint_with_per_expert_keys_loads_into_the_store(family, base_weight_dtype, tmp_path):
    path = _save(build_moe(family), tmp_path)
    _check_same_store_and_step(path, base_weight_dtype, lambda m: with_expert_lora(m, family), vocab=96)


def test_loaded_store_trains_like_the_ordinary_model(tmp_path):
    """No streaming on one side: the ordinary fp32 model with the same LoRA gives the same loss and gradients."""
    path = _save(build_dense("llama"), tmp_path)
    ordinary = with_lora(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    direct = _streamed(_load(path), None, with_lora)
    batch = left_padded_batch(96)
    assert_step_matches(train_step(ordinary, batch), direct, batch)


def test_encoded_store_refuses_to_run_before_streaming(tmp_path):
    path = _save(build_dense("llama"), tmp_path)
    model = _load(path, "nf4")
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    with pytest.raises(RuntimeError, match="enable_layer_streaming"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


def test_streaming_with_another_dtype_than_loaded_is_refused(tmp_path):
    path = _save(build_dense("llama"), tmp_path)
    model = with_lora(_load(path, "nf4"))
    with pytest.raises(ValueError, match="base_weight_dtype='nf4'"):
        hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device="cpu"))


def test_a_weight_left_trainable_falls_back_to_ordinary_packing(tmp_path):
    """A layer whose layout changed after loading (a norm left trainable) is packed from the prebuilt values."""
    path = _save(build_dense("llama"), tmp_path)
    reference = with_lora(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    model = with_lora(_load(path, "int8"))
    for m in (reference, model):
        m.base_model.model.model.layers[1].input_layernorm.weight.requires_grad_(True)
    hf_offload.enable_layer_streaming(reference, hf_offload.OffloadConfig(device="cpu", base_weight_dtype="int8"))
    hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device="cpu", base_weight_dtype="int8"))
    adopted = [pack.adopted for pack in _runtime(model).store.packs]
    assert adopted == [True, False, True, True]
    batch = left_padded_batch(96)
    assert_step_matches(train_step(reference, batch), model, batch)
    assert not hasattr(model.base_model.model, PREBUILT_ATTRIBUTE)


def test_host_memory_check_runs_before_any_weight_is_read(tmp_path, monkeypatch):
    path = _save(build_dense("llama"), tmp_path)
    written = []
    monkeypatch.setattr(PrebuiltLayer, "write", lambda self, name, value: written.append(name))
    monkeypatch.setattr(hostmem, "available_bytes", lambda *a, **k: 1000)
    with pytest.raises(hostmem.HostMemoryError, match=r"HostStoreConfig\(check_host_memory=False\)"):
        _load(path, "nf4")
    assert not written
    monkeypatch.undo()
    monkeypatch.setattr(hostmem, "available_bytes", lambda *a, **k: 1000)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=HostStoreConfig("nf4", check_host_memory=False)
    )
    assert getattr(model, PREBUILT_ATTRIBUTE).layers[0].complete


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="base_weight_dtype"):
        HostStoreConfig("fp3")
    with pytest.raises(ValueError, match="`shared_host_store` should be True, False or None.*'yes'"):
        HostStoreConfig(shared_host_store="yes")


_PEAK_PROBE = """
import sys, threading, time, torch, transformers
import bitsandbytes  # imported by the first encode otherwise: its own memory is not the loader's
from hf_offload import HostStoreConfig

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

peak, done = [anon()], threading.Event()
def sample():
    while not done.is_set():
        peak.append(anon()); time.sleep(0.0005)
thread = threading.Thread(target=sample); before = anon(); thread.start()
config = HostStoreConfig("nf4") if sys.argv[2] == "store" else None
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, quantization_config=config)
done.set(); thread.join()
print(max(peak) - before)
"""


def test_loading_into_the_store_holds_about_the_store_not_the_checkpoint(tmp_path):
    """A bf16 checkpoint loaded in fp32: the ordinary load holds every layer in fp32; loading into an nf4 store holds
    the store, the modules outside the layers and about two layers' worth of tensors in flight, never more."""
    import subprocess
    import sys

    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    path = _save(model, tmp_path)
    layer_fp32 = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    outside_fp32 = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n) * 4
    del model
    peaks = {}
    for how in ("store", "ordinary"):
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_PROBE, path, how], capture_output=True, text=True, timeout=300,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[how] = int(done.stdout.split()[-1])
    store = _load(path, "nf4").__dict__[PREBUILT_ATTRIBUTE].nbytes
    bound = store + 2 * layer_fp32 + outside_fp32 + 16 * 2**20  # + the loader's own working set
    assert peaks["store"] <= bound, (peaks, bound)
    assert peaks["ordinary"] > bound, (peaks, bound)  # the model is big enough for the bound to mean something


@pytest.mark.parametrize(("family", "base_weight_dtype"), [("llama", "nf4"), ("qwen3_moe", "int8")])
def test_a_store_cache_skips_reading_the_layers_and_trains_the_same(family, base_weight_dtype, tmp_path, monkeypatch):
    """The second load of the same checkpoint maps the cache: no layer tensor is written (nor read), and the step is
    the one the first load gives. A rewritten checkpoint is another key."""
    build = build_dense if family == "llama" else build_moe
    path = _save(build(family), tmp_path)
    cache = str(tmp_path / "cache")
    lora = with_lora if family == "llama" else (lambda m: with_expert_lora(m, family))

    def load(required=True):  # the launcher's config says required=False: the same store, the same cache
        config = HostStoreConfig(base_weight_dtype, store_cache=cache, required=required)
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)

    first = _streamed(load(), base_weight_dtype, lora)
    written = []
    original = PrebuiltLayer.write
    monkeypatch.setattr(
        PrebuiltLayer, "write", lambda self, name, value: written.append(name) or original(self, name, value)
    )
    second = _streamed(load(required=False), base_weight_dtype, lora)
    assert written == []
    assert all(pack.adopted for pack in _runtime(second).store.packs)
    for a, b in zip(_runtime(first).store.packs, _runtime(second).store.packs, strict=True):
        assert torch.equal(a.host, b.host)
    batch = left_padded_batch(96)
    assert_step_matches(train_step(first, batch), second, batch)

    import os

    shard = next(p for p in os.listdir(path) if p.endswith(".safetensors"))
    os.utime(os.path.join(path, shard))  # the checkpoint rewritten: its layers are read again
    load()
    assert written


def _two_local_ranks(tmp_path, monkeypatch, path: str) -> tuple[list, list[list[str]]]:
    """Load `path` into an nf4 store and stream it as local rank 0, then 1, of 2 (this process plays both, one after
    the other, sharing under a temporary tmpfs directory). Returns the models and the layer tensors each loaded."""
    from hf_offload.engine import shared_store

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(shared_store, "ROOT", str(shm))
    monkeypatch.setenv(shared_store.JOB_ENV, "loadjob")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    original, models, written = PrebuiltLayer.write, [], []
    for local_rank in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(shared_store, "_shared_in_this_process", 0)  # a fresh process per rank
        written.append([])
        monkeypatch.setattr(
            PrebuiltLayer, "write", lambda self, n, v, w=written[-1]: w.append(n) or original(self, n, v)
        )
        models.append(_streamed(_load(path, "nf4"), "nf4", with_lora))
    assert list(shm.iterdir()) == []  # every segment mapped by both ranks: gone
    return models, written


def test_other_local_ranks_map_the_store_rank_0_loaded_without_reading_a_layer(tmp_path, monkeypatch, caplog):
    """Data parallel, 2 ranks per node: local rank 0 loads the checkpoint into the node's shared store; local rank 1
    maps it and reads no decoder-layer tensor; both train like the ordinary load."""
    path = _save(build_dense("llama"), tmp_path)
    with caplog.at_level("INFO", logger="hf_offload"):
        models, written = _two_local_ranks(tmp_path, monkeypatch, path)
    assert written[0] and not written[1], "local rank 1 read decoder-layer tensors of the checkpoint"
    assert "local rank 1 maps the node's shared host store built by local rank 0" in caplog.text
    runtimes = [_runtime(m) for m in models]
    assert all(r.shared_store is not None for r in runtimes)
    assert [r.summary().layers_loaded_into_store for r in runtimes] == [4, 4]
    with open("/proc/self/maps", encoding="utf-8") as f:  # rank 0 too computes from the segment, not its own copy
        assert sum(str(runtimes[0].shared_store.path) in line for line in f) == 2 * 4
    ordinary = with_lora(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    own = hf_offload.OffloadConfig(device="cpu", base_weight_dtype="nf4", shared_host_store=False)
    hf_offload.enable_layer_streaming(ordinary, own)
    batch = left_padded_batch(96)
    expected = train_step(ordinary, batch)
    for model in models:
        assert_step_matches(expected, model, batch)


def test_a_checkpoint_that_does_not_fill_the_store_is_not_shared_while_loading(tmp_path, monkeypatch, caplog):
    """A layer tensor missing from the checkpoint: local rank 0 declines the segment, each rank loads its own store,
    and streaming shares it the ordinary way; both ranks compute the same."""
    from safetensors.torch import load_file, save_file

    path = _save(build_dense("llama"), tmp_path)
    shard = f"{path}/model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.post_attention_layernorm.weight"]  # transformers initialises it: ones
    save_file(tensors, shard, metadata={"format": "pt"})
    with caplog.at_level("INFO", logger="hf_offload"):
        models, written = _two_local_ranks(tmp_path, monkeypatch, path)
    assert written[0] and written[1] and "local rank 1 builds its own host store" in caplog.text
    runtimes = [_runtime(m) for m in models]
    assert all(r.shared_store is not None for r in runtimes)
    assert "local rank 1 maps the node's shared host store built by local rank 0" in caplog.text
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = [m.eval()(input_ids=ids, labels=ids).loss.item() for m in models]
    assert losses[0] == losses[1]


def test_a_store_shared_while_loading_becomes_private_when_streaming_wants_its_own(tmp_path, monkeypatch):
    """HostStoreConfig(shared_host_store=True) in one process, streaming with shared_host_store=False: the layers get
    writable copies of their own (merging adapters works), the same values, and nothing is left in the tmpfs."""
    from hf_offload.engine import shared_store

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(shared_store, "ROOT", str(shm))
    path = _save(build_dense("llama"), tmp_path)
    config = HostStoreConfig(shared_host_store=True)
    model = with_lora(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **{"quantization_config": config})
    )
    hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device="cpu", shared_host_store=False))
    runtime = _runtime(model)
    assert runtime.shared_store is None and list(shm.iterdir()) == []
    assert [pack.adopted for pack in runtime.store.packs] == [True] * 4
    ordinary = with_lora(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    batch = left_padded_batch(96)
    assert_step_matches(train_step(ordinary, batch), model, batch)
    model.merge_adapter()  # writes into the store: refused while it is shared
