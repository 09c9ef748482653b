"""Atomic writes: a file the user has is replaced whole or not at all, never left half written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting the umask to read it is process-wide, racy with writer threads


@contextlib.contextmanager
def atomic_target(path: Path | str, overwrite: bool = True, suffix: str = ".tmp"):
    """A temporary file beside `path` to write into; when the block ends well it becomes `path` with the umask's
    permissions (replacing it, or with overwrite=False never clobbering an existing file: FileExistsError), so no
    reader ever sees half a file; when it fails the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name exists: never clobbers another session's file
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: Path | str, data: bytes, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically (see atomic_target)."""
    with atomic_target(path, overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: Path | str, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=4, default=str) + "\n").encode(), overwrite=overwrite)
