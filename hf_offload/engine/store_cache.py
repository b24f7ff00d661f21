"""The host store on disk: written once after a build, memory-mapped by later runs with the same key.

Packing a big checkpoint into an nf4 store takes minutes; restarts, resumes and the other ranks of a job would pay
that again for the same bytes. With `OffloadConfig(store_cache=DIR)` the built store is written to `DIR/store/`
(one file per layer buffer and a manifest), and a later build whose key matches maps those files instead of
packing.

Files: `DIR/store/manifest.json` holds the format version, the key and the fields it was made from, and per layer
its file, byte count and the encoded tensors' small metadata (the nf4 offsets); `DIR/store/layer-NNNNN.bin` holds
the layer's buffer bytes exactly.

Note: [Store cache key]
The key is a digest of: this module's format version; the codec (`base_weight_dtype`); the layout of every layer's
buffer (each region's parameter name, kind, offset, dtype and shape, from `layout_layer`, so another dtype, another
set of frozen parameters or another hf_offload packing order is another key); and the model: its `name_or_path`,
its config (without the switches that training flips, such as `use_cache`), and a fingerprint of the weights in
memory (a hash over 256 evenly spaced 64-byte windows of every tensor packed). The fingerprint costs milliseconds
and tells another checkpoint (or a fine-tuned one) from this one; a change confined to bytes it does not sample,
under the same name and config, is not seen: give such a model another cache directory. A manifest whose key
differs is logged with the fields that differ, and the store is built and written anew; it is never used.

Note: [Writing a store cache]
Files are written into a temporary folder next to `store/` and synced; the manifest is written last, and the folder
is renamed to `store/` only then, replacing the old one (renamed aside first, then deleted). A write killed at any
point leaves either the old complete store, no `store/` at all, or a temporary folder that is never read (and is
removed by the next write): never a `store/` that looks valid and is not. When several processes write the same
key at once, the first rename wins and the others discard their copy.

Note: [Mapped layer buffers]
A layer's file is mapped copy-on-write (`mmap.ACCESS_COPY`, MAP_PRIVATE): its pages are the page cache's, shared
by every process mapping it, until one is written; an in-place write to a weight then changes this process's copy
only, never the file. Mappings start on a page boundary, so the buffers can be page-locked like
`page_aligned_empty`'s (page-locking writes to every page, so a pinned buffer ends up a private copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORE = "store"
MANIFEST = "manifest.json"
_SAMPLES, _WINDOW = 256, 64  # fingerprint: windows per tensor, bytes per window
_VOLATILE_CONFIG = frozenset(  # config entries training code flips at run time: not part of the checkpoint
    {"use_cache", "_attn_implementation", "_attn_implementation_autoset", "_commit_hash", "transformers_version"}
)


@dataclass
class CachedLayer:
    """One layer's buffer mapped from the cache, and the metadata of its encoded tensors (in layout order)."""

    host: torch.Tensor
    encoded_meta: list  # per encoded tensor in layout order: its codec metadata (a list of them for stacked experts)


def layout_digest(layer: nn.Module, layout) -> str:
    """A digest of where each tensor of `layout` (a `store.LayerLayout` of `layer`) sits in its buffer."""
    names = {id(p): n for n, p in layer.named_parameters(remove_duplicate=False)}
    regions = [["nbytes", layout.nbytes, layout.base_nbytes]]
    for param, region in layout.dense:
        regions.append(["dense", names.get(id(param), "?"), *_region(region)])
    for param, parts, scratch in layout.encoded:
        regions.append(["encoded", names.get(id(param), "?"), [_region(p) for p in parts], _region(scratch)])
    for param, parts, scratch in layout.encoded_experts:
        regions.append(["experts", names.get(id(param), "?"), [_region(p) for p in parts], _region(scratch)])
    for _, name, region, alias in layout.attributes:
        regions.append(["attribute", name, alias, *_region(region)])
    return _digest(regions)


def _region(region) -> list:
    return [region.offset, str(region.dtype), list(region.shape)]


def fingerprint(tensors: list[torch.Tensor]) -> str:
    """A hash over evenly spaced byte windows of each tensor (and its size): cheap, and different for another
    checkpoint. See Note: [Store cache key].

    Raises:
        ValueError: a tensor has no data here (meta device).
    """
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        if tensor.device.type == "meta":
            raise ValueError("a weight is on the meta device: there are no bytes to fingerprint")
        flat = (
            tensor.detach().reshape(-1).view(torch.uint8)
            if tensor.dim()
            else tensor.detach().reshape(1).view(torch.uint8)
        )
        n = flat.numel()
        digest.update(n.to_bytes(8, "little"))
        if n <= _SAMPLES * _WINDOW:
            digest.update(flat.cpu().numpy().tobytes())
            continue
        starts = torch.linspace(0, n - _WINDOW, _SAMPLES).long()
        index = (starts[:, None] + torch.arange(_WINDOW)).reshape(-1)
        digest.update(flat.index_select(0, index.to(flat.device)).cpu().numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: nn.Module) -> dict:
    """The model's `name_or_path` and config (without run-time switches), for the key."""
    config = getattr(model, "config", None)
    values = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    values = {k: v for k, v in values.items() if k not in _VOLATILE_CONFIG}
    if (values.get("quantization_config") or {}).get("quant_method") == "hf_offload":
        # loading into the store (HostStoreConfig): its settings are in the key's other fields, or change nothing
        del values["quantization_config"]
    return {"name_or_path": str(getattr(model, "name_or_path", "")), "config": _digest(values)}


