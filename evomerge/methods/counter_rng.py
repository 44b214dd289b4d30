"""Counter-based uniform draws for DARE / DELLA: ``u = H(key, j)`` for entry ``j``, the same on every device.

A counter-based generator computes each draw from its position instead of advancing a state (Salmon et al.
2011, "Parallel Random Numbers: As Easy as 1, 2, 3", SC). So the draws of a tensor are identical on CPU and
CUDA, in any chunking, in eager and compiled code, and a new seed costs a few integer operations per entry,
fused into the merge kernel, instead of a serial pass of torch's CPU generator (~3-6 ns per entry).

The function (all arithmetic modulo ``2^32`` on unsigned 32-bit words; ``keys = (k1, k2)`` per source row):

    x = j · 0x9E3779B9 + k1                  (Weyl sequence: SplitMix's counter step)
    y = mix(mix(x) ⊕ k2)                     (the second keyed round decorrelates rows whose k1 differ by a shift)
    u = ⌊y / 2^8⌋ · 2^-24  ∈ [0, 1 − 2^-24]   (24 random bits: every float32 in the grid is exact)

``mix`` is the "lowbias32" integer finalizer (C. Wellons, "Prospecting for Hash Functions", 2018):
``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16``. The counter is the entry's
index modulo ``2^32`` (draws repeat only within a tensor of over 4.29e9 entries).

The keys of a tensor's rows come from its 63-bit seed through SplitMix64 (Steele et al. 2014, "Fast Splittable
Pseudorandom Number Generators", OOPSLA), :func:`row_keys`.

torch has no unsigned 32-bit arithmetic, so words are held in int32: addition and multiplication wrap the same
way in two's complement, and logical right shifts are arithmetic shifts masked to the low bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

_WEYL = 0x9E3779B9  # 2^32 / golden ratio
_MIX = (0x7FEB352D, 0x846CA68B)
_MASK64 = (1 << 64) - 1


def _int32(word: int) -> int:
    """An unsigned 32-bit word (any int, taken modulo 2^32) as the int32 with the same bits."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= 1 << 31 else word


def _splitmix64(state: int) -> int:
    """SplitMix64's output for ``state`` (its finalizer of the Weyl state), a 64-bit word."""
    z = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_keys(seed: int, rows: int) -> Tensor:
    """Keys ``(k1, k2)`` of each of ``rows`` rows of a tensor with ``seed``: [rows, 2] int32 on CPU.

    Row ``i`` takes the 64-bit word ``splitmix64(seed + i · 2^32)``: low half ``k1``, high half ``k2``.
    """
    words = [_splitmix64(seed + (i << 32)) for i in range(rows)]
    return torch.tensor([[_int32(w), _int32(w >> 32)] for w in words], dtype=torch.int32)


def _shift_xor(x: Tensor, shift: int) -> Tensor:
    """``x ^ (x >> shift)`` with a logical shift of the 32-bit word."""
    return x ^ ((x >> shift) & ((1 << (32 - shift)) - 1))


def _mix(x: Tensor) -> Tensor:
    """lowbias32 on int32 words (module docstring)."""
    x = _shift_xor(x, 16) * _int32(_MIX[0])
    x = _shift_xor(x, 15) * _int32(_MIX[1])
    return _shift_xor(x, 16)


def uniform(keys: Tensor, index: Tensor) -> Tensor:
    """Draws ``u[i, m] = H(keys[i], index[m])``: [N, M] float32 in ``[0, 1)``.

    ``keys``: [N, 2] int32 (:func:`row_keys`, on the compute device); ``index``: [M] integer counters (the
    entries' positions in their tensor; int64 positions are taken modulo 2^32).
    """
    counter = index.to(torch.int32).view(1, -1)
    x = counter * _int32(_WEYL) + keys[:, :1]
    y = _mix(_mix(x) ^ keys[:, 1:])
    return ((y >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def uniform_like(tau: Tensor, seed: int) -> Tensor:
    """The draws of a whole tensor stack ``tau`` [N, *S] for ``seed``: entry ``j`` of row ``i`` (row-major)
    gets ``H(row_keys(seed, N)[i], j)``. Same shape, float32, on ``tau``'s device."""
    n_rows = tau.shape[0]
    keys = row_keys(seed, n_rows).to(tau.device)
    index = torch.arange(tau[0].numel(), device=tau.device, dtype=torch.int64)
    return uniform(keys, index).view(tau.shape)
