"""Greedy soup on the zoo's soup sweep: the analog of the model-soups table (Wortsman et al. 2022, Table 1/3).

The ingredients are the zoo's sweep: fine-tunes of one pretrained base on one task with varied learning rate,
seed, steps, label smoothing, augmentation and label noise (``ZooConfig.bench()``'s docstring). Rows, each scored
on the validation and the test split of the sweep task (multiple-choice accuracy, the zoo's scorer, equal to
lm-eval's ``acc``):

* the pretrained base (the start every ingredient was fine-tuned from, for reference);
* best individual: the ingredient with the best VALIDATION accuracy (ties: the first in sweep order);
* uniform soup: the average of all ingredients' weights;
* greedy soup ``>``: ingredients sorted by validation accuracy, each added when the soup's validation accuracy
  strictly improves (the paper's code); greedy soup ``>=``: also kept on a tie (the paper's text, Recipe 1);
  both with :func:`evomerge.search.soup.greedy_soup`, soups materialized in memory by the merge engine;
* output ensembles of all ingredients (the paper's reference, not a single model): the mean of the models'
  next-token probabilities, and the mean of their logits (:func:`evomerge.zoo.table.ensemble_logprobs`).

Selection uses the validation split only; test is reported with its binomial standard error
``sqrt(acc (1 - acc) / n)`` over the ``n`` test items. Nothing is random: given the zoo (same weights, same torch
threads), every number is deterministic, so one run is the result.

    python benchmarks/greedy_soup.py                          # the bench zoo (built if missing, ~20 min)
    python benchmarks/greedy_soup.py --zoo /work/zoo-bench    # a built zoo
    python benchmarks/greedy_soup.py --quick --out /tmp/gs    # the mini zoo of the tests (seconds once built)

Writes greedy_soup.md, greedy_soup.csv and greedy_soup.png into ``--out`` (default results/).
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from candidate_turnaround import machine, revision  # benchmarks/ is sys.path[0] when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

import evomerge
from evomerge.engine import MergeEngine
from evomerge.recipe import Recipe
from evomerge.search.soup import SoupResult, greedy_soup, recipe_key, soup_recipe
from evomerge.zoo import Zoo, ZooConfig, build_zoo, cached_zoo
from evomerge.zoo.table import accuracy, ensemble_logprobs
from evomerge.zoo.taskfiles import read_jsonl
from evomerge.zoo.tasks import Item

SPLITS = ("validation", "test")
ACCEPTS = (">", ">=")


@dataclass(frozen=True)
class Row:
    """One line of the table: a model (or ensemble), its scores, and for soups the ingredients they average."""

    name: str
    validation: float
    test: float
    members: tuple[str, ...] = ()


@dataclass
class GreedySoupBenchmark:
    """Everything the report shows: the rows, the ingredients' own scores and the greedy runs."""

    task: str
    n_items: dict[str, int]
    ingredients: dict[str, dict[str, float]]  # ingredient name -> split -> accuracy
    rows: list[Row]
    soups: dict[str, SoupResult] = field(default_factory=dict)  # accept -> greedy run (paths as names)


def _name(path: str) -> str:
    return Path(path).name


def run_benchmark(zoo: Zoo, *, batch_size: int = 256) -> GreedySoupBenchmark:
    """Score every row of the table (module docstring) on ``zoo``'s sweep task."""
    task = zoo.sweep_task
    items: dict[str, list[Item]] = {s: read_jsonl(zoo.split_file(task, s)) for s in SPLITS}
    tokenizer = AutoTokenizer.from_pretrained(zoo.tokenizer_dir)
    paths = [str(p) for p in zoo.sweep]
    engine = MergeEngine(paths, device="cpu")
    cache: dict[tuple[str, str], float] = {}

    def score(recipe: Recipe, split: str) -> float:
        key = (recipe_key(recipe), split)
        if key not in cache:
            engine.materialize(recipe)
            cache[key] = accuracy(engine.model, tokenizer, items[split], batch_size)
        return cache[key]

    ingredients = {_name(p): {s: score(soup_recipe([p]), s) for s in SPLITS} for p in paths}
    soups = {accept: greedy_soup(paths, lambda r: score(r, "validation"), accept=accept) for accept in ACCEPTS}

    def soup_row(name: str, members: Sequence[str]) -> Row:
        recipe = soup_recipe(members)
        return Row(name, score(recipe, "validation"), score(recipe, "test"), tuple(_name(m) for m in members))

    best = max(paths, key=lambda p: ingredients[_name(p)]["validation"])  # max keeps the first of ties
    base = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
    rows = [
        Row("pretrained base", *(accuracy(base, tokenizer, items[s], batch_size) for s in SPLITS)),
        soup_row("best individual (on validation)", [best]),
        soup_row("uniform soup", paths),
        *(soup_row(f"greedy soup ({accept})", soups[accept].kept) for accept in ACCEPTS),
    ]
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in paths]
    for average in ("probs", "logits"):
        ensemble = ensemble_logprobs(models, average)
        rows.append(Row(f"ensemble (mean {average})",
                        *(accuracy(ensemble, tokenizer, items[s], batch_size) for s in SPLITS),
                        tuple(map(_name, paths))))
    return GreedySoupBenchmark(task, {s: len(v) for s, v in items.items()}, ingredients, rows, soups)


