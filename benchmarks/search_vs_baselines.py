"""Evolved merges vs baselines: CMA-ES (IPOP, evomerge's), TPE, GP and random search at the same trial budget,
several sampler seeds each, in three search spaces, against every expert alone, the uniform average, task
arithmetic / TIES / DARE-TIES at default parameters and the method sweep's validation pick ("hand-tuned").

Spaces (``search_spaces/``): ``ties_dare_layerwise.yaml`` (DARE-TIES, weight and density per expert and layer
group: Sakana's parameter space), ``method_choice.yaml`` (TIES / DARE-TIES / task arithmetic chosen by the
sampler, conditional parameters) and ``layer_stacking.yaml`` (a searched path through the experts' layers with
per-layer scales: Sakana's data-flow space). Every search runs in-process through evomerge's own
:class:`~evomerge.search.study.Runner` (the loop of ``evomerge search``) with ``baselines: false`` (the baselines
are scored once, below, not per run), on the validation split (``--limit`` docs per task, the same seeded subset
for every run); its best trial (on validation) is then scored on the whole test split. Sampler seed k also seeds
the DARE masks of its trials, and the stochastic baselines are scored with the same seeds, so run k and baseline k
are a pair.

Baselines are recipes outside the spaces: ``source:<task>`` (one expert: linear over one model), ``uniform``
(linear over all experts), ``task_arithmetic`` (registry defaults: weight 1, lambda 1), ``ties`` and
``dare_ties`` (registry defaults with density 0.5), and ``hand-tuned``: the overall validation pick of
``results/method_sweep.csv`` (benchmarks/method_sweep.py), rebuilt from its parameters and re-scored here.

Everything is stored in SQLite studies under ``--work`` (one database per space, one study per sampler and seed;
the baselines as references of a study ``baselines``): re-running the same command resumes and skips what is done.
A search's trials are scored on ``--limit`` validation docs per task (cheap, noisy); its ``--confirm-top`` best
are then re-scored on ``--confirm-limit`` docs and the best of them by that score is the search's pick
(``confirm_top`` of the run config: still validation only), scored on ``--test-limit`` test docs. Cost (default:
24 trials x 5 seeds x 4 samplers x 3 spaces = 1,440 trials on 15 docs per task, 180 re-scores on 40, 60 picks and
~10 baselines on 100 test docs): 12.6 min wall, 19.3 min CPU on 2 CPU cores with nothing else running
(results/search_vs_baselines.md states each run's own wall and CPU time; on a machine shared with other jobs the
same run took 56.9 min). Writes
``results/search_vs_baselines.{md,csv,png}``: test mean ± std over seeds per space and sampler, the mean
paired difference to the best baseline (chosen on validation) with a 95% paired-bootstrap interval and a Wilcoxon
signed-rank p-value, and the convergence (best-so-far validation objective vs trials: median and interquartile
band across seeds, per sampler).

    python benchmarks/search_vs_baselines.py --zoo DIR                      # the bench zoo: 60 searches x 24 trials
    python benchmarks/search_vs_baselines.py --quick --out /tmp/svb         # mini zoo, 2 seeds, 2 trials (CI test)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import zoo_bench  # benchmarks/ is sys.path[0] when run as a script
from matplotlib.figure import Figure
from optuna.trial import TrialState
from scipy.stats import wilcoxon

from evomerge.evaluate import Evaluator, build_evaluator
from evomerge.methods import get_method
from evomerge.recipe import Recipe, SourceSpec
from evomerge.report import _save, markdown_table
from evomerge.search import trials as records
from evomerge.search.config import RunConfig
from evomerge.search.study import Runner
from evomerge.zoo import Zoo

ROOT = Path(__file__).resolve().parent.parent
SPACES = {"layerwise TIES/DARE": "ties_dare_layerwise.yaml", "method choice": "method_choice.yaml",
          "layer stacking": "layer_stacking.yaml"}
SAMPLERS = ("cmaes", "tpe", "gp", "random")
HAND_TUNED = "hand-tuned"
BASELINES_STUDY = "baselines"


@dataclass(frozen=True)
class Run:
    """One search: its space, sampler and seed; the best trial's validation and test objective; best-so-far."""

    space: str
    sampler: str
    seed: int
    best_trial: int
    val: float
    confirmed: float | None  # the chosen trial's confirmation score (``--confirm-top``), None when off
    test: float
    curve: list[float]  # best-so-far validation objective after each completed trial, in trial order


