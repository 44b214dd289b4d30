"""The merge recipe: plain data that says how to build one merged model.

A :class:`Recipe` is the contract between the search and the merge core: the search writes recipes, the engine
materializes them, and ``evomerge merge recipe.yaml`` reproduces one bit-identically (given the same seed and device).
How a parameter value (scalar, gradient, per-filter mapping; per source or global) becomes the value of one tensor
is :mod:`evomerge.recipe.resolve`; reading a file (evomerge or mergekit YAML) is :mod:`evomerge.recipe.io`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = Union[bool, float]
Gradient = list[float]
Value = Union[Scalar, Gradient]
ParamValue = Union[Scalar, Gradient, dict[str, Value]]


class RecipeError(ValueError):
    """A recipe that cannot be merged; the message names the field and the fix."""


def refuse_unknown_keys(data: Mapping[str, object], known: Mapping[str, object], where: str) -> None:
    """RecipeError naming the keys of ``data`` that are not in ``known``, with the closest known key for each."""
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = [f"{key!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(str(key), known, 1))
                 for key in unknown]
        raise RecipeError(f"{where}: unknown key {', '.join(hints)}; valid keys: {', '.join(known)}")


class StrictModel(BaseModel):
    """Plain, immutable config data: unknown keys are an error (recipes, search spaces)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(StrictModel):
    """One source checkpoint and its per-source parameters."""

    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class LayerSlice(StrictModel):
    """Layers ``[start, end)`` of ``model``, optionally scaled (layer stacking / passthrough)."""

    model: str
    layer_range: tuple[int, int]
    scale: float = 1.0

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class CalibrationData(StrictModel):
    """Text for data-aware methods (Fisher, RegMean): a ``.txt`` file (one text per line) or a ``.jsonl`` file with
    a ``text`` field (or, as in the zoo's task files, ``query`` + the gold choice); see :mod:`evomerge.calibration`."""

    path: str
    text_field: str = "text"
    n_samples: int = Field(32, ge=1)
    max_length: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)


class Recipe(StrictModel):
    """How to build one merged model.

    ``method`` names a registered method; ``base`` is the model task vectors are taken against (required by
    task-vector methods); ``sources`` the models being merged; ``parameters`` global parameters (and defaults for
    per-source ones); ``slices`` the layer plan of ``passthrough``; ``seed`` seeds stochastic methods per tensor.
    """

    method: str
    base: str | None = None
    sources: list[SourceSpec] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    slices: list[LayerSlice] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    calibration: CalibrationData | None = None

    @model_validator(mode="after")
    def _shape(self) -> Recipe:
        if self.method == "passthrough":
            if not self.slices:
                raise ValueError("method 'passthrough' needs 'slices': a list of {model, layer_range: [start, end]}")
        else:
            if self.slices:
                raise ValueError(f"'slices' is only used by method 'passthrough', not by '{self.method}'")
            if not self.sources:
                raise ValueError(f"method '{self.method}' needs at least one entry in 'sources'")
        return self

    # ----------------------------------------------------------------------------------------------- models
    def model_paths(self) -> list[str]:
        """Every distinct model path the recipe reads, base first."""
        paths: list[str] = [self.base] if self.base else []
        paths += [s.model for s in self.sources]
        paths += [s.model for s in self.slices or []]
        return list(dict.fromkeys(paths))

    # ------------------------------------------------------------------------------------------------ files
    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def model_labels(paths: Sequence[str]) -> list[str]:
    """Short names of models for labels (baselines, report rows): the dir name, the full path where names collide."""
    names = [Path(p).name or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]
