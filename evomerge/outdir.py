"""Output dirs (a merged model, a search's ``best_model/``) built beside their final name and moved into place.

Promises (README: "What evomerge promises on crashes, full disks and bad input"):

* A dir is built under a recognisable temporary name in the same parent, ``.<name>.partial-<pid>-<host>-<rand>``,
  and renamed to ``<name>`` only once complete, so a reader never sees a half-written output under the final name.
* Replacing an existing output (``--force``) swaps the two dirs with one ``renameat2(RENAME_EXCHANGE)`` where the
  kernel and file system support it: a kill at any moment leaves the old or the new output under the final name.
  Elsewhere the old dir is first renamed aside to ``.<name>.old-<pid>-<host>-<rand>``; a process killed between
  the two renames leaves it there, and the next export into that parent (:func:`recover`) renames it back.
* :func:`recover` removes the temporary dirs of dead processes of this host (the PID in the name is checked);
  dirs of live processes and of other hosts (a shared file system) are left alone.
* The final component of the output path must not be a symbolic link (:func:`refuse_symlink`): replacing it would
  write into, and delete the contents of, the link's target.
* The dir and its files get the user's umask permissions (:func:`apply_umask`), like any other file they make.

No torch import: the kill tests drive these functions in a bare subprocess.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputPathError", "OutputWriteError", "apply_umask", "check_free_space", "check_target", "format_size",
           "make_partial", "move_into_place", "recover", "refuse_symlink", "write_error"]

log = logging.getLogger(__name__)

# The host tag keeps a process on another machine sharing the file system from removing a live dir of ours.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}$")


class OutputPathError(ValueError):
    """The output path cannot be used as given (a symbolic link, ...)."""


class OutputWriteError(OSError):
    """Writing an output failed (full disk, permissions, ...); the message names the path, the numbers and the fix."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


def format_size(nbytes: int) -> str:
    """``nbytes`` in binary units with three significant digits (``1.50 MiB``)."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing parent), None if that cannot be read."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _disk_full_message(path: Path, needed: int | None) -> str:
    free = _free_bytes(path)
    need = f"about {format_size(needed)} are needed, " if needed is not None else ""
    have = f"{format_size(free)} are free there" if free is not None else "the free space cannot be read"
    return f"no space left on the device to write {path}: {need}{have}; free some space or choose another path"


def write_error(exc: OSError, path: Path, needed: int | None = None) -> OutputWriteError:
    """One clear error for an OSError raised while writing ``path`` (``needed``: bytes the write needs in all)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputWriteError(exc.errno, _disk_full_message(path, needed))
    detail = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return OutputWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}{detail}")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse, before anything is written, an output of ``needed`` bytes that does not fit beside ``out``."""
    free = _free_bytes(out.parent)
    if free is not None and free < needed:
        raise OutputWriteError(errno.ENOSPC, _disk_full_message(out, needed))


def check_target(out: Path, force: bool) -> None:
    """Refuse an output path that is a symbolic link, or that exists when ``force`` is not set."""
    refuse_symlink(out)
    if out.exists() and not force:
        raise FileExistsError(
            f"output dir {out} already exists; choose another path or pass force=True (CLI: --force) to replace it "
            "(the old dir is removed only after the new one is complete)")


def refuse_symlink(out: Path) -> None:
    """Refuse an output path whose last component is a symbolic link (it is never followed or replaced)."""
    if out.is_symlink():
        raise OutputPathError(
            f"output path {out} is a symbolic link (to {os.readlink(out)}); evomerge never writes through a link, "
            "which would replace the target's contents: pass the target dir itself, or remove the link")


def _temp_path(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}")


def make_partial(out: Path) -> Path:
    """Create (with the user's umask) and return the empty temporary dir in which ``out`` is built."""
    path = _temp_path(out, "partial")
    os.mkdir(path, 0o777)
    return path


def apply_umask(root: Path) -> None:
    """Give every file and dir under ``root`` the user's umask permissions (0o666 / 0o777 minus the umask): some
    writers (safetensors) create files private (0o600), which other users of a shared file system cannot read."""
    umask = os.umask(0o077)  # reading the umask means setting it; restored at once
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(out: Path) -> None:
    """Clean the parent of ``out`` after killed exports: temporary dirs of dead processes of this host are removed,
    and an old output renamed aside by an interrupted replace is renamed back when its final name is free."""
    parent = out.parent
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        match = _TEMP_RE.match(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        final = entry.with_name(match["name"])
        if match["kind"] == "old" and not (final.exists() or final.is_symlink()):
            os.rename(entry, final)
            log.warning("restored %s from %s (a replace of it was interrupted)", final, entry.name)
        else:
            _remove(entry)
            log.info("removed %s, left by the killed process %s", entry, match["pid"])


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the entries ``a`` and ``b`` (Linux ``renameat2``); False where that is not supported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def building(out: Path, *, force: bool, shared: bool = True) -> Iterator[Path]:
    """The temporary dir to build ``out`` in (temporary dirs of killed builds beside it are cleaned first): moved
    into place when the block ends, removed when it raises. ``shared``: every file gets the user's umask
    permissions first (:func:`apply_umask`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = make_partial(out)
    try:
        yield tmp
        if shared:
            apply_umask(tmp)
        move_into_place(tmp, out, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(built: Path, out: Path, *, force: bool) -> None:
    """Rename the finished dir ``built`` to ``out``. An existing ``out`` raises ``FileExistsError`` unless ``force``;
    then the two are swapped (see the module docstring) and the old one is removed once the new one is in place."""
    if not (out.exists() or out.is_symlink()):
        os.rename(built, out)
        return
    check_target(out, force)
    if _exchange(built, out):
        _remove(built)  # now the old output, under the temporary name: recover() would remove it too
        return
    old = _temp_path(out, "old")
    os.rename(out, old)
    try:
        os.rename(built, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)
