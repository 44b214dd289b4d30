"""Calibration data for data-aware merges: Fisher merging needs each model's diagonal Fisher, RegMean each
model's input Gram matrices. Both are estimated from a few batches of text, once per model, and handed to the
engine (:meth:`~evomerge.engine.MergeEngine.set_statistics`); they do not change between candidates.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from evomerge.engine import MergeEngine
from evomerge.methods.statistics import fisher_diagonal, gram_matrices
from evomerge.recipe import CalibrationData, Recipe, RecipeError

ESTIMATORS = {"fisher": fisher_diagonal, "gram": gram_matrices}


def load_texts(data: CalibrationData) -> list[str]:
    """The first ``n_samples`` texts of the calibration file; a clear error when it is missing or unreadable."""
    path = Path(data.path)
    if not path.is_file():
        raise RecipeError(f"calibration data file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()][: data.n_samples]
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        row = json.loads(line)
        if data.text_field in row:
            texts.append(str(row[data.text_field]))
        elif {"query", "choices", "gold"} <= set(row):
            texts.append(f"{row['query']} {row['choices'][row['gold']]}")
        else:
            raise RecipeError(
                f"{path}:{number}: no '{data.text_field}' field (nor query/choices/gold) in {sorted(row)}")
    return texts


def make_batches(texts: list[str], tokenizer: object, data: CalibrationData) -> list[dict[str, Tensor]]:
    """Tokenized, padded batches ``{"input_ids", "attention_mask"}``."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token  # type: ignore[attr-defined]
    return [
        dict(tokenizer(texts[i : i + data.batch_size], return_tensors="pt", padding=True, truncation=True,  # type: ignore[operator]
                       max_length=data.max_length))
        for i in range(0, len(texts), data.batch_size)
    ]


def collect_statistics(engine: MergeEngine, kind: str, batches: list[dict[str, Tensor]]) -> None:
    """Estimate ``kind`` ("fisher" or "gram") for every model of the engine and hand them to it.

    Each model is loaded into the live model in turn (a one-source linear merge reproduces it exactly) and the
    estimator runs on it; the live model's next candidate is merged afresh.
    """
    if kind not in ESTIMATORS:
        raise RecipeError(f"unknown statistic {kind!r}; one of {sorted(ESTIMATORS)}")
    per_model = []
    for path in engine.paths:
        engine.materialize(Recipe(method="linear", sources=[{"model": path}]))
        per_model.append(dict(ESTIMATORS[kind](engine.model, batches)))
    engine.set_statistics(kind, per_model)


def prepare(engine: MergeEngine, recipe: Recipe, calibration: CalibrationData | None, tokenizer: object) -> None:
    """Collect what ``recipe``'s method needs (once per engine), or fail clearly when no calibration data is set."""
    from evomerge.methods import get_method

    kind = get_method(recipe.method).statistic
    if kind is None or engine.has_statistics(kind):
        return
    if calibration is None or tokenizer is None:
        raise RecipeError(
            f"method '{recipe.method}' estimates {kind} statistics from data: add `calibration: {{path: data.jsonl}}`"
            " (text or JSONL) to the recipe/config, and make sure a source has a tokenizer"
        )
    collect_statistics(engine, kind, make_batches(load_texts(calibration), tokenizer, calibration))