@dataclass(frozen=True)
class Baseline:
    """A baseline recipe's validation and test objective per seed (one entry when it draws no random numbers)."""

    label: str
    recipe: str  # a short description
    val: list[float]
    test: list[float]


def run_config(zoo: Zoo, args: argparse.Namespace, space: str) -> RunConfig:
    validation, test = zoo_bench.evaluators(zoo, args.limit, args.test_limit)
    slug = SPACES[space].removesuffix(".yaml")
    work = Path(args.work)
    return RunConfig(name="search", base=str(zoo.base), sources=[str(p) for p in zoo.experts.values()],
                     space=str(ROOT / "search_spaces" / SPACES[space]), evaluator=validation, test_evaluator=test,
                     n_trials=args.trials, baselines=False, out=str(work / slug), device=args.device,
                     confirm_top=args.confirm_top if args.limit else 0,
                     confirm_evaluator={**validation, "limit": args.confirm_limit} if args.confirm_limit else None,
                     calibration=zoo_bench.calibration_file(zoo, work / "calibration.jsonl"))  # hand-tuned may need it


def retarget(runner: Runner, config: RunConfig) -> None:
    """Point a Runner at another study of the same models, space, evaluators and storage (another sampler or seed):
    the models and evaluators it loaded are reused, so each search does not pay their set-up again."""
    runner.config = config


def best_so_far(study: optuna.Study) -> list[float]:
    values = [t.values[0] for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                                          key=lambda t: t.number)]
    return list(np.maximum.accumulate(values)) if values else []


def test_of_best(runner: Runner, test: Evaluator, study: optuna.Study) -> tuple[int, float, float | None, float]:
    """The chosen trial's number, validation objective, confirmation score and test objective: the best on
    validation, or with ``confirm_top`` the best of the re-scored top trials (re-scores and test scored once, then
    read from the study)."""
    confirmed = runner.confirm(study)
    best = records.best_trials(study, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))[0]
    key = f"{records.TEST_PREFIX}{best.number}"
    if records.OBJECTIVE not in study.user_attrs.get(key, {}):
        result = runner.test_score(test, records.recipe_of(best), f"trial #{best.number}")
        if isinstance(result, Exception):
            raise SystemExit(f"test scoring of {study.study_name} #{best.number} failed: {records.describe(result)}")
        records.set_test_result(study, best.number, result.metrics, result.objective, result.stderr)
    return best.number, best.values[0], confirmed.get(best.number), study.user_attrs[key][records.OBJECTIVE]


def searches(zoo: Zoo, args: argparse.Namespace, space: str) -> list[Run]:
    """Every sampler x seed search in ``space`` (resumed where its study stopped)."""
    config = run_config(zoo, args, space)
    runs = []
    with Runner(config) as runner:
        test = build_evaluator(config.test_spec())
        for sampler in SAMPLERS:
            for seed in range(args.seeds):
                retarget(runner, config.model_copy(update={"name": f"{sampler}-s{seed}", "sampler": sampler,
                                                           "seed": seed}))
                study = runner.open_study()
                runner.optimize(study, progress=False)
                number, val, confirmed, test_value = test_of_best(runner, test, study)
                runs.append(Run(space, sampler, seed, number, val, confirmed, test_value, best_so_far(study)))
                print(f"  {space} {sampler} seed {seed}: val {val:.4f} test {test_value:.4f}", flush=True)
    return runs


