"""Exact k-th-largest selection for magnitude masks: a two-pass radix select (CPU) or ``torch.topk`` (CUDA).

Why: TIES-style trimming needs the k-th largest |τ| of every tensor, and ``torch.kthvalue`` (a sort) costs far
more than the merge arithmetic itself (DESIGN.md, "What fast means here"; TIES vs linear rows of
results/merge_throughput_cpu.md and results/merge_throughput_cuda.md). Both selections below are exact
(bit-identical to ``torch.topk``) and read the data a few times.

Radix select: for non-negative IEEE-754 float32 values, the bit pattern read as a (signed) int32 is ordered
exactly like the float, so the k-th largest float is the k-th largest int:

1. histogram the high 16 bits of every entry (bucket ``bits >> 16``, 2^15 buckets since the sign bit is 0),
   cumulate from the top, and find the bucket ``b`` that holds the k-th largest entry; ``g`` entries lie in
   higher buckets;
2. histogram the low 16 bits of only the entries in bucket ``b`` and find the ``(k − g)``-th largest of them.

The threshold is ``(b << 16) | low`` read back as float32. Rows of a 2-D input share one histogram per pass
(every row's bucket ids are offset), so a stack of N task vectors costs one call, not N.

Device choice: on CUDA ``torch.topk`` is itself a radix select and beats this torch-op version, whose
``bincount`` atomics contend on the few buckets real task vectors fill; on CPU the histograms beat both
``kthvalue`` and ``topk``. So :func:`kth_largest_rows` uses ``torch.topk`` on CUDA and the histograms elsewhere
(the TIES rows of the throughput results above measure the chosen path per device).

Inputs must be NaN-free magnitudes (``tau.abs()``): ``+0.0`` is the smallest value; ``-0.0`` or a negative
entry is rejected by ``bincount``.

A search that changes densities every candidate asks for a new k of the same task vector each time. For that,
:class:`SortedMagnitudes` sorts the magnitudes of a row once (NumPy's vectorized sort of the int32 bit patterns,
about the price of one radix select) and keeps them in 2 bytes per entry; any
later k costs a binary search over the distinct high halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_HIGH_BUCKETS = 1 << 15  # high 16 bits of a non-negative float32: sign bit 0 -> values < 2^15
_LOW_BUCKETS = 1 << 16
_LOW_MASK = _LOW_BUCKETS - 1


def _kth_largest_in_histogram(hist: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``hist`` [R, B], the bucket holding the k-th largest element and how many lie above it.

    Returns ``(bucket [R, 1], count_above [R, 1])`` with ``count_above < k <= count_above + hist[bucket]``.
    """
    n_buckets = hist.shape[1]
    at_or_above = hist.flip(1).cumsum(1)  # column j: elements in buckets >= n_buckets - 1 - j
    j = torch.searchsorted(at_or_above, k.view(-1, 1))  # first column whose count reaches k
    bucket = n_buckets - 1 - j
    count_above = at_or_above.gather(1, j) - hist.gather(1, bucket)
    return bucket, count_above


def kth_largest_rows(values: Tensor, k: Tensor) -> Tensor:
    """Exact k-th largest value of each row of a non-negative float32 matrix (NaN-free).

    Args:
        values: [R, M] non-negative float32 (magnitudes), on any device; R < 2^15.
        k: [R] integer tensor with ``1 <= k[r] <= M``.

    Returns:
        [R] float32: ``out[r] == torch.topk(values[r], k[r]).values[-1]`` exactly. CUDA: ``torch.topk``;
        other devices: :func:`radix_kth_largest_rows` (module docstring).
    """
    if values.dim() != 2 or values.dtype != torch.float32:
        raise ValueError(f"kth_largest_rows needs a 2-D float32 tensor, got {values.dim()}-D {values.dtype}")
    if values.is_cuda:
        return topk_kth_largest_rows(values, k)
    return radix_kth_largest_rows(values, k)


def topk_kth_largest_rows(values: Tensor, k: Tensor) -> Tensor:
    """:func:`kth_largest_rows` by ``torch.topk``: one batched call when all rows share ``k``, else one per row."""
    ks = [int(x) for x in k.tolist()]
    if len(set(ks)) == 1:
        if ks[0] == values.shape[1]:
            return values.amin(1)
        return torch.topk(values, ks[0], dim=1, sorted=False).values.amin(1)
    return torch.stack([torch.topk(row, kr, sorted=False).values.amin() for row, kr in zip(values, ks)])


def radix_kth_largest_rows(values: Tensor, k: Tensor) -> Tensor:
    """:func:`kth_largest_rows` by the two-pass radix select of the module docstring (one histogram per pass
    for all rows)."""
    n_rows = values.shape[0]
    k = k.to(device=values.device, dtype=torch.int64)
    bits = values.contiguous().view(torch.int32)
    row_ids = torch.arange(n_rows, device=values.device, dtype=torch.int32).view(-1, 1)

    high = bits >> 16
    high += row_ids * _HIGH_BUCKETS  # bucket id, offset per row (in place: no second full-size buffer)
    hist = torch.bincount(high.view(-1), minlength=n_rows * _HIGH_BUCKETS).view(n_rows, _HIGH_BUCKETS)
    bucket, count_above = _kth_largest_in_histogram(hist, k)

    in_bucket = (high == bucket.to(torch.int32) + row_ids * _HIGH_BUCKETS).view(-1).nonzero().view(-1)
    candidate_row = high.view(-1)[in_bucket] >> 15
    del high
    low_key = (bits.view(-1)[in_bucket] & _LOW_MASK) | (candidate_row << 16)  # low bits, offset per row
    low_hist = torch.bincount(low_key, minlength=n_rows * _LOW_BUCKETS).view(n_rows, _LOW_BUCKETS)
    low_bucket, _ = _kth_largest_in_histogram(low_hist, k.view(-1, 1) - count_above)

    threshold_bits = ((bucket << 16) | low_bucket).to(torch.int32).view(n_rows)
    return threshold_bits.view(torch.float32)


