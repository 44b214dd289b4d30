"""Local multiple-choice tasks for lm-eval: JSONL splits plus a task YAML that reads them.

Item format: ``{"query": str, "choices": [str, ...], "gold": int}``. lm-eval scores each choice as the
continuation ``" " + choice`` of ``query`` (its default ``target_delimiter``) and reports ``acc`` (argmax of the
summed log-likelihood is gold) and ``acc_norm`` (the same, each choice's log-likelihood divided by its length
in characters).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.evaluate.base import EvaluationError

SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def _check_item(item: Mapping[str, Any], where: str) -> None:
    choices = item.get("choices")
    gold = item.get("gold")
    if not isinstance(item.get("query"), str):
        raise EvaluationError(f"{where}: 'query' must be a string")
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
        raise EvaluationError(f"{where}: 'choices' must be a non-empty list of non-empty strings")
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
        raise EvaluationError(f"{where}: 'gold' must be an index into choices (0..{len(choices) - 1}), got {gold!r}")


def write_multiple_choice_task(
    task_dir: Path,
    name: str,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    metrics: Sequence[str] = ("acc", "acc_norm"),
) -> Path:
    """Write ``<name>_<split>.jsonl`` for each split and ``<name>.yaml`` into ``task_dir``; return the YAML path.

    ``splits`` maps ``"train"``, ``"validation"`` and/or ``"test"`` to items; the YAML names the data files by
    absolute path, so ``TaskManager(include_path=task_dir)`` finds and loads the task from any directory.
    """
    unknown = sorted(set(splits) - set(SPLIT_KEYS))
    if unknown or not ({"validation", "test"} & set(splits)):
        raise EvaluationError(
            f"splits must be among {sorted(SPLIT_KEYS)} with validation or test present, got {sorted(splits)}"
        )
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for split, items in splits.items():
        if not items:
            raise EvaluationError(f"task {name!r}: split {split!r} has no items")
        for i, item in enumerate(items):
            _check_item(item, f"task {name!r} split {split!r} item {i}")
        path = task_dir / f"{name}_{split}.jsonl"
        path.write_text("".join(json.dumps(dict(item)) + "\n" for item in items), encoding="utf-8")
        files[split] = str(path)
    config: dict[str, Any] = {
        "task": name,
        "output_type": "multiple_choice",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        **{SPLIT_KEYS[s]: s for s in files},
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        "metadata": {"version": 1.0},
    }
    yaml_path = task_dir / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return yaml_path
