"""The merge recipe: plain data that says how to build one merged model.

A recipe is the contract between the search and the merge core: the search writes recipes, the engine
materializes them, and ``evomerge merge recipe.yaml`` reproduces one bit-identically (given the same seed and device).
Recipes come in kinds, like search spaces: a :class:`Recipe` is a parameter merge (one method over every tensor), a
:class:`StackRecipe` a layer stack (``passthrough``); :data:`AnyRecipe` / :func:`parse_recipe` take either.
How a parameter value (scalar, gradient, per-filter mapping; per source or global) becomes the value of one tensor
is :mod:`evomerge.recipe.resolve`; reading a file (evomerge or mergekit YAML) is :mod:`evomerge.recipe.io`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

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


def one_line(err: ValidationError) -> str:
    """pydantic's errors as one line, ``key.path: problem; ...`` (the "Value error, " prefix dropped)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in err.errors())


class StrictModel(BaseModel):
    """Plain, immutable config data: unknown keys are an error (recipes, search spaces)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The files of a PEFT LoRA adapter dir (a source may be one: :mod:`evomerge.adapters` reads it).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


def is_adapter_dir(path: str | Path) -> bool:
    """True for a dir holding ``adapter_config.json`` or adapter weights and no ``config.json`` (a full model).

    Decided from the file names alone (no torch, no file read): the recipe layer uses it to export an adapter source
    as mergekit's ``BASE+ADAPTER`` reference; :mod:`evomerge.adapters` checks the adapter itself when it opens it."""
    p = Path(path).expanduser()
    names = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE)
    return p.is_dir() and not (p / "config.json").is_file() and any((p / n).is_file() for n in names)


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


#: The method name of a layer stack, as mergekit spells it.
STACK_METHOD = "passthrough"


DType = Literal["float32", "bfloat16", "float16"]


class _RecipeFile(StrictModel):
    """What every kind of recipe does: name the models it reads, write itself as YAML. (Each kind declares its own
    fields, ``method`` first: the order unknown-key messages list them in.)"""

    def model_paths(self) -> list[str]:
        """Every distinct model path the recipe reads, base first."""
        raise NotImplementedError

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


class Recipe(_RecipeFile):
    """A parameter merge: every tensor of the output is ``method`` applied to that tensor of the sources.

    ``method`` names a registered method; ``base`` is the model task vectors are taken against (required by
    task-vector methods); ``sources`` the models being merged; ``parameters`` global parameters (and defaults for
    per-source ones); ``seed`` seeds stochastic methods per tensor. A layer stack is a :class:`StackRecipe`.
    """

    method: str
    base: str | None = None
    sources: list[SourceSpec] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DType | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    calibration: CalibrationData | None = None

    @model_validator(mode="after")
    def _shape(self) -> Recipe:
        if self.method == STACK_METHOD:
            raise ValueError("method 'passthrough' is a layer stack: build it as a StackRecipe (slices: a list of "
                             "{model, layer_range: [start, end]}); parse_recipe picks the kind from the method")
        if not self.sources:
            raise ValueError(f"method '{self.method}' needs at least one entry in 'sources'")
        return self

    def model_paths(self) -> list[str]:
        paths: list[str] = [self.base] if self.base else []
        return list(dict.fromkeys(paths + [s.model for s in self.sources]))


class StackRecipe(_RecipeFile):
    """A layer stack (mergekit's ``passthrough``, a "frankenmerge"): the output's layers are ``slices`` of the
    sources' layer stacks, in order, each optionally scaled; built by :mod:`evomerge.engine.stacking`. ``base`` is
    kept for the record (mergekit's ``base_model``); the stack does not read it."""

    method: Literal["passthrough"] = STACK_METHOD
    base: str | None = None
    slices: list[LayerSlice] = Field(min_length=1)
    dtype: DType | None = None
    tokenizer_source: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: object) -> object:
        """Studies written before recipes had kinds stored every field of one recipe class: the merge fields of a
        stack are dropped when they hold their empty defaults (anything else is still an unknown key)."""
        if isinstance(data, Mapping):
            empty = {"sources": [], "parameters": {}, "seed": 0, "calibration": None}
            data = {k: v for k, v in data.items() if not (k in empty and v == empty[k])}
        return data

    def model_paths(self) -> list[str]:
        paths: list[str] = [self.base] if self.base else []
        return list(dict.fromkeys(paths + [s.model for s in self.slices]))


def _kind(data: object) -> str:
    method = data.get("method") if isinstance(data, Mapping) else getattr(data, "method", None)
    return "stack" if method == STACK_METHOD else "merge"


#: Any kind of recipe, told apart by ``method`` (``passthrough``: a layer stack).
AnyRecipe = Annotated[Union[Annotated[Recipe, Tag("merge")], Annotated[StackRecipe, Tag("stack")]],
                      Discriminator(_kind)]
_ANY_RECIPE: TypeAdapter[Recipe | StackRecipe] = TypeAdapter(AnyRecipe)


def parse_recipe(data: object) -> Recipe | StackRecipe:
    """The recipe of kind ``data["method"]`` names (a mapping, e.g. a stored trial's ``recipe``), validated."""
    return _ANY_RECIPE.validate_python(data)


def recipe_fields(data: Mapping[str, object]) -> Mapping[str, object]:
    """The valid keys of the recipe kind ``data`` describes (for unknown-key messages)."""
    return (StackRecipe if _kind(data) == "stack" else Recipe).model_fields


def model_labels(paths: Sequence[str]) -> list[str]:
    """Short names of models for labels (baselines, report rows): the dir name, the full path where names collide."""
    names = [Path(p).name or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]
