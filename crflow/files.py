"""Files crflow keeps (state, client bundles, a local pod's volumes) are replaced whole."""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """A directory only its owner can enter (0700), made if missing, tightened if it existed."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_atomic(path: Path, content: bytes, mode: int, owner: tuple[int, int] | None = None) -> bool:
    """Replace `path` by rename (readers never see half a file), owned by `owner` (uid, gid)
    when given; return whether it changed."""
    if path.exists() and path.read_bytes() == content and (owner is None or _owner(path) == owner):
        return False
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
        if owner is not None:  # before the rename: the reader never sees it under another owner
            os.fchown(out.fileno(), *owner)
    os.chmod(partial, mode)
    partial.rename(path)
    return True


def _owner(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_uid, stat.st_gid
