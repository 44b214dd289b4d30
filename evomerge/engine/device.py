"""The compute device: which one a merge runs on, and the CPU heap setting that keeps the fp32 temporaries of one
candidate in pages the previous candidate already faulted in. (How much memory it has free:
:mod:`evomerge.engine.memory`.)"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from evomerge.recipe import RecipeError

__all__ = ["compute_device", "keep_cpu_heap"]


def keep_cpu_heap() -> bool:
    """Ask glibc to serve large allocations from its heap and keep freed memory (``mallopt``).

    By default glibc maps each allocation above 32 MiB fresh from the kernel and unmaps it on free, so every merge
    of a large tensor pays page faults and page zeroing for its fp32 temporaries (which then cost more than the
    arithmetic). With mmap off and a high trim threshold, the temporaries of one candidate reuse the pages of
    the previous one. Process-wide; a no-op (returns False) off glibc or with ``EVOMERGE_KEEP_MALLOC=1``.
    """
    if os.environ.get("EVOMERGE_KEEP_MALLOC") == "1" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 40))


def compute_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available, else CPU); RecipeError naming the problem when this
    machine cannot compute on it (an unknown device string, CUDA not available, a CUDA index past the last GPU)."""
    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:  # torch lists every device type it knows, most irrelevant here
        raise RecipeError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise RecipeError(f"device {str(resolved)!r} requested but CUDA is not available ({build}, torch "
                              f"{torch.__version__}); use --device cpu, or leave the device unset to use a GPU when "
                              "there is one")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RecipeError(f"device {str(resolved)!r} requested but this machine has {torch.cuda.device_count()} "
                              "GPU(s)")
    elif resolved.type != "cpu":
        raise RecipeError(f"device {str(resolved)!r} is not supported by the merge engine; use 'cpu' or 'cuda'")
    return resolved
