"""lm-eval settings of the evaluator on the mini zoo, each checked against lm-eval's own ``simple_evaluate`` on the
saved model: the zoo's generation task (greedy decoding, ``strict-match`` filter, exact match), ``num_fewshot`` and
lm-eval's first-N ``limit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate import EvaluationError, LmEvalEvaluator
from evomerge.zoo import Zoo
from evomerge.zoo.taskfiles import generation_name, lm_eval_name, read_jsonl


def _reference(zoo: Zoo, model: str, task: str, **kwargs: Any) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="hf", model_args=f"pretrained={zoo.model_dir(model)},dtype=float32", tasks=[task], device="cpu",
        batch_size=32, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(zoo.task_dir), include_defaults=False), **kwargs,
    )


def _load(zoo: Zoo, model: str) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(zoo.model_dir(model)).eval(), AutoTokenizer.from_pretrained(zoo.base)


def test_generation_task_exact_match_equals_lm_eval_with_first_n_limit(mini_zoo: Zoo) -> None:
    """``zoo_reverse_gen`` answered by greedy generation: metric ``exact_match`` without a filter is the task's
    ``exact_match,strict-match``; the first 40 docs (lm-eval's ``--limit 40``) score as in lm-eval, per doc."""
    task = generation_name("reverse")
    cfg = yaml.safe_load((mini_zoo.task_dir / f"{task}.yaml").read_text())
    assert cfg["output_type"] == "generate_until" and cfg["filter_list"][0]["name"] == "strict-match"
    scores = {}
    for name in ("expert_reverse", "base"):
        reference = _reference(mini_zoo, name, task, limit=40)
        ev = LmEvalEvaluator([task], include_path=mini_zoo.task_dir, split="test", limit=40, limit_mode="first",
                             metrics=["exact_match"], include_defaults=False)
        key = f"{task}/exact_match,strict-match"
        assert ev.objective.metrics == (key,)
        assert sorted(ev.doc_ids()[task]) == list(range(40))
        ours = ev.score(*_load(mini_zoo, name))
        assert ours.metrics[key] == reference["results"][task]["exact_match,strict-match"]
        per_doc = {s["doc_id"]: s["exact_match"] for s in reference["samples"][task]}
        assert ours.items[key] == [per_doc[i] for i in ev.doc_ids()[task]]
        scores[name] = ours.metrics[key]
    # generation is honest: the expert answers its own task better than the base (whose answers follow the
    # confuser half the time)
    assert scores["expert_reverse"] > scores["base"] + 0.05, scores


def test_sampled_generation_draws_what_lm_eval_draws_with_the_same_seeds_in_every_trial(mini_zoo: Zoo) -> None:
    """``gen_kwargs`` with ``do_sample``: each score() seeds random / NumPy / torch as simple_evaluate does (lm-eval's
    default seeds 0 / 1234 / 1234), so every call (trial) gives lm-eval's per-doc answers on the same 40 docs; another
    torch seed gives other answers (the test can tell), and the caller's torch generator is left where it was."""
    import torch

    task = generation_name("reverse")
    gen = {"do_sample": True, "temperature": 0.5, "max_gen_toks": 8}
    key = f"{task}/exact_match,strict-match"
    model, tokenizer = _load(mini_zoo, "expert_reverse")

    def evaluator(**seeds: int) -> LmEvalEvaluator:
        return LmEvalEvaluator([task], include_path=mini_zoo.task_dir, split="test", limit=40, limit_mode="first",
                               metrics=["exact_match"], gen_kwargs=gen, include_defaults=False, **seeds)

    ev = evaluator()
    torch.manual_seed(99)
    state = torch.get_rng_state()
    first = ev.score(model, tokenizer)
    assert torch.equal(torch.get_rng_state(), state)
    assert ev.score(model, tokenizer).items[key] == first.items[key]  # the next trial draws the same
    reference = _reference(mini_zoo, "expert_reverse", task, limit=40, gen_kwargs=gen)
    per_doc = {s["doc_id"]: s["exact_match"] for s in reference["samples"][task]}
    assert first.items[key] == [per_doc[i] for i in ev.doc_ids()[task]]
    assert first.metrics[key] == reference["results"][task]["exact_match,strict-match"]
    assert 0 < first.metrics[key] < 1
    assert evaluator(torch_random_seed=5).score(model, tokenizer).items[key] != first.items[key]


def test_num_fewshot_and_first_n_limit_equal_lm_eval(mini_zoo: Zoo) -> None:
    """2-shot prompts (examples drawn by lm-eval's sampler from the train split) on the first 30 docs."""
    task = lm_eval_name("shift")
    reference = _reference(mini_zoo, "expert_shift", task, num_fewshot=2, limit=30)
    ev = LmEvalEvaluator([task], include_path=mini_zoo.task_dir, split="test", limit=30, limit_mode="first",
                         num_fewshot=2, metrics=["acc", "acc_norm"], include_defaults=False)
    ours = ev.score(*_load(mini_zoo, "expert_shift"))
    assert ours.metrics[f"{task}/acc"] == reference["results"][task]["acc,none"]
    assert ours.metrics[f"{task}/acc_norm"] == reference["results"][task]["acc_norm,none"]
    per_doc = {s["doc_id"]: s["acc"] for s in reference["samples"][task]}
    assert ours.items[f"{task}/acc"] == [per_doc[i] for i in ev.doc_ids()[task]]
    # the prompts really hold two solved train examples before the query
    train = {item["query"] for item in read_jsonl(mini_zoo.split_file("shift", "train"))}
    context = ev.request_args()[0][0]
    shots = context.split("\n\n")
    assert len(shots) == 3 and all(shot.split(" ")[0] in train for shot in shots[:2])
    # and the same ones as lm-eval's (its sampler draws per doc in doc order)
    first = next(s for s in reference["samples"][task] if s["doc_id"] == 0)
    mine = ev.request_args()[4 * ev.doc_ids()[task].index(0)]
    assert mine == tuple(first["arguments"][0])


def test_a_metric_without_filter_means_the_tasks_filters_in_metrics_weights_and_defaults(mini_zoo: Zoo) -> None:
    gen, mc = generation_name("reverse"), lm_eval_name("sort")
    kwargs: dict[str, Any] = {"include_path": mini_zoo.task_dir, "include_defaults": False}
    expected = (f"{gen}/exact_match,strict-match", f"{mc}/acc")
    ev = LmEvalEvaluator([gen, mc], metrics=[f"{gen}/exact_match", f"{mc}/acc"],
                         weights={f"{gen}/exact_match": 3.0, f"{mc}/acc": 1.0}, **kwargs)
    assert ev.objective.metrics == expected and ev.objective.weights == (3.0, 1.0)
    assert LmEvalEvaluator([gen, mc], **kwargs).objective.metrics == expected  # each task's first metric, filter
    with pytest.raises(EvaluationError, match=rf"'acc' is not produced by '{gen}'.*pairs.*: exact_match,strict-match"):
        LmEvalEvaluator([gen, mc], metrics=["acc"], **kwargs)


@pytest.mark.parametrize("mode", ["seeded", "first"])
def test_limit_modes_choose_their_docs(mini_zoo: Zoo, mode: str) -> None:
    ev = LmEvalEvaluator([lm_eval_name("sort")], include_path=mini_zoo.task_dir, limit=0.1, limit_mode=mode, seed=5,
                         include_defaults=False)
    ids = ev.doc_ids()[lm_eval_name("sort")]
    assert len(ids) == 10  # ceil(0.1 * 100), lm-eval's fraction rule
    assert (sorted(ids) == list(range(10))) == (mode == "first")


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] | upper }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def test_chat_template_system_instruction_and_gen_kwargs_equal_lm_eval(mini_zoo: Zoo, tmp_path: Path) -> None:
    """``apply_chat_template`` (few-shot as multiturn, lm-eval's default with a chat template), a system instruction,
    one shot and ``gen_kwargs`` on the generation task, as lm-eval's CLI options of the same names."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tokenizer = _load(mini_zoo, "expert_reverse")
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    task = generation_name("reverse")
    settings: dict[str, Any] = {"apply_chat_template": True, "system_instruction": "reverse", "num_fewshot": 1,
                                "gen_kwargs": "max_gen_toks=5", "limit": 20}
    reference = simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path},dtype=float32", tasks=[task], device="cpu", batch_size=32,
        bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(mini_zoo.task_dir), include_defaults=False), **settings,
    )
    ev = LmEvalEvaluator([task], include_path=mini_zoo.task_dir, split="test", limit_mode="first",
                         include_defaults=False, **settings)
    assert ev.objective.metrics == (f"{task}/exact_match,strict-match",)
    assert ev._tasks[task].config.generation_kwargs["max_gen_toks"] == 5
    ours = ev.score(model, tokenizer)
    samples = {s["doc_id"]: s for s in reference["samples"][task]}
    context = ev.request_args()[0][0]
    assert context == samples[ev.doc_ids()[task][0]]["arguments"][0][0]
    assert context.startswith("S:reverse\nU:") and context.endswith("A:") and context.count("U:") == 2
    assert ours.metrics[f"{task}/exact_match,strict-match"] == reference["results"][task]["exact_match,strict-match"]
    assert ours.items[f"{task}/exact_match,strict-match"] == [samples[i]["exact_match"] for i in ev.doc_ids()[task]]


@pytest.mark.slow
def test_lm_eval_cli_reproduces_the_test_score_and_stderr(mini_zoo: Zoo, tmp_path: Path) -> None:
    """``lm-eval run`` itself (a subprocess, as a user runs it) over a zoo expert with --limit and --gen_kwargs: the
    evaluator's test-split score and its stderr (lm-eval's default bootstrap_iters) are the CLI's. (The zoo models
    never saw few-shot prompts: with shots they answer nothing right, which would make the check blind.)"""
    import json
    import shutil
    import subprocess
    import sys

    task = generation_name("reverse")
    out = tmp_path / "out"
    cli = Path(sys.executable).with_name("lm-eval")
    subprocess.run(
        [str(cli) if cli.exists() else shutil.which("lm-eval"), "run", "--model", "hf", "--model_args",
         f"pretrained={mini_zoo.model_dir('expert_reverse')}", "dtype=float32", "--tasks", task,
         "--include_path", str(mini_zoo.task_dir), "--limit", "40",
         "--gen_kwargs", "max_gen_toks=8", "--device", "cpu", "--batch_size", "32", "--output_path", str(out)],
        check=True, capture_output=True, text=True,
    )
    (results,) = out.rglob("results_*.json")
    reference = json.loads(results.read_text())["results"][task]
    ev = LmEvalEvaluator([task], include_path=mini_zoo.task_dir, split="test", limit=40, limit_mode="first",
                         gen_kwargs={"max_gen_toks": 8}, include_defaults=False)
    ours = ev.score(*_load(mini_zoo, "expert_reverse"))
    key = f"{task}/exact_match,strict-match"
    assert ours.metrics[key] == reference["exact_match,strict-match"]
    assert ours.stderr[key] == pytest.approx(reference["exact_match_stderr,strict-match"], abs=1e-12)
    assert 0 < ours.metrics[key] < 1  # a score that can tell a wrong request from a right one
