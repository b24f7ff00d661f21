"""Partitioned fetch: each local rank copies its chunk of a layer from host memory and the node's ranks all-gather
the rest (gloo on the CPU). Exactness against replicated fetch runs in two torchrun ranks (dp_scripts); the
Trainer-level run is in tests/integrations/test_data_parallel.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import build
from peft import LoraConfig, get_peft_model

import hf_offload
from hf_offload import OffloadConfig

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, TWO_GPUS])])
def test_partitioned_fetch_gives_the_replicated_step_bit_for_bit_on_two_ranks(tmp_path, device):
    """Dense fp32 with dropout, nf4 and routed MoE int8 (on the CPU: on the simulated asynchronous device, gloo; on
    CUDA: NCCL): losses, eval logits and adapter gradients equal, each rank copying half of each layer (of each
    routed layer's base) from the host."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(REPO / "tests" / "dp_scripts" / "partitioned_rank.py"),
        *(["--cuda"] if device == "cuda" else []),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for rank in (0, 1):
        passed = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(passed) == 3, passed  # every case, on each rank


def _lora_llama():
    torch.manual_seed(0)
    return get_peft_model(build("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def test_partitioned_fetch_without_torch_distributed_is_a_clear_error(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    model = hf_offload.enable_layer_streaming(
        _lora_llama(), OffloadConfig(partitioned_fetch=True, shared_host_store=False)
    )
    ids = torch.randint(3, 90, (1, 6))
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        model(input_ids=ids)


def test_partitioned_fetch_alone_on_a_node_copies_whole_layers(caplog):
    with caplog.at_level(logging.INFO, logger="hf_offload"):
        model = hf_offload.enable_layer_streaming(_lora_llama(), OffloadConfig(partitioned_fetch=True))
    assert "partitioned_fetch has no effect with one rank on a node" in caplog.text
    ids = torch.randint(3, 90, (1, 6))
    model(input_ids=ids)
    stats = hf_offload.stats(model)
    assert stats["bytes_from_peers"] == 0 and stats["bytes_to_device"] > 0


def test_partitioned_fetch_is_refused_with_full_finetune():
    with pytest.raises(ValueError, match="partitioned_fetch.*full_finetune"):
        OffloadConfig(partitioned_fetch=True, full_finetune=True)


def test_evaluation_groups_do_not_depend_on_a_ranks_memory_under_partitioned_fetch():
    """Every rank must load the same layers: groups sized by each rank's free memory would not be the same."""
    from hf_offload.engine.distributed import FetchPartition, Ranks
    from hf_offload.engine.layer_major import plan_groups

    model = hf_offload.enable_layer_streaming(_lora_llama())
    runtime = hf_offload.api.get_runtime(model)
    assert plan_groups(model, runtime, None).max_batches is None  # replicated: as many as memory allows
    runtime.streamer.partition = FetchPartition(Ranks(rank=1, world_size=2, local_rank=1, local_world_size=2))
    assert plan_groups(model, runtime, None).max_batches == 1  # batch by batch
    assert plan_groups(model, runtime, 3).max_batches == 3  # a fixed group size is the same on every rank
