"""Search -> merge -> eval end to end on the mini zoo, scored by lm-eval over the live model (the CI's honest run)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate import LmEvalEvaluator
from evomerge.search.config import RunConfig
from evomerge.search.study import run_search
from evomerge.zoo import Zoo
from evomerge.zoo.taskfiles import lm_eval_name

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def test_each_expert_scores_best_on_its_own_task_through_lm_eval(mini_zoo: Zoo) -> None:
    tasks = {task: lm_eval_name(task) for task in mini_zoo.experts}
    evaluator = LmEvalEvaluator(list(tasks.values()), include_path=mini_zoo.task_dir, metrics=["acc"],
                                include_defaults=False)
    tokenizer = AutoTokenizer.from_pretrained(mini_zoo.tokenizer_dir)
    scores = {}
    for expert, path in mini_zoo.experts.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        scores[expert] = evaluator.score(model, tokenizer).metrics
    for task, name in tasks.items():
        own = scores[task][f"{name}/acc"]
        others = {e: s[f"{name}/acc"] for e, s in scores.items() if e != task}
        assert own > max(others.values()), (task, own, others)


def test_search_merge_eval_on_the_mini_zoo(mini_zoo: Zoo, tmp_path: Path) -> None:
    """A short layer-wise DARE-TIES search of the zoo's experts: baselines, CMA-ES trials, test scores of the best
    and of the baselines, and an exported best model whose reloaded score equals the one the search recorded."""
    tasks = [lm_eval_name(t) for t in mini_zoo.experts]
    evaluator = {"type": "lm_eval", "tasks": tasks, "include_path": [str(mini_zoo.task_dir)], "metrics": ["acc"],
                 "include_defaults": False, "split": "validation"}
    config = RunConfig(name="e2e", base=str(mini_zoo.base), sources=[str(p) for p in mini_zoo.experts.values()],
                       space=str(SPACES / "ties_dare_layerwise.yaml"), evaluator=evaluator, n_trials=4,
                       out=str(tmp_path / "run"), device="cpu", seed=0)
    summary = run_search(config, progress=False)

    study = optuna.load_study(study_name="e2e", storage=config.storage_url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    kinds = [t.user_attrs["kind"] for t in complete]
    sources = [t for t in complete if t.user_attrs["kind"].startswith("baseline:source:")]
    assert len(sources) == len(mini_zoo.experts)
    assert "baseline:defaults" in kinds  # (dare_ties cannot express the plain average: no uniform baseline here)
    # n_trials counts the searched trials; the baselines (each source alone, the defaults) run on top
    assert kinds.count("search") == 4 and len(complete) == 4 + len(sources) + 1
    # every expert is good at one task of four; a merge of them beats each of them on the multi-task mean
    best = max(complete, key=lambda t: t.value)
    assert best.value > max(t.value for t in sources)
    assert not best.user_attrs["kind"].startswith("baseline:source:")
    # the test split scored the best and every baseline, never the search's other trials
    tested = {int(k.split(":")[1]) for k in study.user_attrs if k.startswith("test:")}
    assert tested == {best.number} | {t.number for t in complete if t.user_attrs["kind"].startswith("baseline")}
    assert summary["best_trial"] == best.number
    # the exported HF dir, loaded from disk, scores what the live model scored on the test split
    run = Path(config.out)
    exported = AutoModelForCausalLM.from_pretrained(run / "best_model").eval()
    test = LmEvalEvaluator(tasks, include_path=mini_zoo.task_dir, metrics=["acc"], include_defaults=False,
                           split="test")
    rescored = test.score(exported, AutoTokenizer.from_pretrained(run / "best_model"))
    recorded = study.user_attrs[f"test:{best.number}"]
    assert rescored.objective == pytest.approx(recorded["objective"], abs=1e-12)
    summary_md = (run / "report" / "summary.md").read_text()
    assert summary_md.count("| source: ") == len(sources)
    # the plain average, outside the dare_ties space, is scored beside the study; check it against an average
    # made here by hand
    uniform = study.user_attrs["reference:uniform"]
    assert "| uniform (linear, outside the space) |" in summary_md and "test_objective" in uniform
    experts = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in mini_zoo.experts.values()]
    average = AutoModelForCausalLM.from_pretrained(mini_zoo.base).eval()
    average.load_state_dict({k: sum(sd[k] for sd in experts) / len(experts) for k in experts[0]})
    validation = LmEvalEvaluator(tasks, include_path=mini_zoo.task_dir, metrics=["acc"], include_defaults=False)
    by_hand = validation.score(average, AutoTokenizer.from_pretrained(mini_zoo.tokenizer_dir)).objective
    assert uniform["values"][0] == pytest.approx(by_hand, abs=0.011)  # fp32 summation order: at most one item


def test_evaluator_equals_lm_eval_simple_evaluate_on_a_saved_zoo_expert(mini_zoo: Zoo) -> None:
    """Our reused-HFLM evaluator and lm-eval's own ``simple_evaluate(model="hf", pretrained=DIR)`` agree, per
    document, on a zoo expert's test split."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task, path = next(iter(mini_zoo.experts.items()))
    name = lm_eval_name(task)
    reference = simple_evaluate(
        model="hf", model_args=f"pretrained={path},dtype=float32", tasks=[name], device="cpu", batch_size=16,
        bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(mini_zoo.task_dir), include_defaults=False),
    )
    evaluator = LmEvalEvaluator([name], include_path=mini_zoo.task_dir, split="test", metrics=["acc", "acc_norm"],
                                include_defaults=False)
    ours = evaluator.score(AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    assert ours.metrics[f"{name}/acc"] == reference["results"][name]["acc,none"]
    assert ours.metrics[f"{name}/acc_norm"] == reference["results"][name]["acc_norm,none"]
    per_doc = {s["doc_id"]: s["acc"] for s in reference["samples"][name]}
    assert ours.items[f"{name}/acc"] == [per_doc[i] for i in evaluator.doc_ids()[name]]
