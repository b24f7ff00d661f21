"""The engine under DistributedDataParallel (one gloo rank, in this process) and the data-parallel refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from families import build
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.engine import compat
from hf_offload.engine.distributed import Ranks, current_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")


@pytest.fixture
def one_rank(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _lora(model):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize("dtype", [None, "nf4"])
def test_ddp_leaves_streamed_weights_alone_and_reduces_adapter_gradients(one_rank, dtype):
    reference = _lora(build("llama"))
    model = hf_offload.enable_layer_streaming(copy.deepcopy(reference), OffloadConfig(base_weight_dtype=dtype))
    # nf4 weights are one-element placeholders between uses: DDP's start-up broadcast would write into them
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    streamed = {id(t.param) for pack in hf_offload.api.get_runtime(model).store.packs for t in pack.tensors}
    streamed |= {id(e.param) for pack in hf_offload.api.get_runtime(model).store.packs for e in pack.encoded}
    assert streamed and not streamed & {id(p) for p in ddp._module_parameters}
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks
    ddp(input_ids=ids, labels=ids).loss.backward()
    if dtype is None:  # the same weights: the same gradients as the unstreamed model
        torch.manual_seed(2)
        reference(input_ids=ids, labels=ids).loss.backward()
        want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert got.keys() == want.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    else:
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_ignore_list_goes_with_streaming():
    model = _lora(build("llama"))
    hf_offload.enable_layer_streaming(model)
    names = model._ddp_params_and_buffers_to_ignore
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert not any("lora_" in n for n in names) and "base_model.model.model.embed_tokens.weight" not in names
    assert compat.peft_base_model(model)._ddp_params_and_buffers_to_ignore  # whichever of the two DDP wraps
    hf_offload.disable_layer_streaming(model)
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")


def test_full_finetune_is_refused_with_more_than_one_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    model = build("llama")
    with pytest.raises(ValueError, match="rank 1 of 2 data-parallel processes"):
        hf_offload.enable_layer_streaming(model, OffloadConfig(full_finetune=True))
    assert not hf_offload.is_streaming(model)


def test_ranks_from_the_launcher_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    assert current_ranks(env) == Ranks(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1)
    assert current_ranks({}) == Ranks() and not Ranks().distributed
