"""The demo, end to end on the built-in tiny model zoo (``bash scripts/demo.sh``).

1. builds the zoo (or reuses it) and prints its score table: every model on every task;
2. searches a layer-wise DARE-TIES merge of the zoo's experts (Optuna, baselines first), scored by lm-eval on the
   experts' validation splits, and reports the best merge beside every expert and the uniform baseline on the test
   splits;
3. cooks the uniform and greedy soups of the zoo's same-task sweep;
4. writes a report (tables, plots) per run and prints the summaries.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from evomerge.search.config import RunConfig
from evomerge.search.study import run_search, run_soup
from evomerge.zoo import ZooConfig, build_zoo
from evomerge.zoo.taskfiles import lm_eval_name

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def lm_eval_spec(tasks: list[str], task_dir: Path) -> dict:
    """lm-eval over the zoo's local task files; objective: the mean accuracy over ``tasks``."""
    return {"type": "lm_eval", "tasks": tasks, "include_path": [str(task_dir)], "split": "validation",
            "metrics": ["acc"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mini", action="store_true", help="the ~1-minute zoo of the tests, and a shorter search")
    parser.add_argument("--out", default="runs/demo", help="where the zoo and the runs go")
    parser.add_argument("--trials", type=int, help="search trials (default 40, mini 12)")
    parser.add_argument("--space", default=str(SPACES / "ties_dare_layerwise.yaml"))
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out) / ("mini" if args.mini else "full")

    print("== 1. the tiny model zoo", flush=True)
    zoo = build_zoo(out / "zoo", ZooConfig.mini() if args.mini else ZooConfig.full())
    print((zoo.root / "table.md").read_text())

    print("== 2. search: a layer-wise merge of the experts", flush=True)
    tasks = list(zoo.experts)
    search = RunConfig(
        name="experts", base=str(zoo.base), sources=[str(zoo.experts[t]) for t in tasks], space=args.space,
        evaluator=lm_eval_spec([lm_eval_name(t) for t in tasks], zoo.task_dir),
        n_trials=args.trials or (12 if args.mini else 40),
        out=str(out / "search"), device=args.device, seed=0,
    )
    summary = run_search(search)
    print((Path(summary["report"])).read_text())

    print("== 3. soups of the same-task sweep", flush=True)
    soup = RunConfig(
        name="soup", sources=[str(p) for p in zoo.sweep],
        evaluator=lm_eval_spec([lm_eval_name(zoo.sweep_task)], zoo.task_dir),
        out=str(out / "soup"), device=args.device, seed=0,
    )
    summary = run_soup(soup)
    print((Path(summary["report"])).read_text())
    print(f"greedy soup: kept {len(summary['kept'])} of {len(zoo.sweep)} ingredients ({', '.join(summary['kept'])})")
    print(f"runs, reports and merged models are in {out}/")


if __name__ == "__main__":
    main()
