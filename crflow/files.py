"""Every file crflow writes lands where it was meant to, whoever else can write nearby.

crflow often runs as root, beside folders that others can write: the registry's own volumes,
a backup's folder in /tmp, a `--root` tree. A link planted at a name crflow writes would make
root write, chmod or chown whatever the link points to. So writes here go through directory
file descriptors:

- a folder is reached one component at a time with O_NOFOLLOW; a symbolic link is followed
  only where nobody else could have planted it (in a folder only root or crflow's user can
  change, or a sticky one where the link is theirs), and never below a `within` root;
- a file is written to a random temporary name made with O_EXCL | O_NOFOLLOW, its owner and
  mode set on the open descriptor, then renamed over the name (which replaces a planted link
  instead of following it); readers never see half a file;
- a full disk is one line (DiskFull), and no temporary file stays behind.

    write_atomic(state_dir / "identity.json", data, 0o600)
    write_atomic(root / "etc/containers/certs.d/h:5000/ca.crt", pem, 0o644, within=root, make_parents=0o755)
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crflow.errors import CrflowError, DiskFull

_DIR = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_LINKS = 40  # as the kernel's own bound on links in one lookup
FULL = (errno.ENOSPC, errno.EDQUOT)


class UnsafePath(CrflowError):
    """A path crflow would reach only through a link someone else could have planted."""


def _others_can_plant(folder: os.stat_result, link: os.stat_result) -> bool:
    """Could someone other than root or this user have put `link` in `folder`?"""
    ours = (0, os.geteuid())
    if link.st_uid not in ours:
        return True
    if folder.st_uid not in ours:
        return True
    if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
        return True  # writable by others, and not sticky: any entry could be replaced
    return False


@contextmanager
def opened_dir(path: Path, make: int | None = None, within: Path | None = None) -> Iterator[int]:
    """A descriptor of the folder `path`, reached as this module says. `make`: the mode of
    each missing folder made on the way (set exactly, whatever the umask). `within`: `path`
    is under this folder, and nothing below it is followed."""
    fd = _open_dir(Path(os.path.abspath(path)), make, within)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_dir(path: Path, make: int | None, within: Path | None) -> int:
    if within is not None:
        top = Path(os.path.realpath(within))  # the folder the user named: its own links are theirs
        try:
            parts = Path(os.path.abspath(path)).relative_to(os.path.abspath(within)).parts
        except ValueError:
            raise UnsafePath(f"{path} is not under {within}") from None
        if ".." in parts:
            raise UnsafePath(f"{path} leaves {within}")
        fd = os.open(top, os.O_DIRECTORY | os.O_CLOEXEC)
        return _walk(fd, top, list(parts), make, follow=False, hops=0)
    return _walk(os.open("/", os.O_DIRECTORY | os.O_CLOEXEC), Path("/"), list(path.parts[1:]), make, True, 0)


def _walk(fd: int, at: Path, parts: list[str], make: int | None, follow: bool, hops: int) -> int:
    """From `fd` (the folder `at`), down `parts`; returns the last folder's descriptor."""
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":  # lexical, as abspath made it; only in a followed link's target
            parent = os.open("..", _DIR, dir_fd=fd)
            os.close(fd)
            fd, at = parent, at.parent
            continue
        try:
            child = os.open(name, _DIR, dir_fd=fd)
        except FileNotFoundError:
            if make is None:
                os.close(fd)
                raise
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                child = os.open(name, _DIR, dir_fd=fd)
                os.fchmod(child, make)
            except FileExistsError:  # another run made it first
                child = os.open(name, _DIR, dir_fd=fd)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                os.close(fd)
                raise
            link = os.lstat(name, dir_fd=fd)
            if not stat.S_ISLNK(link.st_mode):
                os.close(fd)
                raise
            if not follow or _others_can_plant(os.fstat(fd), link) or hops >= MAX_LINKS:
                os.close(fd)
                where = "inside the tree crflow writes into" if not follow else "in a folder others can write"
                raise UnsafePath(f"{at / name} is a symbolic link {where}; crflow does not follow it: remove it, "
                                 "or point crflow at the real folder") from None
            target = os.readlink(name, dir_fd=fd)
            if not target.startswith("/"):  # on from the folder already open, never reopened by its path
                return _walk(fd, at, [*Path(target).parts, *parts], make, follow, hops + 1)
            os.close(fd)
            return _walk(os.open("/", os.O_DIRECTORY | os.O_CLOEXEC), Path("/"), [*Path(target).parts[1:], *parts],
                         make, follow, hops + 1)
        os.close(fd)
        fd, at = child, at / name
    return fd


