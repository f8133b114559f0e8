"""Writes that a crash cannot leave half done, and claims that keep two processes off one case.

* :func:`atomic_path` writes beside the target under a temporary name and renames it into place
  only when the write succeeded, so a reader never sees a partial file. The temporary name carries
  the writer's host and process id (``.mask.nii.gz~host~1234~x7q.part.nii.gz``) so that
  :func:`remove_stale_parts` can tell a file whose writer was killed (SIGKILL, power cut of a
  node, OOM killer: nothing runs to clean up) from one still being written, and remove it.
* :func:`claim` takes an exclusive ``flock`` on ``.<target>.claim`` beside a case's output, so two
  ``liverseg infer`` runs on one output folder never work on the same case. The kernel drops the
  lock when its holder dies, however it dies, so a killed run's claim never blocks a rerun; the
  file holds ``host pid`` for people and is removed by its holder when the case is over. ``flock``
  works on local file systems and on Linux NFS clients (as a POSIX lock); where ``fcntl`` is
  missing (Windows) claims always succeed and only the atomic writes protect a case.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
# .<target name>~<host>~<pid>~<random>.part<suffix>, as written by atomic_path.
_PART = re.compile(r"^\..+~(?P<host>[^~]+)~(?P<pid>\d+)~[^~]+\.part(\.[^/]*)?$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    An error leaves no file behind; a killed process leaves only its temporary file, which
    :func:`remove_stale_parts` removes on the next run.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}~{_HOST}~{os.getpid()}~",
                                    suffix=f".part{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_stale_parts(*folders: str | Path) -> list[Path]:
    """Remove temporary files of :func:`atomic_path` whose writer (on this host) is dead.

    Files of live writers and of other hosts (a shared output folder) are left alone. Returns
    the removed paths.
    """
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            match = _PART.match(entry.name)
            if (match and match["host"] == _HOST and not _pid_alive(int(match["pid"]))
                    and entry.is_file(follow_symlinks=False)):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def claim_path(target: str | Path) -> Path:
    target = Path(target)
    return target.with_name(f".{target.name}.claim")


def _lock(path: Path, wait: bool) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if needed), or None if it is held."""
    assert fcntl is not None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        # The previous holder removes the file before releasing it: if we locked a file that is
        # no longer at ``path``, our lock guards nothing and we must try again.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


@contextmanager
def claim(target: str | Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold the claim on ``target`` (one case's output) for the block; yields whether it is held.

    Without ``wait`` it yields False at once when another live process holds the claim; with
    ``wait`` it blocks until that process releases it (finishes the case or dies).
    """
    path = claim_path(target)
    if fcntl is None:  # pragma: no cover - no flock: atomic writes are the only protection
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path, wait)
    if fd is None:
        yield False
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{_HOST} {os.getpid()}\n".encode())
        yield True
    finally:
        try:
            path.unlink(missing_ok=True)  # while still holding the lock (see _lock)
        finally:
            os.close(fd)


def claimed(items: Iterable[T], target: Callable[[T], Path], finished: Callable[[T], bool], *,
            force: bool = False) -> Iterator[tuple[T, bool]]:
    """Each item with whether to do it now, its claim held while the caller works on it.

    Finished items come with False (unless ``force``). Items another live process holds are put
    off, then waited for at the end: True if that process died before finishing them, else
    False. So runs sharing an output folder split the work, and each returns when all is done.
    """
    busy: list[T] = []
    for item in items:
        if not force and finished(item):
            yield item, False
            continue
        with claim(target(item)) as held:
            if held:
                yield item, force or not finished(item)  # another run may have finished it meanwhile
            else:
                busy.append(item)
    for item in busy:
        with claim(target(item), wait=True):
            yield item, not finished(item)
