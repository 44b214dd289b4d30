"""A search over MoE recipes: one live MoE built once, re-materialized and scored per trial (Python API).

:func:`search_moe` is the MoE counterpart of ``evomerge search`` in its simplest form: an Optuna study (TPE, seeded)
whose trials are :class:`~evomerge.search.moe_space.MoeSpace` suggestions around a template recipe, each written into
one :class:`~evomerge.moe.MoeModel` in place and scored by any :class:`~evomerge.evaluate.Evaluator` on it. The first
trial is mergekit-moe's MoE of the template where the space can express it (``kind: baseline``). Each trial keeps its
recipe in the user attribute ``recipe``. Not yet part of ``evomerge search`` (run configs, resume locks, workers,
reports): see the README's "Mixture of experts".
"""

from __future__ import annotations

import optuna
import torch

from evomerge.evaluate.base import Evaluator
from evomerge.moe import MoeModel
from evomerge.recipe import MoeRecipe
from evomerge.search.moe_space import MoeSpace
from evomerge.search.study import evaluate

__all__ = ["best_moe_recipe", "search_moe"]


def search_moe(template: MoeRecipe, space: MoeSpace, evaluator: Evaluator, *, n_trials: int, seed: int = 0,
               device: str | torch.device | None = None, live: MoeModel | None = None) -> tuple[optuna.Study, MoeModel]:
    """Run ``n_trials`` trials (the baseline included) and return the study and the live MoE (holding the last
    trial's recipe); ``live``: an MoE already built over the template's models, reused."""
    from transformers import AutoTokenizer

    live = live or MoeModel(template, device=device, materialize=False)
    space.check(template, live.num_layers)
    evaluator.check(live.model)
    tokenizer = AutoTokenizer.from_pretrained(template.base, trust_remote_code=False)
    study = optuna.create_study(direction=evaluator.objective.direction,
                                sampler=optuna.samplers.TPESampler(seed=seed))
    baseline = space.baseline_params(template, live.num_layers)
    if baseline is not None:
        study.enqueue_trial(baseline, user_attrs={"kind": "baseline"})

    def objective(trial: optuna.Trial) -> float:
        recipe = space.suggest(trial, template, live.num_layers)
        trial.set_user_attr("recipe", recipe.model_dump(mode="json"))
        live.materialize(recipe)
        return evaluate(evaluator, live.model, tokenizer).objective

    study.optimize(objective, n_trials=n_trials)
    return study, live


def best_moe_recipe(study: optuna.Study) -> MoeRecipe:
    """The recipe of the study's best trial."""
    return MoeRecipe.model_validate(study.best_trial.user_attrs["recipe"])