def ensure_dir(path: Path, mode: int = 0o700, within: Path | None = None) -> Path:
    """`path` is a folder (made with `mode`, parents too, where missing), reached safely."""
    with opened_dir(path, make=mode, within=within):
        return path


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter (0700), made if missing, tightened if it existed."""
    with opened_dir(path, make=0o700) as fd:
        os.fchmod(fd, 0o700)
    return path


def _full(path: Path, err: OSError) -> DiskFull:
    return DiskFull(f"no space left on the device of {path.parent}: {path.name} was not written (the old one, if "
                    "any, is unchanged); free some space and run the command again")


def read_bytes(path: Path, within: Path | None = None) -> bytes | None:
    """The file's content, or None when it is not there (or is a link, which crflow never writes)."""
    try:
        with opened_dir(path.parent, within=within) as dfd:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None
        raise
    with os.fdopen(fd, "rb") as file:
        return file.read()


def _current(dfd: int, name: str, content: bytes, mode: int, owner: tuple[int, int] | None) -> bool:
    """The file `name` already holds exactly this, with this mode and owner (a link never does)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or stat.S_IMODE(info.st_mode) != mode:
            return False
        if owner is not None and (info.st_uid, info.st_gid) != owner:
            return False
        return info.st_size == len(content) and file.read() == content


def _write_temp(dfd: int, path: Path, content: bytes, mode: int, owner: tuple[int, int] | None) -> str:
    """`content` in a new file of a random name beside `path`, fully set up; returns its name."""
    temp = f".{path.name}.{secrets.token_hex(8)}.partial"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            if owner is not None:  # before it has its name: a reader never sees it under another owner
                os.fchown(out.fileno(), *owner)
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
    except BaseException:
        _unlink_quietly(dfd, temp)
        raise
    return temp


def _unlink_quietly(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def write_atomic(path: Path, content: bytes, mode: int, owner: tuple[int, int] | None = None,
                 within: Path | None = None, make_parents: int | None = None) -> bool:
    """Replace `path` whole with `content`, `mode` and `owner` (uid, gid) when given; return
    whether it changed. `within` and `make_parents`: as `opened_dir`'s `within` and `make`."""
    try:
        with opened_dir(path.parent, make=make_parents, within=within) as dfd:
            if _current(dfd, path.name, content, mode, owner):
                return False
            temp = _write_temp(dfd, path, content, mode, owner)
            try:
                os.rename(temp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                _unlink_quietly(dfd, temp)
                raise
    except OSError as err:
        if err.errno in FULL:
            raise _full(path, err) from err
        raise
    return True


def create_once(path: Path, content: bytes, mode: int) -> bool:
    """Write `path` only if there is nothing there yet (whole or not at all); return whether
    this call wrote it. A record written this way is never replaced."""
    try:
        with opened_dir(path.parent) as dfd:
            temp = _write_temp(dfd, path, content, mode, None)
            try:
                os.link(temp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                return True
            except FileExistsError:
                return False
            finally:
                _unlink_quietly(dfd, temp)
    except OSError as err:
        if err.errno in FULL:
            raise _full(path, err) from err
        raise


def own_tree(path: Path, owner: tuple[int, int], only_if_top_differs: bool = False) -> None:
    """`path` and all under it owned by `owner`, through descriptors: no link inside is
    followed, however the tree changes while it is walked. With `only_if_top_differs`, a tree
    whose top is already theirs is left as it is (a big claim is walked once)."""
    with opened_dir(path) as top:
        info = os.fstat(top)
        if only_if_top_differs and (info.st_uid, info.st_gid) == owner:
            return
        for _, dirs, files, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for name in [*dirs, *files]:
                os.chown(name, *owner, dir_fd=dfd, follow_symlinks=False)
        os.fchown(top, *owner)


def remove(path: Path) -> bool:
    """Remove the file or tree at `path` (links inside are removed, never followed); return
    whether there was one. A mount point's contents go; the mount point itself stays."""
    with opened_dir(path.parent) as dfd:
        try:
            info = os.lstat(path.name, dir_fd=dfd)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(path.name, dir_fd=dfd)
            return True
        if os.path.ismount(path):
            with opened_dir(path) as inner:
                for name in os.listdir(inner):
                    _remove_at(inner, name)
            return True
        _remove_at(dfd, path.name)
        return True


def _remove_at(dfd: int, name: str) -> None:
    if stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
        shutil.rmtree(name, dir_fd=dfd)  # fd-based on Linux: it never follows a link it meets
    else:
        os.unlink(name, dir_fd=dfd)
