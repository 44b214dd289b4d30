"""The merge recipe: plain data that says how to build one merged model.

A :class:`Recipe` is the contract between the search and the merge core: the search writes recipes, the engine
materializes them, and ``evomerge merge recipe.yaml`` reproduces one bit-identically (given the same seed and device).

Parameter values
----------------
Every method parameter (see :mod:`evomerge.methods`) takes one of:

- a scalar (``0.5``, ``true``);
- a list of floats, a *gradient* interpolated linearly across the layer stack (mergekit semantics):
  ``[0.0, 1.0]`` goes from 0 at the first layer to 1 at the last. Tensors outside the stack take the value at the
  start (embeddings) or the end (final norm, lm_head) of the gradient;
- a mapping from filter to either of the above, with an optional ``default`` key:
  ``{self_attn: [0, 1], mlp: 0.5, default: 0.3}``. A filter matches a tensor name as described in
  :func:`evomerge.checkpoint.matches_filter` (``self_attn``, ``mlp``, ``embed``, ``norm``, ``lm_head`` or any substring
  of the name); the first matching key wins, in the order written.

Per-source parameters (``weight``, ``density``, ...) are looked up in the source's ``parameters`` first, then in the
recipe's top-level ``parameters`` (a default for all sources), then the method's default.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.checkpoint import matches_filter

Scalar = Union[bool, float]
Gradient = list[float]
Value = Union[Scalar, Gradient]
ParamValue = Union[Scalar, Gradient, dict[str, Value]]

DTYPES = ("float32", "bfloat16", "float16")


class RecipeError(ValueError):
    """A recipe that cannot be merged; the message names the field and the fix."""


def _refuse_unknown_keys(data: Mapping[str, object], known: Mapping[str, object], where: str) -> None:
    """RecipeError naming the keys of ``data`` that are not in ``known``, with the closest known key for each."""
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = [f"{key!r}" + "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(str(key), known, 1))
                 for key in unknown]
        raise RecipeError(f"{where}: unknown key {', '.join(hints)}; valid keys: {', '.join(known)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """One source checkpoint and its per-source parameters."""

    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class LayerSlice(_Strict):
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


class CalibrationData(_Strict):
    """Text for data-aware methods (Fisher, RegMean): a ``.txt`` file (one text per line) or a ``.jsonl`` file with
    a ``text`` field (or, as in the zoo's task files, ``query`` + the gold choice); see :mod:`evomerge.calibration`."""

    path: str
    text_field: str = "text"
    n_samples: int = Field(32, ge=1)
    max_length: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)


class Recipe(_Strict):
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
    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read an evomerge recipe; a mergekit config (``merge_method:``) is converted on the way."""
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
        if "merge_method" in data:
            from evomerge.mergekit import from_mergekit

            return from_mergekit(data)
        _refuse_unknown_keys(data, cls.model_fields, f"{path}")
        for i, source in enumerate(data.get("sources") or []):
            if isinstance(source, dict):
                _refuse_unknown_keys(source, SourceSpec.model_fields, f"{path}: sources[{i}]")
        return cls.model_validate(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


# ---------------------------------------------------------------------------------------------- resolution
def gradient_position(layer: int | None, num_layers: int, is_embedding: bool) -> float:
    """Position in [0, 1] along the layer stack: layer / (L − 1); embeddings 0, other non-layer tensors 1."""
    if layer is None:
        return 0.0 if is_embedding else 1.0
    return layer / (num_layers - 1) if num_layers > 1 else 0.0


def interpolate(value: Value, position: float) -> Scalar:
    """A scalar as is; a gradient list interpolated linearly at ``position`` ∈ [0, 1] (mergekit's gradient)."""
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        anchors = np.linspace(0.0, 1.0, len(value))
        return float(np.interp(position, anchors, np.asarray(value, dtype=np.float64)))
    return value


def select_filter(value: ParamValue, name: str) -> Value | None:
    """The entry of a per-filter mapping that applies to tensor ``name`` (``default`` last); non-mappings as is."""
    if not isinstance(value, dict):
        return value
    for key, entry in value.items():
        if key != "default" and matches_filter(name, key):
            return entry
    return value.get("default")


def resolve_value(value: ParamValue, name: str, position: float) -> Scalar | None:
    """The scalar a parameter value takes for tensor ``name`` at stack ``position``; None if no filter matches."""
    entry = select_filter(value, name)
    return None if entry is None else interpolate(entry, position)
