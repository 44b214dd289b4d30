"""Build the tiny zoo: task files, tokenizer, base model, experts, soup sweep, manifest, table.

A build writes into a temporary sibling dir and renames it into place at the end (:mod:`evomerge.outdir`: a
recognisable name, cleaned by the next build after a kill), so an interrupted build leaves no half zoo behind.
Everything is seeded and runs under a fixed torch thread count, so the same config gives bit-identical weights on
the same machine.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import evomerge
from evomerge.outdir import building
from evomerge.zoo import taskfiles
from evomerge.zoo.config import TrainSpec, ZooConfig
from evomerge.zoo.manifest import MANIFEST, Zoo
from evomerge.zoo.table import Table, model_row, table_markdown, write_table
from evomerge.zoo.tasks import Item, answer_pairs, augment_pairs, generate_items, split_items
from evomerge.zoo.tokenizer import train_tokenizer
from evomerge.zoo.train import Encoded, encode, make_model, torch_threads, train

CACHE_ENV = "EVOMERGE_ZOO_CACHE"
TOKENIZER_DIR = "tokenizer"
MODELS_DIR = "models"
TASKS_DIR = "tasks"


def _make_splits(config: ZooConfig) -> dict[str, dict[str, list[Item]]]:
    """task -> split -> items: disjoint train/validation/test items of every task."""
    sizes = {"train": config.n_train, "validation": config.n_validation, "test": config.n_test}
    return {
        task: split_items(
            generate_items(task, sum(sizes.values()), config.data_seed, config.task_sizes.get(task)), sizes
        )
        for task in config.tasks
    }


def _save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save ``model`` (fp32 safetensors) and ``tokenizer`` into ``out`` as a self-contained HF dir."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class _Run:
    """One model of the zoo to train: the base from scratch, or a fine-tune of the base on one task."""

    name: str
    kind: str  # base | expert | sweep
    task: str | None  # None for the base (the mixture of all tasks)
    spec: TrainSpec


def _plan(config: ZooConfig) -> list[_Run]:
    """Every model of ``config`` in build order: base, experts, sweep."""
    return [
        _Run("base", "base", None, config.base),
        *(_Run(f"expert_{task}", "expert", task, config.expert_spec(task)) for task in config.expert_tasks),
        *(_Run(f"sweep_{i:02d}", "sweep", config.sweep_task, spec) for i, spec in enumerate(config.sweep)),
    ]


def _training_data(
    run: _Run, splits: dict[str, dict[str, list[Item]]], tokenizer: PreTrainedTokenizerFast, config: ZooConfig
) -> Encoded:
    """Base: the mixture of all tasks' train items, answers swapped for confusers at ``confuser_rate``, loss on
    every token. Fine-tunes: their task's train items (the first ``train_items`` of them when set), answers
    swapped for the confuser at the run's ``label_noise`` and relabelled at its ``augment`` rate (never into a
    validation or test query), then ``replay`` of the set drawn (seeded) from the other tasks' train items with
    the base's ``confuser_rate``; loss on the answer tokens only."""
    if run.task is None:
        mixture = [item for task_splits in splits.values() for item in task_splits["train"]]
        pairs = answer_pairs(mixture, config.confuser_rate, config.data_seed)
        return encode(pairs, tokenizer, answer_only=False)
    spec, task_splits = run.spec, splits[run.task]
    pairs = answer_pairs(task_splits["train"][: spec.train_items], spec.label_noise, spec.seed)
    if spec.augment:
        held_out = {str(item["query"]) for split in ("validation", "test") for item in task_splits[split]}
        pairs = augment_pairs(run.task, pairs, spec.augment, spec.seed, held_out)
    if spec.replay:
        others = [item for task, task_splits in splits.items() if task != run.task for item in task_splits["train"]]
        random.Random(f"replay:{spec.seed}").shuffle(others)
        n_replay = round(len(pairs) * spec.replay / (1 - spec.replay))  # replay = n_replay / (n_own + n_replay)
        pairs += answer_pairs(others[:n_replay], config.confuser_rate, spec.seed)
    return encode(pairs, tokenizer, answer_only=True)


