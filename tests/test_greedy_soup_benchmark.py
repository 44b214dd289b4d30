"""benchmarks/greedy_soup.py --quick end to end on the mini zoo, checked against independent recomputations."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import Zoo
from evomerge.zoo.table import accuracy
from evomerge.zoo.taskfiles import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import greedy_soup  # noqa: E402


def averaged_model(zoo: Zoo, names: tuple[str, ...]) -> torch.nn.Module:
    """The uniform soup of ``names``, averaged here by hand from the safetensors."""
    states = [AutoModelForCausalLM.from_pretrained(zoo.model_dir(n)).state_dict() for n in names]
    model = AutoModelForCausalLM.from_pretrained(zoo.model_dir(names[0])).eval()
    model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return model


def test_quick_run_rows_are_consistent(mini_zoo: Zoo, tmp_path: Path) -> None:
    result = greedy_soup.main(["--quick", "--out", str(tmp_path)])
    rows = {row.name: row for row in result.rows}
    table = mini_zoo.table()
    task = mini_zoo.sweep_task
    # the engine's soup of one ingredient scores exactly what the build's scorer gave the ingredient itself
    for name, scores in result.ingredients.items():
        assert scores == {s: table[name][f"{task}/{s}"] for s in ("validation", "test")}
    best_val = max(s["validation"] for s in result.ingredients.values())
    assert rows["best individual (on validation)"].validation == best_val
    tok = AutoTokenizer.from_pretrained(mini_zoo.tokenizer_dir)
    items = {s: read_jsonl(mini_zoo.split_file(task, s)) for s in ("validation", "test")}
    for accept in (">", ">="):
        soup = result.soups[accept]
        row = rows[f"greedy soup ({accept})"]
        assert row.validation >= best_val  # greedy starts from the best ingredient and never gets worse
        # kept list: exactly the steps whose score beat (or tied, for >=) the best so far
        best, kept = -math.inf, []
        for step in soup.steps:
            take = step.score > best or (accept == ">=" and step.score == best)
            assert step.accepted == take and step.members == (*kept, step.ingredient)
            if take:
                kept.append(step.ingredient)
                best = step.score
        assert tuple(kept) == soup.kept and row.members == tuple(Path(k).name for k in kept)
        model = averaged_model(mini_zoo, row.members)
        assert row.validation == accuracy(model, tok, items["validation"]) == soup.greedy_score
        assert row.test == accuracy(model, tok, items["test"])
    assert len(result.soups[">="].kept) >= len(result.soups[">"].kept)
    uniform = rows["uniform soup"]
    assert len(uniform.members) == len(result.ingredients)
    for average in ("probs", "logits"):
        ensemble = rows[f"ensemble (mean {average})"]
        assert 0 < ensemble.validation <= 1 and 0 < ensemble.test <= 1

    with (tmp_path / "greedy_soup.csv").open() as f:
        written = list(csv.DictReader(f))
    assert [r["row"] for r in written[: len(result.rows)]] == [row.name for row in result.rows]
    assert float(written[2]["test"]) == uniform.test
    assert len(written) == len(result.rows) + len(result.ingredients)
    md = (tmp_path / "greedy_soup.md").read_text()
    assert "| greedy soup (>=) |" in md and "- commit:" in md and "deterministic" in md
    assert (tmp_path / "greedy_soup.png").stat().st_size > 10_000


def test_quick_refuses_an_explicit_zoo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        greedy_soup.main(["--quick", "--zoo", str(tmp_path)])
    assert "--quick uses the mini zoo" in capsys.readouterr().err
