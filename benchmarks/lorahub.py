"""LoraHub on held-out zoo tasks: can a few examples of an unseen task pick a combination of other tasks' adapters?

The setting of Huang et al. 2023 ("LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition") on
the tiny zoo's LoRA stage (evomerge/zoo/lora.py), leave-one-out: each zoo task in turn is held out, the adapters of
the other tasks are the upstream adapters, and k examples of the held-out task (a seeded sample of its validation
split, k = 5 .. 20) are all the search sees. Its fitness is LoraHub's: the mean cross-entropy of the gold answers
of the k examples, plus ``--l1`` times ``Σ |w_i|`` (the paper's L1 penalty on the weights, 0.05 there; evomerge's
own, a search space's ``penalty: {l1: ...}``: :class:`evomerge.search.space.Penalty`). Rows:

- ``base (zero-shot)``: the base alone;
- ``adapter alone (mean)``: every upstream adapter alone, averaged; ``adapter alone (k-shot pick)``: the one with
  the lowest few-shot fitness;
- ``uniform (lorahub)``: LoraHub's composition with every weight 1/N; ``uniform (task arithmetic)``: the average
  of the adapters' updates ``Σ s_i B_i A_i / N``;
- ``lorahub (cma-es)``: LoraHub's composition, a weight per adapter in [-1.5, 1.5] searched by Optuna's CMA-ES
  (``--trials`` candidates, started at the centre 0 as the paper starts);
- ``ties (cma-es)``, ``dare_ties (cma-es)``: evomerge's TIES / DARE-TIES on the adapters' task vectors, a weight per
  adapter in [0, 1.5] and one density in [0.1, 1] searched the same way;
- ``own adapter (reference)``: the held-out task's own adapter, which the setting does not have.

Selection uses the k examples only; the test split of the held-out task is scored once per row and run. Every
searched row is run with ``--seeds`` seeds (the k-shot sample and the sampler's seed); the table gives, per k, the
test accuracy averaged over the held-out tasks, mean ± std over seeds. Memory per candidate: the bytes of the
sources the engine holds, adapters as factors against the same adapters as full task vectors (N models); with
``--timing`` also the seconds per candidate of both (only meaningful on a quiet machine).

    python benchmarks/lorahub.py                 # mini zoo, all 5 tasks, k = 5, 10, 20, 5 seeds -> results/lorahub.*
    python benchmarks/lorahub.py --quick         # one task, k = 5, 2 seeds, 4 trials, a tiny LoRA stage: CI-sized
"""

from __future__ import annotations

import argparse
import csv
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch

from evomerge.adapters import AdapterCheckpoint
from evomerge.checkpoint import save_hf_dir
from evomerge.engine import MergeEngine
from evomerge.engine.lowrank import stack_bytes
from evomerge.engine.plan import open_sources
from evomerge.recipe import Recipe
from evomerge.search.space import Penalty, penalized
from evomerge.zoo import ZooConfig, cached_zoo, default_cache_root
from evomerge.zoo.config import TrainSpec
from evomerge.zoo.lora import LoraSetting, LoraZoo, LoraZooConfig, build_lora_zoo
from evomerge.zoo.table import accuracy, choice_logprobs
from evomerge.zoo.taskfiles import read_jsonl
from evomerge.zoo.tasks import Item

QUICK_LORA = LoraZooConfig(settings=(LoraSetting(r=4, lora_alpha=8),), tasks=("reverse", "sort", "shift"),
                           train=TrainSpec(steps=30, lr=5e-3, seed=7), table=False)
SEARCHED = ("lorahub", "ties", "dare_ties")


def few_shot_loss(engine: MergeEngine, tokenizer: object, shots: Sequence[Item]) -> float:
    """LoraHub's fitness without the penalty: the cross-entropy of each shot's gold answer given its query (summed
    over the answer's tokens), averaged over the shots, under the engine's live model."""
    gold = [{**item, "choices": [item["choices"][item["gold"]]]} for item in shots]  # type: ignore[index]
    logp = choice_logprobs(engine.model, tokenizer, gold)
    return float(-logp.mean())


def recipe_of(method: str, base: str, adapters: Sequence[str], weights: Sequence[float],
              density: float | None = None, seed: int = 0) -> Recipe:
    per = [{"weight": w, **({} if density is None else {"density": density})} for w in weights]
    return Recipe(method=method, base=base, seed=seed,
                  sources=[{"model": a, "parameters": p} for a, p in zip(adapters, per)])


