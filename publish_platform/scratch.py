"""Local scratch folders of the steps, and the sweep of those a killed process left behind.

A step's scratch holds batch-sized files: the parse's spilled entity JSON, the diff and plan
files, a snapshot. A process killed with -9 (by the kernel's OOM killer, by an operator, by run
monitoring) cannot remove its own, and a worker host that keeps them fills its disk. So each
folder is locked (``flock``) by the process that made it, for as long as it lives: the kernel
releases the lock when the process dies, however it dies. A new scratch folder is made only
after the sweep has removed every unlocked one, which no live process can be using.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

PREFIX = "publish-platform-"
# A folder is made, then locked: an unlocked one younger than this may be being made.
GRACE_S = 60.0


class ScratchFolder:
    """A temporary folder (like ``tempfile.TemporaryDirectory``) that is locked while in use:
    removed on ``cleanup``, at exit from a ``with``, or when garbage-collected; and by the
    next sweep if its process was killed."""

    def __init__(self, kind: str, root: Path | None = None) -> None:
        sweep(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=root))
        self._lock = os.open(self.path, os.O_RDONLY)  # not inherited by child processes
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._finalizer = weakref.finalize(self, _remove, self.path, self._lock)

    def cleanup(self) -> None:
        self._finalizer()

    def __enter__(self) -> Path:
        return self.path

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()


def _remove(path: Path, lock: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(lock)


def _size(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total


def sweep(root: Path | None = None, grace_s: float = GRACE_S) -> list[Path]:
    """Remove the scratch folders under ``root`` (the system's temporary folder) that no live
    process holds: those of processes that were killed. Returns what it removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(PREFIX + "*"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            lock = os.open(folder, os.O_RDONLY)
        except OSError:  # removed meanwhile, or not ours to read
            continue
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live process's
                continue
            if time.time() - os.fstat(lock).st_mtime < grace_s:
                continue
            size = _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning(
                "removed scratch folder %s (%.1f MB) left by a process that was killed",
                folder,
                size / 2**20,
            )
            removed.append(folder)
        finally:
            os.close(lock)
    return removed
