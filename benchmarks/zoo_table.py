"""The score table of a built zoo, with the merges a user would try first: is there headroom for a good merge?

Rows: every model of the zoo (base, experts, soup sweep; accuracies from the zoo's build-time table), then merges
of all experts made with ``evomerge merge``'s code path (``load_recipe`` + ``merge_to_dir`` on the recipe YAMLs
written beside the table) and scored by the same scorer (multiple-choice accuracy, equal to lm-eval's ``acc``):

* uniform average (``linear``, every weight 1): the plain soup of the experts;
* task arithmetic and TIES at the method defaults (weight 1, lambda 1; TIES density 1: sign election only);
* task arithmetic with lambda 0.3 (the scale the task-arithmetic paper, Ilharco et al. 2023, found best on
  held-out data for many tasks) and TIES with density 0.2 (the top-20% trim of Yadav et al. 2023).

Columns: every task on validation and test, and the mean over the expert tasks. The header carries the build time
(from the manifest, and from ``/usr/bin/time -v`` output when ``--build-log`` names it), the sha256 of every model
file (same config + library versions + machine + torch threads => the same hashes), versions, commit and date.

    python benchmarks/zoo_table.py --zoo /work/zoo-bench --build-log build.log   # -> results/zoo_bench/
    python benchmarks/zoo_table.py --quick --out /tmp/zt                          # the mini zoo of the tests
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
import yaml
from greedy_soup import provenance  # benchmarks/ is sys.path[0] when run as a script
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.merge import merge_to_dir
from evomerge.recipe import load_recipe
from evomerge.zoo import Zoo, ZooConfig, cached_zoo
from evomerge.zoo.table import Table, column, model_row
from evomerge.zoo.taskfiles import read_jsonl

SPLITS = ("validation", "test")
#: merge rows: name -> recipe fields besides the sources (every expert, in the zoo's order)
MERGES: dict[str, dict[str, object]] = {
    "merge: uniform average": {"method": "linear"},
    "merge: task arithmetic (defaults)": {"method": "task_arithmetic"},
    "merge: ties (defaults)": {"method": "ties"},
    "merge: task arithmetic (lambda 0.3)": {"method": "task_arithmetic", "parameters": {"lambda": 0.3}},
    "merge: ties (density 0.2)": {"method": "ties", "parameters": {"density": 0.2}},
}


def recipe_for(zoo: Zoo, fields: dict[str, object]) -> dict[str, object]:
    """The recipe YAML content of a merge of every expert of ``zoo``."""
    recipe: dict[str, object] = {**fields, "sources": [{"model": str(p)} for p in zoo.experts.values()]}
    if fields["method"] != "linear":
        recipe["base"] = str(zoo.base)
    return recipe


def merge_rows(zoo: Zoo, recipe_dir: Path, batch_size: int = 256) -> Table:
    """Write each recipe of :data:`MERGES` into ``recipe_dir``, merge it like ``evomerge merge`` and score it."""
    tokenizer = AutoTokenizer.from_pretrained(zoo.tokenizer_dir)
    items = {(t, s): read_jsonl(zoo.split_file(t, s)) for t in zoo.task_names for s in SPLITS}
    recipe_dir.mkdir(parents=True, exist_ok=True)
    rows: Table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, fields) in enumerate(MERGES.items()):
            path = recipe_dir / f"{re.sub(r'[^a-z0-9]+', '_', name.removeprefix('merge: ')).strip('_')}.yaml"
            path.write_text(yaml.safe_dump(recipe_for(zoo, fields), sort_keys=False))
            out = merge_to_dir(load_recipe(path), Path(tmp) / str(i))
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            rows[name] = model_row(model, tokenizer, items, batch_size)
    return rows


def expert_mean(row: dict[str, float], tasks: Sequence[str], split: str) -> float:
    """Mean accuracy of a table row over ``tasks`` on ``split``."""
    return sum(row[column(t, split)] for t in tasks) / len(tasks)


def build_log_summary(path: Path) -> str:
    """Wall time, CPU time and peak memory from ``/usr/bin/time -v`` output."""
    text = path.read_text()

    def field(label: str) -> str:
        match = re.search(rf"{re.escape(label)}: (.+)", text)
        return match.group(1).strip() if match else "?"

    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    rss = int(field("Maximum resident set size (kbytes)")) / 1024
    return f"`/usr/bin/time -v`: wall {field('Elapsed (wall clock) time (h:mm:ss or m:ss)')}, CPU {cpu:.0f} s, " \
           f"{field('Percent of CPU this job got')} CPU, max RSS {rss:.0f} MiB"


def model_hashes(zoo: Zoo) -> dict[str, str]:
    """sha256 (first 16 hex digits) of every model's safetensors file."""
    return {name: hashlib.sha256((zoo.model_dir(name) / "model.safetensors").read_bytes()).hexdigest()[:16]
            for name in zoo.model_names}


