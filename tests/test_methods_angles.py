"""Gram matrices of flattened tensors against dot products written out by hand."""

from __future__ import annotations

import torch

from evomerge.methods import angles
from evomerge.methods.angles import gram_matrix


def test_gram_of_whole_tensors_and_of_rows() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [-1.0, 2.0]]])  # N=2 vectors of shape [2, 2]
    whole = gram_matrix(x)
    assert whole.dtype == torch.float64 and whole.shape == (1, 2, 2)
    # flattened: a = [1, 2, 3, 4], b = [0, 1, -1, 2]: a·a = 30, a·b = 7, b·b = 6
    assert torch.equal(whole[0], torch.tensor([[30.0, 7.0], [7.0, 6.0]], dtype=torch.float64))
    rows = gram_matrix(x, rows=2)  # row 0: [1, 2]·[0, 1] = 2; row 1: [3, 4]·[-1, 2] = 5
    assert torch.equal(rows, torch.tensor([[[5.0, 2.0], [2.0, 1.0]], [[25.0, 5.0], [5.0, 5.0]]], dtype=torch.float64))


def test_gram_accumulates_in_float64_across_chunks(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=g)
    exact = x.double() @ x.double().T
    monkeypatch.setattr(angles, "_CHUNK", 64)  # 16 chunks
    assert torch.allclose(gram_matrix(x)[0], exact, rtol=1e-12, atol=1e-10)
