"""The merge recipe: plain data that says how to build one merged model.

A recipe is the contract between the search and the merge core: the search writes recipes, the engine
materializes them, and ``evomerge merge recipe.yaml`` reproduces one bit-identically (given the same seed and device).
Recipes come in kinds, like search spaces: a :class:`Recipe` is a parameter merge (one method over every tensor), a
:class:`StackRecipe` a layer stack (``passthrough``), an :class:`MoeRecipe` (``kind: moe``) a mixture of experts
assembled from dense fine-tunes; :data:`AnyRecipe` / :func:`parse_recipe` take any of them (:func:`recipe_kind` tells
them apart). The MoE recipe's mergekit-moe YAML is :mod:`evomerge.recipe.moe`.
How a parameter value (scalar, gradient, per-filter mapping; per source or global) becomes the value of one tensor
is :mod:`evomerge.recipe.resolve`; reading a file (evomerge or mergekit YAML) is :mod:`evomerge.recipe.io`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
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


def closest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to a misspelt ``name``, ``""`` when none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def refuse_unknown_keys(data: Mapping[str, object], known: Mapping[str, object], where: str) -> None:
    """RecipeError naming the keys of ``data`` that are not in ``known``, with the closest known key for each."""
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = [f"{key!r}{closest(str(key), known)}" for key in unknown]
        raise RecipeError(f"{where}: unknown key {', '.join(hints)}; valid keys: {', '.join(known)}")


def one_line(err: ValidationError, root: str = "value", unknown: Callable[[str], str] = lambda where: "unknown key",
             hidden: Collection[str] = ()) -> str:
    """pydantic's errors as one line, ``key.path: problem; ...`` (the "Value error, " prefix dropped): ``root``
    names an error at the top, ``unknown(where)`` says what an unknown key is (e.g. with the closest valid key),
    ``hidden`` are location parts left out (a tagged union's tags)."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"] if x not in hidden) or root
        problem = unknown(where) if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {problem}")
    return "; ".join(parts)


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
    fields, its tag first (``method``, ``kind``): the order unknown-key messages list them in.)"""

    def model_paths(self) -> list[str]:
        """Every distinct model path the recipe reads, base first."""
        raise NotImplementedError

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The recipe as YAML (keys at their default left out), its kind's tag first: ``method`` of a merge or a
        stack, ``kind`` of an MoE (each kind declares its tag as its first field; a stack's and an MoE's tag has a
        default, which must still be written for :func:`parse_recipe` to tell the kind)."""
        tag = next(iter(type(self).model_fields))
        data = {tag: getattr(self, tag), **self.model_dump(mode="json", exclude_defaults=True)}
        text = yaml.safe_dump(data, sort_keys=False)
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


GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
GATE_MODES: tuple[str, ...] = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
#: gate modes whose router rows come from each expert's prompts
PROMPT_MODES = {"hidden", "hidden_last", "hidden_avg", "cheap_embed"}
#: the MoE classes an MoE recipe can be written as (``architecture``; :mod:`evomerge.moe.arch` maps them to
#: transformers classes and the bases each takes)
MoeArchitecture = Literal["mixtral", "qwen2_moe"]
#: their names in text (model cards)
MOE_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}


class MoeExpert(StrictModel):
    """One expert: a fine-tune of the base whose MLPs become expert ``i`` of every layer, with the prompts that
    should be routed to it (``positive_prompts``) and away from it (``negative_prompts``); ``residual_scale``
    multiplies its ``down_proj`` (mergekit-moe's key of the same name)."""

    model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    residual_scale: float = 1.0


class DenseMlp(StrictModel):
    """Layers that keep a dense MLP: the experts' MLPs merged by ``method`` (any evomerge method, with ``parameters``
    as in a merge recipe and per-expert ``weights`` in expert order; ``base`` of the merge is the MoE's base). In a
    Mixtral every expert slot of each layer in ``layers`` holds it, so whichever experts the router picks, the layer
    computes that one MLP (the top-k weights sum to 1); in a Qwen2-MoE the layer is a plain MLP
    (``Qwen2MoeConfig.mlp_only_layers``: no router, no shared expert)."""

    layers: list[int]
    method: str = "linear"
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    weights: list[float] | None = None

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError(f"dense_layers.layers must be distinct layer indices >= 0, got {v}")
        return sorted(v)


