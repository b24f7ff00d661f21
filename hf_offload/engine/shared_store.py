"""One host store per node, shared by the node's data-parallel ranks: files in a tmpfs, mapped by every rank.

The store is built once per node. Local rank 0 locks a segment directory under /dev/shm before it packs (or loads)
a single layer, builds the store as usual (`store.HostStore.build`, or a checkpoint load into the store), then writes
each layer buffer into the segment, maps the file read-only and moves the layer onto the mapping (`LayerPack.host`,
the one thing a store's location is, see store.py), which frees its private copy, one layer at a time. Every other
local rank waits for the segment, checks that it holds the model this rank would have built, and binds its layers to
the mapped files as a store cache hit does: it packs nothing (and, loading into the store, reads no decoder-layer
weight of the checkpoint). In steady state the node holds one copy of the frozen layers, and while starting up one
copy plus the layer local rank 0 is moving.

Note: [Shared store lifecycle]
- Name. `hf_offload-store-<job>-<n>`: `<job>` is `HF_OFFLOAD_JOB` (set by `hf-offload launch`) or the pid of the
  ranks' parent (the torchrun agent or `accelerate launch`, the same for every rank of a node and different for every
  job), followed by `.<attempt>` when torchrun restarted the ranks; `<n>` counts the stores this process shared
  before (a reference model gets its own segment). Every rank knows the name before building anything.
- Same model. Local rank 0 writes a key into the manifest: for a store packed from a loaded model, a digest of the
  codec, every layer's layout and 64 sampled values of each raw weight as loaded (not the packed bytes, which the
  other ranks never make); for a store loaded from a checkpoint, the checkpoint's files (names, sizes, times), config,
  dtype and layouts. Each other rank computes its own key and stops with a clear error when they differ.
- Who creates. Local rank 0, in `<name>.creating` holding its lock from before the first layer is built, renamed to
  `<name>` when complete. The others wait for `<name>` as long as the lock is held (building a big store takes
  minutes); if the lock is free (its creator died or failed) they stop with an error, and if no `.creating` appeared
  within `START_TIMEOUT_S` they stop with another. Waiting is on files only: no torch.distributed collective (the
  process group may not exist yet, while a checkpoint loads). A local rank 0 that cannot share what it loaded (the
  checkpoint did not fill every layer) renames a manifest that declines, and every rank builds its own store.
- No segment outlives its job. Every rank that maps the segment drops a `mapped.<local rank>` mark; the rank that
  completes the set removes the directory. The mappings keep the memory alive (tmpfs pages belong to the file, not
  to its name) and the kernel frees it when the last rank unmaps or dies, SIGKILL included. What a failure between
  creation and the last mapping leaves behind is removed by the next start on the node (`sweep`: directories whose
  lock nobody holds), and by `hf-offload launch` when the command it ran exits (`remove_job`).
- Space. Before anything is built, the free space of the tmpfs is checked against the store's layouts; too little
  is a clear error that says how to grow /dev/shm or turn the sharing off.
- Writes. The mapping is read-only: a write into a frozen weight cannot reach the other ranks. The runtime refuses
  the writes it knows (merging adapters, `load_state_dict` into streamed weights); any other in-place write into
  a shared weight stops the process with a segmentation fault rather than silently changing another rank's model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..units import format_bytes

if TYPE_CHECKING:  # torch is imported where it is used: `hf-offload launch` imports this module to clean up
    import torch

    from .distributed import Ranks

logger = logging.getLogger(__name__)

ROOT = "/dev/shm"
PREFIX = "hf_offload-store-"
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
JOB_ENV = "HF_OFFLOAD_JOB"  # set by `hf-offload launch`: the job whose segments it removes when the command exits
CREATING = ".creating"
LOCK = "lock"
MANIFEST = "manifest.json"
START_TIMEOUT_S = 300.0  # how long a rank waits for local rank 0 to begin building before giving up
POLL_S = 0.05

_shared_in_this_process = 0  # stores shared so far: the n-th model of a script gets the n-th segment


class SharedStoreError(RuntimeError):
    """The node's shared host store could not be created or mapped; the message says what to do."""


