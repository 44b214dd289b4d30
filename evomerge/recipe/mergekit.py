"""Import and export of mergekit YAML configs.

A mergekit config (``merge_method``, ``base_model``, ``models[].parameters``, top-level ``parameters``, ``slices``,
``dtype``, ``tokenizer_source``) converts to a :class:`~evomerge.recipe.Recipe` and back with the same meaning:

- parameter values: scalars and gradient lists map as they are; mergekit's filter lists
  ``[{filter: self_attn, value: V}, {value: D}]`` map to evomerge's ``{self_attn: V, default: D}``;
- ``slerp``: mergekit interpolates from ``base_model`` (t=0) to the other model (t=1); evomerge's slerp goes from
  ``sources[0]`` to ``sources[1]``, so the base becomes ``sources[0]``;
- ``karcher`` and ``linear``: mergekit averages every input model, the base too (appended last when ``models`` does
  not list it), so the base stays one of the sources, at that place; exported, a base that is not one of the sources
  is left out. mergekit's ``linear`` has no default ``weight``: a model without one (the base included, unless the
  top-level ``parameters`` give a ``weight``) is refused, as mergekit refuses it;
- ``dtype`` / ``out_dtype``: mergekit computes in ``dtype`` and writes ``out_dtype`` (default ``dtype``); evomerge
  computes in fp32 and writes the recipe's ``dtype`` = ``out_dtype or dtype`` (with ``dtype: bfloat16`` mergekit rounds
  every step to bf16: a few ulp apart, README); exported, a bf16 / fp16 recipe is ``dtype: float32`` + ``out_dtype``,
  so mergekit computes as evomerge does;
- ``slices`` describe the layer plan of ``passthrough`` (one source per slice, optional scalar ``scale``); for other
  methods only the common "one slice, every source over the same range" form is accepted and read as the models list;
- a model ``MODEL+LORA`` (mergekit's model with a LoRA applied) is the adapter dir as a source on the base, which
  must be MODEL (:mod:`evomerge.adapters`); without ``base_model`` (``linear`` / ``karcher``, where the base would be
  averaged in) MODEL becomes the recipe's base, the model the adapters sit on. Exported, an adapter source is
  written ``MODEL+LORA`` with MODEL the model the engine puts it on (the recipe's base, else its first source);
  whether a source is an adapter is decided from its files (``adapter_config.json`` or adapter weights and no
  ``config.json``: :func:`~evomerge.recipe.schema.is_adapter_dir`, no torch), as the engine decides it;
- keys evomerge does not implement are an error that names them, never silently dropped; ``int8_mask`` (a memory
  option of mergekit that does not change the result) is accepted and dropped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import yaml

from evomerge.recipe.moe import to_mergekit_moe, to_mergekit_moe_yaml
from evomerge.recipe.schema import (
    STACK_METHOD,
    AnyRecipe,
    LayerSlice,
    MoeRecipe,
    ParamValue,
    Recipe,
    RecipeError,
    SourceSpec,
    StackRecipe,
    is_adapter_dir,
)

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                  "slices"}
# dtypes evomerge computes in: always float32 (a recipe's dtype is the output's, rounded once)
COMPUTE_DTYPE = "float32"
MODEL_KEYS = {"model", "parameters"}
DROPPED_PARAMETERS = {"int8_mask"}
# methods whose mergekit inputs are all the models, base included (mergekit ignores which one is the base)
BASE_IS_A_SOURCE = {"karcher", "linear"}
# methods whose per-model `weight` mergekit requires (no default): a model without one is an error there
WEIGHT_REQUIRED = {"linear"}


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"mergekit {where}: unsupported key(s) {unknown}; evomerge understands {sorted(allowed)}")


def _param_from_mergekit(value: Any, where: str) -> ParamValue:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out: dict[str, Any] = {}
        for entry in value:
            _check_keys(entry, {"filter", "value"}, f"{where} filter entry")
            out[entry.get("filter", "default")] = entry["value"]
        return out
    return value


def _param_to_mergekit(value: ParamValue) -> Any:
    if isinstance(value, dict):
        return [{"value": v} if k == "default" else {"filter": k, "value": v} for k, v in value.items()]
    return value


def _params_from_mergekit(params: Mapping[str, Any] | None, where: str) -> dict[str, ParamValue]:
    out = {}
    for key, value in (params or {}).items():
        if key in DROPPED_PARAMETERS:
            log.warning("mergekit %s: '%s' is a mergekit memory option; ignored (it does not change the result)",
                        where, key)
            continue
        out[key] = _param_from_mergekit(value, f"{where}.{key}")
    return out


def _reference(entry: Any) -> str:
    return entry if isinstance(entry, str) else entry["model"]


def _adapters_model(models: list[Any], method: str) -> str | None:
    """Without ``base_model``: the MODEL of the ``MODEL+LORA`` references of a method that averages every model in
    (``linear``, ``karcher``), which becomes the recipe's base (the adapters sit on it); None without references."""
    anchors = list(dict.fromkeys(_reference(m).split("+", 1)[0] for m in models if "+" in _reference(m)))
    if method not in BASE_IS_A_SOURCE or len(anchors) != 1:
        return None  # several models, or a method that needs base_model: _model_name names the problem
    return anchors[0]


