"""An optional zoo stage: PEFT LoRA adapters trained on the zoo's tasks, for merges and LoraHub of adapters.

``build_lora_zoo(zoo, out_dir, LoraZooConfig.mini())`` trains, on the zoo's base, one adapter per task and rank
setting (``lora_<task>_r<r>``) with the zoo's own loop (:func:`evomerge.zoo.train.train`: answer tokens only,
AdamW, cosine schedule; only the LoRA factors are trained), saves each as a PEFT dir and scores every adapter (and
the base) on every task. The zoo itself is not touched (its files and hash stay as they are); the stage has its own
config hash.

The LoraHub setting (Huang et al. 2023) is leave-one-out over the zoo's tasks: a task is held out, the adapters of
the *other* tasks are the upstream adapters (:meth:`LoraZoo.upstream`) whose combination must solve it from a few
examples, and the held-out task's own adapter is the reference of what a task-specific adapter reaches.

Layout of the output dir::

    lora.json                     manifest (written last: its presence marks a complete stage)
    adapters/lora_<task>_r<r>/    PEFT dirs: adapter_config.json + adapter_model.safetensors
    table.md, table.csv           accuracy of the base and every adapter on every task (validation and test; unless
                                  the config's ``table`` is off)
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.outdir import building, check_target
from evomerge.zoo.config import TrainSpec
from evomerge.zoo.manifest import Zoo
from evomerge.zoo.table import Table, model_row, table_markdown, write_table
from evomerge.zoo.taskfiles import read_jsonl
from evomerge.zoo.tasks import answer_pairs
from evomerge.zoo.train import encode, torch_threads, train

__all__ = ["LORA_MANIFEST", "LoraSetting", "LoraZoo", "LoraZooConfig", "build_lora_zoo"]

LORA_MANIFEST = "lora.json"
ADAPTERS_DIR = "adapters"
LORA_FORMAT_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraSetting(_Frozen):
    """One rank / alpha setting: every task gets an adapter with it."""

    r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)


class LoraZooConfig(_Frozen):
    """Which adapters the stage trains and how."""

    settings: tuple[LoraSetting, ...] = Field(min_length=1)
    tasks: tuple[str, ...] | None = Field(None, description="the tasks that get adapters (default: every zoo task)")
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train: TrainSpec
    batch_size: int = Field(32, ge=1)
    threads: int = Field(1, ge=1, description="torch threads during the build (fixed for bit-identical weights)")
    eval_batch_size: int = Field(256, ge=1)
    table: bool = Field(True, description="score the base and every adapter on every task (table.md / table.csv)")

    def config_hash(self, zoo_hash: str) -> str:
        """First 16 hex digits of sha256 over this config, the zoo's hash and ``LORA_FORMAT_VERSION``."""
        payload = json.dumps({"format": LORA_FORMAT_VERSION, "zoo": zoo_hash, "config": self.model_dump(mode="json")},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def full(cls) -> LoraZooConfig:
        """For the full zoo: ranks 4 and 16 (alpha = 2r), 300 steps each."""
        return cls(settings=(LoraSetting(r=4, lora_alpha=8), LoraSetting(r=16, lora_alpha=32)),
                   train=TrainSpec(steps=300, lr=3e-3, seed=7), batch_size=64)

    @classmethod
    def mini(cls) -> LoraZooConfig:
        """For the mini zoo (the tests): ranks 2 and 4, 60 steps each: seconds on one core."""
        return cls(settings=(LoraSetting(r=4, lora_alpha=8), LoraSetting(r=2, lora_alpha=8)),
                   train=TrainSpec(steps=60, lr=5e-3, seed=7))


def adapter_name(task: str, setting: LoraSetting) -> str:
    return f"lora_{task}_r{setting.r}"


def train_adapter(zoo: Zoo, tokenizer: PreTrainedTokenizerFast, task: str, setting: LoraSetting,
                   config: LoraZooConfig) -> tuple[Any, float]:
    """A PEFT model of the zoo's base with a fresh adapter (factors seeded by the config's seed), trained on
    ``task``'s training split; the mean loss of the last 10% of steps."""
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
    torch.manual_seed(config.train.seed)
    model = get_peft_model(base, LoraConfig(r=setting.r, lora_alpha=setting.lora_alpha, lora_dropout=0.0,
                                            target_modules=list(config.target_modules)))
    data = encode(answer_pairs(read_jsonl(zoo.split_file(task, "train"))), tokenizer, answer_only=True)
    loss = train(model, data, config.train, batch_size=config.batch_size, desc=f"lora {task} r{setting.r}",
                 progress=False)
    return model, loss


def _build_into(root: Path, zoo: Zoo, config: LoraZooConfig, progress: bool) -> Table:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(zoo.tokenizer_dir)
    scored = {(t, s): read_jsonl(zoo.split_file(t, s)) for t in zoo.task_names for s in ("validation", "test")}
    table: Table = {"base": model_row(LlamaForCausalLM.from_pretrained(zoo.base), tokenizer, scored,
                                      config.eval_batch_size)} if config.table else {}
    adapters: dict[str, dict[str, object]] = {}
    unknown = sorted(set(config.tasks or ()) - set(zoo.task_names))
    if unknown:
        raise ValueError(f"LoRA tasks {unknown} are not tasks of the zoo {zoo.root}; its tasks: {zoo.task_names}")
    for setting in config.settings:
        for task in config.tasks or zoo.task_names:
            start = time.perf_counter()
            name = adapter_name(task, setting)
            model, loss = train_adapter(zoo, tokenizer, task, setting, config)
            model.save_pretrained(root / ADAPTERS_DIR / name)
            if config.table:
                table[name] = model_row(model, tokenizer, scored, config.eval_batch_size)
            adapters[name] = {"path": f"{ADAPTERS_DIR}/{name}", "task": task, "r": setting.r,
                              "lora_alpha": setting.lora_alpha, "final_loss": round(loss, 6),
                              "seconds": round(time.perf_counter() - start, 1)}
            if progress:
                print(f"zoo lora: {name} loss {loss:.3f}", flush=True)
    if table:
        write_table(table, root)
    manifest = {"config": config.model_dump(mode="json"), "config_hash": config.config_hash(zoo.config_hash),
                "zoo": str(zoo.root), "zoo_hash": zoo.config_hash, "adapters": adapters}
    (root / LORA_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return table


class LoraZoo:
    """A built LoRA stage on disk: its adapters by task and rank, and the LoraHub leave-one-out sets."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root, self.manifest = root, manifest

    @classmethod
    def load(cls, root: str | Path) -> LoraZoo:
        root = Path(root).resolve()
        if not (root / LORA_MANIFEST).is_file():
            raise FileNotFoundError(f"{root / LORA_MANIFEST} not found: build it with `evomerge zoo lora ZOO_DIR`")
        return cls(root, json.loads((root / LORA_MANIFEST).read_text()))

    @property
    def config_hash(self) -> str:
        return str(self.manifest["config_hash"])

    def adapter(self, task: str, r: int | None = None) -> Path:
        """The adapter of ``task`` (at rank ``r``; default the first setting's)."""
        r = self.manifest["config"]["settings"][0]["r"] if r is None else r
        for entry in self.manifest["adapters"].values():
            if entry["task"] == task and entry["r"] == r:
                return self.root / entry["path"]
        raise KeyError(f"no adapter for task {task!r} at rank {r} in {self.root}")

    def upstream(self, held_out: str, r: int | None = None) -> list[Path]:
        """LoraHub's upstream adapters for the held-out task ``held_out``: every other task's (rank ``r``)."""
        tasks = list(dict.fromkeys(e["task"] for e in self.manifest["adapters"].values()))
        if held_out not in tasks:
            raise KeyError(f"no task {held_out!r} in {self.root}; tasks: {tasks}")
        return [self.adapter(t, r) for t in tasks if t != held_out]


def build_lora_zoo(zoo: Zoo, out_dir: str | Path, config: LoraZooConfig, *, force: bool = False,
                   progress: bool = True) -> LoraZoo:
    """Train the adapters of ``config`` on ``zoo`` into ``out_dir`` (atomic: built beside it and renamed into place)
    and return the stage. A complete stage of the same config hash in ``out_dir`` is returned as is; anything else
    there is refused unless ``force``."""
    out = Path(out_dir).expanduser().resolve()
    wanted = config.config_hash(zoo.config_hash)
    if (out / LORA_MANIFEST).is_file() and not force:
        found = LoraZoo.load(out)
        if found.config_hash == wanted:
            return found
    check_target(out, force)
    with building(out, force=force) as tmp, torch_threads(config.threads):
        table = _build_into(tmp, zoo, config, progress)
    if progress:
        print(f"LoRA adapters built in {out} (config {wanted})\n{table_markdown(table) if table else ''}", flush=True)
    return LoraZoo.load(out)
