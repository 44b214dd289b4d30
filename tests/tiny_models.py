"""Tiny random Llama checkpoints for engine tests: a base and fine-tunes = base + seeded noise."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(num_layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )


def save_tiny(path: Path, seed: int, *, noise_of: Path | None = None, scale: float = 0.05,
              num_layers: int = 2) -> Path:
    """A random tiny Llama (seed), or ``noise_of``'s weights plus seeded Gaussian noise of std ``scale``."""
    torch.manual_seed(seed)
    if noise_of is None:
        model = LlamaForCausalLM(tiny_config(num_layers))
    else:
        model = LlamaForCausalLM.from_pretrained(noise_of)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiny_family(root: Path, n: int = 3, num_layers: int = 2) -> tuple[Path, list[Path]]:
    """A base and ``n`` fine-tunes of it under ``root``."""
    base = save_tiny(root / "base", 0, num_layers=num_layers)
    return base, [save_tiny(root / f"ft{i}", 100 + i, noise_of=base) for i in range(n)]
