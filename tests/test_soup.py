"""Greedy / uniform soups with a fake scorer: each model is a number, a soup the weighted mean of its members."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import get_method
from evomerge.recipe import Recipe
from evomerge.search.soup import SoupStep, greedy_soup, recipe_key, soup_recipe

# Score of a soup = −|weighted mean of its members' positions − 0|. Individually: a −1, b −2, c −2.5, d −3.
POSITION = {"a": 1.0, "b": -2.0, "c": 2.5, "d": -3.0}
GIVEN_ORDER = ["c", "a", "d", "b"]


class FakeScorer:
    """Scores recipes as above and records which soups it was asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, recipe: Recipe) -> float:
        assert recipe.method == "linear"
        members = tuple(s.model for s in recipe.sources)
        weights = [float(s.parameters.get("weight", recipe.parameters["weight"])) for s in recipe.sources]
        self.calls.append(members)
        mean = sum(w * POSITION[m] for w, m in zip(weights, members)) / sum(weights)
        return -abs(mean)


INDIVIDUAL_CALLS = [("c",), ("a",), ("d",), ("b",)]
# Hand computation, sorted order a, b, c, d:
#   start {a}: -1
#   + b: mean (1 - 2)/2 = -0.5        -> -0.5 > -1: kept
#   + c: mean (1 - 2 + 2.5)/3 = 0.5   -> -0.5 == -0.5: a tie, dropped with '>', kept with '>='
#   + d ('>'):  mean (1 - 2 - 3)/3 = -4/3         -> dropped
#   + d ('>='): mean (1 - 2 + 2.5 - 3)/4 = -0.375 -> -0.375 > -0.5: kept
EXPECTED = {
    ">": (("a", "b"), -0.5, [("a",), ("a", "b"), ("a", "b", "c"), ("a", "b", "d")],
          [True, True, False, False], [-1.0, -0.5, -0.5, -4 / 3]),
    ">=": (("a", "b", "c", "d"), -0.375, [("a",), ("a", "b"), ("a", "b", "c"), ("a", "b", "c", "d")],
           [True, True, True, True], [-1.0, -0.5, -0.5, -0.375]),
}


@pytest.mark.parametrize("accept", [">", ">="])
def test_greedy_soup_strict_and_tie_acceptance(accept):
    kept, greedy, members, accepted, scores = EXPECTED[accept]
    scorer, seen = FakeScorer(), []
    result = greedy_soup(GIVEN_ORDER, scorer, accept=accept, on_step=seen.append)
    assert result.ingredients == ("a", "b", "c", "d")
    assert result.individual_scores == {"a": -1.0, "b": -2.0, "c": -2.5, "d": -3.0}
    assert result.kept == kept
    assert result.greedy_score == greedy
    assert [s.members for s in result.steps] == members
    assert [s.accepted for s in result.steps] == accepted
    assert [s.score for s in result.steps] == pytest.approx(scores)
    assert [s.ingredient for s in result.steps] == ["a", "b", "c", "d"]
    assert seen == list(result.steps) and [s.index for s in seen] == [0, 1, 2, 3]
    # Order of evaluations: the single models in the given order, then one candidate soup per step (not step 0).
    assert scorer.calls == INDIVIDUAL_CALLS + members[1:]
    assert result.greedy_recipe() == soup_recipe(kept)


def test_given_individual_scores_and_done_cache_skip_evaluations():
    scorer = FakeScorer()
    individual = {m: -abs(POSITION[m]) for m in POSITION}
    result = greedy_soup(GIVEN_ORDER, scorer, individual_scores=individual)
    assert scorer.calls == [("a", "b"), ("a", "b", "c"), ("a", "b", "d")]
    # A resumed run: the first soup step and two singles were scored before; only the rest is evaluated.
    done = {recipe_key(soup_recipe(["a", "b"])): -0.5, recipe_key(soup_recipe(["a"])): -1.0,
            recipe_key(soup_recipe(["c"])): -2.5}
    resumed_scorer = FakeScorer()
    resumed = greedy_soup(GIVEN_ORDER, resumed_scorer, done=done)
    assert resumed_scorer.calls == [("d",), ("b",), ("a", "b", "c"), ("a", "b", "d")]
    assert resumed == result


def test_uniform_recipe_is_the_equal_weight_average():
    result = greedy_soup(GIVEN_ORDER, FakeScorer())
    recipe = result.uniform_recipe()
    assert recipe.method == "linear" and recipe.base is None
    assert [s.model for s in recipe.sources] == ["a", "b", "c", "d"]
    # Through the registry's linear merge: equal weights, normalised -> the plain mean of the ingredients.
    stack = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8
    linear = get_method("linear")
    weight = torch.tensor([float(recipe.parameters["weight"])] * 4)
    normalize = recipe.parameters.get("normalize", linear.param("normalize").default)
    torch.testing.assert_close(linear.fn(None, stack, weight=weight, normalize=normalize), stack.mean(0))


def test_single_ingredient_and_nan_scores():
    result = greedy_soup(["a"], FakeScorer())
    assert result.kept == ("a",) and result.steps == (SoupStep(0, "a", ("a",), -1.0, True),)
    def nan_with_x(recipe: Recipe) -> float:
        return float("nan") if any(s.model == "x" for s in recipe.sources) else -1.0

    nan_last = greedy_soup(["x", "a"], nan_with_x, accept=">=")
    assert nan_last.ingredients == ("a", "x") and nan_last.kept == ("a",)  # NaN sorts last, is never accepted


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ingredients": []}, "at least one ingredient"),
    ({"ingredients": ["a", "a"]}, "must be distinct"),
    ({"ingredients": ["a"], "accept": ">>"}, "accept must be"),
    ({"ingredients": ["a"], "individual_scores": {"z": 1.0}}, "not ingredients: \\['z'\\]"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        greedy_soup(score=FakeScorer(), **kwargs)
