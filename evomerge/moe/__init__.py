"""Mixtures of experts from dense experts (mergekit-moe's recipes, built in memory and searchable).

- :mod:`~evomerge.moe.arch`: which base maps to which upstream MoE class, the checks before loading, the config;
- :mod:`~evomerge.moe.gates`: router rows from prompts (hidden states, token embeddings) or seeded noise;
- :mod:`~evomerge.moe.build`: :class:`MoeModel`, the live MoE re-materialized per recipe and exported
  (:func:`evomerge.merge.merge_to_dir` writes an MoE recipe with it).

The recipe itself is :class:`evomerge.recipe.MoeRecipe` (plain data); mergekit-moe YAML is :mod:`evomerge.recipe.moe`.
"""

from evomerge.moe.arch import MOE_CLASSES, MoeError
from evomerge.moe.build import MoeModel

__all__ = ["MOE_CLASSES", "MoeError", "MoeModel"]