def _build_into(root: Path, final_root: Path, config: ZooConfig, progress: bool) -> Table:
    """Build every part of the zoo into ``root``; task YAMLs point at ``final_root``. Returns the table."""
    t_start = time.perf_counter()
    splits = _make_splits(config)
    for task, task_splits in splits.items():
        taskfiles.write_task_files(root / TASKS_DIR, task, task_splits, data_dir=final_root / TASKS_DIR)
    mixture = [item for task_splits in splits.values() for item in task_splits["train"]]
    tokenizer = train_tokenizer((f"{query} {answer}" for query, answer in answer_pairs(mixture)), config.vocab_size)
    tokenizer.save_pretrained(root / TOKENIZER_DIR)

    scored = {(t, s): splits[t][s] for t in config.tasks for s in ("validation", "test")}
    table: Table = {}
    models: dict[str, dict[str, object]] = {}
    base: LlamaForCausalLM | None = None
    for run in _plan(config):
        t_run = time.perf_counter()
        model = make_model(config.model, tokenizer, run.spec.seed) if base is None else copy.deepcopy(base)
        data = _training_data(run, splits, tokenizer, config)
        batch_size = run.spec.batch_size or config.batch_size
        loss = train(model, data, run.spec, batch_size=batch_size, desc=f"zoo {run.name}", progress=progress)
        if base is None:
            base = model
        path = Path(MODELS_DIR) / run.name
        _save_model(model, tokenizer, root / path)
        table[run.name] = model_row(model, tokenizer, scored, config.eval_batch_size)
        models[run.name] = {
            "path": str(path),
            "kind": run.kind,
            "task": run.task,
            "train": run.spec.model_dump(),
            "final_loss": round(loss, 6),
            "seconds": round(time.perf_counter() - t_run, 1),
        }

    write_table(table, root)
    manifest = {
        "config": config.model_dump(mode="json"),
        "config_hash": config.config_hash(),
        "built_at": str(final_root),
        "build_seconds": round(time.perf_counter() - t_start, 1),
        "tokenizer": TOKENIZER_DIR,
        "task_dir": TASKS_DIR,
        "sweep_task": config.sweep_task,
        "models": models,
        "tasks": {
            task: {
                "lm_eval_name": taskfiles.lm_eval_name(task),
                "yaml": str(taskfiles.yaml_path(Path(TASKS_DIR), task)),
                "splits": {s: str(taskfiles.split_path(Path(TASKS_DIR), task, s)) for s in taskfiles.SPLITS},
            }
            for task in config.tasks
        },
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return table


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _existing_hash(out_dir: Path) -> str | None:
    """Config hash of the complete zoo in ``out_dir``, or None when there is none."""
    try:
        return str(json.loads((out_dir / MANIFEST).read_text())["config_hash"])
    except (OSError, ValueError, KeyError):
        return None


def build_zoo(out_dir: Path, config: ZooConfig, *, force: bool = False, progress: bool = True) -> Zoo:
    """Build the zoo of ``config`` into ``out_dir`` and return it.

    - ``out_dir`` holds a complete zoo of the same config hash: returned as is (unless ``force``).
    - ``out_dir`` is missing or empty: built.
    - ``out_dir`` holds anything else: ValueError, unless ``force``, which replaces it.

    The build runs in a temporary sibling dir that is renamed to ``out_dir`` only when complete;
    on any error the temporary dir is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir).resolve()
    wanted = config.config_hash()
    if out_dir.exists() and not _is_empty_dir(out_dir) and not force:
        found = _existing_hash(out_dir)
        if found == wanted:
            return Zoo.load(out_dir)
        what = f"a zoo of another config (hash {found}, wanted {wanted})" if found else "files that are not a zoo"
        raise ValueError(
            f"{out_dir} holds {what}; choose an empty or new dir, or pass force=True (--force) to replace it"
        )

    with building(out_dir, force=True, shared=False) as tmp, torch_threads(config.threads):  # made with the umask
        table = _build_into(tmp, out_dir, config, progress)
    if progress:
        print(f"zoo built in {out_dir} (config {wanted})\n{table_markdown(table)}", flush=True)
    return Zoo.load(out_dir)


def default_cache_root() -> Path:
    """``$EVOMERGE_ZOO_CACHE``, else ``.zoo`` in the source checkout evomerge runs from, else ``./.zoo``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    repo = Path(evomerge.__file__).resolve().parents[1]
    return (repo if (repo / "pyproject.toml").is_file() else Path.cwd()) / ".zoo"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing), so concurrent processes build once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_zoo(config: ZooConfig, cache_root: Path | None = None, *, progress: bool = False) -> Zoo:
    """The zoo of ``config`` from ``cache_root/<config_hash>``, built there on first use.

    ``cache_root`` defaults to :func:`default_cache_root`. Concurrent callers wait on a lock file
    instead of building the same zoo twice.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out_dir = root / config.config_hash()
    with _file_lock(root / f"{config.config_hash()}.lock"):
        return build_zoo(out_dir, config, progress=progress)
