"""The method registry: lookup, parameter validation, and that every entry matches its function."""

from __future__ import annotations

import inspect

import pytest
import torch

from evomerge.methods import METHODS, MergeMethod, MethodError, get_method, validate_params
from evomerge.methods.spec import Coefficients, Ranks, Thresholds
from evomerge.methods.ties import FAMILY, SparseTaskMerge


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(MethodError, match="unknown merge method 'tiez'; valid: .*slerp.*ties"):
        get_method("tiez")
    assert issubclass(MethodError, ValueError)


def test_unknown_parameter_lists_valid_ones() -> None:
    with pytest.raises(MethodError, match="unknown parameter 'densty' for method 'ties'; valid: density, lambda"):
        validate_params(get_method("ties"), {"densty": 0.5}, 2, True)


def test_out_of_range_value_names_param_value_and_range() -> None:
    with pytest.raises(MethodError, match=r"'density' = 1.5 is out of range \[0.0, 1.0\]"):
        validate_params(get_method("ties"), {"density": [0.5, 1.5]}, 2, True)
    with pytest.raises(MethodError, match=r"'t' = -0.1 is out of range"):
        validate_params(get_method("slerp"), {"t": [0.0, 0.5, -0.1]}, 2, False)  # a per-layer gradient
    with pytest.raises(MethodError, match="'weight' = 3.0 is out of range"):
        validate_params(get_method("linear"), {"weight": torch.tensor([1.0, 3.0])}, 2, False)


def test_value_types() -> None:
    with pytest.raises(MethodError, match="'normalize' must be true or false, got 1"):
        validate_params(get_method("ties"), {"normalize": 1}, 2, True)
    with pytest.raises(MethodError, match="'density' must be a number, got 'half'"):
        validate_params(get_method("ties"), {"density": "half"}, 2, True)


def test_source_counts_and_base() -> None:
    with pytest.raises(MethodError, match="slerp takes exactly 2 sources, got 3"):
        validate_params(get_method("slerp"), {"t": 0.5}, 3, False)
    with pytest.raises(MethodError, match="model_stock takes at least 2 sources, got 1"):
        validate_params(get_method("model_stock"), {}, 1, True)
    with pytest.raises(MethodError, match="ties needs a base model"):
        validate_params(get_method("ties"), {"density": 0.5}, 2, False)


def test_missing_required_parameter() -> None:
    with pytest.raises(MethodError, match="missing required parameter.*t"):
        validate_params(get_method("slerp"), {}, 2, False)


def test_della_epsilon_window_and_breadcrumbs_band() -> None:
    della = get_method("della")
    validate_params(della, {"density": [0.5, 0.9], "epsilon": [0.5, 0.1]}, 2, True)  # per source: fits
    with pytest.raises(MethodError, match=r"density ± epsilon must stay within \[0, 1\].*source 1"):
        validate_params(della, {"density": [0.5, 0.95], "epsilon": 0.1}, 2, True)
    with pytest.raises(MethodError, match="source 0 spans"):
        validate_params(della, {"density": 0.05}, 2, True)  # default epsilon 0.1 > density
    with pytest.raises(MethodError, match="gamma \\+ density must be <= 1"):
        validate_params(get_method("breadcrumbs"), {"density": 0.95, "gamma": 0.1}, 2, True)


def test_valid_recipes_pass() -> None:
    validate_params(get_method("task_arithmetic"), {"weight": [1.0, -0.5], "lambda": 1.2}, 2, True)
    validate_params(get_method("ties"), {"density": [[0.2, 0.8], 0.5], "normalize": False}, 2, True)
    validate_params(get_method("linear"), {}, 5, True)


