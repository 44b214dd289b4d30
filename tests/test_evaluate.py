"""Tests of evomerge.evaluate: lm-eval evaluator on the live model, perplexity, callable, factory, FastHFLM.

Fixtures: a byte-level BPE tokenizer trained here, tiny random ``LlamaForCausalLM`` models (hidden 32, 2 layers)
and two local multiple-choice tasks:
* ``ev_known``: every doc's choices are identical strings, so every choice gets the same log-likelihood and
  lm-eval's argmax picks choice 0 whatever the model: a doc's acc is ``gold == 0``, known by construction;
  validation and test use different gold patterns, hence different known accuracies.
* ``ev_random``: random words, four different choices: the score depends on the weights.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.evaluate import (
    CallableEvaluator,
    EvaluationError,
    Evaluator,
    LmEvalEvaluator,
    Objective,
    PerplexityEvaluator,
    build_evaluator,
    write_multiple_choice_task,
)
from evomerge.evaluate.base import fidelity_count, seeded_order
from evomerge.evaluate.fast_hflm import FastHFLM
from evomerge.evaluate.perplexity import sliding_windows

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut", "red", "blue", "big", "small"]
N_KNOWN = 12


def _gold_known(split: str, i: int) -> int:
    """ev_known gold index: validation has gold 0 on every third doc (acc 4/12), test on all but every fourth (9/12)."""
    return 0 if (i % 3 == 0 if split == "validation" else i % 4 != 0) else 1


def _known_items(split: str) -> list[dict[str, Any]]:
    return [{"query": f"q{i} {WORDS[i % len(WORDS)]} ->", "choices": ["same", "same"], "gold": _gold_known(split, i)}
            for i in range(N_KNOWN)]


def _random_items(rng: random.Random, n: int) -> list[dict[str, Any]]:
    return [{"query": " ".join(rng.choice(WORDS) for _ in range(5)) + " ->",
             "choices": [rng.choice(WORDS) for _ in range(4)], "gold": rng.randrange(4)} for _ in range(n)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_multiple_choice_task(root, "ev_known", {s: _known_items(s) for s in ("validation", "test")})
    rng = random.Random(7)
    write_multiple_choice_task(root, "ev_random", {s: _random_items(rng, 24) for s in ("validation", "test")})
    return root


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_a(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return _tiny_llama(tokenizer, seed=1)


# ---------------------------------------------------------------- lm-eval evaluator


def test_split_selection_evaluates_the_chosen_split(task_dir: Path, tokenizer: Any, model_a: Any) -> None:
    for split, expected in (("validation", 4 / 12), ("test", 9 / 12)):
        ev = LmEvalEvaluator(["ev_known"], include_path=task_dir, split=split, include_defaults=False)
        result = ev.score(model_a, tokenizer)
        assert result.metrics["ev_known/acc"] == pytest.approx(expected)
        assert result.objective == pytest.approx(expected)
        assert result.n_items == N_KNOWN


def test_fidelity_subsets_are_nested_deterministic_and_items_align(
    task_dir: Path, tokenizer: Any, model_a: Any
) -> None:
    ev = LmEvalEvaluator(["ev_known"], include_path=task_dir, split="validation", seed=3, include_defaults=False)
    full_ids = ev.doc_ids(1.0)["ev_known"]
    assert full_ids == seeded_order(N_KNOWN, 3) and sorted(full_ids) == list(range(N_KNOWN))
    previous: list[float] = []
    for fidelity in (0.25, 0.5, 1.0):
        result = ev.score(model_a, tokenizer, fidelity=fidelity)
        items = result.items["ev_known/acc"]
        n = math.ceil(fidelity * N_KNOWN)
        assert result.n_items == len(items) == n
        # per-item acc is known by construction: gold == 0, for the docs in fidelity order
        assert items == [float(_gold_known("validation", i) == 0) for i in full_ids[:n]]
        assert items[: len(previous)] == previous
        assert result.metrics["ev_known/acc"] == pytest.approx(sum(items) / n)
        previous = items
    same_seed = LmEvalEvaluator(["ev_known"], include_path=task_dir, seed=3, include_defaults=False)
    other_seed = LmEvalEvaluator(["ev_known"], include_path=task_dir, seed=4, include_defaults=False)
    file_order = LmEvalEvaluator(["ev_known"], include_path=task_dir, seed=None, include_defaults=False)
    limited = LmEvalEvaluator(["ev_known"], include_path=task_dir, seed=3, limit=5, include_defaults=False)
    assert same_seed.doc_ids()["ev_known"] == full_ids
    assert other_seed.doc_ids()["ev_known"] != full_ids
    assert file_order.doc_ids()["ev_known"] == list(range(N_KNOWN))
    assert limited.doc_ids()["ev_known"] == full_ids[:5]
    assert limited.score(model_a, tokenizer).items["ev_known/acc"] == previous[:5]


def test_in_place_weight_change_changes_the_score(task_dir: Path, tokenizer: Any) -> None:
    live, other = _tiny_llama(tokenizer, seed=1), _tiny_llama(tokenizer, seed=2)
    ev = LmEvalEvaluator(["ev_random"], include_path=task_dir, metrics=["acc", "acc_norm"], include_defaults=False)
    before = ev.score(live, tokenizer)
    lm = ev._lm
    reference = LmEvalEvaluator(["ev_random"], include_path=task_dir, metrics=["acc", "acc_norm"],
                                include_defaults=False).score(other, tokenizer)
    assert before.items != reference.items  # the two models really score differently
    with torch.no_grad():
        for p, q in zip(live.parameters(), other.parameters(), strict=True):
            p.data.copy_(q)
    after = ev.score(live, tokenizer)
    assert ev._lm is lm and lm.model is live  # one HFLM around the same live object, no copy
    assert after.metrics == reference.metrics
    assert after.items == reference.items


def test_scores_equal_lm_eval_simple_evaluate_on_a_saved_model(
    task_dir: Path, tokenizer: Any, model_a: Any, tmp_path: Path
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_a.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reference = simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path},dtype=float32", tasks=["ev_random"], device="cpu",
        batch_size=8, bootstrap_iters=0, log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    ev = LmEvalEvaluator(["ev_random"], include_path=task_dir, split="test", batch_size=8,
                         metrics=["acc", "acc_norm"], include_defaults=False)
    ours = ev.score(model_a, tokenizer)
    assert ours.metrics["ev_random/acc"] == reference["results"]["ev_random"]["acc,none"]
    assert ours.metrics["ev_random/acc_norm"] == reference["results"]["ev_random"]["acc_norm,none"]
    per_doc = {s["doc_id"]: s["acc"] for s in reference["samples"]["ev_random"]}
    assert ours.items["ev_random/acc"] == [per_doc[i] for i in ev.doc_ids()["ev_random"]]


def test_objective_weights_and_two_tasks(task_dir: Path, tokenizer: Any, model_a: Any) -> None:
    ev = LmEvalEvaluator(["ev_known", "ev_random"], include_path=task_dir, split="test",
                         weights={"ev_known/acc": 3.0, "ev_random/acc": 1.0}, include_defaults=False)
    result = ev.score(model_a, tokenizer)
    known, rnd = result.metrics["ev_known/acc"], result.metrics["ev_random/acc"]
    assert known == pytest.approx(9 / 12)
    assert result.objectives == [known, rnd]
    assert result.objective == pytest.approx((3 * known + rnd) / 4)
    assert result.n_items == N_KNOWN + 24
    assert ev.objective.direction == "maximize" and isinstance(ev, Evaluator)


def test_configuration_errors_are_clear_and_early(task_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"unknown lm-eval task.*'ev_nope'.*ev_known.*ev_random"):
        LmEvalEvaluator(["ev_nope"], include_path=task_dir, include_defaults=False)
    with pytest.raises(EvaluationError, match=r"'f1' is not produced by 'ev_random'.*pairs.*: acc,none, acc_norm,none"):
        LmEvalEvaluator(["ev_random"], include_path=task_dir, metrics=["f1"], include_defaults=False)
    with pytest.raises(EvaluationError, match=r"'ev_nope/acc' names 'ev_nope'.*evaluated: \['ev_random'\]"):
        LmEvalEvaluator(["ev_random"], include_path=task_dir, metrics=["ev_nope/acc"], include_defaults=False)
    with pytest.raises(EvaluationError, match=r"'acc,strict-match' is not produced by 'ev_random'"):
        LmEvalEvaluator(["ev_random"], include_path=task_dir, metrics=["acc,strict-match"], include_defaults=False)
    with pytest.raises(EvaluationError, match="limit_mode"):
        LmEvalEvaluator(["ev_random"], include_path=task_dir, limit=3, limit_mode="last", include_defaults=False)
    with pytest.raises(EvaluationError, match="fewshot_as_multiturn needs apply_chat_template"):
        LmEvalEvaluator(["ev_random"], include_path=task_dir, fewshot_as_multiturn=True, include_defaults=False)
    broken = tmp_path / "broken"
    yaml_path = write_multiple_choice_task(broken, "ev_gone", {s: _known_items(s) for s in ("validation", "test")})
    missing = broken / "ev_gone_validation.jsonl"
    missing.unlink()
    with pytest.raises(EvaluationError) as err:
        LmEvalEvaluator(["ev_gone"], include_path=broken, include_defaults=False)
    assert str(missing) in str(err.value) and str(yaml_path) in str(err.value)
    test_only = tmp_path / "test_only"
    write_multiple_choice_task(test_only, "ev_test_only", {"test": _known_items("test")})
    with pytest.raises(EvaluationError, match="no validation split"):
        LmEvalEvaluator(["ev_test_only"], include_path=test_only, split="validation", include_defaults=False)
    with pytest.raises(EvaluationError, match="fidelity"):
        LmEvalEvaluator(["ev_known"], include_path=task_dir, include_defaults=False).score(None, None, fidelity=0.0)


# ---------------------------------------------------------------- FastHFLM


def test_fast_hflm_matches_hflm_and_a_hand_computation(tokenizer: Any, model_a: Any) -> None:
    from lm_eval.models.huggingface import HFLM

    rng = random.Random(0)
    vocab = len(tokenizer)
    contexts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 14))] for _ in range(6)]
    requests = []
    for ctx in contexts:  # multi-token continuations, and one-token ones that share the context (grouped)
        requests += [(("", ""), ctx, [rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))]) for _ in range(2)]
        requests += [(("", ""), ctx, [t]) for t in rng.sample(range(3, vocab), 3)]
    with torch.no_grad():  # one request whose continuation is the greedy decode (is_greedy must be True)
        ctx, cont = list(contexts[0]), []
        for _ in range(3):
            cont.append(int(model_a(torch.tensor([ctx + cont])).logits[0, -1].argmax()))
    requests.append((("", ""), ctx, cont))
    fast = FastHFLM(pretrained=model_a, tokenizer=tokenizer, batch_size=4, max_length=12)
    stock = HFLM(pretrained=model_a, tokenizer=tokenizer, batch_size=4, max_length=12)
    ours, theirs = fast._loglikelihood_tokens(requests), stock._loglikelihood_tokens(requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert ours[-1][1] is True
    for (ll, _), (ll_ref, _) in zip(ours, theirs, strict=True):
        assert ll == pytest.approx(ll_ref, abs=1e-5)
    # two requests with equal context + continuation[:-1] but continuations of different lengths share one
    # forward pass; each must be read at its own last positions (stock HFLM reads the shorter one elsewhere)
    a, b, c, d = 5, 6, 7, 8
    requests += [(("", ""), [a, b], [c, d]), (("", ""), [a, b, c], [d])]
    ours = fast._loglikelihood_tokens(requests)
    assert fast._loglikelihood_tokens(requests) == ours  # the reused batch plan gives the same answers
    with torch.no_grad():  # independent: sum of log p(cont_j | ...) over the truncated window of 12 tokens
        for (_, ctx, cont), (ll, _) in zip(requests, ours, strict=True):
            inp = (ctx + cont)[-13:][:-1]
            logprobs = F.log_softmax(model_a(torch.tensor([inp])).logits[0], dim=-1)
            expected = sum(float(logprobs[len(inp) - len(cont) + j, t]) for j, t in enumerate(cont))
            assert ll == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- perplexity


def test_sliding_windows_score_every_token_once_with_context() -> None:
    for n_tokens, max_length, stride in ((2, 4, 1), (10, 4, 1), (10, 4, 3), (17, 5, 2), (30, 64, 32), (9, 8, 7)):
        windows = sliding_windows(n_tokens, max_length, stride)
        scored = [t for w in windows for t in range(w.first_target, w.end)]
        assert scored == list(range(1, n_tokens))  # each text token exactly once, in order
        for k, w in enumerate(windows):
            assert w.end - w.begin <= max_length and w.first_target > w.begin
            if k > 0:
                assert w.first_target - w.begin >= max_length - stride
    with pytest.raises(EvaluationError, match="stride"):
        sliding_windows(10, 4, 4)


def _write_docs(path: Path, docs: list[str]) -> Path:
    import json

    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


DOCS = ["apple pear plum fig", "kiwi lime date nut red blue big small apple", "fig fig fig", "small big red"]


def _reference_nll(model: Any, tokenizer: Any, docs: list[str]) -> tuple[float, int, int]:
    """Full-sequence NLL of every doc, by hand: ``-sum_t log_softmax(logits[t - 1])[x_t]``, plus token/byte counts."""
    total, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"]]])
            logprobs = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            total -= float(logprobs.gather(1, ids[0, 1:, None]).sum())
            tokens += ids.shape[1] - 1
            n_bytes += len(doc.encode("utf-8"))
    return total, tokens, n_bytes


def test_perplexity_equals_a_single_window_hand_computation(tmp_path: Path, tokenizer: Any, model_a: Any) -> None:
    ev = PerplexityEvaluator(_write_docs(tmp_path / "docs.jsonl", DOCS), max_length=64, batch_size=3)
    result = ev.score(model_a, tokenizer)
    nll, tokens, n_bytes = _reference_nll(model_a, tokenizer, DOCS)
    assert result.metrics["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result.metrics["bits_per_byte"] == pytest.approx(nll / (n_bytes * math.log(2)), rel=1e-5)
    assert result.objective == result.metrics["bits_per_byte"] and ev.objective.direction == "minimize"
    assert len(result.items["bits_per_byte"]) == len(DOCS) == result.n_items


class BigramLM(torch.nn.Module):
    """``logits[t]`` depends on ``input_ids[t]`` only, so any window with >= 1 context token gives the exact NLL."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)
        self.config = SimpleNamespace(max_position_embeddings=256)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table(input_ids))


