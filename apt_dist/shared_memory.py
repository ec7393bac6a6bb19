"""A shared-memory data plane between the driver and the workers on its own node.

Ray moves every argument or reply over 100 KB through its object store: a put, a seal, a
fetch and fresh pages to fault in, for each of the dozens of calls of every timestep. For
workers on the driver's node that is pure overhead, so there the patches and predictions
travel through one file in /dev/shm that the driver and the workers map once and reuse
every step; the Ray call itself then carries only offsets. Workers on other nodes keep
using Ray objects.

Safe to reuse without locks because every timestep is a barrier: the driver writes a
step's inputs before it submits the calls, a worker writes its outputs before its call
returns, and the driver reads them only after that return.
"""

from __future__ import annotations

import math
import mmap
import os
import uuid

import numpy as np

SHM_DIR = "/dev/shm"


def available(directory: str = SHM_DIR) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


class SharedBuffer:
    """The driver's side: one growable file in `directory`, mapped read-write."""

    def __init__(self, directory: str = SHM_DIR, prefix: str = "apt-dist"):
        self.directory, self.prefix = directory, prefix
        self.path: str | None = None
        self.size = 0
        self._mm: mmap.mmap | None = None

    def ensure(self, nbytes: int) -> None:
        """Make room for `nbytes` (a new, larger file; the old one is unlinked, mappings die with their views).

        The space is reserved with posix_fallocate, so a full /dev/shm is an OSError here
        rather than a SIGBUS at the first write.
        """
        if nbytes <= self.size:
            return
        if self.path is None:
            remove_stale(self.directory, self.prefix)
        size = max(nbytes, 2 * self.size, 1 << 20)
        size = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
        path = os.path.join(self.directory, f"{self.prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self.close()
        self.path, self.size, self._mm = path, size, mm

    def array(self, offset: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.ndarray(shape, dtype=dtype, buffer=self._mm, offset=offset)

    def close(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        # Views handed out keep the mapping alive until they are gone; no explicit close.
        self.path, self.size, self._mm = None, 0, None


def remove_stale(directory: str = SHM_DIR, prefix: str = "apt-dist") -> list[str]:
    """Unlink this user's files left by drivers that died without closing (their pid is gone); returns them."""
    removed = []
    for name in os.listdir(directory):
        parts = name.split("-")
        if not name.startswith(prefix + "-") or len(parts) < 3 or not parts[-2].isdigit():
            continue
        try:
            os.kill(int(parts[-2]), 0)  # raises if no such process
        except ProcessLookupError:
            path = os.path.join(directory, name)
            try:
                if os.lstat(path).st_uid != os.getuid():  # never another user's file
                    continue
                os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
        except PermissionError:  # someone else's live process
            pass
    return removed


class SharedViews:
    """A worker's side: maps the driver's file on first use, keeps only the newest one."""

    def __init__(self):
        self._path: str | None = None
        self._mm: mmap.mmap | None = None

    def array(self, path: str, offset: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        if path != self._path:
            with open(path, "r+b") as f:
                self._mm = mmap.mmap(f.fileno(), 0)
            self._path = path
        return np.ndarray(shape, dtype=np.dtype(dtype), buffer=self._mm, offset=offset)


def nbytes(shape: tuple[int, ...], dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize  # math.prod: np.prod costs microseconds per call