def hand_tuned(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The method sweep's overall validation pick (method, parameters) from its CSV, None without one."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["section"] == "all experts" and r["val_mean"]]
    best = max(rows, key=lambda r: float(r["val_mean"]))
    return best["method"], json.loads(best["params"])


def baseline_recipes(zoo: Zoo, sweep_csv: Path) -> list[tuple[str, str, Recipe]]:
    """``(label, description, recipe)`` of every baseline (module docstring)."""
    experts = [str(p) for p in zoo.experts.values()]
    base = str(zoo.base)

    def merge(method: str, **params: Any) -> Recipe:
        return Recipe(method=method, base=base if get_method(method).needs_base else None,
                      sources=[SourceSpec(model=m) for m in experts], parameters=params)

    out = [(f"source:{task}", "the expert alone", Recipe(method="linear", sources=[SourceSpec(model=str(path))]))
           for task, path in zoo.experts.items()]
    out += [("uniform", "linear, equal weights", merge("linear")),
            ("task_arithmetic", "weight 1, lambda 1", merge("task_arithmetic")),
            ("ties", "density 0.5, lambda 1", merge("ties", density=0.5)),
            ("dare_ties", "density 0.5, lambda 1", merge("dare_ties", density=0.5))]
    picked = hand_tuned(sweep_csv)
    if picked is not None:
        method, params = picked
        described = ", ".join(f"{k} {v}" for k, v in params.items())
        out.append((HAND_TUNED, f"{method} {described} (method sweep's pick)", merge(method, **params)))
    return out


def baselines(zoo: Zoo, args: argparse.Namespace) -> list[Baseline]:
    """Score every baseline on validation and test (stochastic ones with seeds 0 .. seeds-1), stored as references
    of the study ``baselines`` beside the first space's searches (done ones are read back)."""
    config = run_config(zoo, args, next(iter(SPACES))).model_copy(update={"name": BASELINES_STUDY})
    out = []
    with Runner(config) as runner:
        study = runner.open_study()
        test = build_evaluator(config.test_spec())
        for label, description, recipe in baseline_recipes(zoo, Path(args.sweep_csv)):
            seeds = range(args.seeds) if get_method(recipe.method).stochastic else range(1)
            val, tests = [], []
            for seed in seeds:
                key = f"{label}/seed {seed}"
                seeded = recipe.model_copy(update={"seed": seed})
                stored = records.references(study.user_attrs).get(key)
                if stored is None or Recipe.model_validate(stored[records.RECIPE]) != seeded:
                    scored = runner.score(seeded)
                    records.set_reference(study, key, recipe=seeded, metrics=scored.result.metrics,
                                          values=[scored.result.objective], merge_seconds=scored.merge_seconds,
                                          eval_seconds=scored.result.seconds)
                    result = runner.test_score(test, seeded, key)
                    if isinstance(result, Exception):
                        raise SystemExit(f"test scoring of baseline {key} failed: {records.describe(result)}")
                    records.set_reference_test(study, key, metrics=result.metrics, objective=result.objective)
                    stored = records.references(study.user_attrs)[key]
                val.append(stored[records.VALUES][0])
                tests.append(stored[records.TEST_OBJECTIVE])
            out.append(Baseline(label, description, val, tests))
            print(f"  baseline {label}: val {statistics.fmean(val):.4f} test {statistics.fmean(tests):.4f}",
                  flush=True)
    return out


def paired(runs: Sequence[Run], baseline: Baseline) -> tuple[float, tuple[float, float], float | None]:
    """Mean of the paired test differences run - baseline over seeds (a deterministic baseline pairs its one value
    with every run), its 95% bootstrap interval and the two-sided Wilcoxon signed-rank p-value (None when every
    difference is 0)."""
    by_seed = sorted(runs, key=lambda r: r.seed)
    diffs = [r.test - baseline.test[r.seed if len(baseline.test) > 1 else 0] for r in by_seed]
    p = None if all(d == 0 for d in diffs) else float(wilcoxon(diffs).pvalue)
    return statistics.fmean(diffs), zoo_bench.paired_bootstrap(diffs), p


def _ms(values: Sequence[float]) -> str:
    mean, std = zoo_bench.mean_std(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {std:.3f}"


def _margin(group: Sequence[Run], baseline: Baseline | None) -> str:
    """Test mean of the runs minus the baseline's, ✓ when larger than the spread (the runs' std over seeds and the
    baseline's, whichever is larger)."""
    if baseline is None:
        return "–"
    mean, std = zoo_bench.mean_std([r.test for r in group])
    base_mean, base_std = zoo_bench.mean_std(baseline.test)
    diff = mean - base_mean
    return f"{diff:+.3f}{' ✓' if diff > max(std, base_std) else ''}"


def comparators(base_lines: Sequence[Baseline]) -> list[tuple[str, Baseline | None]]:
    """The baselines the results must beat: the best source (on validation), the uniform average, the hand-tuned."""
    by_label = {b.label: b for b in base_lines}
    sources = [b for b in base_lines if b.label.startswith("source:")]
    best_source = max(sources, key=lambda b: statistics.fmean(b.val))
    return [(f"best source ({best_source.label})", best_source), ("uniform", by_label.get("uniform")),
            (HAND_TUNED, by_label.get(HAND_TUNED))]


def results_table(runs: Sequence[Run], best: Baseline,
                  base_lines: Sequence[Baseline]) -> tuple[list[str], list[list[str]]]:
    others = comparators(base_lines)
    confirm = any(r.confirmed is not None for r in runs)
    header = ["space", "sampler", "seeds", "best validation", *(["confirmed"] if confirm else []), "test",
              f"Δ test vs {best.label} (95% CI)", "Wilcoxon p", *(f"Δ vs {label}" for label, _ in others)]
    rows = []
    for space in SPACES:
        for sampler in SAMPLERS:
            group = [r for r in runs if r.space == space and r.sampler == sampler]
            if not group:
                continue
            mean, (low, high), p = paired(group, best)
            confirmed = [_ms([r.confirmed for r in group if r.confirmed is not None])] if confirm else []
            rows.append([space, sampler, str(len(group)), _ms([r.val for r in group]), *confirmed,
                         _ms([r.test for r in group]),
                         f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]", "–" if p is None else f"{p:.3g}",
                         *(_margin(group, b) for _, b in others)])
    return header, rows


def sampler_lines(runs: Sequence[Run]) -> list[str]:
    """Per space: each model-based sampler's test mean over seeds minus random search's (equal budget)."""
    lines = []
    for space in SPACES:
        means = {s: statistics.fmean(r.test for r in runs if r.space == space and r.sampler == s)
                 for s in SAMPLERS if any(r.space == space and r.sampler == s for r in runs)}
        if "random" in means:
            lines.append(f"- {space}: test mean − random's: " + ", ".join(
                f"{s} {means[s] - means['random']:+.3f}" for s in means if s != "random"))
    return lines


def plot(runs: Sequence[Run], base_lines: Sequence[Baseline], best: Baseline, path: Path) -> None:
    """Per space: median best-so-far validation objective vs trials per sampler, interquartile band across seeds;
    the best baseline's validation objective dashed."""
    spaces = [s for s in SPACES if any(r.space == s for r in runs)]
    fig = Figure(figsize=(5.2 * len(spaces), 3.8))
    for k, space in enumerate(spaces):
        ax = fig.add_subplot(1, len(spaces), k + 1)
        for c, sampler in enumerate(SAMPLERS):
            curves = [r.curve for r in runs if r.space == space and r.sampler == sampler]
            n = min(len(c) for c in curves)
            stack = np.array([c[:n] for c in curves])
            x = np.arange(1, n + 1)
            ax.plot(x, np.median(stack, axis=0), label=sampler, color=f"C{c}")
            ax.fill_between(x, np.percentile(stack, 25, axis=0), np.percentile(stack, 75, axis=0), alpha=0.2,
                            color=f"C{c}")
        ax.axhline(statistics.fmean(best.val), color="black", linestyle="--", linewidth=1,
                   label=f"{best.label} (best baseline)")
        ax.set(xlabel="trial", ylabel="best-so-far validation objective", title=space)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    _save(fig, path)


def write_results(out: Path, zoo: Zoo, args: argparse.Namespace, started: float, runs: Sequence[Run],
                  base_lines: Sequence[Baseline]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = "search_vs_baselines_quick" if args.quick else "search_vs_baselines"
    best = max(base_lines, key=lambda b: statistics.fmean(b.val))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "space", "sampler", "label", "seed", "best_trial", "val", "confirmed", "test"])
        for b in base_lines:
            for seed, (v, t) in enumerate(zip(b.val, b.test)):
                writer.writerow(["baseline", "", "", b.label, seed, "", repr(v), "", repr(t)])
        for r in runs:
            writer.writerow(["search", r.space, r.sampler, "", r.seed, r.best_trial, repr(r.val),
                             "" if r.confirmed is None else repr(r.confirmed), repr(r.test)])
    plot(runs, base_lines, best, out / f"{stem}.png")
    docs = f"{args.limit} validation docs per task (one seeded subset)" if args.limit else "every validation doc"
    tests = f"{args.test_limit} test docs per task" if args.test_limit else "every test doc"
    if args.confirm_top and args.limit:
        on = f"{args.confirm_limit} validation docs per task" if args.confirm_limit else "every validation doc"
        tests = (f"{tests}, after the {args.confirm_top} best trials are re-scored on {on} and the best of them by "
                 "that score chosen (`confirm_top`)")
    lines = zoo_bench.header("Evolved merges vs baselines: samplers at equal budget, several seeds", zoo, started, [
        f"- budget: {args.trials} trials per search, {args.seeds} sampler seeds per sampler and space, {docs}; the "
        f"chosen trial is scored on {tests}; objective = mean accuracy over the experts' tasks",
        f"- samplers: {', '.join(SAMPLERS)} (cmaes = evomerge's IPOP-CMA-ES; categorical parameters go to its random "
        "independent sampler); spaces: " + ", ".join(f"{s} (`{f}`)" for s, f in SPACES.items()),
        f"- studies (resumable): `{args.work}`; hand-tuned baseline from `{args.sweep_csv}`"])
    header, rows = results_table(runs, best, base_lines)
    lines += ["## Evolved merges (test: mean ± std over seeds)", "", markdown_table(header, rows), "",
              f"Δ: mean over seeds of (run's test − {best.label}'s test), paired by seed; the best baseline is the one "
              "with the highest validation objective. CI: 95% paired bootstrap (10,000 resamples). Last columns: test "
              "mean minus the baseline's; ✓ = by more than the spread (the larger std over seeds).", "",
              "Samplers at equal budget:", "", *sampler_lines(runs), "",
              f"![convergence]({stem}.png)", "",
              "## Baselines", "",
              markdown_table(["baseline", "recipe", "seeds", "validation", "test"],
                             [[b.label, b.recipe, str(len(b.val)), _ms(b.val), _ms(b.test)] for b in base_lines]), ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = zoo_bench.arg_parser(__doc__, "mini zoo, 2 seeds, 2 trials (the CI test)")
    parser.add_argument("--trials", type=int, help="trials per search (default 24; quick 2)")
    parser.add_argument("--seeds", type=int, help="sampler seeds per sampler and space (default 5; quick 2)")
    parser.add_argument("--confirm-top", type=int, help="re-score the k best trials of each search on more "
                        "validation docs and choose among them (`confirm_top`; default 3; quick 2; 0: off)")
    parser.add_argument("--confirm-limit", type=int, help="validation docs per task of the re-scoring (0: all; "
                        "default 40; quick 10)")
    parser.add_argument("--sweep-csv", default="results/method_sweep.csv", help="the method sweep's results")
    args = zoo_bench.parse_args(parser, argv, "search_vs_baselines", {
        "trials": (24, 2), "seeds": (5, 2), "limit": (15, 5), "test_limit": (100, 10), "confirm_top": (3, 2),
        "confirm_limit": (40, 10)})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.time()
    zoo = zoo_bench.find_zoo(args.zoo, args.quick)
    runs = []
    for space in SPACES:
        print(f"== {space}", flush=True)
        runs += searches(zoo, args, space)
    print("== baselines", flush=True)  # last: the method sweep (for the hand-tuned one) may run meanwhile
    base_lines = baselines(zoo, args)
    write_results(Path(args.out), zoo, args, started, runs, base_lines)
    print(f"wrote {args.out}/{'search_vs_baselines_quick' if args.quick else 'search_vs_baselines'}.md "
          f"({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