def checkpoint_fingerprint(files: list[str]) -> str:
    """A digest of checkpoint files' names, sizes and modification times: another or rewritten checkpoint is another
    key, without reading a weight (the key of a store loaded straight from a checkpoint)."""
    entries = []
    for path in sorted(files):
        status = os.stat(path)
        entries.append([os.path.basename(path), status.st_size, status.st_mtime_ns])
    return _digest(entries)


def make_key_fields(codec_name: str | None, layouts: list[str], identity: dict, content: str) -> dict:
    return {"format": FORMAT_VERSION, "codec": codec_name, "layout": _digest(layouts), **identity, "content": content}


def key_of(fields: dict) -> str:
    return _digest(fields)


def open_cached(directory: str | os.PathLike, fields: dict) -> list[CachedLayer] | None:
    """The layer buffers cached in `directory` for the key made of `fields`, mapped copy-on-write, or None.

    None when there is no complete cache, or when it was made for another key (logged, with the fields that differ).
    """
    store = Path(directory) / STORE
    try:
        manifest = json.loads((store / MANIFEST).read_text())
    except FileNotFoundError:
        logger.info("hf_offload: no host store cache in %s yet; it is written once the store is built", directory)
        return None
    except (OSError, ValueError) as error:
        logger.warning("hf_offload: the host store cache in %s is unreadable (%s); rebuilding it", directory, error)
        return None
    if manifest.get("key") != key_of(fields):
        stale = sorted(
            k
            for k in fields.keys() | manifest.get("fields", {}).keys()
            if manifest.get("fields", {}).get(k) != fields.get(k)
        )
        logger.warning(
            "hf_offload: the host store cache in %s was built for another %s; building the store again and "
            "replacing it",
            directory,
            ", ".join(stale) or "key",
        )
        return None
    layers = []
    for entry in manifest["layers"]:
        path = store / entry["file"]
        try:
            if path.stat().st_size != entry["nbytes"]:
                raise OSError(f"{path.name} holds {path.stat().st_size} bytes, the manifest says {entry['nbytes']}")
            layers.append(CachedLayer(_map(path, entry["nbytes"]), entry["encoded_meta"]))
        except OSError as error:
            logger.warning("hf_offload: the host store cache in %s is damaged (%s); rebuilding it", directory, error)
            return None
    logger.info("hf_offload: host store mapped from the cache in %s (%d layers)", directory, len(layers))
    return layers


def _map(path: Path, nbytes: int) -> torch.Tensor:
    """The file's bytes as a uint8 tensor over a copy-on-write mapping. See Note: [Mapped layer buffers]."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_COPY)  # the mapping outlives the file object
    return torch.frombuffer(mapping, dtype=torch.uint8)


def write_cache(directory: str | os.PathLike, fields: dict, packs: list) -> None:
    """Write the store's layer buffers (`packs`, `store.LayerPack`s) to `directory` under the key of `fields`.

    See Note: [Writing a store cache]. A failure to write is logged and leaves the run going (the store is built).
    """
    directory = Path(directory)
    temporary = directory / f".{STORE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(directory)
        temporary.mkdir()
        layers = []
        for pack in packs:
            name = f"layer-{pack.index:05d}.bin"
            _write_file(temporary / name, pack.host)
            layers.append({"file": name, "nbytes": pack.nbytes, "encoded_meta": [e.codec_meta for e in pack.encoded]})
        manifest = {"format": FORMAT_VERSION, "key": key_of(fields), "fields": fields, "layers": layers}
        _write_bytes(temporary / MANIFEST, json.dumps(manifest, indent=1).encode())
        _sync_directory(temporary)
        _publish(temporary, directory / STORE)
        logger.info("hf_offload: host store cached in %s", directory)
    except OSError as error:
        logger.warning("hf_offload: could not write the host store cache to %s (%s); the run goes on", directory, error)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _publish(temporary: Path, store: Path) -> None:
    """Rename the complete temporary folder to `store`, replacing an older one."""
    old = None
    if store.exists():
        old = store.with_name(f".{STORE}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(store, old)
    try:
        os.rename(temporary, store)
    except OSError:
        if not (store / MANIFEST).exists():  # not another writer that got there first
            raise
    _sync_directory(store.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned(directory: Path) -> None:
    """Temporary folders of killed writes (older than an hour, so a concurrent writer's folder is left alone)."""
    import time

    for path in directory.glob(f".{STORE}.*"):
        try:
            if time.time() - path.stat().st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _write_file(path: Path, buffer: torch.Tensor) -> None:
    with open(path, "wb") as f:
        if buffer.numel():
            f.write(memoryview(buffer.numpy()))
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the renames durable
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
