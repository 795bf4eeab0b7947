"""Shared-memory files: the one place they are named, created, mapped and removed.

The supervisor creates each file (`groundwatch-<its pid>-<name>` under `SHM_DIR`, mode 0600, never an existing
one) and hands its `spec()` to the children, which attach to the same bytes. `frames.remove_stale_mailboxes`
deletes the files of a supervisor that was killed, by the pid in the name.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def shared_path(name: str) -> str:
    """The path of this process's shared-memory file `name`."""
    return str(SHM_DIR / f"groundwatch-{os.getpid()}-{name}")


def map_shared(path: str, size: int, *, create: bool) -> mmap.mmap:
    """Map `size` bytes of the file at `path`; `create` makes it (and fails if it exists) with mode 0600."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink_shared(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class PerStreamTable:
    """One row of `row_shape` items of `dtype` per stream, in a shared-memory file; `table` is the
    (streams, *row_shape) array over it. Subclasses set `NAME` (the file's name) and `DTYPE`/`ROW_SHAPE`."""

    NAME: str
    DTYPE: np.dtype
    ROW_SHAPE: tuple[int, ...]

    def __init__(self, path: str, stream_ids: list[str], *, _create: bool = False) -> None:
        self.path, self.stream_ids = path, list(stream_ids)
        self.row_of = {stream: row for row, stream in enumerate(self.stream_ids)}
        shape = (max(len(stream_ids), 1), *self.ROW_SHAPE)
        size = int(np.prod(shape)) * np.dtype(self.DTYPE).itemsize
        self._map = map_shared(path, size, create=_create)
        self.table = np.ndarray(shape, self.DTYPE, buffer=self._map)

    @classmethod
    def create(cls, stream_ids: list[str]):
        return cls(shared_path(cls.NAME), stream_ids, _create=True)

    @classmethod
    def attach(cls, spec: dict):
        return cls(spec["path"], spec["stream_ids"])

    def spec(self) -> dict:
        """What a child process needs to attach (picklable by multiprocessing's spawn, never by our sockets)."""
        return {"path": self.path, "stream_ids": self.stream_ids}

    def close(self) -> None:
        # Views into the map must go before the map can close.
        del self.table
        self._map.close()

    def unlink(self) -> None:
        unlink_shared(self.path)
