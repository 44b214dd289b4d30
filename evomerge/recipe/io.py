"""Reading a recipe file: evomerge YAML or mergekit YAML, chosen here, at the edge.

A mapping with ``merge_method`` is a mergekit config (converted by :func:`evomerge.recipe.mergekit.from_mergekit`);
one with ``kind: moe``, or a mergekit-moe config (``base_model`` and ``experts``), is a mixture-of-experts recipe
(:mod:`evomerge.recipe.moe`); anything else is an evomerge recipe, whose keys are checked with the closest valid key
named for a misspelt one.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.recipe.mergekit import from_mergekit
from evomerge.recipe.moe import MoeRecipe, is_mergekit_moe, load_moe_recipe
from evomerge.recipe.schema import AnyRecipe, RecipeError, SourceSpec, parse_recipe, recipe_fields, refuse_unknown_keys
from evomerge.yamlfile import load_yaml

__all__ = ["load_recipe"]


def load_recipe(path: str | Path) -> AnyRecipe | MoeRecipe:
    """The recipe in ``path``: an evomerge recipe of either kind, a mergekit config (``merge_method:``) converted, or
    an MoE recipe (``kind: moe`` or a mergekit-moe config)."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    if "merge_method" in data:
        return from_mergekit(data)
    if data.get("kind") == "moe" or is_mergekit_moe(data):
        return load_moe_recipe(data, f"{path}")
    refuse_unknown_keys(data, recipe_fields(data), f"{path}")
    for i, source in enumerate(data.get("sources") or []):
        if isinstance(source, dict):
            refuse_unknown_keys(source, SourceSpec.model_fields, f"{path}: sources[{i}]")
    return parse_recipe(data)
