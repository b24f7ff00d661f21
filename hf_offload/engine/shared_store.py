"""One host store per node, shared by the node's data-parallel ranks: files in a tmpfs, mapped by every rank.

Each rank packs its store as usual (`store.HostStore.build`); then local rank 0 writes the layer buffers into a
segment directory under /dev/shm, every local rank maps the files read-only, checks that they hold exactly the bytes
it packed itself, and moves its layers onto the mapping (`LayerPack.host`, the one thing a store's location is,
see store.py), which frees its private copy. In steady state the node holds one copy of the frozen layers.

Note: [Shared store lifecycle]
- Name. `hf_offload-store-<job>-<fingerprint>`: `<job>` is `HF_OFFLOAD_JOB` (set by `hf-offload launch`) or the
  pid of the ranks' parent (the torchrun agent or `accelerate launch`, the same for every rank of a node and
  different for every job); `<fingerprint>` hashes the layout and a sample of the bytes, plus how many stores this
  process shared before (a reference model gets its own segment).
- Who creates. Local rank 0, in `<name>.creating` holding its lock, renamed to `<name>` when complete. The
  others wait for `<name>`; if the creating directory's lock is free (its creator died) they stop with an error.
- No segment outlives its job. Every rank that maps the segment drops a `mapped.<local rank>` mark; the rank that
  completes the set removes the directory. The mappings keep the memory alive (tmpfs pages belong to the file, not
  to its name) and the kernel frees it when the last rank unmaps or dies, SIGKILL included. What a failure between
  creation and the last mapping leaves behind is removed by the next start on the node (`sweep`: directories whose
  lock nobody holds), and by `hf-offload launch` when the command it ran exits (`remove_job`).
- Space. Before anything is written, the free space of the tmpfs is checked against the store; too little is a
  clear error that says how to grow /dev/shm or turn the sharing off.
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
    return _safe(job) if job else f"agent{os.getppid()}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:64]


def fingerprint(packs, counter: int) -> str:
    """A digest of the store's layout (per layer: size and tensor places) and of 4 KiB at three places of each
    buffer: two models of the same shape get different segments."""
    digest = hashlib.sha256(str(counter).encode())
    for pack in packs:
        places = [(t.offset, str(t.dtype), t.shape) for t in pack.tensors]
        digest.update(repr((pack.index, pack.nbytes, places)).encode())
        n = pack.nbytes
        for start in sorted({0, max(n // 2 - 2048, 0), max(n - 4096, 0)}):
            digest.update(pack.host[start : start + 4096].numpy().tobytes())
    return digest.hexdigest()[:16]


def required_bytes(packs) -> int:
    """Bytes the segment takes in the tmpfs: every layer file rounded up to whole pages."""
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


def sweep(root: str | None = None, grace_s: float = 60.0) -> list[str]:
    """Remove segments no living process holds: left by a job that died before its ranks had all mapped theirs.
    A directory without a lock file yet is left alone for `grace_s` (its creator may be about to lock it).

    Returns:
        The directories removed.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root or ROOT):
            if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
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
            if entry.name.startswith(f"{PREFIX}{_safe(job)}-"):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed


# --- creating, waiting, mapping -------------------------------------------------------------------------------------
def _layer_file(path: Path, index: int) -> Path:
    return path / f"layer-{index:05d}.bin"


def _create(path: Path, packs, root: str) -> int:
    """Write every layer buffer into `<path>.creating`, then rename it to `path` (local rank 0). Returns the
    descriptor holding the segment's shared lock, taken before the first byte is written: waiters and sweeps see a
    living creator from the start, and the lock goes with the directory through the rename."""
    check_space(root, required_bytes(packs))
    building = path.with_name(path.name + CREATING)
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(mode=0o700)
    fd = _lock(building / LOCK, fcntl.LOCK_SH)
    try:
        for pack in packs:
            with open(_layer_file(building, pack.index), "wb") as f:
                f.write(memoryview(pack.host.numpy()))
        manifest = {"layers": [[pack.index, pack.nbytes] for pack in packs], "pid": os.getpid()}
        (building / MANIFEST).write_text(json.dumps(manifest))
        os.rename(building, path)
    except BaseException:
        os.close(fd)
        shutil.rmtree(building, ignore_errors=True)
        raise
    return fd


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


def _map(path: Path, pack) -> torch.Tensor:
    """Layer `pack.index`'s file in `path`, mapped shared and read-only, as a uint8 tensor of `pack.nbytes`."""
    import torch

    with open(_layer_file(path, pack.index), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != pack.nbytes:
            raise SharedStoreError(
                f"hf_offload: the shared host store {path} holds {size} bytes for layer {pack.index}, but this rank "
                f"packed {pack.nbytes}: the ranks of this node are not streaming the same model."
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


def share(
    packs,
    ranks: Ranks,
    pin: Callable[[torch.Tensor], bool],
    unpin: Callable[[torch.Tensor], None],
    root: str | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> SharedStore:
    """Move this rank's layer buffers onto its node's shared store, building the store on local rank 0.

    Args:
        packs: the `LayerPack`s of this rank's freshly built store; each `host` is replaced by the shared mapping.
        ranks: this process's place in the job (`local_rank`, `local_world_size`).
        pin / unpin: the device's page-locking of a host buffer (the mapping is pinned as the old buffer was).
        root: the tmpfs directory (default `ROOT`, /dev/shm).
        timeout_s: how long to wait for local rank 0 to begin building.

    Returns:
        The `SharedStore`, to `close` when streaming ends.

    Raises:
        SharedStoreError: too little space in `root`, local rank 0 failed, or the ranks hold different models.
    """
    import torch

    global _shared_in_this_process
    root = root or ROOT
    if ranks.local_rank == 0:
        sweep(root)
    path = Path(root) / f"{PREFIX}{job_key()}-{fingerprint(packs, _shared_in_this_process)}"
    _shared_in_this_process += 1
    if ranks.local_rank == 0:
        fd = _create(path, packs, root)
    else:
        _wait(path, timeout_s)
        fd = _lock(path / LOCK, fcntl.LOCK_SH)
    for pack in packs:
        mapped = _map(path, pack)
        if not torch.equal(mapped, pack.host):
            os.close(fd)
            raise SharedStoreError(
                f"hf_offload: layer {pack.index} of the shared host store {path} differs from the one this rank "
                f"(local rank {ranks.local_rank}) packed: the ranks of this node are not streaming the same weights. "
                "Load the same checkpoint on every rank, or turn sharing off (shared_host_store=False)."
            )
        was_pinned = pack.pinned
        if was_pinned:
            unpin(pack.host)
        pack.host = mapped
        pack.pinned = pin(mapped) if was_pinned else False
        pack.bind_host()
    _mark_mapped(path, ranks)
    shared = SharedStore(path, required_bytes(packs), fd)
    logger.info(
        "hf_offload: local rank %d maps the node's shared host store (%s, %s)",
        ranks.local_rank,
        path,
        format_bytes(shared.nbytes),
    )
    return shared


def _mark_mapped(path: Path, ranks: Ranks) -> None:
    """Say this rank has mapped the segment; the last local rank to do so removes its names (the mappings stay)."""
    (path / f"mapped.{ranks.local_rank}").touch()
    marks = {p.name for p in path.glob("mapped.*")}
    if marks >= {f"mapped.{k}" for k in range(ranks.local_world_size)}:
        shutil.rmtree(path, ignore_errors=True)
