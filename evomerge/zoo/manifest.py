"""The zoo manifest ``zoo.json`` and the :class:`Zoo` handle that reads it.

Layout of a zoo dir::

    zoo.json                      manifest (written last: its presence marks a complete zoo)
    tokenizer/                    the tokenizer (also copied into every model dir)
    models/<name>/                self-contained HF dirs: config, model.safetensors, tokenizer
    tasks/                        lm-eval include_path: zoo_<task>[_gen].yaml + <task>/<split>.jsonl
    table.md, table.csv           accuracy of every model on every task (validation and test)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.zoo import taskfiles
from evomerge.zoo.table import Table, read_table_csv

MANIFEST = "zoo.json"
TABLE_CSV = "table.csv"


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk: paths of its models and task files, read from ``zoo.json``."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, root: Path | str) -> Zoo:
        """Read ``root/zoo.json``. If the zoo was moved since it was built, the task YAMLs (whose
        data paths are absolute) are rewritten to point into ``root``.

        Raises FileNotFoundError when ``root`` holds no complete zoo.
        """
        root = Path(root).resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {root} is not a complete zoo; build one with `evomerge zoo build {root}`"
            )
        zoo = cls(root, json.loads(path.read_text()))
        if zoo.manifest["built_at"] != str(root):
            for task in zoo.task_names:
                taskfiles.write_yaml(zoo.task_dir, task, zoo.task_dir)
        return zoo

    @property
    def config_hash(self) -> str:
        """Hash of the :class:`~evomerge.zoo.config.ZooConfig` this zoo was built from."""
        return str(self.manifest["config_hash"])

    @property
    def tokenizer_dir(self) -> Path:
        """Dir of the shared tokenizer (every model dir holds a copy too)."""
        return self.root / self.manifest["tokenizer"]

    def _models(self, kind: str) -> dict[str, dict[str, Any]]:
        return {name: m for name, m in self.manifest["models"].items() if m["kind"] == kind}

    def model_dir(self, name: str) -> Path:
        """Dir of the model called ``name`` in the manifest (``base``, ``expert_add``, ``sweep_00``, ...)."""
        try:
            return self.root / self.manifest["models"][name]["path"]
        except KeyError:
            raise KeyError(f"no model {name!r} in zoo {self.root}; models: {sorted(self.manifest['models'])}") from None

    @property
    def model_names(self) -> list[str]:
        """Names of all models, base first, then experts, then the sweep."""
        return list(self.manifest["models"])

    @property
    def base(self) -> Path:
        """Dir of the base model every other model was fine-tuned from."""
        (name,) = self._models("base")
        return self.model_dir(name)

    @property
    def experts(self) -> dict[str, Path]:
        """Expert dirs by the task each was fine-tuned on."""
        return {m["task"]: self.root / m["path"] for m in self._models("expert").values()}

    @property
    def sweep(self) -> list[Path]:
        """Dirs of the soup sweep: fine-tunes of the base on :attr:`sweep_task` with varied hyperparameters."""
        return [self.root / m["path"] for m in self._models("sweep").values()]

    @property
    def sweep_task(self) -> str:
        """The task every sweep model was fine-tuned on."""
        return str(self.manifest["sweep_task"])

    @property
    def task_names(self) -> list[str]:
        """Zoo task names (``add``, ``reverse``, ...); the lm-eval names are ``zoo_<task>``."""
        return list(self.manifest["tasks"])

    @property
    def task_dir(self) -> Path:
        """Dir to give lm-eval's ``TaskManager(include_path=...)``."""
        return self.root / self.manifest["task_dir"]

    def _check_task(self, name: str) -> str:
        task = name.removeprefix(taskfiles.TASK_PREFIX)
        if task not in self.manifest["tasks"]:
            raise KeyError(f"no task {name!r} in zoo {self.root}; tasks: {self.task_names}")
        return task

    def task_yaml(self, name: str) -> Path:
        """lm-eval YAML of task ``name`` (``add`` or ``zoo_add``)."""
        return taskfiles.yaml_path(self.task_dir, self._check_task(name))

    def split_file(self, task: str, split: str) -> Path:
        """JSONL file of ``task``'s ``split`` (train, validation or test)."""
        return taskfiles.split_path(self.task_dir, self._check_task(task), split)

    def task_config(self, name: str, split: str) -> dict[str, object]:
        """lm-eval config dict of task ``name`` scoring ``split``; see :func:`taskfiles.task_config`."""
        return taskfiles.task_config(self.task_dir, self._check_task(name), split)

    def table(self) -> Table:
        """Accuracy table written at build time: model name -> ``task/split`` -> acc."""
        return read_table_csv(self.root / TABLE_CSV)
