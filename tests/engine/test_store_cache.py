"""The host store cache: written once, mapped on a matching key (no encoding), rebuilt on any stale key field,
never left half-written, copy-on-write; a training step from a cached store equals one from a packed store."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from families import VOCAB, build
from parity import assert_step_matches, left_padded_batch, train_step, with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine import store, store_cache
from hf_offload.engine.quant import Int8RowwiseCodec, NF4Codec, make_codec
from hf_offload.engine.store import HostStore, StoreCache

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[2]


def frozen_model(seed: int = 0):
    model = build("llama", seed)
    model.requires_grad_(False)
    return model


def build_store(model, directory, codec: str | None = "nf4") -> HostStore:
    cache = StoreCache(str(directory), store_cache.model_identity(model))
    return HostStore.build(
        model.model.layers, pin=lambda _: False, show_progress=False, codec=make_codec(codec), cache=cache
    )


def manifest(directory) -> dict:
    return json.loads((Path(directory) / "store" / "manifest.json").read_text())


def forbid_encoding(monkeypatch):
    def refuse(self, weight):
        raise AssertionError("encoded although the store cache matched")

    monkeypatch.setattr(NF4Codec, "encode", refuse)
    monkeypatch.setattr(Int8RowwiseCodec, "encode", refuse)


def test_second_build_maps_the_cache_without_encoding(tmp_path, monkeypatch, caplog):
    packed = build_store(frozen_model(), tmp_path)
    assert [layer["nbytes"] for layer in manifest(tmp_path)["layers"]] == [p.nbytes for p in packed.packs]
    forbid_encoding(monkeypatch)
    model = frozen_model()
    with caplog.at_level(logging.INFO, logger="hf_offload.engine.store_cache"):
        mapped = build_store(model, tmp_path)
    assert "mapped from the cache" in caplog.text
    for fresh, cached in zip(packed.packs, mapped.packs):
        assert torch.equal(fresh.host, cached.host)
        assert [e.meta for e in fresh.encoded] == [e.meta for e in cached.encoded]
        assert cached.host.data_ptr() % 4096 == 0  # page-aligned: can be page-locked
        for packed_tensor in cached.tensors:  # dense parameters are views into the mapped buffer
            assert packed_tensor.param.data_ptr() == cached.host.data_ptr() + packed_tensor.offset
        for encoded in cached.encoded:  # encoded ones are hollow, as packing leaves them
            assert encoded.param.data.stride() == (0,) * encoded.param.dim()
            assert torch.isnan(encoded.param.data[(0,) * encoded.param.dim()])
        for encoded_fresh, encoded_cached in zip(fresh.encoded, cached.encoded):
            assert torch.equal(encoded_fresh.dense_copy(fresh.host), encoded_cached.dense_copy(cached.host))


def change_content(model):
    return frozen_model(seed=1)


def change_name(model):
    model.name_or_path = "another/checkpoint"
    return model


def change_config(model):
    model.config.rms_norm_eps = 1e-3  # no shape changes: only the config digest tells
    return model


@pytest.mark.parametrize(
    "fields, change, codec",
    [
        ({"content"}, change_content, "nf4"),
        ({"name_or_path"}, change_name, "nf4"),
        ({"config"}, change_config, "nf4"),
        ({"codec", "layout"}, None, "int8"),  # int8 parts are laid out differently too
        ({"layout"}, "alignment", "nf4"),
        ({"format"}, "format", "nf4"),
    ],
    ids=["content", "name_or_path", "config", "codec", "layout", "format"],
)
def test_a_stale_cache_is_logged_rebuilt_and_replaced(tmp_path, monkeypatch, caplog, fields, change, codec):
    build_store(frozen_model(), tmp_path)
    old_key = manifest(tmp_path)["key"]
    model = frozen_model()
    if callable(change):
        model = change(model)
    elif change == "alignment":  # another packing layout of the same tensors
        monkeypatch.setattr(store, "ALIGNMENT", 2 * store.ALIGNMENT)
    elif change == "format":
        monkeypatch.setattr(store_cache, "FORMAT_VERSION", store_cache.FORMAT_VERSION + 1)
    reference = build_store(model_copy := _same_weights(model), tmp_path / "reference", codec)
    del model_copy
    with caplog.at_level(logging.WARNING, logger="hf_offload.engine.store_cache"):
        rebuilt = build_store(model, tmp_path, codec)
    logged = re.search(r"built for another (.*?); building", caplog.text)
    assert logged and set(logged.group(1).split(", ")) == fields
    assert "mapped from the cache" not in caplog.text
    assert manifest(tmp_path)["key"] != old_key  # replaced by the rebuilt store
    for ours, theirs in zip(rebuilt.packs, reference.packs):
        assert torch.equal(ours.host, theirs.host)


def _same_weights(model):
    twin = frozen_model()
    twin.load_state_dict(model.state_dict())
    twin.name_or_path = model.name_or_path
    twin.config = model.config
    return twin


def test_in_place_writes_to_mapped_weights_never_reach_the_cache(tmp_path):
    build_store(frozen_model(), tmp_path)
    first = frozen_model()
    mapped = build_store(first, tmp_path)
    on_disk = (tmp_path / "store" / "layer-00000.bin").read_bytes()
    norm = first.model.layers[0].input_layernorm.weight
    norm.data.add_(1.0)  # a view into the copy-on-write mapping
    assert torch.equal(norm.data, torch.ones_like(norm) * 2)
    assert (tmp_path / "store" / "layer-00000.bin").read_bytes() == on_disk
    again = build_store(frozen_model(), tmp_path)
    assert not torch.equal(again.packs[0].host, mapped.packs[0].host)  # the other process's view kept the write
    assert again.packs[0].host.numpy().tobytes() == on_disk


def test_a_write_killed_midway_leaves_no_cache_that_looks_valid(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from hf_offload.engine import store_cache
        from tests.engine.test_store_cache import build_store, frozen_model
        written = []
        real = store_cache._write_file
        def dying_write(path, buffer):
            real(path, buffer)
            written.append(path)
            if len(written) == 2:
                os._exit(9)  # killed after two of the four layer files: no cleanup runs
        store_cache._write_file = dying_write
        build_store(frozen_model(), {str(tmp_path)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr
    assert not (tmp_path / "store").exists()
    assert list(tmp_path.glob(".store.tmp-*"))  # the abandoned write, never read
    model = frozen_model()
    fields = StoreCache(str(tmp_path), store_cache.model_identity(model)).key_fields(
        model.model.layers,
        [store.layout_layer(layer, make_codec("nf4")) for layer in model.model.layers],
        make_codec("nf4"),
    )
    assert store_cache.open_cached(tmp_path, fields) is None
    build_store(model, tmp_path)  # the next run builds and writes a complete cache
    assert len(manifest(tmp_path)["layers"]) == len(model.model.layers)


def streamed(directory, seed: int = 0):
    model = with_lora(build("llama", seed))
    config = OffloadConfig(device="cpu", base_weight_dtype="nf4", store_cache=str(directory) if directory else None)
    return hf_offload.enable_layer_streaming(model, config)


def test_a_training_step_from_the_cached_store_equals_one_from_a_packed_store(tmp_path, monkeypatch):
    batch = left_padded_batch(VOCAB)
    packed = streamed(None)
    reference_step = train_step(packed, batch)
    streamed(tmp_path)  # writes the cache
    forbid_encoding(monkeypatch)
    cached = streamed(tmp_path)
    assert all(p.encoded for p in get_runtime(cached).store.packs)
    assert_step_matches(reference_step, cached, batch)


def test_a_damaged_cache_is_rebuilt(tmp_path, caplog):
    build_store(frozen_model(), tmp_path)
    (tmp_path / "store" / "layer-00001.bin").write_bytes(b"short")  # truncated by something outside hf_offload
    with caplog.at_level(logging.WARNING, logger="hf_offload.engine.store_cache"):
        rebuilt = build_store(frozen_model(), tmp_path)
    assert "damaged" in caplog.text
    assert (tmp_path / "store" / "layer-00001.bin").stat().st_size == rebuilt.packs[1].nbytes


def test_store_cache_with_full_finetune_is_refused():
    with pytest.raises(ValueError, match="store_cache"):
        OffloadConfig(full_finetune=True, store_cache="/tmp/x")


def test_a_routed_moe_step_from_the_cached_store_equals_one_from_a_packed_store(tmp_path, caplog):
    from moe_families import VOCAB as MOE_VOCAB
    from moe_families import build as build_moe
    from moe_families import with_expert_lora

    def streamed_moe(directory):
        model = with_expert_lora(build_moe("qwen3_moe"), "qwen3_moe")
        config = OffloadConfig(device="cpu", base_weight_dtype="nf4", store_cache=str(directory) if directory else None)
        return hf_offload.enable_layer_streaming(model, config)

    batch = left_padded_batch(MOE_VOCAB)
    reference_step = train_step(streamed_moe(None), batch)
    streamed_moe(tmp_path)  # writes the cache
    with caplog.at_level(logging.INFO, logger="hf_offload.engine.store_cache"):
        cached = streamed_moe(tmp_path)
    assert "mapped from the cache" in caplog.text
    assert any(pack.experts for pack in get_runtime(cached).store.packs)  # expert regions come from the cache too
    assert_step_matches(reference_step, cached, batch)
    assert hf_offload.stats(cached)["experts_loaded"] > 0
