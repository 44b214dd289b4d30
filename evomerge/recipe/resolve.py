"""Which value does tensor T get: the one implementation of parameter resolution, pure and model-free.

Every method parameter (see :mod:`evomerge.methods`) takes one of:

- a scalar (``0.5``, ``true``);
- a list of floats, a *gradient* interpolated linearly across the layer stack (mergekit semantics):
  ``[0.0, 1.0]`` goes from 0 at the first layer to 1 at the last (:func:`gradient_position`, :func:`interpolate`);
  tensors outside the stack (embeddings, final norm, lm_head) take the value at the start, as in mergekit;
- a mapping from filter to either of the above, with an optional ``default`` key:
  ``{self_attn: [0, 1], mlp: 0.5, default: 0.3}``. A filter matches a tensor name as described in
  :func:`evomerge.naming.matches_filter` (``self_attn``, ``mlp``, ``embed``, ``norm``, ``lm_head`` or any substring
  of the name); the first matching key wins, in the order written (:func:`select_filter`).

Per-source parameters (``weight``, ``density``, ...) are looked up in the source's ``parameters`` first, then in the
recipe's top-level ``parameters`` (a default for all sources), then the method's default (:func:`resolve_params`).
The engine, the report's layer tables and the tests all resolve through :func:`resolve_params`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from evomerge.naming import layer_index, matches_filter
from evomerge.recipe.schema import ParamValue, Recipe, Scalar, Value

__all__ = ["gradient_position", "interpolate", "resolve_params", "resolve_value", "select_filter", "tensor_position"]


class ParamSpec(Protocol):
    """What resolution needs of a method parameter (:class:`evomerge.methods.spec.Param` is one)."""

    name: str
    default: float | bool | None
    per_source: bool


class MethodSpec(Protocol):
    """What resolution needs of a method (:class:`evomerge.methods.spec.MergeMethod` is one)."""

    params: Sequence[ParamSpec]


def gradient_position(layer: int | None, num_layers: int) -> float:
    """Position ``t`` in [0, 1] along the layer stack, as mergekit evaluates gradients (``mergekit/plan.py``):
    ``layer / (L − 1)`` for a layer of a stack of ``L > 1`` layers, 1 for the only layer of a 1-layer stack, and 0
    for every tensor outside the stack (embeddings, final norm, lm_head: mergekit plans them with ``t = 0``)."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(value: Value, position: float) -> Scalar:
    """A scalar as is; a gradient list interpolated linearly at ``position`` ∈ [0, 1] (mergekit's gradient).

    Evaluated as mergekit does (``mergekit/config.py: evaluate_setting``), so the float64 value is the same bit for
    bit: ``s = t·(n − 1)``, ``i = floor(s)``, ``f = s − i``, ``(1 − f)·v[i] + f·v[min(i + 1, n − 1)]``.
    """
    if isinstance(value, list):
        scaled = position * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(value[i0]) + frac * float(value[i1])
    return value


def layer_values(value: Value, num_layers: int) -> list[float]:
    """The value at each layer ``0..L-1`` of a stack of ``L`` layers: :func:`interpolate` at each layer's
    :func:`gradient_position` (e.g. an MoE recipe's ``router_scale``)."""
    return [float(interpolate(value, gradient_position(i, num_layers))) for i in range(num_layers)]


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


def tensor_position(name: str, num_layers: int) -> float:
    """The gradient position of tensor ``name`` in a stack of ``num_layers`` layers (:func:`gradient_position`)."""
    return gradient_position(layer_index(name), num_layers)


def _first(key: str, scopes: Sequence[Mapping[str, ParamValue]], name: str, position: float) -> Scalar | None:
    """The value of ``key`` from the first scope that sets it for ``name`` (a per-filter mapping with no matching
    entry falls through to the next scope)."""
    for scope in scopes:
        if key in scope:
            value = resolve_value(scope[key], name, position)
            if value is not None:
                return value
    return None


def resolve_params(recipe: Recipe, method: MethodSpec, tensor_name: str, num_layers: int) -> dict[str, object]:
    """The parameter values tensor ``tensor_name`` gets from ``recipe`` under ``method``.

    A global parameter resolves from the recipe's ``parameters``; a per-source one from each source's
    ``parameters``, then the recipe's, giving a list with one value per source (the method default where a source
    resolves to nothing) as soon as any source resolves it. Parameters that resolve nowhere are absent (the method
    default applies). Keys the method does not declare are passed through unresolved, so that
    :func:`evomerge.methods.validate_params` names them.
    """
    position = tensor_position(tensor_name, num_layers)
    resolved: dict[str, object] = {}
    for p in method.params:
        if p.per_source:
            values = [_first(p.name, (s.parameters, recipe.parameters), tensor_name, position) for s in recipe.sources]
            if any(v is not None for v in values):
                resolved[p.name] = [p.default if v is None else v for v in values]
        else:
            value = _first(p.name, (recipe.parameters,), tensor_name, position)
            if value is not None:
                resolved[p.name] = value
    known = {p.name for p in method.params}
    for scope in [recipe.parameters, *(s.parameters for s in recipe.sources)]:
        for key in scope:
            if key not in known:
                resolved.setdefault(key, scope[key])
    return resolved
