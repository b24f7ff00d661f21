"""Each host buffer of the store is a storage of its own that starts where its page registration starts.

CUDA reports a tensor as pinned (`is_pinned()`) from its storage's start address, and torch's non-blocking copy
decides from it whether a copy can be asynchronous. The store registers (page-locks) each buffer from its first
byte: if the buffer were a view into a larger storage that starts earlier, the registration would not cover the
storage's start, and torch would treat the buffer as pageable memory.
"""

from __future__ import annotations

import gc
import mmap

import pytest
from families import build
from parity import with_lora

import hf_offload
from hf_offload import OffloadConfig
from hf_offload.api import get_runtime
from hf_offload.engine.store import page_aligned_empty


@pytest.mark.parametrize("nbytes", [1, 64, mmap.PAGESIZE - 1, mmap.PAGESIZE, 3 * mmap.PAGESIZE + 5])
def test_buffer_storage_starts_at_the_page_aligned_buffer(nbytes):
    host = page_aligned_empty(nbytes)
    storage = host.untyped_storage()
    assert host.numel() == nbytes and host.storage_offset() == 0
    assert storage.data_ptr() == host.data_ptr()
    assert storage.data_ptr() % mmap.PAGESIZE == 0
    # the storage spans whole pages, so registering them all is registering exactly this storage
    assert storage.nbytes() % mmap.PAGESIZE == 0 and nbytes <= storage.nbytes() < nbytes + mmap.PAGESIZE
    host.fill_(7)
    assert int(host.sum()) == 7 * nbytes


def test_store_buffers_are_storages_of_their_own():
    model = with_lora(build("llama"))
    hf_offload.enable_layer_streaming(model, OffloadConfig(device="cpu"))
    for pack in get_runtime(model).store.packs:
        storage = pack.host.untyped_storage()
        assert storage.data_ptr() == pack.host.data_ptr(), f"layer {pack.index}: buffer starts inside its storage"
        assert storage.data_ptr() % mmap.PAGESIZE == 0


def test_buffer_memory_is_released_with_the_tensor():
    def is_mapped(address: int) -> bool:
        with open("/proc/self/maps") as f:
            ranges = [[int(x, 16) for x in line.split()[0].split("-")] for line in f]
        return any(start <= address < end for start, end in ranges)

    host = page_aligned_empty(64 * mmap.PAGESIZE)
    address = host.data_ptr()
    assert is_mapped(address)
    del host
    gc.collect()
    assert not is_mapped(address)
