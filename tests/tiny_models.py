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


def assert_engine_is_function(paths: list[str], recipe: object, fn: object, *,
                              engine_options: dict[str, object] | None = None, **kwargs: object) -> int:
    """Materialize ``recipe`` with a CPU engine over ``paths`` (base first when the recipe has one, then its
    sources; ``engine_options``: MergeEngine keywords such as ``chunk_entries``, ``compile``) and check that every
    live tensor equals ``fn(base, sources, **kwargs)`` of the loaded fp32 tensors bit for bit (and, with
    ``compile=True``, that the kernel ran compiled); returns how many tensors the merge changed from the base (or
    first source)."""
    from safetensors.torch import load_file

    from evomerge.engine import MergeEngine

    options = engine_options or {}
    engine = MergeEngine(paths, device="cpu", **options)  # type: ignore[arg-type]
    engine.materialize(recipe)  # type: ignore[arg-type]
    if options.get("compile"):
        assert engine.kernels.is_compiled(recipe.method)  # type: ignore[attr-defined]
    weights = [load_file(f"{p}/model.safetensors") for p in paths]
    has_base = getattr(recipe, "base", None) is not None
    live, changed = engine.model.state_dict(), 0
    for name in engine.names:
        base = weights[0][name] if has_base else None
        sources = torch.stack([w[name] for w in weights[1 if has_base else 0:]])
        expected = fn(base, sources, **kwargs)  # type: ignore[operator]
        assert torch.equal(live[name], expected), name
        changed += not torch.equal(live[name], weights[0][name])
    return changed