def stderr(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy over ``n`` items: ``sqrt(acc (1 - acc) / n)``."""
    return math.sqrt(acc * (1 - acc) / n)


def write_csv(result: GreedySoupBenchmark, path: Path) -> None:
    n_test = result.n_items["test"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["row", "validation", "test", "test_stderr", "n_members", "members"])
        for row in result.rows:
            writer.writerow([row.name, repr(row.validation), repr(row.test), repr(stderr(row.test, n_test)),
                             len(row.members), " ".join(row.members)])
        for name, scores in result.ingredients.items():
            writer.writerow([f"ingredient {name}", repr(scores["validation"]), repr(scores["test"]),
                             repr(stderr(scores["test"], n_test)), 1, name])


def _training(zoo: Zoo, name: str) -> str:
    """The knobs an ingredient was trained with, as in the zoo's manifest (non-default ones only)."""
    spec = zoo.manifest["models"][name]["train"]
    shown = [f"lr {spec['lr']:g}", f"seed {spec['seed']}", f"steps {spec['steps']}"]
    shown += [f"{k.replace('_', ' ')} {spec[k]:g}" for k in ("label_smoothing", "augment", "label_noise")
              if spec.get(k)]
    return ", ".join(shown)


def provenance(command: str) -> list[str]:
    """Markdown header lines of every zoo benchmark result: command, commit, date, machine, versions."""
    return [
        f"- command: `{command}`",
        f"- commit: {revision()}; date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine(torch.device('cpu'))}",
        f"- versions: evomerge {evomerge.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    ]


def write_markdown(result: GreedySoupBenchmark, zoo: Zoo, path: Path, command: str) -> None:
    n_val, n_test = result.n_items["validation"], result.n_items["test"]
    lines = [
        "# Greedy soup on the zoo's soup sweep",
        "",
        *provenance(command),
        f"- zoo: {zoo.root} (config {zoo.config_hash}); task `{result.task}`, {len(result.ingredients)} "
        f"ingredients; {n_val} validation and {n_test} test items",
        "- deterministic given the zoo: no part of this benchmark is random (one run; test ± is the binomial "
        "standard error over the test items)",
        "",
        "| row | validation | test | ingredients |",
        "|---|---|---|---|",
    ]
    for row in result.rows:
        members = "all" if len(row.members) == len(result.ingredients) else ", ".join(row.members) or "-"
        lines.append(f"| {row.name} | {row.validation:.3f} | {row.test:.3f} ± {stderr(row.test, n_test):.3f} "
                     f"| {members} |")
    lines += ["", "Ingredients, in greedy order (validation accuracy, best first):", "",
              "| ingredient | trained with | validation | test | kept by `>` | kept by `>=` |",
              "|---|---|---|---|---|---|"]
    kept = {accept: {_name(p) for p in soup.kept} for accept, soup in result.soups.items()}
    for path_ in result.soups[">"].ingredients:
        name = _name(path_)
        scores = result.ingredients[name]
        marks = " | ".join("yes" if name in kept[a] else "" for a in ACCEPTS)
        lines.append(f"| {name} | {_training(zoo, name)} | {scores['validation']:.3f} | {scores['test']:.3f} "
                     f"| {marks} |")
    lines += ["", "Greedy steps (`>=` run; the candidate soup's validation accuracy):", ""]
    lines += [f"{step.index}. + {_name(step.ingredient)}: {step.score:.3f} {'kept' if step.accepted else 'dropped'}"
              for step in result.soups[">="].steps]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: GreedySoupBenchmark, path: Path) -> None:
    """Validation (x) vs test (y) accuracy: the ingredients as grey dots, every row of the table as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    val = [s["validation"] for s in result.ingredients.values()]
    test = [s["test"] for s in result.ingredients.values()]
    ax.scatter(val, test, color="0.6", label="ingredients")
    for marker, row in zip("oD*^vsP", result.rows, strict=False):
        ax.scatter([row.validation], [row.test], marker=marker, s=90, label=row.name, zorder=3)
    ax.set_xlabel(f"{result.task} validation accuracy")
    ax.set_ylabel(f"{result.task} test accuracy")
    ax.set_title("Greedy soup vs ingredients, uniform soup and output ensemble")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> GreedySoupBenchmark:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="a built zoo dir (default: the bench zoo, built into the cache)")
    parser.add_argument("--quick", action="store_true", help="the mini zoo of the tests (seconds once cached)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed: the numbers depend on it)")
    args = parser.parse_args(argv)
    if args.quick and args.zoo:
        parser.error("--quick uses the mini zoo; drop --zoo or --quick")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    if args.zoo:
        zoo = Zoo.load(args.zoo) if (args.zoo / "zoo.json").is_file() else build_zoo(args.zoo, ZooConfig.bench())
    else:
        zoo = cached_zoo(ZooConfig.mini() if args.quick else ZooConfig.bench(), progress=not args.quick)
    result = run_benchmark(zoo)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/greedy_soup.py", *(sys.argv[1:] if argv is None else argv)])
    write_csv(result, args.out / "greedy_soup.csv")
    write_markdown(result, zoo, args.out / "greedy_soup.md", command)
    write_plot(result, args.out / "greedy_soup.png")
    print((args.out / "greedy_soup.md").read_text())
    return result


if __name__ == "__main__":
    main()
