"""Mixtures of experts from dense experts (mergekit-moe's recipes, built in memory and searchable).

- :mod:`~evomerge.moe.arch`: which base maps to which upstream MoE class, the checks before loading, the config;
- :mod:`~evomerge.moe.gates`: router rows from prompts (hidden states, token embeddings) or seeded noise;
- :mod:`~evomerge.moe.build`: :class:`MoeModel`, the live MoE re-materialized per recipe, and :func:`moe_to_dir`.

The recipe itself (plain data, mergekit-moe YAML import / export) is :mod:`evomerge.recipe.moe`.
"""

from evomerge.moe.arch import MOE_CLASSES, MoeError
from evomerge.moe.build import MoeModel, moe_to_dir

__all__ = ["MOE_CLASSES", "MoeError", "MoeModel", "moe_to_dir"]
