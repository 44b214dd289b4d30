"""Task files of the zoo: JSONL splits per task and an lm-eval task YAML that reads them.

Layout under the task dir (the dir to give lm-eval's ``TaskManager(include_path=...)``)::

    <task_dir>/<task>/{train,validation,test}.jsonl
    <task_dir>/zoo_<task>.yaml
    <task_dir>/zoo_<task>_gen.yaml

``zoo_<task>`` evaluates the local files as ``output_type: multiple_choice`` with metrics ``acc`` and
``acc_norm``; lm-eval scores ``test_split`` when present, so :func:`task_config` returns the
YAML's config with ``test_split`` dropped to score the validation split instead.

``zoo_<task>_gen`` asks the same questions as a generation task (``output_type: generate_until``, greedy):
the model continues the query, the ``strict-match`` filter keeps the answer only when the continuation is
``" " + answer`` up to the first space or newline (the format the models were trained on), and ``exact_match``
compares it with the right choice -- the exact-match scoring of gsm8k-style benchmarks, on the same items.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import yaml

from evomerge.yamlfile import load_yaml
from evomerge.zoo.tasks import Item

SPLITS = ("train", "validation", "test")
TASK_PREFIX = "zoo_"
GENERATION_SUFFIX = "_gen"
#: longest answer of any zoo task (brackets of size 10) is 10 tokens; a few more let a wrong answer run on
MAX_GEN_TOKS = 16


def lm_eval_name(task: str) -> str:
    """lm-eval task name of a zoo task: ``zoo_<task>``."""
    return f"{TASK_PREFIX}{task}"


def generation_name(task: str) -> str:
    """lm-eval task name of the generation variant of a zoo task: ``zoo_<task>_gen``."""
    return f"{lm_eval_name(task)}{GENERATION_SUFFIX}"


def split_path(task_dir: Path, task: str, split: str) -> Path:
    """Path of the JSONL file of ``task``'s ``split``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    return task_dir / task / f"{split}.jsonl"


def yaml_path(task_dir: Path, task: str) -> Path:
    """Path of ``task``'s lm-eval YAML."""
    return task_dir / f"{lm_eval_name(task)}.yaml"


def generation_yaml_path(task_dir: Path, task: str) -> Path:
    """Path of the lm-eval YAML of ``task``'s generation variant."""
    return task_dir / f"{generation_name(task)}.yaml"


def write_jsonl(path: Path, items: list[Item]) -> None:
    """One JSON object per line, keys in insertion order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def read_jsonl(path: Path) -> list[Item]:
    """Inverse of :func:`write_jsonl`."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def yaml_config(data_dir: Path, task: str) -> dict[str, object]:
    """The lm-eval task config of ``task`` with ABSOLUTE data file paths under ``data_dir``."""
    files = {split: str(split_path(data_dir.resolve(), task, split)) for split in SPLITS}
    return {
        "task": lm_eval_name(task),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "training_split": "train",
        "validation_split": "validation",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def generation_yaml_config(data_dir: Path, task: str) -> dict[str, object]:
    """The lm-eval config of ``task`` answered by greedy generation, scored by exact match after a strict regex.

    Same data files and splits as :func:`yaml_config`; the target is the text of the right choice.
    """
    mc = yaml_config(data_dir, task)
    shared = ("dataset_path", "dataset_kwargs", "training_split", "validation_split", "test_split", "doc_to_text")
    return {
        "task": generation_name(task),
        **{key: mc[key] for key in shared},
        "output_type": "generate_until",
        "doc_to_target": "{{choices[gold]}}",
        "target_delimiter": " ",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [{"function": "regex", "regex_pattern": r"^ ([^ \n]+)"}, {"function": "take_first"}],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_task_files(task_dir: Path, task: str, splits: Mapping[str, list[Item]], data_dir: Path) -> None:
    """Write ``task``'s JSONL splits and its YAML under ``task_dir``; the YAML reads the splits
    from ``data_dir`` (the final place of ``task_dir`` when building into a temporary dir)."""
    for split, items in splits.items():
        write_jsonl(split_path(task_dir, task, split), items)
    write_yaml(task_dir, task, data_dir)


def write_yaml(task_dir: Path, task: str, data_dir: Path) -> None:
    """(Re)write ``task``'s YAMLs (multiple choice, generation) in ``task_dir`` so that their data file paths point
    into ``data_dir``."""
    yaml_path(task_dir, task).write_text(yaml.safe_dump(yaml_config(data_dir, task), sort_keys=False))
    generation_yaml_path(task_dir, task).write_text(
        yaml.safe_dump(generation_yaml_config(data_dir, task), sort_keys=False)
    )


def task_config(task_dir: Path, task: str, split: str) -> dict[str, object]:
    """lm-eval config dict (as in the YAML) that scores ``split`` ("validation" or "test").

    Pass it in ``simple_evaluate(tasks=[...])``; its task name is ``zoo_<task>`` for the test split
    and ``zoo_<task>_validation`` for the validation split.
    """
    cfg = load_yaml(yaml_path(task_dir, task))
    if split == "validation":
        cfg.pop("test_split")
        cfg["task"] = f"{lm_eval_name(task)}_validation"
    elif split != "test":
        raise ValueError(f"lm-eval scores 'validation' or 'test', not {split!r}")
    return cfg
