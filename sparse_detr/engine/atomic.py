"""Atomic file writes: a reader, or a crash at any moment, sees the previous file or the new one, never half of one."""
from __future__ import annotations

import os
import secrets
from typing import IO, Any, Callable

__all__ = ["write_atomic"]


def write_atomic(path: str, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """Call ``write(f)`` on a new temporary file next to ``path`` (``.<name>.<8 hex digits>.tmp``), fsync it, rename
    it over ``path`` (``os.replace`` is atomic on POSIX) and fsync the folder so that the rename is durable too.
    On any error, a KeyboardInterrupt included, the temporary file is removed and the error propagates."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's permissions, as open()
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
