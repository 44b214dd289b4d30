"""Recipes: the plain-data contract between search and merge (no torch or transformers import).

- :mod:`~evomerge.recipe.schema`: the recipe kinds (:class:`Recipe`: a parameter merge, :class:`StackRecipe`: a layer
  stack, :class:`MoeRecipe`: a mixture of experts; :data:`AnyRecipe`, :func:`parse_recipe`) and their parts;
- :mod:`~evomerge.recipe.resolve`: which value each tensor gets (:func:`resolve_params`);
- :mod:`~evomerge.recipe.mergekit`: mergekit YAML <-> recipe; :mod:`~evomerge.recipe.moe`: mergekit-moe YAML <-> MoE
  recipe;
- :mod:`~evomerge.recipe.io`: :func:`load_recipe`, evomerge, mergekit or mergekit-moe YAML.
"""

from evomerge.recipe.io import load_recipe
from evomerge.recipe.resolve import (
    gradient_position,
    interpolate,
    layer_values,
    resolve_params,
    resolve_value,
    select_filter,
    tensor_position,
)
from evomerge.recipe.schema import (
    AnyRecipe,
    CalibrationData,
    DenseMlp,
    Gradient,
    LayerSlice,
    MoeExpert,
    MoeRecipe,
    ParamValue,
    Recipe,
    RecipeError,
    Scalar,
    SourceSpec,
    StackRecipe,
    Value,
    parse_recipe,
)

__all__ = [
    "AnyRecipe", "CalibrationData", "DenseMlp", "Gradient", "LayerSlice", "MoeExpert", "MoeRecipe", "ParamValue",
    "Recipe", "RecipeError", "Scalar", "SourceSpec", "StackRecipe", "Value", "gradient_position", "interpolate",
    "layer_values", "load_recipe", "parse_recipe", "resolve_params", "resolve_value", "select_filter",
    "tensor_position",
]
