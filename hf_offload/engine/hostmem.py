"""Host memory: how much the host store will need while it is built, and how much this machine has available.

Building the store allocates one new buffer per layer and releases the layer's old tensors as soon as it is packed.
Tensors in anonymous memory (a model built or converted in this process) are freed then; tensors backed by a file
mapping (transformers loads safetensors checkpoints memory-mapped) live in the page cache, which the kernel already
counts as available, so packing them frees nothing more. Tensors on an accelerator free no host memory. The peak
of new host memory is therefore

    max over layers k of  sum(store bytes of layers 0..k) - sum(freed bytes of layers 0..k-1) + encode scratch of k

and `check_fits` compares it with `available_bytes()` before anything is packed, so a store that cannot fit stops
with a clear message instead of the process being killed by the OOM killer half-way through.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..units import format_bytes

logger = logging.getLogger(__name__)


class HostMemoryError(MemoryError):
    """Raised before the host store is built when it would not fit in available host memory."""

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed = needed
        self.available = available


def available_bytes(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Host memory this process can still get: MemAvailable, capped by a cgroup memory limit. None when unknown.

    Args:
        proc_root: where procfs is mounted (a parameter so tests can pass a fake tree).
        cgroup_root: where the cgroup hierarchy is mounted.

    Returns:
        Bytes, or None when neither /proc/meminfo nor a cgroup limit can be read.
    """
    candidates = []
    try:
        with open(os.path.join(proc_root, "meminfo")) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)  # reported in kB
                    break
    except (OSError, ValueError):
        pass
    headroom = _cgroup_headroom(proc_root, cgroup_root)
    if headroom is not None:
        candidates.append(headroom)
    return min(candidates) if candidates else None


# Note: [cgroup memory limits]
# Containers limit memory through cgroups. v2 (unified): /proc/self/cgroup has a line `0::<path>`, and the limit
# and usage are <root>/<path>/memory.max ("max" when unlimited) and memory.current. v1: a line
# `<id>:memory:<path>` (the controller list may hold more names, e.g. "memory,cpu"), with the memory hierarchy
# mounted at <root>/memory and files memory.limit_in_bytes (a huge page-rounded number when unlimited) and
# memory.usage_in_bytes. Inside a container the path recorded in /proc/self/cgroup is often the host's and the
# container sees its own cgroup at the mount root, so the mount root is tried when the path does not exist there.
# Both versions can be mounted at once (hybrid); the smallest headroom found wins.
_CGROUP_FILES = {"v2": ("memory.max", "memory.current"), "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes")}


def _cgroup_headroom(proc_root: str, cgroup_root: str) -> int | None:
    """Limit minus usage of this process's memory cgroup (v1 or v2), or None when there is no limit to read."""
    try:
        with open(os.path.join(proc_root, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            mount, version = cgroup_root, "v2"
        elif "memory" in controllers.split(","):
            mount, version = os.path.join(cgroup_root, "memory"), "v1"
        else:
            continue
        for base in (os.path.join(mount, path.lstrip("/")), mount):
            headroom = _read_headroom(base, *_CGROUP_FILES[version])
            if headroom is not None:
                found.append(headroom)
                break
    return min(found) if found else None


def _read_headroom(base: str, limit_file: str, usage_file: str) -> int | None:
    try:
        with open(os.path.join(base, limit_file)) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, usage_file)) as f:
            usage = int(f.read().strip())
        limit_bytes = int(limit)
    except (OSError, ValueError):
        return None
    if limit_bytes >= 1 << 60:  # cgroup v1 "unlimited" (PAGE_COUNTER_MAX pages)
        return None
    return max(limit_bytes - usage, 0)


class _FileMappings:
    """Address ranges of this process's file-backed memory mappings (Linux /proc/self/maps; empty elsewhere)."""

    def __init__(self) -> None:
        starts, ends = [], []
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    fields = line.split()
                    # address perms offset dev inode [path]; a non-zero inode is a file mapping
                    if len(fields) >= 6 and fields[4] != "0":
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        starts.append(start)
                        ends.append(end)
        except OSError:
            pass
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self.starts = [starts[i] for i in order]
        self.ends = [ends[i] for i in order]

    def __contains__(self, address: int) -> bool:
        i = bisect.bisect_right(self.starts, address) - 1
        return i >= 0 and address < self.ends[i]


def freed_bytes(params: list[nn.Parameter], mappings: _FileMappings) -> int:
    """Anonymous host memory released when these tensors are packed (see the module docstring)."""
    total = 0
    for param in params:
        if param.device.type == "cpu" and param.data_ptr() not in mappings:
            total += param.numel() * param.element_size()
    return total


@dataclass
class LayerNeed:
    store_bytes: int  # its buffer in the host store
    freed_bytes: int  # anonymous host memory its old tensors give back once packed
    transient_bytes: int  # working memory while it is encoded


def peak_bytes(layers: list[LayerNeed]) -> int:
    """Most new host memory held at once while the store is built layer by layer."""
    peak = held = 0
    for layer in layers:
        held += layer.store_bytes
        peak = max(peak, held + layer.transient_bytes)
        held -= layer.freed_bytes
    return max(peak, 0)


def check_fits(needs_of: Callable[[str | None], list[LayerNeed]], chosen: str | None, available: int | None) -> None:
    """Raise `HostMemoryError` when the store for `chosen` (a base_weight_dtype) would not fit in `available`.

    `needs_of(dtype)` gives the layer needs of the store with that base_weight_dtype; the other dtypes are only
    laid out when `chosen` does not fit, to say which of them would.
    """
    if available is None:
        logger.debug("hf_offload: available host memory unknown; skipping the host memory check")
        return
    needed = peak_bytes(needs_of(chosen))
    if needed <= available:
        return
    options = []
    for dtype in (None, "int8", "nf4"):
        if dtype == chosen:
            continue
        peak = peak_bytes(needs_of(dtype))
        verdict = "fits" if peak <= available else "does not fit either"
        options.append(f"base_weight_dtype={dtype!r} would need {format_bytes(peak)} ({verdict})")
    raise HostMemoryError(
        f"hf_offload: building the host store with base_weight_dtype={chosen!r} needs {format_bytes(needed)} more "
        f"host memory, but only {format_bytes(available)} is available (MemAvailable, or the cgroup limit). "
        + ("; ".join(options) + ". " if options else "")
        + "Free host memory, pick a smaller base_weight_dtype in OffloadConfig, or pass "
        "OffloadConfig(check_host_memory=False) to skip this check.",
        needed,
        available,
    )


def layer_needs(layouts: list, mappings: _FileMappings | None = None) -> list[LayerNeed]:
    """`LayerNeed` of each layer from its store layout (`store.LayerLayout`)."""
    mappings = mappings if mappings is not None else _FileMappings()
    needs = []
    for layout in layouts:
        params = [p for p, _ in layout.dense] + [p for p, _, _ in layout.encoded]
        # quantizing one weight works on an fp32 copy of it at most
        transient = max((p.numel() * 4 for p, _, _ in layout.encoded), default=0)
        needs.append(LayerNeed(layout.nbytes, freed_bytes(params, mappings), transient))
    return needs


def file_mappings() -> _FileMappings:
    return _FileMappings()
