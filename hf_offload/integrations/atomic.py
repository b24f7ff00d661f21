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
_TMP, _OLD = ".tmp-", ".old-"
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


@contextlib.contextmanager
def staged_files(target: str, seed: tuple[str, ...] = ("README.md",)) -> Iterator[str]:
    """Yield a temporary directory next to `target` to save into; then move each file saved there into `target`.

    For saves into a directory that holds other things too (a Trainer's output directory holds its checkpoints),
    so the directory itself cannot be swapped: every file is complete before it replaces its namesake (os.replace),
    so a kill leaves each file old or new, never cut short. Files named in `seed` are copied in first, so that a
    save that updates them (peft updates README.md) updates the existing ones.

    Args:
        target: the directory the files end up in (created if missing).
        seed: names of files of `target` copied into the temporary directory before the save.

    Yields:
        The path to save into.
    """
    target = os.path.abspath(target)
    parent, name = os.path.split(target)
    os.makedirs(target, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_TMP}", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        for seeded in seed:
            if os.path.isfile(os.path.join(target, seeded)):
                shutil.copy2(os.path.join(target, seeded), os.path.join(tmp, seeded))
        yield tmp
        for folder, _, files in os.walk(tmp):
            destination = os.path.join(target, os.path.relpath(folder, tmp))
            os.makedirs(destination, exist_ok=True)
            for file in files:
                _fsync(os.path.join(folder, file))
                os.replace(os.path.join(folder, file), os.path.join(destination, file))
        _fsync(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