def write_outputs(zoo: Zoo, table: Table, out: Path, command: str, build_log: Path | None) -> None:
    tasks = list(zoo.experts)
    columns = [column(t, s) for t in zoo.task_names for s in SPLITS]
    with (out / "zoo_table.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["model", *columns, "expert_mean/validation", "expert_mean/test"])
        for name, row in table.items():
            writer.writerow([name, *(repr(row[c]) for c in columns),
                             *(repr(expert_mean(row, tasks, s)) for s in SPLITS)])
    config = ZooConfig.model_validate(zoo.manifest["config"])
    seconds = {name: m["seconds"] for name, m in zoo.manifest["models"].items()}
    lines = [
        f"# Zoo score table: {zoo.root.name} (config {zoo.config_hash})",
        "",
        *provenance(command),
        f"- model: Llama, {config.model.layers} layers, hidden {config.model.hidden}, {config.model.heads} heads "
        f"({config.model.kv_heads} KV), intermediate {config.model.intermediate}; "
        f"{config.n_validation} validation / {config.n_test} test items per task (test stderr <= "
        f"{0.5 / config.n_test ** 0.5:.3f})",
        f"- build: {zoo.manifest['build_seconds']:.0f} s by the manifest (base {seconds['base']:.0f} s, experts "
        f"{sum(v for k, v in seconds.items() if k.startswith('expert_')):.0f} s, sweep "
        f"{sum(v for k, v in seconds.items() if k.startswith('sweep_')):.0f} s, scoring the rest), "
        f"{config.threads} torch thread(s)" + (f"; {build_log_summary(build_log)}" if build_log else ""),
        "- merges: all experts, recipes in `recipes/` (paths of the zoo above), merged by `evomerge merge`'s code",
        "",
        "| model | " + " | ".join(columns) + " | expert mean val | expert mean test |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for name, row in table.items():
        cells = [f"{row[c]:.3f}" for c in columns] + [f"{expert_mean(row, tasks, s):.3f}" for s in SPLITS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "sha256 of every model file (first 16 hex digits; a rebuild with the same config, versions, "
              "machine and threads gives the same):", ""]
    lines += [f"- {name}: `{digest}`" for name, digest in model_hashes(zoo).items()]
    (out / "zoo_table.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> Table:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="a built zoo dir (default: the bench zoo from the cache)")
    parser.add_argument("--quick", action="store_true", help="the mini zoo of the tests")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results" / "zoo_bench")
    parser.add_argument("--build-log", type=Path, help="output of `/usr/bin/time -v evomerge zoo build ...`")
    args = parser.parse_args(argv)
    if args.quick and args.zoo:
        parser.error("--quick uses the mini zoo; drop --zoo or --quick")
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    zoo = Zoo.load(args.zoo) if args.zoo else cached_zoo(ZooConfig.mini() if args.quick else ZooConfig.bench())
    args.out.mkdir(parents=True, exist_ok=True)
    table = {**zoo.table(), **merge_rows(zoo, args.out / "recipes")}
    command = shlex.join(["python", "benchmarks/zoo_table.py", *(sys.argv[1:] if argv is None else argv)])
    write_outputs(zoo, table, args.out, command, args.build_log)
    print((args.out / "zoo_table.md").read_text())
    return table


if __name__ == "__main__":
    main()