def search(method: str, engine: MergeEngine, tokenizer: object, shots: Sequence[Item], base: str,
           adapters: Sequence[str], args: argparse.Namespace, seed: int) -> Recipe:
    """The recipe of the best of ``args.trials`` CMA-ES candidates by few-shot fitness (+ L1 on the weights)."""
    low, high = (-1.5, 1.5) if method == "lorahub" else (0.0, 1.5)

    def objective(trial: optuna.Trial) -> float:
        weights = [trial.suggest_float(f"w{i}", low, high) for i in range(len(adapters))]
        density = None if method == "lorahub" else trial.suggest_float("density", 0.1, 1.0)
        engine.materialize(recipe_of(method, base, adapters, weights, density, seed))
        # the product's penalty (a space's `penalty: {l1: ...}`): loss + l1 Σ|w| on the searched weights
        return penalized(few_shot_loss(engine, tokenizer, shots), Penalty(l1=args.l1).amount(weights), "minimize")

    study = optuna.create_study(sampler=optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False))
    study.optimize(objective, n_trials=args.trials)
    p = study.best_params
    return recipe_of(method, base, adapters, [p[f"w{i}"] for i in range(len(adapters))], p.get("density"), seed)


def run_task(task: str, zoo: object, lora: LoraZoo, tokenizer: object, args: argparse.Namespace) -> list[dict]:
    """Every row of one held-out task, for every k and seed."""
    base, adapters = str(zoo.base), [str(p) for p in lora.upstream(task)]  # type: ignore[attr-defined]
    engine = MergeEngine([base, *adapters, str(lora.adapter(task))], device=args.device)
    validation = read_jsonl(zoo.split_file(task, "validation"))  # type: ignore[attr-defined]
    test = read_jsonl(zoo.split_file(task, "test"))  # type: ignore[attr-defined]

    def test_acc(recipe: Recipe) -> float:
        engine.materialize(recipe)
        return accuracy(engine.model, tokenizer, test)

    n = len(adapters)
    fixed = {
        "base (zero-shot)": test_acc(recipe_of("task_arithmetic", base, adapters, [0.0] * n)),
        "adapter alone (mean)": statistics.mean(
            test_acc(recipe_of("task_arithmetic", base, [a], [1.0])) for a in adapters),
        "uniform (lorahub)": test_acc(recipe_of("lorahub", base, adapters, [1.0 / n] * n)),
        "uniform (task arithmetic)": test_acc(recipe_of("task_arithmetic", base, adapters, [1.0 / n] * n)),
        "own adapter (reference)": test_acc(recipe_of("task_arithmetic", base, [str(lora.adapter(task))], [1.0])),
    }
    rows = []
    for k in args.ks:
        for seed in range(args.seeds):
            shots = random.Random(f"{task}:{k}:{seed}").sample(validation, k)
            scores = dict(fixed)
            alone = []
            for a in adapters:
                engine.materialize(recipe_of("task_arithmetic", base, [a], [1.0]))
                alone.append((few_shot_loss(engine, tokenizer, shots), a))
            scores["adapter alone (k-shot pick)"] = test_acc(recipe_of("task_arithmetic", base, [min(alone)[1]], [1.0]))
            for method in args.methods:
                scores[f"{method} (cma-es)"] = test_acc(search(method, engine, tokenizer, shots, base, adapters, args,
                                                               seed))
            rows += [{"task": task, "k": k, "seed": seed, "row": r, "test_acc": v} for r, v in scores.items()]
    return rows


