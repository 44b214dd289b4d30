"""Reading a recipe file: evomerge YAML or mergekit YAML, chosen here, at the edge.

A mapping with ``merge_method`` is a mergekit config (converted by :func:`evomerge.recipe.mergekit.from_mergekit`);
anything else is an evomerge recipe, whose keys are checked with the closest valid key named for a misspelt one.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.recipe.mergekit import from_mergekit
from evomerge.recipe.schema import AnyRecipe, RecipeError, SourceSpec, parse_recipe, recipe_fields, refuse_unknown_keys
from evomerge.yamlfile import load_yaml

__all__ = ["load_recipe"]


def load_recipe(path: str | Path) -> AnyRecipe:
    """The recipe in ``path``: an evomerge recipe of either kind, or a mergekit config (``merge_method:``)
    converted."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    if "merge_method" in data:
        return from_mergekit(data)
    refuse_unknown_keys(data, recipe_fields(data), f"{path}")
    for i, source in enumerate(data.get("sources") or []):
        if isinstance(source, dict):
            refuse_unknown_keys(source, SourceSpec.model_fields, f"{path}: sources[{i}]")
    return parse_recipe(data)
