"""Fixtures shared by the tests of the faces."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on 2 shared cores, OpenMP threads contending with other processes make the tiny
    matmuls of these tests ~15x slower. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """hf_offload's embedded tiny Llama (2 layers for speed) with its tokenizer, saved to a local directory."""
    from hf_offload.demo import tiny_checkpoint

    return str(tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama-2", num_hidden_layers=2))