def memory_row(zoo: object, lora: LoraZoo, task: str, args: argparse.Namespace) -> dict[str, object]:
    """Source bytes the engine holds for one held-out task's upstream adapters, as factors and as full task
    vectors (the adapters' models written out as checkpoints), and with ``--timing`` the seconds per candidate."""
    base, adapters = str(zoo.base), [str(p) for p in lora.upstream(task)]  # type: ignore[attr-defined]
    opened = open_sources([base, *adapters])
    itemsize = 4
    row: dict[str, object] = {
        "adapters": len(adapters),
        "factors MB": stack_bytes(opened.checkpoints, opened.names, itemsize) / 1e6,
        "full task vectors MB": len(opened.checkpoints) * stack_bytes(opened.checkpoints[:1], opened.names,
                                                                      itemsize) / 1e6,
    }
    if args.timing:
        with tempfile.TemporaryDirectory() as tmp:
            fulls = []
            for i, ck in enumerate(opened.checkpoints[1:]):
                assert isinstance(ck, AdapterCheckpoint)
                fulls.append(str(save_hf_dir({n: ck.get(n) for n in ck.names}, Path(tmp) / f"full{i}",
                                             config=ck.config)))
            for label, sources in (("factors", adapters), ("full", fulls)):
                engine = MergeEngine([base, *sources], device=args.device)
                times = []
                for j in range(6):
                    start = time.perf_counter()
                    engine.materialize(recipe_of("ties", base, sources, [0.5 + 0.1 * j] * len(sources), 0.5))
                    times.append(time.perf_counter() - start)
                row[f"{label} s/candidate"] = statistics.median(times[1:])
    return row


def header(args: argparse.Namespace) -> list[str]:
    import peft
    import transformers

    return [f"- command: `python {' '.join(sys.argv)}`; commit {args.commit or 'unknown'}; date "
            f"{time.strftime('%Y-%m-%d')}",
            f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, optuna {optuna.__version__}",
            f"- zoo: {args.zoo}; held-out tasks {', '.join(args.tasks)}; k = {', '.join(map(str, args.ks))}; "
            f"{args.seeds} seeds; {args.trials} CMA-ES candidates per search; L1 {args.l1}"]


def write(rows: list[dict], memory: dict[str, object], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "k", "seed", "row", "test_acc"])
        writer.writeheader()
        writer.writerows(rows)
    names = list(dict.fromkeys(r["row"] for r in rows))
    lines = ["# LoraHub on held-out zoo tasks", "", *header(args), "",
             "Test accuracy of the held-out task, averaged over the held-out tasks: mean ± std over seeds "
             "(selection on the k examples only).", "",
             "| row | " + " | ".join(f"k = {k}" for k in args.ks) + " |", "|---|" + "---:|" * len(args.ks)]
    for name in names:
        cells = []
        for k in args.ks:
            per_seed = [statistics.mean(r["test_acc"] for r in rows if r["row"] == name and r["k"] == k
                                        and r["seed"] == s) for s in range(args.seeds)]
            spread = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            cells.append(f"{statistics.mean(per_seed):.3f} ± {spread:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Sources held per candidate (one held-out task's upstream adapters, fp32):", "",
              "| " + " | ".join(memory) + " |", "|" + "---:|" * len(memory),
              "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in memory.values()) + " |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", choices=["mini", "full"], default="mini")
    parser.add_argument("--ks", default="5,10,20", help="few-shot sizes, comma-separated")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=40, help="CMA-ES candidates per search (the paper: 40)")
    parser.add_argument("--l1", type=float, default=0.05, help="weight of the L1 penalty Σ|w| (the paper: 0.05)")
    parser.add_argument("--methods", default=",".join(SEARCHED))
    parser.add_argument("--tasks", default=None, help="held-out tasks (default: every task with an adapter)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing", action="store_true", help="also seconds per candidate (quiet machines only)")
    parser.add_argument("--quick", action="store_true", help="one task, k = 5, 2 seeds, 4 trials, tiny adapters")
    parser.add_argument("--out", default="results/lorahub", help="output path without suffix (.md and .csv)")
    args = parser.parse_args()
    # the code that runs: read now, the checkout may move while the benchmark runs
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    args.ks = [int(k) for k in args.ks.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        args.ks, args.seeds, args.trials = [5], 2, 4
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = cached_zoo(ZooConfig.mini() if args.zoo == "mini" else ZooConfig.full())
    config = QUICK_LORA if args.quick else LoraZooConfig.mini() if args.zoo == "mini" else LoraZooConfig.full()
    lora = build_lora_zoo(zoo, default_cache_root() / f"{zoo.config_hash}-lora-{config.config_hash(zoo.config_hash)}",
                          config, progress=False)
    tasks = list(dict.fromkeys(e["task"] for e in lora.manifest["adapters"].values()))
    args.tasks = args.tasks.split(",") if args.tasks else tasks[:1] if args.quick else tasks
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(zoo.tokenizer_dir)
    rows = [row for task in args.tasks for row in run_task(task, zoo, lora, tokenizer, args)]
    write(rows, memory_row(zoo, lora, args.tasks[0], args), args)


if __name__ == "__main__":
    main()
