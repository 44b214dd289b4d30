"""Greedy and uniform model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned
models improves accuracy without increasing inference time", ICML), as pure logic over an injected scorer.

A soup of models ``M`` is the uniform average ``Σ_{m∈M} θ_m / |M|``: ``Recipe(method="linear")`` with equal weights
(:func:`soup_recipe`). The greedy soup sorts the ingredients by their individual validation score (best first),
starts from the best one and tries each next ingredient in turn: the candidate soup ``kept + [ingredient]`` is
kept when its score beats the best so far (``>``; ``>=`` also keeps ties). The uniform soup of all ingredients is
reported beside it (:meth:`SoupResult.uniform_recipe`).

Scoring and resume: every score comes from ``score(recipe)``. The caller passes ``done``, a mapping from
:func:`recipe_key` to the score of every recipe already evaluated (e.g. the finished trials of a resumed Optuna
study); recipes found there are not scored again, so a resumed run repeats no evaluation and takes the same
decisions. Calls to ``score`` happen in this order: first the individual recipes of the ingredients without a
score (from ``individual_scores`` or ``done``), in the order given; then one call per candidate soup, steps
``1 .. n − 1`` in the sorted order.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from evomerge.recipe import Recipe, SourceSpec

log = logging.getLogger(__name__)


def soup_recipe(members: Sequence[str]) -> Recipe:
    """The uniform soup of ``members``: ``Recipe(method="linear")``, every source with weight 1 (normalised)."""
    return Recipe(method="linear", sources=[SourceSpec(model=m) for m in members], parameters={"weight": 1.0})


def recipe_key(recipe: Recipe) -> str:
    """A canonical string of a recipe (sorted JSON), the key of the ``done`` cache."""
    return json.dumps(recipe.model_dump(mode="json"), sort_keys=True)


@dataclass(frozen=True)
class SoupStep:
    """One step of the greedy soup: the candidate soup ``members`` (kept so far + ``ingredient``) and its score.

    Step 0 is the best single ingredient the soup starts from (its individual score, always accepted).
    """

    index: int
    ingredient: str
    members: tuple[str, ...]
    score: float
    accepted: bool

    def recipe(self) -> Recipe:
        return soup_recipe(self.members)


@dataclass(frozen=True)
class SoupResult:
    """The greedy soup and what led to it."""

    ingredients: tuple[str, ...]  # sorted by individual score, best first (ties keep the given order)
    kept: tuple[str, ...]
    steps: tuple[SoupStep, ...]
    individual_scores: dict[str, float]
    greedy_score: float

    def greedy_recipe(self) -> Recipe:
        """The uniform average of the kept ingredients."""
        return soup_recipe(self.kept)

    def uniform_recipe(self) -> Recipe:
        """The uniform soup of every ingredient (in the sorted order), the reference beside the greedy one."""
        return soup_recipe(self.ingredients)


def _sort_key(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def greedy_soup(
    ingredients: Sequence[str],
    score: Callable[[Recipe], float],
    *,
    accept: Literal[">", ">="] = ">",
    individual_scores: Mapping[str, float] | None = None,
    on_step: Callable[[SoupStep], None] | None = None,
    done: Mapping[str, float] | None = None,
) -> SoupResult:
    """Greedy soup (Wortsman et al. 2022, Recipe 1) over ``ingredients`` (model paths), scored by ``score``.

    ``accept``: ``">"`` keeps an ingredient when the candidate soup scores strictly higher than the best so far,
    ``">="`` also on a tie. ``individual_scores``: scores of the single models, when known. ``on_step`` is called
    after each step (step 0 included). ``done``: already known scores by :func:`recipe_key` (module docstring).
    A NaN score sorts last and is never accepted.
    """
    if accept not in (">", ">="):
        raise ValueError(f"accept must be '>' or '>=', got {accept!r}")
    if not ingredients:
        raise ValueError("a soup needs at least one ingredient")
    if len(set(ingredients)) != len(ingredients):
        raise ValueError(f"ingredients must be distinct, got {list(ingredients)}")
    given = dict(individual_scores or {})
    strangers = sorted(set(given) - set(ingredients))
    if strangers:
        raise ValueError(f"individual_scores names models that are not ingredients: {strangers}")
    known = dict(done or {})

    def scored(recipe: Recipe) -> float:
        key = recipe_key(recipe)
        if key not in known:
            known[key] = float(score(recipe))
        return known[key]

    individual = {m: float(given[m]) if m in given else scored(soup_recipe([m])) for m in ingredients}
    order = tuple(sorted(ingredients, key=lambda m: -_sort_key(individual[m])))

    def record(step: SoupStep) -> SoupStep:
        log.info("soup step %d: %s -> %.6g (%s)", step.index, step.ingredient, step.score,
                 "kept" if step.accepted else "dropped")
        if on_step is not None:
            on_step(step)
        return step

    kept, best = [order[0]], individual[order[0]]
    steps = [record(SoupStep(0, order[0], (order[0],), best, True))]
    for index, ingredient in enumerate(order[1:], start=1):
        members = (*kept, ingredient)
        value = scored(soup_recipe(members))
        accepted = value > best or (accept == ">=" and value == best)
        if accepted:
            kept.append(ingredient)
            best = value
        steps.append(record(SoupStep(index, ingredient, members, value, accepted)))
    return SoupResult(order, tuple(kept), tuple(steps), individual, best)