def magnitude_threshold(abs_tau: Tensor, k: int) -> Tensor:
    """Exact k-th largest entry of a tensor of magnitudes (any shape), as a 0-d float32 tensor.

    ``abs_tau >= magnitude_threshold(abs_tau, k)`` keeps the k largest entries plus any entries tied with the
    k-th (see :func:`evomerge.methods.sparsify.topk_mask`). Requires ``1 <= k <= abs_tau.numel()``.
    """
    n = abs_tau.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a tensor of {n} entries, got k={k}")
    row = abs_tau.reshape(1, -1).to(torch.float32)
    return kth_largest_rows(row, torch.tensor([k], device=abs_tau.device))[0]


@dataclass(frozen=True)
class SortedMagnitudes:
    """The magnitudes of one task vector row in ascending order, 2 bytes per entry: exact k-th largest for any k.

    The sorted int32 bit patterns are kept split: ``low`` holds the low 16 bits of every entry, and the high 16
    bits, which are non-decreasing along the sorted order, are kept run-length encoded (``high[i]`` is the high
    half of positions ``ends[i-1] .. ends[i] - 1``).
    """

    low: np.ndarray  # uint16 [n]
    high: np.ndarray  # int32 [runs], ascending
    ends: np.ndarray  # int64 [runs], exclusive end position of each run; ends[-1] == n

    @classmethod
    def build(cls, magnitudes: Tensor) -> SortedMagnitudes:
        """Sort the entries of a non-negative, NaN-free float32 tensor (any shape, any device)."""
        bits = np.sort(magnitudes.detach().reshape(-1).to("cpu", torch.float32).contiguous().view(torch.int32).numpy())
        high = bits >> 16
        ends = np.append(np.flatnonzero(high[1:] != high[:-1]) + 1, high.size).astype(np.int64)
        return cls(low=(bits & 0xFFFF).astype(np.uint16), high=high[ends - 1].astype(np.int32), ends=ends)

    @property
    def numel(self) -> int:
        return int(self.low.size)

    @property
    def nbytes(self) -> int:
        return int(self.low.nbytes + self.high.nbytes + self.ends.nbytes)

    def kth_largest(self, k: int) -> float:
        """The exact k-th largest magnitude (``1 <= k <= numel``), as a float (a float32 value)."""
        if not 1 <= k <= self.numel:
            raise ValueError(f"k must be in [1, {self.numel}], got {k}")
        position = self.numel - k  # ascending order
        run = int(np.searchsorted(self.ends, position, side="right"))
        bits = np.array([(int(self.high[run]) << 16) | int(self.low[position])], dtype=np.int32)
        return float(bits.view(np.float32)[0])


def magnitude_ranks(values: Tensor) -> Tensor:
    """Per row of a non-negative float32 matrix [R, M] (NaN-free), each entry's rank: the number of entries of its
    row strictly smaller (tied entries share the lower rank). int64 [R, M] on ``values``' device.

    CPU: one NumPy sort per row of 64-bit keys ``(bits << 32) | index`` (its vectorized sort; ~16 ns per entry
    here, vs ~140 for a float sort plus ``searchsorted``), then the first position of every run of equal values,
    scattered back. Other devices: ``torch.sort`` and ``torch.searchsorted``.
    """
    if values.dim() != 2 or values.dtype != torch.float32:
        raise ValueError(f"magnitude_ranks needs a 2-D float32 tensor, got {values.dim()}-D {values.dtype}")
    if values.device.type != "cpu":
        return sorted_search_ranks(values)
    n = values.shape[1]
    out = np.empty(values.shape, dtype=np.int64)
    index = np.arange(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)  # sorted position -> first position of its run of equal values
    change = np.empty(n, dtype=bool)
    change[0] = True
    for row, bits in enumerate(values.contiguous().view(torch.int32).numpy()):
        keys = bits.astype(np.int64)
        keys <<= 32
        keys |= index
        keys.sort()
        ordered = keys >> 32
        np.not_equal(ordered[1:], ordered[:-1], out=change[1:])
        np.multiply(index, change, out=first)
        np.maximum.accumulate(first, out=first)
        keys &= 0xFFFFFFFF
        out[row, keys] = first
    return torch.from_numpy(out)


def sorted_search_ranks(values: Tensor) -> Tensor:
    """:func:`magnitude_ranks` by ``torch.sort`` and ``torch.searchsorted`` (the first position of each value in its
    sorted row): the device path, usable on any device."""
    ordered = values.sort(dim=1).values
    return torch.searchsorted(ordered, values.contiguous())
