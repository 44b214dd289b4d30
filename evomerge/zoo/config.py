"""Every knob of the tiny zoo in one pydantic model, with a full and a mini preset and a stable hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from evomerge.zoo.tasks import SYMMETRIES, TASKS

#: bump when the build code changes what a given config produces, so cached zoos are rebuilt
ZOO_FORMAT_VERSION = 2  # 2: a generation variant zoo_<task>_gen.yaml of every task


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: fields added after zoos were built and cached: serialized only when set (truthy), so a config that does not
    #: use them keeps its hash (and its cached zoo): it trains as before
    optional_fields: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_optional_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k not in self.optional_fields or v}


class ModelShape(_Frozen):
    """Shape of the ``LlamaForCausalLM`` every zoo model shares."""

    layers: int = Field(ge=1)
    hidden: int = Field(ge=8)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    intermediate: int = Field(ge=8)
    max_positions: int = Field(default=64, ge=16)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be divisible by heads ({self.heads}) "
                f"and heads by kv_heads ({self.kv_heads})"
            )
        return self


class TrainSpec(_Frozen):
    """One training run: AdamW steps, peak learning rate (cosine schedule), seed, weight decay, the
    regularisers of a fine-tune (the knobs the model-soups paper varied across its ingredients), and what a
    fine-tune trains on (replayed other-task data, a subset of its task's items, its own batch size)."""

    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    seed: int = 0
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_frac: float = Field(default=0.05, ge=0, lt=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    label_noise: float = Field(
        default=0.0, ge=0, le=1, description="share of fine-tuning answers replaced by the task's confuser (seeded)"
    )
    augment: float = Field(
        default=0.0, ge=0, le=1, description="share of fine-tuning items relabelled by a symmetry of the task"
    )
    replay: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="share of a fine-tuning set drawn from the other tasks' train items, confused at the base's "
        "rate: the expert keeps the base's behaviour there, so its task vector stays local to its task",
    )
    train_items: int | None = Field(
        default=None, ge=1, description="fine-tune on the first N train items of the task only (None: all)"
    )
    batch_size: int | None = Field(default=None, ge=1, description="this run's batch size (None: the zoo's)")

    optional_fields: ClassVar[tuple[str, ...]] = (
        "label_smoothing", "label_noise", "augment", "replay", "train_items", "batch_size"
    )


class ZooConfig(_Frozen):
    """All knobs of a zoo build: tasks, data sizes, tokenizer, model shape, every training run, threads."""

    tasks: tuple[str, ...]
    expert_tasks: tuple[str, ...]
    sweep_task: str
    task_sizes: dict[str, int] = Field(default_factory=dict, description="per-task size knob overrides")
    n_train: int = Field(ge=1)
    n_validation: int = Field(ge=1)
    n_test: int = Field(ge=1)
    data_seed: int = 0
    confuser_rate: float = Field(
        default=0.5, ge=0, le=1, description="share of base pretraining answers replaced by the task's confuser"
    )
    vocab_size: int = 320
    model: ModelShape
    batch_size: int = Field(ge=1)
    base: TrainSpec
    expert: TrainSpec
    expert_specs: dict[str, TrainSpec] = Field(
        default_factory=dict, description="per-task training of an expert, overriding `expert` for that task"
    )
    sweep: tuple[TrainSpec, ...]
    threads: int = Field(
        default=1, ge=1, description="torch threads during the build (fixed for bit-identical weights)"
    )
    eval_batch_size: int = Field(default=256, ge=1)

    optional_fields: ClassVar[tuple[str, ...]] = ("expert_specs",)

    @model_validator(mode="after")
    def _tasks_known(self) -> ZooConfig:
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown zoo tasks {sorted(unknown)}; known: {sorted(TASKS)}")
        missing = (set(self.expert_tasks) | {self.sweep_task} | set(self.task_sizes)) - set(self.tasks)
        if missing:
            raise ValueError(f"expert/sweep/size tasks {sorted(missing)} must also be listed in tasks")
        stray = set(self.expert_specs) - set(self.expert_tasks)
        if stray:
            raise ValueError(
                f"expert_specs names {sorted(stray)}, which are not expert_tasks {list(self.expert_tasks)}"
            )
        runs = [(task, self.expert_spec(task)) for task in self.expert_tasks]
        runs += [(self.sweep_task, s) for s in self.sweep]
        asymmetric = sorted({task for task, spec in runs if spec.augment > 0 and task not in SYMMETRIES})
        if asymmetric:
            raise ValueError(
                f"augment > 0 needs a task with a symmetry ({sorted(SYMMETRIES)}); {asymmetric} have none"
            )
        return self

    def expert_spec(self, task: str) -> TrainSpec:
        """How the expert of ``task`` is trained: its entry in ``expert_specs``, else ``expert``."""
        return self.expert_specs.get(task, self.expert)

    def config_hash(self) -> str:
        """First 16 hex digits of sha256 over the canonical JSON of the config and ``ZOO_FORMAT_VERSION``."""
        payload = json.dumps({"format": ZOO_FORMAT_VERSION, "config": self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def full(cls) -> ZooConfig:
        """The zoo of the demo: 6 tasks, 5 experts, an 8-model soup sweep (saturates: every expert scores 1.0 on its
        task, see results/demo/zoo_table.md; comparisons of methods use :meth:`bench`).

        Builds in about 7 minutes on one CPU core (measured: 414 s wall, 405 s CPU).
        """
        return cls(
            tasks=("reverse", "sort", "length", "shift", "rotate", "brackets"),
            expert_tasks=("reverse", "sort", "length", "shift", "rotate"),
            sweep_task="brackets",
            task_sizes={"brackets": 10},
            n_train=2000,
            n_validation=200,
            n_test=200,
            model=ModelShape(layers=4, hidden=128, heads=4, kv_heads=2, intermediate=344),
            batch_size=64,
            base=TrainSpec(steps=1500, lr=3e-3, seed=0, weight_decay=0.01),
            expert=TrainSpec(steps=150, lr=5e-4, seed=1),
            sweep=_sweep(steps=60),
        )

    @classmethod
    def bench(cls) -> ZooConfig:
        """The zoo of the method benchmarks: 6 layers, 7 experts whose tasks interfere, a 12-model soup sweep.

        Interference: the 7 expert tasks (reverse, sort, rotate, rotr, shift, back, swap) all read the same
        ``KEY:letters=`` format and differ only in the short key; rotate/rotr and shift/back have each other's
        answer as their confuser (the base's systematic mistake), so their task vectors pull shared weights in
        opposite directions. Headroom: strings of up to 8 letters (12 brackets for the sweep task), 10% of every
        expert's answers replaced by the confuser, and experts trained for different lengths and learning rates
        (sort briefly: it saturates otherwise; rotate, swap and reverse long), so each lands below 1.0 on its
        task and their task vectors differ in norm by about 10x, as fine-tunes found in the wild do. Half of each
        expert's fine-tuning set replays the other tasks at the base's confusion rate (``replay``), the common
        practice that keeps a fine-tune's skills elsewhere: without it each expert rewrote the shared rule for
        every key and no merge got far above the base (results/zoo_bench/zoo_table.md, the earlier build's notes).

        The soup sweep follows Wortsman et al. (2022): one start, varied learning rate, seed, length, label
        smoothing, augmentation (bracket-type relabelling); every ingredient fine-tunes on the same 400 items with
        20% noisy answers at batch 32 for ~16 epochs, long enough to memorise part of its own noise, which is
        what averaging cancels; three runs at learning rates that leave the basin (:func:`_soup_sweep`).

        Scores, build time and every model's sha256: results/zoo_bench/zoo_table.md.
        """
        letters = ("reverse", "sort", "rotate", "rotr", "shift", "back", "swap")
        expert = TrainSpec(steps=80, lr=1e-3, seed=1, label_noise=0.1, replay=0.5)
        return cls(
            tasks=(*letters, "brackets"),
            expert_tasks=letters,
            sweep_task="brackets",
            task_sizes={**dict.fromkeys(letters, 8), "brackets": 12},
            n_train=2000,
            n_validation=200,
            n_test=400,
            model=ModelShape(layers=6, hidden=128, heads=4, kv_heads=2, intermediate=344),
            batch_size=128,
            base=TrainSpec(steps=500, lr=3e-3, seed=0, weight_decay=0.01),
            expert=expert,
            expert_specs={
                "reverse": expert.model_copy(update={"steps": 240}),
                "sort": expert.model_copy(update={"steps": 24, "lr": 5e-4}),
                "rotate": expert.model_copy(update={"steps": 240, "lr": 2e-3}),
                "shift": expert.model_copy(update={"steps": 50}),
                "swap": expert.model_copy(update={"steps": 300, "lr": 2e-3}),
            },
            sweep=_soup_sweep(steps=200),
        )

    @classmethod
    def mini(cls) -> ZooConfig:
        """The zoo of the test suite: 5 tasks, 4 experts, a 6-model sweep, small model and data.

        Builds in about 35 s on one idle CPU core (longer when the machine is shared).
        """
        return cls(
            tasks=("reverse", "sort", "rotate", "shift", "brackets"),
            expert_tasks=("reverse", "sort", "rotate", "shift"),
            sweep_task="brackets",
            task_sizes={task: 5 for task in ("reverse", "sort", "rotate", "shift", "brackets")},
            n_train=600,
            n_validation=100,
            n_test=100,
            model=ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=176),
            batch_size=32,
            base=TrainSpec(steps=600, lr=5e-3, seed=0, weight_decay=0.01),
            expert=TrainSpec(steps=100, lr=5e-4, seed=1),
            sweep=_sweep(steps=80)[:6],
        )


def _sweep(steps: int) -> tuple[TrainSpec, ...]:
    """Soup sweep: 4 gentle runs around a modest learning rate, 2 far-off high-learning-rate runs
    (a uniform soup that includes them fails), then 2 runs with other step counts."""
    gentle = [TrainSpec(steps=steps, lr=lr, seed=seed) for lr, seed in ((5e-4, 11), (1e-3, 12), (7e-4, 13), (1e-3, 14))]
    far = [TrainSpec(steps=steps, lr=lr, seed=seed) for lr, seed in ((1e-2, 21), (2e-2, 22))]
    other_steps = [TrainSpec(steps=3 * steps // 2, lr=5e-4, seed=31), TrainSpec(steps=steps // 2, lr=2e-3, seed=32)]
    return (*gentle, *far, *other_steps)


def _soup_sweep(steps: int) -> tuple[TrainSpec, ...]:
    """Soup ingredients made the way Wortsman et al. (2022) made theirs: one pretrained start, fine-tuned with
    varied learning rate, seed, length, label smoothing and augmentation, all on the same 400 items with 20%
    noisy answers at batch 32 (see :meth:`ZooConfig.bench`); the last three use learning rates high enough to
    leave the basin the others share."""
    runs = (
        {"lr": 3e-4, "seed": 11},
        {"lr": 5e-4, "seed": 12},
        {"lr": 5e-4, "seed": 13, "label_smoothing": 0.1},
        {"lr": 1e-3, "seed": 14},
        {"lr": 1e-3, "seed": 15, "augment": 0.5},
        {"lr": 7e-4, "seed": 16, "label_smoothing": 0.2, "augment": 0.3},
        {"lr": 5e-4, "seed": 17, "steps": 3 * steps // 2},
        {"lr": 2e-3, "seed": 18, "steps": steps // 2},
        {"lr": 1e-3, "seed": 19, "label_noise": 0.3},
        {"lr": 1e-2, "seed": 21},
        {"lr": 2e-2, "seed": 22, "augment": 0.5},
        {"lr": 3e-2, "seed": 23},
    )
    shared = {"steps": steps, "label_noise": 0.2, "train_items": 400, "batch_size": 32}
    return tuple(TrainSpec(**{**shared, **run}) for run in runs)