class MoeRecipe(_RecipeFile):
    """A mixture of experts (``kind: moe``) built from dense fine-tunes of one base, in the Mixtral or Qwen2-MoE layout
    (``architecture``): attention, norms, embeddings and head from ``base``; in every layer each expert's MLP becomes
    one expert; a router per layer sends each token to ``experts_per_token`` of them. The router rows are initialised by
    ``gate_mode``, with mergekit-moe's meaning (``mergekit/moe/router.py``):

    - ``hidden`` (mergekit's default, also ``hidden_last``): per layer, the base model's hidden state entering that
      layer at the *last* token of each positive prompt, averaged over the prompts, minus the same for the negative
      prompts, normalised to unit length; computed in bfloat16, as mergekit does;
    - ``hidden_avg``: the same with the hidden states averaged over each prompt's tokens;
    - ``cheap_embed``: the sum of the prompts' token embeddings (no forward pass), normalised, the same for every
      layer;
    - ``random``: standard normal rows, ``uniform_random``: ``U(−1/√h, 1/√h)`` (torch.nn.Linear's init); both drawn
      from ``seed`` (mergekit-moe ``--random-seed SEED`` draws the same ones).

    ``architecture`` names the output class: ``mixtral`` (``MixtralForCausalLM``, no shared expert) or ``qwen2_moe``
    (``Qwen2MoeForCausalLM``: the routed experts plus exactly one ``shared_experts`` entry whose MLP every token
    runs through, scaled by a sigmoid gate whose row comes from the shared expert's prompts like a router row); left
    out, it is ``qwen2_moe`` with a shared expert and ``mixtral`` without (:attr:`output_architecture`).

    What the search adds beyond mergekit-moe (all neutral by default, so a mergekit-moe config means what it means
    there): ``router_scale`` (a scalar or a gradient across the layers, as any evomerge parameter: multiplies the
    router rows, i.e. a softmax temperature of ``1/scale``), ``random_weight`` (router rows ``(1 − r)·g + r·z/|z|``
    with ``z`` the seeded normal rows: the weight of the prompt gate vs random) and ``dense_layers`` (layers whose
    experts all hold one dense MLP merged from the experts' MLPs by any evomerge method, :class:`DenseMlp`). The
    build is :mod:`evomerge.moe`.
    """

    kind: Literal["moe"] = "moe"
    base: str
    experts: list[MoeExpert]
    experts_per_token: int = Field(2, ge=1)
    gate_mode: GateMode = "hidden"
    shared_experts: list[MoeExpert] = Field(default_factory=list)
    architecture: MoeArchitecture | None = None
    router_scale: Value = 1.0
    random_weight: float = Field(0.0, ge=0.0, le=1.0)
    dense_layers: DenseMlp | None = None
    dtype: DType | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> MoeRecipe:
        n = len(self.experts)
        if n < 1:
            raise ValueError("an MoE recipe needs at least one entry in 'experts'")
        if self.experts_per_token > n:
            raise ValueError(f"experts_per_token is {self.experts_per_token} but there are only {n} experts: "
                             f"set experts_per_token to at most {n} or add experts")
        if self.gate_mode in PROMPT_MODES:
            empty = [i for i, e in enumerate(self.experts) if not e.positive_prompts]
            if empty:
                raise ValueError(f"gate_mode {self.gate_mode!r} computes each router row from the expert's prompts, "
                                 f"but experts {empty} have an empty positive_prompts list: give every expert at least "
                                 "one positive prompt, or use gate_mode 'random'")
        if self.dense_layers is not None and self.dense_layers.weights is not None \
                and len(self.dense_layers.weights) != n:
            raise ValueError(f"dense_layers.weights has {len(self.dense_layers.weights)} entries for {n} experts")
        self._check_shared()
        return self

    def _check_shared(self) -> None:
        """The shared experts the output class can hold (mergekit-moe's rules, ``mergekit/moe/{mixtral,qwen}.py``)."""
        shared = self.shared_experts
        if self.architecture == "mixtral" and shared:
            raise ValueError("shared_experts: MixtralForCausalLM has no shared expert; remove shared_experts, or set "
                             "architecture: qwen2_moe (Qwen2-MoE has exactly one)")
        if self.output_architecture != "qwen2_moe":
            return
        if len(shared) != 1:
            raise ValueError(f"architecture qwen2_moe: Qwen2MoeForCausalLM has exactly one shared expert, the recipe "
                             f"lists {len(shared)}: give shared_experts one entry (e.g. the base), or use "
                             "architecture: mixtral")
        if self.gate_mode != "random" and not shared[0].positive_prompts:
            raise ValueError(f"gate_mode {self.gate_mode!r} initialises the shared expert's gate from its prompts (as "
                             "mergekit-moe does), but shared_experts[0] has no positive_prompts: give it some, or use "
                             "gate_mode 'random'")

    @property
    def output_architecture(self) -> str:
        """``architecture``, or where it is left out ``qwen2_moe`` with shared experts and ``mixtral`` without."""
        return self.architecture or ("qwen2_moe" if self.shared_experts else "mixtral")

    def model_paths(self) -> list[str]:
        return list(dict.fromkeys([self.base, *(e.model for e in self.experts),
                                   *(e.model for e in self.shared_experts)]))


#: The recipe class of each kind (:func:`recipe_kind`).
RECIPE_KINDS: dict[str, type[_RecipeFile]] = {"merge": Recipe, "stack": StackRecipe, "moe": MoeRecipe}


def recipe_kind(data: object) -> str:
    """The kind of a recipe or of its mapping: ``moe`` (``kind: moe``), ``stack`` (``method: passthrough``) or
    ``merge``."""
    def get(key: str) -> Any:
        return data.get(key) if isinstance(data, Mapping) else getattr(data, key, None)

    if get("kind") == "moe":
        return "moe"
    return "stack" if get("method") == STACK_METHOD else "merge"


#: Any kind of recipe, told apart by :func:`recipe_kind`.
AnyRecipe = Annotated[Union[Annotated[Recipe, Tag("merge")], Annotated[StackRecipe, Tag("stack")],
                            Annotated[MoeRecipe, Tag("moe")]], Discriminator(recipe_kind)]


def parse_recipe(data: object) -> Recipe | StackRecipe | MoeRecipe:
    """The recipe of the kind ``data`` describes (a mapping, e.g. a stored trial's ``recipe``), validated (pydantic's
    ValidationError when invalid)."""
    return RECIPE_KINDS[recipe_kind(data)].model_validate(data)  # type: ignore[return-value]


def recipe_fields(data: Mapping[str, object]) -> Mapping[str, object]:
    """The valid keys of the recipe kind ``data`` describes (for unknown-key messages)."""
    return RECIPE_KINDS[recipe_kind(data)].model_fields


def model_labels(paths: Sequence[str]) -> list[str]:
    """Short names of models for labels (baselines, report rows): the dir name, the full path where names collide."""
    names = [Path(p).name or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]