def _model_name(entry: Any, base: str | None = None) -> str:
    """A model reference's path; mergekit's ``MODEL+LORA`` (the model with a LoRA adapter applied) is the adapter dir,
    a source on the recipe's base (:mod:`evomerge.adapters`), so MODEL must be the base."""
    name = _reference(entry)
    if "+" not in name:
        return name
    model, lora = name.split("+", 1)
    if model != base:
        raise RecipeError(f"mergekit model {name!r}: a LoRA adapter is a source on the recipe's base only, and "
                          f"{model!r} is not base_model {base!r}; merge it into {model!r} first (peft's "
                          "merge_and_unload) or set base_model to it")
    return lora


def _slice_models(slices: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if len(slices) != 1 or len({tuple(s.get("layer_range", ())) for s in slices[0]["sources"]}) != 1:
        raise RecipeError(
            "mergekit slices with several slices or differing layer ranges are only supported for passthrough; "
            "for other methods use 'models:' (the whole stack)"
        )
    return [{k: v for k, v in s.items() if k != "layer_range"} for s in slices[0]["sources"]]


def from_mergekit(data: Mapping[str, Any]) -> AnyRecipe:
    """Convert a parsed mergekit config into a recipe (``passthrough``: a layer stack). Errors name unsupported
    keys; an unknown method is named when the recipe is checked against the registry
    (:func:`evomerge.merge.check_values`)."""
    _check_keys(data, TOP_LEVEL_KEYS, "config")
    method = data["merge_method"]
    params = _params_from_mergekit(data.get("parameters"), "parameters")
    tokenizer = data.get("tokenizer_source")
    if tokenizer == "union":
        raise RecipeError("mergekit tokenizer_source 'union' is not supported; use 'base' or a model path")
    base = data.get("base_model")
    if isinstance(base, str) and "+" in base:
        raise RecipeError(f"mergekit base_model {base!r} carries a LoRA adapter; evomerge takes adapters as sources on "
                          "a full base: list the adapter under models as BASE+LORA with base_model: BASE")
    # mergekit computes in `dtype` and writes `out_dtype` (default: `dtype`); evomerge computes in fp32 and writes the
    # recipe's dtype: `dtype: float32, out_dtype: bfloat16` is evomerge's own arithmetic
    common = {"dtype": data.get("out_dtype") or data.get("dtype"),
              "tokenizer_source": base if tokenizer == "base" else tokenizer}
    if method == STACK_METHOD:
        slices = []
        for s in data.get("slices") or []:
            if len(s["sources"]) != 1:
                raise RecipeError("mergekit passthrough slices must have exactly one source each")
            src = s["sources"][0]
            _check_keys(src, {"model", "layer_range", "parameters"}, "slice source")
            scale = _params_from_mergekit(src.get("parameters"), "slice parameters")
            _check_keys(scale, {"scale"}, "slice parameters")
            slices.append(LayerSlice(model=src["model"], layer_range=tuple(src["layer_range"]),
                                     scale=float(scale.get("scale", 1.0))))
        return StackRecipe(base=base, slices=slices, **common)
    models = data.get("models") or (_slice_models(data["slices"]) if data.get("slices") else [])
    adapters_model = _adapters_model(models, method) if base is None else None
    sources = []
    for i, m in enumerate(models):
        if isinstance(m, Mapping):
            _check_keys(m, MODEL_KEYS | {"layer_range"}, f"models[{i}]")
        sources.append(SourceSpec(model=_model_name(m, base or adapters_model),
                                  parameters=_params_from_mergekit(m.get("parameters") if isinstance(m, Mapping)
                                                                   else None, f"models[{i}].parameters")))
    if method == "slerp":
        others = [s for s in sources if s.model != base]
        if base is None or len(others) != 1:
            raise RecipeError("mergekit slerp needs base_model and exactly one other model")
        sources = [SourceSpec(model=base), others[0]]
    elif method in BASE_IS_A_SOURCE:
        if base is not None and all(s.model != base for s in sources):
            sources.append(SourceSpec(model=base))
        if method in WEIGHT_REQUIRED and "weight" not in params:
            unweighted = [s.model for s in sources if "weight" not in s.parameters]
            if unweighted:
                raise RecipeError(
                    f"mergekit {method} needs a weight for every input model, the base_model too (mergekit averages "
                    f"it in): {', '.join(unweighted)} has none; give it parameters.weight (or a top-level "
                    "parameters.weight for all), or drop base_model")
    else:
        sources = [s for s in sources if s.model != base or s.parameters]
    return Recipe(method=method, base=base or adapters_model, sources=sources, parameters=params, **common)


def _source_defaults(recipe: Recipe) -> dict[str, Any]:
    """Per-source parameters the recipe leaves to the method's default, spelled out: mergekit has no default for
    some of them (``weight``) and refuses the config without them."""
    from evomerge.methods import get_method  # the registry holds the defaults; imported only when exporting

    method = get_method(recipe.method)
    return {p.name: p.default for p in method.params
            if p.per_source and p.default is not None and p.name not in recipe.parameters}


def to_mergekit(recipe: AnyRecipe) -> dict[str, Any]:
    """Convert a recipe into a mergekit config dict (``yaml.safe_dump`` it to write the file); an MoE recipe into
    the config mergekit-moe reads (:func:`~evomerge.recipe.moe.to_mergekit_moe`). A LoRA adapter source (a dir with
    ``adapter_config.json``: :func:`~evomerge.recipe.schema.is_adapter_dir`, a file check, so the recipe layer stays
    free of torch) is written ``BASE+ADAPTER``, mergekit's reference to the base with the adapter merged in (peft's
    merge_and_unload, what :mod:`evomerge.adapters` reads an adapter as)."""
    if isinstance(recipe, MoeRecipe):
        return to_mergekit_moe(recipe)
    out: dict[str, Any] = {"merge_method": recipe.method}
    if isinstance(recipe, StackRecipe):
        out["slices"] = [
            {"sources": [{"model": s.model, "layer_range": list(s.layer_range),
                          **({"parameters": {"scale": s.scale}} if s.scale != 1.0 else {})}]}
            for s in recipe.slices
        ]
    else:
        base = recipe.sources[0].model if recipe.method == "slerp" else recipe.base
        if recipe.method in BASE_IS_A_SOURCE and all(s.model != base for s in recipe.sources):
            base = None  # mergekit would average it in as one more input; evomerge's sources leave it out
        if base is not None:
            out["base_model"] = base
        defaults = _source_defaults(recipe)
        on = recipe.model_paths()[0]  # the model the engine opens first: LoRA adapter sources sit on it
        out["models"] = []
        for s in recipe.sources:
            params = {**defaults, **{k: _param_to_mergekit(v) for k, v in s.parameters.items()}}
            model = f"{on}+{s.model}" if s.model != on and is_adapter_dir(s.model) else s.model
            out["models"].append({"model": model, **({"parameters": params} if params else {})})
        if recipe.parameters:
            out["parameters"] = {k: _param_to_mergekit(v) for k, v in recipe.parameters.items()}
    if recipe.dtype:  # computed in fp32 and rounded once, as evomerge computes it
        out["dtype"] = COMPUTE_DTYPE
        if recipe.dtype != COMPUTE_DTYPE:
            out["out_dtype"] = recipe.dtype
    if recipe.tokenizer_source:
        out["tokenizer_source"] = "base" if recipe.tokenizer_source == recipe.base else recipe.tokenizer_source
    return out


#: Methods whose masks evomerge draws from its counter-based generator: mergekit draws them with torch.bernoulli,
#: so the same recipe gives other (equally distributed) masks there.
RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
RANDOM_NOTE = (
    "# evomerge draws the {method} masks from a counter-based generator (seed {seed}, the same masks on any device),\n"
    "# mergekit from torch.bernoulli: mergekit's result has other, equally distributed masks, not evomerge's tensors.\n"
    "# evomerge rescales kept entries by 1/p when rescale is true; mergekit rescales each task vector to its L1 norm.\n"
)


def to_mergekit_yaml(recipe: AnyRecipe) -> str:
    """:func:`to_mergekit` as YAML text, with a comment on where mergekit's result differs (DARE / DELLA draws; an
    MoE's random routers: :func:`~evomerge.recipe.moe.to_mergekit_moe_yaml`)."""
    if isinstance(recipe, MoeRecipe):
        return to_mergekit_moe_yaml(recipe)
    text = yaml.safe_dump(to_mergekit(recipe), sort_keys=False)
    if isinstance(recipe, Recipe) and recipe.method in RANDOM_METHODS:
        text = RANDOM_NOTE.format(method=recipe.method, seed=recipe.seed) + text
    return text