def job_key(env: dict[str, str] | None = None) -> str:
    """The job part of a segment's name (see Note: [Shared store lifecycle])."""
    env = os.environ if env is None else env
    job = env.get(JOB_ENV)
    key = _safe(job) if job else f"agent{os.getppid()}"
    restart = env.get(RESTART_ENV)  # torchrun restarts the ranks under the same agent: a new attempt, new names
    return f"{key}.{_safe(restart)}" if restart and restart != "0" else key


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:64]


def wanted(setting: bool | None, ranks: Ranks) -> bool:
    """Whether this rank's store is the node's shared one: `setting` (`shared_host_store`) when given, else whenever
    several ranks of the job run on this node."""
    return ranks.local_world_size > 1 if setting is None else setting


def required_bytes(packs) -> int:
    """Bytes the segment takes in the tmpfs: every layer file rounded up to whole pages (`packs`: anything with
    `nbytes` per layer: packed layers, their layouts before packing, a load's prebuilt layers)."""
    page = mmap.PAGESIZE
    return sum(-(-pack.nbytes // page) * page for pack in packs)


def check_space(root: str | None, needed: int) -> None:
    """Raise before anything is written when the tmpfs at `root` has less than `needed` bytes free.

    Raises:
        SharedStoreError: not enough free space (or no such directory).
    """
    root = root or ROOT
    try:
        stat = os.statvfs(root)
    except OSError as err:
        raise SharedStoreError(
            f"hf_offload: the shared host store goes in {root}, which cannot be used ({err}). Run on a host with a "
            "tmpfs at /dev/shm, or turn sharing off (shared_host_store=False, `--offload_shared_host_store false`): "
            "each rank then keeps its own store."
        ) from None
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise SharedStoreError(
            f"hf_offload: the node's shared host store needs {format_bytes(needed)} in {root}, but it has "
            f"{format_bytes(free)} free. Grow it (`mount -o remount,size=<N>G {root}`; in Docker, `--shm-size`), or "
            "turn sharing off (shared_host_store=False, `--offload_shared_host_store false`): each rank then keeps "
            "its own store, which takes that much host memory per rank."
        )


# --- locks ----------------------------------------------------------------------------------------------------------
def _lock(path: Path, how: int) -> int | None:
    """An open descriptor of `path` holding flock `how` (| LOCK_NB: None when someone else holds it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _held(lock_file: Path) -> bool:
    """Whether a living process holds a lock on `lock_file` (a missing file counts as not held)."""
    if not lock_file.exists():
        return False
    fd = _lock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        return True
    os.close(fd)
    return False


def sweep(root: str | None = None, grace_s: float = 60.0, spare: str | None = None) -> list[str]:
    """Remove segments no living process holds: left by a job that died before its ranks had all mapped theirs.
    A directory without a lock file yet is left alone for `grace_s` (its creator may be about to lock it), and so
    are the segments of job `spare` (local rank 0's own: one it declined waits, unlocked, for the other ranks).

    Returns:
        The directories removed.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root or ROOT):
            if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            if spare is not None and entry.name.startswith(f"{PREFIX}{spare}-"):
                continue
            path = Path(entry.path)
            lock_file = path / LOCK
            young = time.time() - entry.stat(follow_symlinks=False).st_mtime < grace_s
            if (not lock_file.exists() and young) or _held(lock_file):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    if removed:
        logger.info("hf_offload: removed %d shared host store(s) left by a job that ended: %s", len(removed), removed)
    return removed


def remove_job(job: str, root: str | None = None) -> list[str]:
    """Remove every segment of `job` (what `hf-offload launch` does when its command exits, however it ended).

    Returns:
        The directories removed.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root or ROOT):
            if entry.name.startswith((f"{PREFIX}{_safe(job)}-", f"{PREFIX}{_safe(job)}.")):  # `.`: a restart
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


# --- creating, waiting, mapping -------------------------------------------------------------------------------------
def _layer_file(path: Path, index: int) -> Path:
    return path / f"layer-{index:05d}.bin"


def _next_path(root: str) -> Path:
    """The segment of this process's next shared store (the n-th model of a script gets the n-th segment)."""
    global _shared_in_this_process
    path = Path(root) / f"{PREFIX}{job_key()}-{_shared_in_this_process}"
    _shared_in_this_process += 1
    return path


def values_fingerprint(tensors) -> str:
    """A digest of each tensor's dtype and shape and of 64 evenly spaced values of it (raw, as the rank loaded them:
    the same on every rank that loaded the same checkpoint, whatever the store does to them afterwards). A tensor
    whose values are not laid out in memory one by one (an expanded placeholder) counts by dtype and shape only.
    """
    import torch

    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(repr((str(tensor.dtype), tuple(tensor.shape))).encode())
        if tensor.device.type == "meta" or not tensor.is_contiguous() or 0 in tensor.stride() or not tensor.numel():
            continue
        flat = tensor.detach().reshape(-1)  # contiguous: a view
        index = torch.linspace(0, flat.numel() - 1, min(64, flat.numel())).long().to(flat.device)
        digest.update(flat.index_select(0, index).cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class Building:
    """Local rank 0's segment while the store is built: `<name>.creating`, locked from before the first layer is
    packed (or loaded) until the store is complete, so the other local ranks wait for it rather than give up."""

    path: Path
    _fd: int | None = field(default=None, repr=False)

    @property
    def building(self) -> Path:
        return self.path.with_name(self.path.name + CREATING)

    @property
    def in_progress(self) -> bool:
        """Whether this rank still holds the segment's lock as its builder (not published, declined or abandoned)."""
        return self._fd is not None

    @classmethod
    def begin(cls, needed: int, root: str | None = None) -> Building:
        """Sweep what dead jobs left, check the space (`needed` bytes), and lock a new `<name>.creating`.

        Raises:
            SharedStoreError: not enough free space in the tmpfs.
        """
        root = root or ROOT
        sweep(root, spare=job_key())
        check_space(root, needed)
        segment = cls(_next_path(root))
        shutil.rmtree(segment.building, ignore_errors=True)
        segment.building.mkdir(mode=0o700)
        segment._fd = _lock(segment.building / LOCK, fcntl.LOCK_SH)
        return segment

    def publish(self, layers, key: str, swap: Callable[[int, torch.Tensor], None], ranks: Ranks) -> SharedStore:
        """Write the built store and move this rank onto it, layer by layer: each layer's file is written, mapped
        read-only and handed to `swap(position, mapping)`, which binds the layer to it and drops the private buffer
        (so the node holds one extra layer at a time, not a second store). Then the manifest, and the rename that
        lets the other ranks in.

        Args:
            layers: per layer, an object with `index`, `nbytes`, `host` (its buffer) and `encoded` (records with
                `codec_meta`, in layout order).
            key: what the other ranks check they would have built (see `attach`).
            swap: binds layer `position` to its mapping.
            ranks: this process's place (for the mapped mark).
        """
        entries = []
        try:
            for position, layer in enumerate(layers):
                entries.append([layer.index, layer.nbytes, [e.codec_meta for e in layer.encoded]])
                with open(_layer_file(self.building, layer.index), "wb") as f:
                    if layer.nbytes:
                        f.write(memoryview(layer.host.numpy()))
                swap(position, _map(self.building, layer.index, layer.nbytes))
            manifest = {"key": key, "layers": entries, "pid": os.getpid()}
            (self.building / MANIFEST).write_text(json.dumps(manifest))
            os.rename(self.building, self.path)
        except BaseException:
            self.abandon()
            raise
        fd, self._fd = self._fd, None
        _mark_mapped(self.path, ranks)
        shared = SharedStore(self.path, required_bytes(layers), fd)
        logger.info(
            "hf_offload: local rank 0 built the node's shared host store (%s, %s)",
            self.path,
            format_bytes(shared.nbytes),
        )
        return shared

    def decline(self, reason: str, ranks: Ranks) -> None:
        """Tell the waiting ranks that no store is shared under this name (they build their own), and let go."""
        try:
            (self.building / MANIFEST).write_text(json.dumps({"declined": reason, "pid": os.getpid()}))
            os.rename(self.building, self.path)
            _mark_mapped(self.path, ranks)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Let go of the lock (waiting ranks then report that local rank 0 stopped) and remove what was written."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        shutil.rmtree(self.building, ignore_errors=True)


def _wait(path: Path, timeout_s: float) -> None:
    """Wait until local rank 0 has renamed the complete segment to `path` (another local rank)."""
    building = path.with_name(path.name + CREATING)
    started = time.monotonic()
    while not (path / MANIFEST).exists():
        if building.exists() and not _held(building / LOCK) and (building / LOCK).exists():
            if (path / MANIFEST).exists():
                break  # renamed between the two checks
            raise SharedStoreError(
                f"hf_offload: local rank 0 stopped while building the node's shared host store in {building}. See "
                "its error above; the store is rebuilt at the next start."
            )
        if not building.exists() and time.monotonic() - started > timeout_s:
            raise SharedStoreError(
                f"hf_offload: waited {timeout_s:.0f} s for local rank 0 of this node to build the shared host store "
                f"{path}, and it did not start. Every rank of a node must stream the same model; start them with "
                "the same command (torchrun, accelerate launch), or turn sharing off (shared_host_store=False)."
            )
        time.sleep(POLL_S)


def _map(path: Path, index: int, nbytes: int) -> torch.Tensor:
    """Layer `index`'s file in `path`, mapped shared and read-only, as a uint8 tensor of `nbytes`."""
    import torch

    with open(_layer_file(path, index), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != nbytes:
            raise SharedStoreError(
                f"hf_offload: the shared host store {path} holds {size} bytes for layer {index}, but its manifest "
                f"says {nbytes}: it is damaged. Start the job again."
            )
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        mapping = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # torch warns that the buffer is not writable: that is the point
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)


@dataclass
class SharedStore:
    """This rank's hold on its node's shared host store (see Note: [Shared store lifecycle])."""

    path: Path
    nbytes: int
    _fd: int | None = field(default=None, repr=False)

    def close(self) -> None:
        """Let go of the segment's lock (the mappings go with the layer buffers that use them)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class MappedLayer:
    """One layer's buffer mapped from the node's shared store, and its encoded tensors' codec metadata (the shape
    of a store cache's `CachedLayer`, so packing and loading bind it the same way)."""

    host: torch.Tensor
    encoded_meta: list

    @property
    def nbytes(self) -> int:
        return self.host.numel()


def attach(
    key: str, ranks: Ranks, root: str | None = None, timeout_s: float = START_TIMEOUT_S
) -> tuple[SharedStore, list[MappedLayer]] | None:
    """Wait for local rank 0's store and map it (every local rank but 0): nothing is packed or read here.

    Args:
        key: what this rank would have built (the layouts and a sample of its raw weights, or the checkpoint it
            loads); the store's must be the same.
        ranks: this process's place in the job.
        root: the tmpfs directory (default `ROOT`, /dev/shm).
        timeout_s: how long to wait for local rank 0 to begin building.

    Returns:
        The `SharedStore` to close when streaming ends and each layer's mapping, or None when local rank 0 shares
        no store under this name (this rank then builds its own).

    Raises:
        SharedStoreError: local rank 0 failed or never started, or it built the store of another model.
    """
    path = _next_path(root or ROOT)
    _wait(path, timeout_s)
    fd = _lock(path / LOCK, fcntl.LOCK_SH)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if "declined" in manifest:
            logger.info(
                "hf_offload: local rank %d builds its own host store: %s", ranks.local_rank, manifest["declined"]
            )
            _mark_mapped(path, ranks)
            os.close(fd)
            return None
        if manifest["key"] != key:
            raise SharedStoreError(
                f"hf_offload: the node's shared host store {path} was built by local rank 0 from other weights than "
                f"this rank (local rank {ranks.local_rank}) holds: the ranks of this node are not streaming the same "
                "model. Load the same checkpoint with the same settings on every rank, or turn sharing off "
                "(shared_host_store=False)."
            )
        layers = [MappedLayer(_map(path, index, nbytes), meta) for index, nbytes, meta in manifest["layers"]]
    except BaseException:
        os.close(fd)
        raise
    _mark_mapped(path, ranks)
    shared = SharedStore(path, required_bytes(layers), fd)
    logger.info(
        "hf_offload: local rank %d maps the node's shared host store built by local rank 0 (%s, %s)",
        ranks.local_rank,
        path,
        format_bytes(shared.nbytes),
    )
    return shared, layers


def _mark_mapped(path: Path, ranks: Ranks) -> None:
    """Say this rank has mapped the segment; the last local rank to do so removes its names (the mappings stay)."""
    (path / f"mapped.{ranks.local_rank}").touch()
    marks = {p.name for p in path.glob("mapped.*")}
    if marks >= {f"mapped.{k}" for k in range(ranks.local_world_size)}:
        shutil.rmtree(path, ignore_errors=True)
