"""Fault injection helpers: a small real tmpfs to fill, a PID that is certainly dead."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mount: Path, size: str = "2m") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``mount`` (root only; the test is skipped where mounting fails)."""
    mount.mkdir(exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def fill(path: Path, leave: int = 0) -> Path:
    """Write into ``path`` until its file system is full (a real ENOSPC), then shrink it to leave ``leave`` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as err:
            while True:
                os.write(fd, b"x" * 65536)
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(path, path.stat().st_size - leave)
    return path


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
