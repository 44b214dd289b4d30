"""Reading a recipe file: evomerge YAML of any kind, a mergekit config or a mergekit-moe config, chosen here, at the
edge.

A mapping with ``merge_method`` is a mergekit config (converted by :func:`evomerge.recipe.mergekit.from_mergekit`);
one with ``base_model`` and ``experts`` a mergekit-moe config (:func:`evomerge.recipe.moe.from_mergekit_moe`);
anything else is an evomerge recipe of the kind :func:`~evomerge.recipe.schema.recipe_kind` tells (``kind: moe``,
``method: passthrough``, else a parameter merge), whose keys, and those of its entries, are checked with the closest
valid key named for a misspelt one. Every error is one :class:`~evomerge.recipe.schema.RecipeError` line. The model
paths in a recipe are read as written: a relative one is taken from the working directory (as mergekit reads its
configs; :func:`relative_path_hint` says so in errors).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from evomerge.recipe.mergekit import from_mergekit
from evomerge.recipe.moe import from_mergekit_moe, is_mergekit_moe
from evomerge.recipe.schema import (
    AnyRecipe,
    LayerSlice,
    MoeExpert,
    RecipeError,
    SourceSpec,
    one_line,
    parse_recipe,
    recipe_fields,
    recipe_kind,
    refuse_unknown_keys,
)
from evomerge.yamlfile import load_yaml

__all__ = ["load_recipe", "relative_path_hint"]

#: per recipe kind: its list-valued keys and the model of their entries (whose keys are checked too)
_ENTRIES: dict[str, tuple[tuple[str, type[BaseModel]], ...]] = {
    "merge": (("sources", SourceSpec),),
    "stack": (("slices", LayerSlice),),
    "moe": (("experts", MoeExpert), ("shared_experts", MoeExpert)),
}


def relative_path_hint(path: str) -> str:
    """For a model path a recipe names: where a relative one was looked for (a recipe's relative paths, in every
    format and command, are taken from the working directory, as mergekit reads its configs), ``""`` for an
    absolute one; for the end of an error line."""
    if Path(path).expanduser().is_absolute():
        return ""
    return f" (relative paths in a recipe are taken from the working directory, {Path.cwd()})"


def load_recipe(path: str | Path) -> AnyRecipe:
    """The recipe in ``path``: an evomerge recipe of any kind, or a mergekit / mergekit-moe config converted."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    if "merge_method" in data:
        return from_mergekit(data)
    if is_mergekit_moe(data):
        return from_mergekit_moe(data)
    refuse_unknown_keys(data, recipe_fields(data), f"{path}")
    for key, model in _ENTRIES[recipe_kind(data)]:
        for i, entry in enumerate(data.get(key) or []):
            if isinstance(entry, dict):
                refuse_unknown_keys(entry, model.model_fields, f"{path}: {key}[{i}]")
    try:
        return parse_recipe(data)
    except ValidationError as err:
        raise RecipeError(f"{path}: {one_line(err)}") from None
