"""Dense merge vs mixture of experts on the zoo: is an MoE of the experts worth its size?

On the zoo's expert tasks (multiple choice, ``acc``), per seed: each expert alone; the best dense merge an evomerge
search finds (``search_spaces/ties_dare_layerwise.yaml``); mergekit-moe's MoE of the experts (``hidden`` gates from
prompts drawn from each expert's task's train split, 2 experts per token); and the MoE an evomerge search finds
around it (``search_spaces/moe.yaml``: experts per token, router scale per layer group, random routing weight,
dense merged layers, prompt windows). Searches select on the validation split only; every row is scored on the test
split (mean over the tasks and per task), with mean ± std over the seeds (the seed moves the prompt draw, the
samplers and the DARE masks). Beside each: parameter count and forward time per token (batch of test queries,
median of 5 passes; timings are only comparable when taken on a quiet machine).

    python benchmarks/moe.py [--quick] [--zoo DIR] [--seeds 3] [--trials 24] [--device cpu] [--out results]
    -> results/moe.md / .csv   (--quick: the mini zoo, 2 seeds, 2 trials, 20 items per task; --zoo: a built zoo,
       e.g. the bench preset's, whose experts are not at the ceiling: moe_<preset or dir name>.md / .csv)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import optuna
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from candidate_turnaround import machine, revision  # noqa: E402

from evomerge.engine import MergeEngine  # noqa: E402
from evomerge.evaluate import build_evaluator  # noqa: E402
from evomerge.moe import MoeModel  # noqa: E402
from evomerge.noise import quiet_third_party  # noqa: E402
from evomerge.recipe import MoeRecipe, load_recipe, parse_recipe  # noqa: E402
from evomerge.search.config import RunConfig  # noqa: E402
from evomerge.search.study import run_search  # noqa: E402
from evomerge.zoo import Zoo, ZooConfig, cached_zoo  # noqa: E402
from evomerge.zoo.taskfiles import lm_eval_name  # noqa: E402

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
WINDOWS = 2  # prompt windows per expert in the MoE search's pool (the mergekit-moe MoE takes the first)


@dataclass
class Row:
    method: str
    seed: int | None
    validation: float | None
    test: float
    per_task: dict[str, float]
    params: int
    ms_per_token: float


def evaluator_spec(zoo: Zoo, split: str, limit: int | None) -> dict:
    return {"type": "lm_eval", "tasks": [lm_eval_name(t) for t in zoo.experts], "include_path": [str(zoo.task_dir)],
            "split": split, "metrics": ["acc"], "limit": limit}


def queries(zoo: Zoo, task: str, split: str) -> list[str]:
    return [json.loads(line)["query"] for line in zoo.split_file(task, split).read_text().splitlines()]


def template(zoo: Zoo, seed: int, prompts: int) -> MoeRecipe:
    """mergekit-moe's default MoE of the zoo's experts, with a seeded pool of ``WINDOWS × prompts`` train prompts."""
    experts = [{"model": str(path), "positive_prompts": random.Random(f"{seed}:{task}").sample(
        queries(zoo, task, "train"), WINDOWS * prompts)} for task, path in zoo.experts.items()]
    return MoeRecipe(base=str(zoo.base), gate_mode="hidden", experts_per_token=2, experts=experts, seed=seed)


def forward_ms_per_token(model: torch.nn.Module, batch: dict[str, torch.Tensor], reps: int = 5) -> float:
    """Median wall time of one forward pass over ``batch``, per non-padding token, in milliseconds."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    times = []
    with torch.inference_mode():
        model(**batch)  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / int(batch["attention_mask"].sum())


class Scorer:
    """Test-split scoring, parameter count and forward time of a model, the same way for every row."""

    def __init__(self, zoo: Zoo, limit: int | None) -> None:
        from transformers import AutoTokenizer

        self.test = build_evaluator(evaluator_spec(zoo, "test", limit))
        self.tokenizer = AutoTokenizer.from_pretrained(zoo.tokenizer_dir)
        texts = [q for task in zoo.experts for q in queries(zoo, task, "test")[:16]]
        self.batch = dict(self.tokenizer(texts, return_tensors="pt", padding=True))

    def row(self, method: str, seed: int | None, model: torch.nn.Module, validation: float | None) -> Row:
        result = self.test.score(model, self.tokenizer)
        per_task = {k.split("/")[0].removeprefix("zoo_"): v for k, v in result.metrics.items() if k.endswith("/acc")}
        return Row(method, seed, validation, result.objective, per_task, sum(p.numel() for p in model.parameters()),
                   forward_ms_per_token(model, self.batch))


def dense_search(zoo: Zoo, seed: int, args: argparse.Namespace, work: Path, scorer: Scorer) -> Row:
    config = RunConfig(name=f"dense_{seed}", base=str(zoo.base), sources=[str(p) for p in zoo.experts.values()],
                       space=str(SPACES / "ties_dare_layerwise.yaml"), evaluator=evaluator_spec(zoo, "validation",
                                                                                                args.limit),
                       n_trials=args.trials, out=str(work / f"dense_{seed}"), device=args.device, seed=seed)
    summary = run_search(config, export=False, progress=False)
    recipe = load_recipe(work / f"dense_{seed}" / "best_recipe.yaml")
    engine = MergeEngine(recipe.model_paths(), device=args.device)
    engine.materialize(recipe)
    return scorer.row("dense merge (searched)", seed, engine.model, summary["best_value"])


