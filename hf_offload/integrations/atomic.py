"""Exports that a kill cannot destroy: write into a temporary sibling, then swap it in for the old one at once.

Note: [Atomic exports]
A merged model, a model card or any other export hf_offload writes is first written completely into a temporary
directory (or file) in the same parent, so that it is on the same filesystem, then put in place of the old one:
- a file with `os.replace`, which is atomic;
- a directory with `renameat2(RENAME_EXCHANGE)` (Linux), which swaps the two names atomically; the old export then
  sits under the temporary name and is deleted. Where the call or the filesystem does not offer the exchange, the
  old directory is first renamed aside, then the new one renamed in: a kill between those two renames leaves both
  on disk under hidden names, and the next export (or `recover_directory`) puts the complete one back in place.
So a kill at any moment leaves the previous export or the new one under the target name, never a mixture and never
nothing (in the fallback, never nothing after recovery).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_TMP, _OLD, _STAGED = ".tmp-", ".old-", ".staged-"
COMPLETE_MARKER = ".hf_offload_complete"


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:  # pragma: no cover - no libc to load
        return None


_LIBC = _libc()


def exchange(a: str, b: str) -> bool:
    """Atomically swap the paths `a` and `b` (both must exist). False where the system cannot."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    result = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), a)


def _siblings(target: str, kind: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(target))
    prefix = f".{name}{kind}"
    if not os.path.isdir(parent):
        return []
    return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)]


def recover_directory(target: str) -> None:
    """Undo what a kill during the fallback swap left: put the complete export back under `target`, drop the rest."""
    target = os.path.abspath(target)
    if not os.path.exists(target):
        complete = [p for p in _siblings(target, _TMP) if os.path.isfile(os.path.join(p, COMPLETE_MARKER))]
        candidates = complete or _siblings(target, _OLD)
        if candidates:
            os.rename(max(candidates, key=os.path.getmtime), target)
    for leftover in _siblings(target, _TMP) + _siblings(target, _OLD):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str) -> Iterator[str]:
    """Yield an empty temporary directory next to `target`; when the block ends normally it replaces `target`.

    See Note: [Atomic exports]. If the block raises, `target` is left as it was and the temporary directory removed.

    Args:
        target: the directory the export ends up in (created if missing; replaced whole if present).

    Yields:
        The path to write the export into.
    """
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    recover_directory(target)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_TMP}", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an export is as readable as any new directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    open(os.path.join(tmp, COMPLETE_MARKER), "w").close()
    if os.path.isdir(target) and exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # the old export, now under the temporary name
    elif os.path.isdir(target):
        old = tempfile.mkdtemp(prefix=f".{name}{_OLD}", dir=parent)
        os.rmdir(old)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(target, COMPLETE_MARKER))
    _fsync(parent)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary file path next to `path`; when the block ends normally it replaces `path` (os.replace)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{_TMP}", dir=parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync(parent)


# Note: [The final save into output_dir]
# A Trainer's output directory holds the final save (adapter, configs, training_args.bin, tokenizer, README.md) next
# to what must survive it: checkpoint-N directories, a merged/ export, files the user put there. So the directory
# cannot be swapped whole, and moving the final save into a subdirectory or behind symlinks would change what users
# and tools (PeftModel.from_pretrained(output_dir), push_to_hub, cp) expect to find. The save is made atomic as a
# set instead, with a commit marker, like a journal:
# 1. the Trainer saves into a hidden sibling `.<name>.staged-*` (README.md copied in first, so peft updates it);
# 2. every file there is flushed to disk, then COMPLETE_MARKER is written into it: this is the commit point;
# 3. the files are moved into the output directory one by one (os.replace, atomic per file), and the sibling
#    removed. Nothing else in the output directory is touched.
# A kill before the commit point leaves the previous save whole (the sibling is dropped later). A kill after it
# leaves the new save committed: `finish_staged_save` (run by the next save into that directory and when a Trainer
# starts training) moves the rest in, so the directory ends up with the new save whole, never a mixture. What stays
# open: the moves take a few milliseconds (renames only), and a loader that reads the output directory after a kill
# inside those milliseconds and before anything has finished the save sees some files new and some old, each
# whole. Call `finish_staged_save(output_dir)` before loading a directory whose writer was killed.
@contextlib.contextmanager
def staged_files(target: str, seed: tuple[str, ...] = ("README.md",)) -> Iterator[str]:
    """Yield a temporary directory next to `target` to save into; then commit its files into `target` as one set.

    See Note: [The final save into output_dir]. Files named in `seed` are copied in first, so that a save that
    updates them (peft updates README.md) updates the existing ones. If the block raises, `target` is left as it was.

    Args:
        target: the directory the files end up in (created if missing); what else it holds is left alone.
        seed: names of files of `target` copied into the temporary directory before the save.

    Yields:
        The path to save into.
    """
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(target, exist_ok=True)
    finish_staged_save(target)  # one a kill interrupted after its commit point goes in first, whole
    tmp = tempfile.mkdtemp(prefix=f".{name}{_STAGED}", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        for seeded in seed:
            if os.path.isfile(os.path.join(target, seeded)):
                shutil.copy2(os.path.join(target, seeded), os.path.join(tmp, seeded))
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # not committed: the previous save stays
        raise
    _move_in(tmp, target)  # if this fails half way the save is committed: the next one finishes it


def finish_staged_save(target: str) -> bool:
    """Finish a final save into `target` that a kill interrupted after its commit point; drop uncommitted ones.

    See Note: [The final save into output_dir].

    Args:
        target: the output directory the save was going into.

    Returns:
        True if a committed save was found and moved in (the directory now holds it whole).
    """
    finished = False
    for staged in sorted(_siblings(target, _STAGED)):
        if os.path.isfile(os.path.join(staged, COMPLETE_MARKER)):
            os.makedirs(target, exist_ok=True)
            _move_in(staged, target)
            finished = True
        else:
            shutil.rmtree(staged, ignore_errors=True)
    return finished


def _commit(staged: str) -> None:
    """The commit point of a staged save: its marker, on disk, after every file it marks."""
    with open(os.path.join(staged, COMPLETE_MARKER), "w") as f:
        f.flush()
        os.fsync(f.fileno())
    _fsync(staged)


def _move_in(staged: str, target: str) -> None:
    """Move every file of a committed staged save into `target` (each replaces its namesake), then remove it."""
    for folder, _, files in os.walk(staged):
        destination = os.path.join(target, os.path.relpath(folder, staged))
        os.makedirs(destination, exist_ok=True)
        for file in files:
            if folder != staged or file != COMPLETE_MARKER:
                os.replace(os.path.join(folder, file), os.path.join(destination, file))
        _fsync(destination)
    shutil.rmtree(staged)  # the marker last of all: until it is gone a kill is finished by the next call


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    """Flush a file or directory to disk, so that the rename that follows cannot be persisted before its content."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)