def _signature(method: MergeMethod) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``method.fn`` takes: its own, or for a member of the TIES family its merge's and its
    sparsifier's (the member passes the rest on), with the member's ``normalize`` default."""
    if not isinstance(method.fn, SparseTaskMerge):
        return dict(inspect.signature(method.fn).parameters)
    merge = inspect.signature(SparseTaskMerge.__call__).parameters
    own = {k: v for k, v in merge.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    own["normalize"] = own["normalize"].replace(default=method.fn.normalize)
    return {**own, **inspect.signature(method.fn.sparsify).parameters}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_matches_function_signature(name: str) -> None:
    method = METHODS[name]
    signature = _signature(method)
    # what a whole-tensor call passes, and the declared inputs, are keywords the function takes
    extra = set(method.whole_tensor_inputs(0, None)) | {need.kwarg for need in method.inputs}
    assert extra <= set(signature), extra - set(signature)
    assert not {"seed", "stats"} & set(signature) - extra  # no unused seed / stats
    for p in method.params:
        assert p.key in signature, p.key
        declared = signature[p.key].default
        if p.per_source or p.default is None:
            assert declared is inspect.Parameter.empty, p.name  # supplied by the engine
        else:
            assert declared == p.default and type(declared) is type(p.default), p.name
        if p.default is not None and not p.is_bool and p.low is not None and p.high is not None:
            assert p.low <= p.default <= p.high, p.name


def test_ties_family_is_one_table() -> None:
    """Every member of the family is (sparsifier, sign election); members sharing a sparsifier share parameters and
    inputs, and differ in the election exactly as the table says."""
    members = {member.name: member for member in FAMILY}
    assert set(members) == {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
                            "della_linear"}
    assert [m.name for m in FAMILY if m.sign_election] == ["ties", "dare_ties", "breadcrumbs_ties", "della"]
    for a, b in (("dare_linear", "dare_ties"), ("breadcrumbs", "breadcrumbs_ties"), ("della_linear", "della")):
        assert members[a].sparsify is members[b].sparsify
        assert [p.name for p in METHODS[a].params] == [p.name for p in METHODS[b].params]
        assert METHODS[a].inputs == METHODS[b].inputs
    assert METHODS["della"].stochastic and METHODS["dare_ties"].stochastic and not METHODS["ties"].stochastic
    assert METHODS["ties"].needs(Thresholds) is not None and METHODS["della"].needs(Ranks) is not None


# lorahub merges LoRA factors, not dense tensors: tests/test_lorahub.py
@pytest.mark.parametrize("name", sorted(n for n, m in METHODS.items() if not m.takes_factors))
def test_every_method_runs_with_registry_defaults_and_keeps_inputs(name: str) -> None:
    method = METHODS[name]
    g = torch.Generator().manual_seed(0)
    n = max(2, method.min_sources) if method.max_sources is None else method.max_sources
    base, sources = torch.randn(4, 3, generator=g), torch.randn(n, 4, 3, generator=g)
    stats = {"fisher": torch.rand(n, 4, 3, generator=g), "gram": torch.eye(3).expand(n, 3, 3) * 2.0, None: None}
    kwargs = {}
    for p in method.params:
        value = 0.5 if p.default is None else p.default
        kwargs[p.key] = torch.full((n,), float(value)) if p.per_source else value
    before = (base.clone(), sources.clone())
    out = method.fn(
        base if method.needs_base else None, sources, **method.whole_tensor_inputs(1, stats[method.statistic]),
        **kwargs,
    )
    assert out.shape == base.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(base, before[0]) and torch.equal(sources, before[1])
    if all(p.default is not None for p in method.params):
        validate_params(method, {}, n, True)  # the defaults satisfy the cross-parameter constraints


@pytest.mark.parametrize("name", [n for n, m in sorted(METHODS.items()) if m.needs(Coefficients) is not None])
def test_precomputed_coefficients_give_the_same_bits(name: str) -> None:
    """Angle-based methods give exactly their own result when handed ``coefficients(gram(...))`` (what the engine
    computes once per tensor and candidate), and the combination is entrywise when it has one row."""
    method = METHODS[name]
    need = method.needs(Coefficients)
    assert need is not None and need.kwarg == "coefficients"
    g = torch.Generator().manual_seed(2)
    n = 2 if method.max_sources == 2 else 3
    base, sources = torch.randn(5, 4, generator=g), torch.randn(n, 5, 4, generator=g)
    for flags in ({}, {"filter_wise": True}) if name == "model_stock" else ({},):
        kwargs: dict[str, object] = dict(flags)
        for p in method.params:
            if p.key not in kwargs and not p.is_bool:
                kwargs[p.key] = torch.full((n,), 0.7) if p.per_source else 0.3
        coefficients = need.combine(need.gram(base, sources, kwargs), kwargs)
        out = method.fn(base, sources, coefficients=coefficients, **kwargs)
        assert torch.equal(out, method.fn(base, sources, **kwargs))
        if coefficients.shape[0] == 1:  # entrywise: any slice of the flattened entries gives that slice
            part = method.fn(base.view(-1)[3:11], sources.view(n, -1)[:, 3:11], coefficients=coefficients, **kwargs)
            assert torch.equal(part, out.view(-1)[3:11])