def test_sliding_window_perplexity_covers_every_token(tmp_path: Path, tokenizer: Any) -> None:
    model = BigramLM(len(tokenizer))
    path = _write_docs(tmp_path / "docs.jsonl", DOCS)
    nll, tokens, _ = _reference_nll(model, tokenizer, DOCS)
    for max_length, stride in ((4, 1), (4, 3), (5, 2), (64, 32)):
        result = PerplexityEvaluator(path, max_length=max_length, stride=stride, batch_size=2).score(model, tokenizer)
        assert result.metrics["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-6)


def test_perplexity_fidelity_and_errors(tmp_path: Path, tokenizer: Any) -> None:
    model = BigramLM(len(tokenizer))
    ev = PerplexityEvaluator(_write_docs(tmp_path / "docs.jsonl", DOCS), max_length=16, seed=5)
    half = ev.score(model, tokenizer, fidelity=0.5)
    chosen = [DOCS[i] for i in seeded_order(len(DOCS), 5)[: fidelity_count(len(DOCS), 0.5)]]
    nll, tokens, _ = _reference_nll(model, tokenizer, chosen)
    assert half.n_items == 2 and half.metrics["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-6)
    (tmp_path / "paragraphs.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    from_txt = PerplexityEvaluator(tmp_path / "paragraphs.txt", max_length=16).score(model, tokenizer)
    nll, tokens, _ = _reference_nll(model, tokenizer, DOCS)
    assert from_txt.n_items == len(DOCS)
    assert from_txt.metrics["nll_per_token"] == pytest.approx(nll / tokens, rel=1e-6)
    with pytest.raises(EvaluationError, match="does not exist"):
        PerplexityEvaluator(tmp_path / "nope.jsonl")
    with pytest.raises(EvaluationError, match="no string field 'body'"):
        PerplexityEvaluator(tmp_path / "docs.jsonl", text_field="body")
    with pytest.raises(EvaluationError, match="stride"):
        PerplexityEvaluator(tmp_path / "docs.jsonl", max_length=8, stride=8)


# ---------------------------------------------------------------- callable, factory, objective

SEEN: dict[str, Any] = {}


def two_metrics(model: Any, tokenizer: Any) -> dict[str, float]:
    """A user score: records the scoring context, returns two metrics."""
    SEEN.update(training=model.training, inference=torch.is_inference_mode_enabled())
    return {"a": 1.0, "b": 3.0}


def with_fidelity(model: Any, tokenizer: Any, fidelity: float) -> float:
    return fidelity * 10


def returns_text(model: Any, tokenizer: Any) -> str:
    return "good"


def test_callable_evaluator(model_a: Any) -> None:
    model_a.train()
    ev = CallableEvaluator(f"{__name__}:two_metrics", metrics=["a", "b"], weights={"a": 1.0, "b": 3.0})
    result = ev.score(model_a, None)
    assert result.metrics == {"a": 1.0, "b": 3.0} and result.objectives == [1.0, 3.0]
    assert result.objective == pytest.approx((1 * 1 + 3 * 3) / 4)
    assert SEEN == {"training": False, "inference": True} and model_a.training  # mode restored after scoring
    model_a.eval()
    assert CallableEvaluator(with_fidelity).score(model_a, None, fidelity=0.5).objective == pytest.approx(5.0)
    assert CallableEvaluator(two_metrics).score(model_a, None).objective == pytest.approx(2.0)


def test_callable_evaluator_errors(model_a: Any) -> None:
    with pytest.raises(EvaluationError, match="cannot import module 'no_such_module_xyz'"):
        CallableEvaluator("no_such_module_xyz:f")
    with pytest.raises(EvaluationError, match="has no attribute 'missing'.*two_metrics"):
        CallableEvaluator(f"{__name__}:missing")
    with pytest.raises(EvaluationError, match="package.module:function"):
        CallableEvaluator("no colon here")
    with pytest.raises(EvaluationError, match="must accept"):
        CallableEvaluator(lambda model: 1.0)
    with pytest.raises(EvaluationError, match="must return a finite float.*str"):
        CallableEvaluator(returns_text).score(model_a, None)
    with pytest.raises(EvaluationError, match="must return a finite float"):
        CallableEvaluator(lambda m, t: {"a": "x"}).score(model_a, None)


def test_build_evaluator(task_dir: Path, tmp_path: Path) -> None:
    ev = build_evaluator({"type": "lm_eval", "tasks": ["ev_known"], "include_path": str(task_dir),
                          "include_defaults": False, "split": "test"})
    assert isinstance(ev, LmEvalEvaluator) and ev.split == "test"
    ppl = build_evaluator({"type": "perplexity", "path": _write_docs(tmp_path / "d.jsonl", DOCS)})
    assert isinstance(ppl, PerplexityEvaluator)
    assert isinstance(build_evaluator({"type": "callable", "function": f"{__name__}:two_metrics"}), CallableEvaluator)
    with pytest.raises(EvaluationError, match=r"must be one of \['callable', 'lm_eval', 'perplexity'\]"):
        build_evaluator({"type": "bleu"})
    with pytest.raises(EvaluationError, match=r"unknown keys \['task'\], missing keys \['tasks'\]"):
        build_evaluator({"type": "lm_eval", "task": "ev_known"})


def test_objective_arithmetic_and_validation() -> None:
    objective = Objective.build(["x", "y", "z"], [1.0, 0.0, 3.0])
    assert objective.combine(objective.values({"x": 2.0, "y": 100.0, "z": 6.0, "w": 1.0})) == pytest.approx(5.0)
    assert Objective(("x", "y")).combine([1.0, 4.0]) == pytest.approx(2.5)
    with pytest.raises(EvaluationError, match="2 metrics.*1 weights"):
        Objective(("x", "y"), (1.0,))
    with pytest.raises(EvaluationError, match=r"not produced.*\['x'\]"):
        Objective(("q",)).values({"x": 1.0})
    with pytest.raises(EvaluationError, match="not all 0"):
        Objective(("x",), (0.0,))


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_equal_cpu_scores(task_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    cpu, gpu = _tiny_llama(tokenizer, seed=1), _tiny_llama(tokenizer, seed=1).cuda()
    kwargs: dict[str, Any] = {"include_path": task_dir, "metrics": ["acc", "acc_norm"], "include_defaults": False}
    on_cpu = LmEvalEvaluator(["ev_random"], **kwargs).score(cpu, tokenizer)
    on_gpu = LmEvalEvaluator(["ev_random"], **kwargs).score(gpu, tokenizer)
    assert on_gpu.metrics == on_cpu.metrics and on_gpu.items == on_cpu.items
    path = _write_docs(tmp_path / "docs.jsonl", DOCS)
    ppl_cpu = PerplexityEvaluator(path, max_length=8, stride=3).score(cpu, tokenizer)
    ppl_gpu = PerplexityEvaluator(path, max_length=8, stride=3).score(gpu, tokenizer)
    assert ppl_gpu.metrics["nll_per_token"] == pytest.approx(ppl_cpu.metrics["nll_per_token"], rel=1e-4)


# ---------------------------------------------------------------- groups, stderr


def _group_yaml(root: Path, name: str, weight_by_size: bool) -> None:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.yaml").write_text(yaml.safe_dump({
        "group": name, "task": ["ev_known", "ev_random"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": weight_by_size}],
        "metadata": {"version": 1.0},
    }))


def test_group_aggregate_and_stderr_equal_lm_eval(
    task_dir: Path, tokenizer: Any, model_a: Any, tmp_path: Path
) -> None:
    """A group over ev_known (12 docs) and ev_random (24 docs): lm-eval's size-weighted and unweighted aggregates
    and stderrs, by hand and from ``simple_evaluate``; search-time scoring (validation) has no stderr."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    groups = tmp_path / "groups"
    _group_yaml(groups, "ev_sized", weight_by_size=True)
    _group_yaml(groups, "ev_flat", weight_by_size=False)
    model_a.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    paths = [task_dir, groups]
    for group, by_size in (("ev_sized", True), ("ev_flat", False)):
        reference = simple_evaluate(
            model="hf", model_args=f"pretrained={tmp_path / 'model'},dtype=float32", tasks=[group], device="cpu",
            batch_size=8, bootstrap_iters=1000,
            task_manager=TaskManager(include_path=[str(p) for p in paths], include_defaults=False),
        )["results"]
        ev = LmEvalEvaluator([group], include_path=paths, split="test", include_defaults=False)
        assert ev.objective.metrics == (f"{group}/acc",) and ev.bootstrap_iters == 100000
        ours = ev.score(model_a, tokenizer)
        known, rnd = ours.metrics["ev_known/acc"], ours.metrics["ev_random/acc"]
        assert known == pytest.approx(9 / 12) and known != pytest.approx(rnd)
        expected = (12 * known + 24 * rnd) / 36 if by_size else (known + rnd) / 2
        assert ours.objective == ours.metrics[f"{group}/acc"] == pytest.approx(expected)
        # stderr of a mean metric: sample standard deviation / sqrt(n) (closed form in lm-eval, no bootstrap)
        assert ours.stderr["ev_known/acc"] == pytest.approx(math.sqrt(12 * 0.75 * 0.25 / 11) / math.sqrt(12))
        for name in (group, "ev_known", "ev_random"):
            assert ours.metrics[f"{name}/acc"] == pytest.approx(reference[name]["acc,none"], abs=1e-12)
            assert ours.stderr[f"{name}/acc"] == pytest.approx(reference[name]["acc_stderr,none"], abs=1e-12)
    search = LmEvalEvaluator(["ev_sized"], include_path=paths, include_defaults=False).score(model_a, tokenizer)
    assert search.stderr is None and "ev_sized/acc" in search.metrics
