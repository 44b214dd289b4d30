"""What a recipe means for a set of checkpoints, before any tensor work: which tensors are merged, in which dtype,
which models are base and sources, and every tensor's resolved, validated parameters.

Shared by the in-memory :class:`~evomerge.engine.MergeEngine` and the tensor-by-tensor
:func:`~evomerge.engine.streaming.stream_merge`, so both mean the same thing by a recipe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.adapters import AdapterCheckpoint, LoraAdapter, is_adapter_dir
from evomerge.checkpoint import Checkpoint, check_compatible
from evomerge.engine.layout import model_class
from evomerge.methods import MergeMethod, get_method, validate_params
from evomerge.recipe import Recipe, RecipeError, resolve_params

__all__ = ["DTYPES", "Sources", "live_dtype", "method_kwargs", "open_sources", "plan_params", "recipe_indices",
           "recipe_method"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _meta_model(path: str, first: Checkpoint) -> torch.nn.Module:
    """A weightless (meta-device) instance of ``path``'s model class: what the model rebuilds and which modules it
    has, known before anything is loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        return model_class(config, first.names).from_config(config, trust_remote_code=False)


def _rebuilt_buffers(model: torch.nn.Module) -> set[str]:
    """Names of the non-persistent buffers of a model (BERT's ``embeddings.position_ids``, rotary ``inv_freq``): the
    model rebuilds them and transformers neither loads nor saves them, yet checkpoints saved by some transformers
    versions hold them."""
    return {n for n, _ in model.named_buffers()} - set(model.state_dict())


def _transposed_weights(model: torch.nn.Module, names: Sequence[str]) -> set[str]:
    """The checkpoint's weights stored [d_in, d_out] (transformers' ``Conv1D``, GPT-2), on which a LoRA delta is
    transposed; matched by module path, also when the checkpoint's names carry the head model's prefix
    (``transformer.``) and ``model`` is the bare model."""
    from transformers.pytorch_utils import Conv1D

    conv = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    return {n for n in names if any(n == c or n.endswith("." + c) for c in conv)} if conv else set()


def _open_model(path: str, base: Checkpoint | None, meta: torch.nn.Module | None,
                allow_pickle: bool) -> Checkpoint | AdapterCheckpoint:
    """A full checkpoint, or a LoRA adapter dir as the model it makes on ``base`` (the first model)."""
    if not is_adapter_dir(path):
        return Checkpoint.open(path, allow_pickle=allow_pickle)
    if base is None or meta is None:
        raise RecipeError(f"{path} is a LoRA adapter; an adapter needs its base model first: set the recipe's "
                          "'base' to the model the adapter was trained on")
    adapter = LoraAdapter.open(path, base, transposed=_transposed_weights(meta, base.names), allow_pickle=allow_pickle)
    return AdapterCheckpoint(adapter, base)


@dataclass
class Sources:
    """Opened, compatible checkpoints: ``kept`` every tensor the merged model holds (the first model's names but
    rebuilt buffers), ``names`` the floating-point ones among them (merged), ``skipped`` the rebuilt buffers some
    checkpoints hold."""

    paths: list[str]
    checkpoints: list[Checkpoint | AdapterCheckpoint]
    kept: list[str]
    names: list[str]
    skipped: list[str]

    @property
    def num_layers(self) -> int:
        return self.checkpoints[0].num_layers


def open_sources(paths: Sequence[str | Path], *, allow_pickle: bool = False) -> Sources:
    """Open every model and check, from metadata alone, that they can be merged tensor by tensor. LoRA adapter dirs
    (:mod:`evomerge.adapters`) are sources on the first model, which must be a full checkpoint (the recipe's base)."""
    if not paths:
        raise RecipeError("a merge needs at least one model path")
    names = [str(p) for p in paths]
    first = _open_model(names[0], None, None, allow_pickle)
    meta = _meta_model(names[0], first)
    checkpoints = [first] + [_open_model(p, first, meta, allow_pickle) for p in names[1:]]
    rebuilt = _rebuilt_buffers(meta)
    skipped = check_compatible(checkpoints, skip=rebuilt)
    kept = [n for n in first.names if n not in rebuilt]
    return Sources(names, checkpoints, kept, [n for n in kept if first.dtype(n).is_floating_point], list(skipped))


def live_dtype(dtype: str | torch.dtype | None, first: Checkpoint) -> torch.dtype:
    """The merged model's dtype: ``dtype`` when given, else the first floating-point tensor's (an integer buffer may
    come first on disk)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        floats = [n for n in first.names if first.dtype(n).is_floating_point]
        return first.dtype((floats or first.names)[0])
    if dtype not in DTYPES:
        raise RecipeError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def recipe_indices(paths: Sequence[str], recipe: Recipe) -> tuple[int | None, list[int]]:
    """Positions of the recipe's base and sources among ``paths``."""
    where = {p: i for i, p in enumerate(paths)}
    unknown = [p for p in recipe.model_paths() if p not in where]
    if unknown:
        raise RecipeError(f"recipe names models the engine was not loaded with: {unknown}; loaded: {list(paths)}")
    adapters = [s.model for s in recipe.sources if is_adapter_dir(s.model)]
    if adapters and recipe.base is not None and recipe.base != paths[0]:  # no base: a plain average of the models
        raise RecipeError(f"recipe sources {adapters[:2]} are LoRA adapters on {paths[0]}; set the recipe's base to "
                          "it (an adapter is a task vector against the base it was trained on)")
    base = where[recipe.base] if recipe.base else None
    return base, [where[s.model] for s in recipe.sources]


def recipe_method(recipe: Recipe) -> MergeMethod:
    """The registered method of a parameter merge (a layer stack is built by :mod:`evomerge.engine.stacking`)."""
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"the merge engine materializes parameter merges, not a {type(recipe).__name__} "
                          "(a layer stack changes the layer count: build it with evomerge.engine.stacking)")
    return get_method(recipe.method)


def plan_params(recipe: Recipe, names: Sequence[str], num_layers: int) -> tuple[MergeMethod, dict[str, dict]]:
    """The recipe's method and every tensor's resolved parameters, each distinct set checked against the method's
    ranges: a gradient or a per-filter value out of range anywhere in the stack fails here, not half-way through."""
    method = recipe_method(recipe)
    resolved = {n: resolve_params(recipe, method, n, num_layers) for n in names}
    seen: set[str] = set()
    for params in resolved.values():
        key = repr(sorted(params.items()))
        if key not in seen:
            seen.add(key)
            validate_params(method, params, len(recipe.sources), recipe.base is not None, recipe=True)
    return method, resolved


def method_kwargs(method: MergeMethod, params: Mapping[str, object], n: int) -> dict[str, object]:
    """Keyword arguments of ``method.fn``: per-source parameters as float64 CPU tensors [n] (the recipe's values as
    mergekit's Python floats hold them: keep counts ``⌊d·n⌋`` are counted from them), globals as is."""
    kwargs: dict[str, object] = {}
    for p in method.params:
        value = params.get(p.name, p.default)
        if p.per_source:
            values = value if isinstance(value, list) else [value] * n
            value = torch.tensor(values, dtype=torch.float64)
        kwargs[p.kwarg or p.name] = value
    return kwargs