def moe_rows(zoo: Zoo, seed: int, args: argparse.Namespace, work: Path, scorer: Scorer) -> list[Row]:
    """mergekit-moe's MoE of the seed's template and the MoE `evomerge search` finds around it (an MoE run config:
    the template, the shipped MoE space with ``--prompts`` windows); the first is the study's baseline trial."""
    run = work / f"moe_{seed}"
    run.mkdir()
    template(zoo, seed, args.prompts).to_yaml(run / "template.yaml")
    space = yaml.safe_load((SPACES / "moe.yaml").read_text()) | {"prompts": args.prompts}
    (run / "space.yaml").write_text(yaml.safe_dump(space))
    config = RunConfig(name=f"moe_{seed}", template=str(run / "template.yaml"), space=str(run / "space.yaml"),
                       evaluator=evaluator_spec(zoo, "validation", args.limit), n_trials=args.trials,
                       out=str(run / "run"), device=args.device, seed=seed)
    summary = run_search(config, export=False, progress=False)
    study = optuna.load_study(study_name=config.name, storage=config.storage_url)
    baseline = next(t for t in study.trials if t.user_attrs.get("kind") == "baseline:mergekit-moe")
    live = MoeModel(parse_recipe(baseline.user_attrs["recipe"]), device=args.device)
    rows = [scorer.row("MoE, mergekit-moe defaults", seed, live.model, baseline.value)]
    live.materialize(load_recipe(run / "run" / "best_recipe.yaml"))
    rows.append(scorer.row("MoE (searched)", seed, live.model, summary["best_value"]))
    return rows


COLUMNS = ["method", "seed", "validation", "test_mean", "params", "ms_per_token"]


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_results(out: Path, stem: str, rows: list[Row], tasks: list[str], info: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS + [f"test_{t}" for t in tasks])
        for r in rows:
            writer.writerow([r.method, "" if r.seed is None else r.seed,
                             "" if r.validation is None else f"{r.validation:.4f}", f"{r.test:.4f}", r.params,
                             f"{r.ms_per_token:.4f}", *(f"{r.per_task.get(t, float('nan')):.4f}" for t in tasks)])
    methods = list(dict.fromkeys(r.method for r in rows))
    table = ["| method | seeds | test mean | " + " | ".join(tasks) + " | params | ms / token |",
             "|" + "---|" * (5 + len(tasks))]
    for method in methods:
        mine = [r for r in rows if r.method == method]
        base_params = mine[0].params
        table.append(f"| {method} | {len(mine)} | {_mean_std([r.test for r in mine])} | "
                     + " | ".join(_mean_std([r.per_task[t] for r in mine]) for t in tasks)
                     + f" | {base_params:,} | {statistics.median(r.ms_per_token for r in mine):.4f} |")
    lines = [
        "# Dense merge vs mixture of experts on the zoo", "",
        "Test-split accuracy (mean over the expert tasks, and per task; mean ± std over seeds) of each expert alone, "
        "the best dense merge an evomerge search finds (`ties_dare_layerwise`), mergekit-moe's MoE of the experts "
        "(`hidden` gates from train-split prompts, 2 experts per token) and the MoE an evomerge search finds around it "
        "(`search_spaces/moe.yaml`). Searches select on validation only. `ms / token`: median forward time per "
        "token over a batch of test queries (median over seeds); only comparable when measured on a quiet machine.",
        "",
        f"- command: `python {' '.join(info['argv'])}` (evomerge at {info['revision']})",
        f"- machine: {info['machine']}",
        f"- zoo: {info['zoo']}; {info['trials']} trials per search; items per task: {info['limit']}",
        f"- date: {info['date']}; {info['seconds']} s",
        "", *table, "",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the mini zoo, 2 seeds, 2 trials, 20 items per task")
    parser.add_argument("--zoo", help="a built zoo dir (default: the full zoo, built on first use)")
    parser.add_argument("--seeds", type=int, help="seeds (default 3; quick 2)")
    parser.add_argument("--trials", type=int, help="trials per search (default 24; quick 2)")
    parser.add_argument("--limit", type=int, help="items per task (default: all; quick 20)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per expert for the router (default 8)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    quiet_third_party()
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.trials = args.trials or (2 if args.quick else 24)
    args.limit = args.limit or (20 if args.quick else None)
    zoo = Zoo.load(args.zoo) if args.zoo else cached_zoo(ZooConfig.mini() if args.quick else ZooConfig.full())
    presets = {c.config_hash(): name for name, c in (("mini", ZooConfig.mini()), ("full", ZooConfig.full()),
                                                      ("bench", ZooConfig.bench()))}
    label = presets.get(zoo.config_hash, Path(args.zoo or ".").resolve().name)
    tasks = list(zoo.experts)
    start = time.perf_counter()
    scorer = Scorer(zoo, args.limit)
    from transformers import AutoModelForCausalLM

    rows = [scorer.row(f"expert {task}", None, AutoModelForCausalLM.from_pretrained(path), None)
            for task, path in zoo.experts.items()]
    with tempfile.TemporaryDirectory(prefix="evomerge-moe-bench-") as work:
        for seed in range(args.seeds):
            rows.append(dense_search(zoo, seed, args, Path(work), scorer))
            rows += moe_rows(zoo, seed, args, Path(work), scorer)
            for r in rows[-3:]:
                print(f"seed {seed}: {r.method}: validation {r.validation:.3f} test {r.test:.3f}", flush=True)
    info = {"argv": sys.argv, "revision": revision(), "machine": machine(torch.device(args.device)),
            "zoo": f"{label} ({zoo.config_hash})", "trials": str(args.trials),
            "limit": str(args.limit or "all"), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": f"{time.perf_counter() - start:.0f}"}
    write_results(Path(args.out), f"moe_{label}" if args.zoo and label != "full" else "moe", rows, tasks, info)


if __name__ == "__main__":
    main()
