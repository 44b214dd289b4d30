"""benchmarks/zoo_table.py --quick on the mini zoo: the table rows, the merges' recipes and scores, the files."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.recipe import load_recipe
from evomerge.zoo import Zoo
from evomerge.zoo.table import accuracy
from evomerge.zoo.taskfiles import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import zoo_table  # noqa: E402


def test_quick_table_has_every_model_and_the_merges(mini_zoo: Zoo, tmp_path: Path) -> None:
    table = zoo_table.main(["--quick", "--out", str(tmp_path)])
    assert list(table)[: len(mini_zoo.model_names)] == mini_zoo.model_names
    assert list(table)[len(mini_zoo.model_names) :] == list(zoo_table.MERGES)
    recipes = {p.stem: load_recipe(p) for p in (tmp_path / "recipes").glob("*.yaml")}
    assert sorted(r.method for r in recipes.values()) == ["linear", "task_arithmetic", "task_arithmetic", "ties",
                                                          "ties"]
    assert recipes["ties_density_0_2"].parameters["density"] == 0.2
    assert [s.model for s in recipes["uniform_average"].sources] == [str(p) for p in mini_zoo.experts.values()]
    # the uniform merge scores what a hand-made average of the experts scores (up to float rounding of one item)
    experts = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in mini_zoo.experts.values()]
    model = AutoModelForCausalLM.from_pretrained(mini_zoo.base).eval()
    model.load_state_dict({k: sum(sd[k] for sd in experts) / len(experts) for k in experts[0]})
    tok = AutoTokenizer.from_pretrained(mini_zoo.base)
    items = read_jsonl(mini_zoo.split_file("sort", "test"))
    assert table["merge: uniform average"]["sort/test"] == pytest.approx(accuracy(model, tok, items), abs=0.011)

    with (tmp_path / "zoo_table.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    tasks = list(mini_zoo.experts)
    mean = sum(table["base"][f"{t}/validation"] for t in tasks) / len(tasks)
    assert float(rows["base"]["expert_mean/validation"]) == pytest.approx(mean)
    md = (tmp_path / "zoo_table.md").read_text()
    assert "| merge: ties (density 0.2) |" in md and "- build:" in md and "sha256" in md
