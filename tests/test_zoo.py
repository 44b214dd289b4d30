"""Tests of the offline tiny model zoo (evomerge.zoo): tasks, tokenizer, build, manifest, table."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import TrainSpec, Zoo, ZooConfig, build_zoo, cached_zoo, default_cache_root
from evomerge.zoo import build as build_module
from evomerge.zoo.table import accuracy, ensemble_logprobs
from evomerge.zoo.taskfiles import read_jsonl
from evomerge.zoo.tasks import SYMMETRIES, TASKS, answer_pairs, augment_pairs, generate_items
from evomerge.zoo.train import IGNORE_INDEX, lr_at, smoothed_loss

CLOSER = {"(": ")", "[": "]", "{": "}", "<": ">"}


def solve(task: str, query: str) -> str:
    """Independent reference solutions of every zoo task, from the query text alone."""
    if task == "add":
        a, b = query.removesuffix("=").split("+")
        return str(int(a) + int(b))
    body = query.split(":", 1)[1].removesuffix("=")
    if task == "length":
        return str(len(body))
    if task == "count":
        letter, text = body.split(":")
        return str(sum(ch == letter for ch in text))
    return {
        "reverse": lambda s: s[::-1],
        "sort": lambda s: "".join(sorted(s)),
        "shift": lambda s: "".join(chr(ord(ch) + 1) for ch in s),
        "back": lambda s: "".join("z" if ch == "a" else chr(ord(ch) - 1) for ch in s),
        "rotate": lambda s: s[1:] + s[:1],
        "rotr": lambda s: s[-1:] + s[:-1],
        "swap": lambda s: "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2)),
        "brackets": lambda s: "".join(CLOSER[ch] for ch in reversed(s)),
    }[task](body)


def micro_config() -> ZooConfig:
    """A zoo config small enough to build in a few seconds (for build-mechanics tests)."""
    mini = ZooConfig.mini()
    return mini.model_copy(
        update={
            "n_train": 64,
            "n_validation": 16,
            "n_test": 16,
            "base": TrainSpec(steps=30, lr=5e-3, seed=0),
            "expert": TrainSpec(steps=5, lr=5e-4, seed=1),
            "sweep": mini.sweep[:2],
            "expert_tasks": mini.expert_tasks[:2],
        }
    )


def sha256_of_models(zoo: Zoo) -> dict[str, str]:
    return {
        name: hashlib.sha256((zoo.model_dir(name) / "model.safetensors").read_bytes()).hexdigest()
        for name in zoo.model_names
    }


def assert_experts_best_on_own_task(zoo: Zoo, margin: float) -> None:
    """Each expert beats the base and every other expert on its own task (validation) by ``margin``."""
    table = zoo.table()
    for task in zoo.experts:
        col = f"{task}/validation"
        own = table[f"expert_{task}"][col]
        rivals = {name: row[col] for name, row in table.items() if name == "base" or name.startswith("expert_")}
        del rivals[f"expert_{task}"]
        assert own >= max(rivals.values()) + margin, (task, own, rivals)


def assert_uniform_merge_beats_base(zoo: Zoo, margin: float) -> None:
    """The zoo's reason to exist: expert task vectors add up, so the uniform average of the experts
    beats the base by ``margin`` on the mean validation accuracy over the expert tasks."""
    tok = AutoTokenizer.from_pretrained(zoo.base)
    experts = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in zoo.experts.values()]
    merged = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
    merged.load_state_dict({k: sum(sd[k] for sd in experts) / len(experts) for k in experts[0]})
    tasks = list(zoo.experts)
    merged_acc = [accuracy(merged, tok, read_jsonl(zoo.split_file(t, "validation"))) for t in tasks]
    base_acc = [zoo.table()["base"][f"{t}/validation"] for t in tasks]
    assert sum(merged_acc) / len(tasks) > sum(base_acc) / len(tasks) + margin, (merged_acc, base_acc)


# ---------------------------------------------------------------- tasks, tokenizer, config


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_items_have_one_right_answer_among_four_distinct_choices(task: str) -> None:
    items = generate_items(task, 300, seed=3)
    assert len({item["query"] for item in items}) == 300
    for item in items:
        right = solve(task, item["query"])
        assert len(set(item["choices"])) == 4
        assert item["choices"][item["gold"]] == right
        assert [c for c in item["choices"] if c == right] == [right]
        # the confuser (the base's systematic mistake) is a choice unless it coincides with the answer
        assert item["confuser"] == right or item["confuser"] in item["choices"]
    # the gold position is shuffled: every position is used
    assert {item["gold"] for item in items} == {0, 1, 2, 3}


def test_task_generation_is_seeded() -> None:
    assert generate_items("sort", 50, seed=1) == generate_items("sort", 50, seed=1)
    assert generate_items("sort", 50, seed=1) != generate_items("sort", 50, seed=2)


def test_task_too_small_for_item_count_names_the_problem() -> None:
    with pytest.raises(ValueError, match="cannot produce"):
        generate_items("reverse", 1001, seed=0, size=3)  # only 10**3 strings of length 3


@pytest.mark.parametrize("task", sorted(SYMMETRIES))
def test_augmented_pairs_are_valid_items_and_avoid_held_out_queries(task: str) -> None:
    items = generate_items(task, 400, seed=5)
    pairs = answer_pairs(items[:300])
    held_out = {str(item["query"]) for item in items[300:]}
    augmented = augment_pairs(task, pairs, 0.5, seed=7, held_out=held_out)
    changed = [(new, old) for new, old in zip(augmented, pairs, strict=True) if new != old]
    assert 100 < len(changed) < 200  # about half of 300
    for (query, answer), (old_query, _) in changed:
        assert answer == solve(task, query) and query.split(":")[0] == old_query.split(":")[0]
        assert query not in held_out and len(query) == len(old_query)
    assert augment_pairs(task, pairs, 0.5, seed=7, held_out=held_out) == augmented
    assert augment_pairs(task, pairs, 0.5, seed=8, held_out=held_out) != augmented
    assert augment_pairs(task, pairs, 0.0, seed=7, held_out=held_out) == pairs


def test_label_noise_replaces_that_share_of_answers_by_the_confuser() -> None:
    items = generate_items("rotr", 1000, seed=1)
    noisy = answer_pairs(items, 0.2, seed=3)
    confused = sum(answer == item["confuser"] for (_, answer), item in zip(noisy, items, strict=True))
    assert 150 < confused < 250


def test_smoothed_loss_is_the_mixture_of_cross_entropy_and_uniform_target() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6]])
    logp = torch.log_softmax(logits, dim=-1)
    terms = [
        -(0.9 * logp[b, t - 1, labels[b, t]] + 0.1 * logp[b, t - 1].mean())
        for b in range(2)
        for t in range(1, 5)
        if labels[b, t] != IGNORE_INDEX
    ]
    assert float(smoothed_loss(logits, labels, 0.1)) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)


def test_config_refuses_augmenting_a_task_without_symmetry() -> None:
    mini = ZooConfig.mini()
    with pytest.raises(ValueError, match="augment > 0 needs a task with a symmetry.*sort"):
        ZooConfig.model_validate({**mini.model_dump(), "expert": {"steps": 5, "lr": 1e-3, "augment": 0.5}})
    assert mini.model_copy(update={"sweep": (TrainSpec(steps=5, lr=1e-3, augment=0.5),)}).sweep[0].augment == 0.5


def test_regularisers_enter_the_hash_only_when_used() -> None:
    plain = TrainSpec(steps=5, lr=1e-3)
    assert set(plain.model_dump()) == {"steps", "lr", "seed", "weight_decay", "warmup_frac"}  # as before they existed
    smoothed = TrainSpec(steps=5, lr=1e-3, label_smoothing=0.1)
    assert TrainSpec.model_validate(smoothed.model_dump()) == smoothed
    mini = ZooConfig.mini()
    assert mini.model_copy(update={"expert": smoothed}).config_hash() != mini.model_copy(
        update={"expert": plain}
    ).config_hash()


def test_fine_tune_knobs_enter_the_hash_only_when_set() -> None:
    mini = ZooConfig.mini()
    plain = mini.expert
    assert ZooConfig.model_validate(mini.model_dump()).config_hash() == mini.config_hash()
    assert "expert_specs" not in mini.model_dump()  # configs from before per-task experts keep their hash
    for knob in ({"replay": 0.5}, {"train_items": 10}, {"batch_size": 8}):
        changed = plain.model_copy(update=knob)
        assert knob.keys() <= changed.model_dump().keys()
        assert mini.model_copy(update={"expert": changed}).config_hash() != mini.config_hash()
    per_task = mini.model_copy(update={"expert_specs": {"sort": plain.model_copy(update={"steps": 3})}})
    assert per_task.config_hash() != mini.config_hash()
    assert per_task.expert_spec("sort").steps == 3 and per_task.expert_spec("reverse") == plain


def test_expert_specs_must_name_expert_tasks() -> None:
    data = {**ZooConfig.mini().model_dump(), "expert_specs": {"brackets": {"steps": 3, "lr": 1e-3}}}
    with pytest.raises(ValueError, match=r"expert_specs names \['brackets'\], which are not expert_tasks"):
        ZooConfig.model_validate(data)


def test_fine_tune_data_takes_a_subset_and_replays_other_tasks_at_the_base_confusion() -> None:
    cfg = micro_config()
    splits = build_module._make_splits(cfg)
    task = cfg.expert_tasks[0]
    spec = TrainSpec(steps=1, lr=1e-3, seed=3, train_items=10, replay=0.6)
    seen: list[list[tuple[str, str]]] = []
    original = build_module.encode
    build_module.encode = lambda pairs, tokenizer, answer_only: seen.append(pairs)  # type: ignore[assignment]
    try:
        build_module._training_data(build_module._Run("e", "expert", task, spec), splits, None, cfg)  # type: ignore[arg-type]
    finally:
        build_module.encode = original
    pairs = seen[0]
    own, replayed = pairs[:10], pairs[10:]
    assert [q for q, _ in own] == [str(item["query"]) for item in splits[task]["train"][:10]]
    assert len(replayed) == 15  # 0.6 = 15 / (10 + 15)
    other = {str(item["query"]): item for t, sp in splits.items() if t != task for item in sp["train"]}
    assert all(q in other for q, _ in replayed)
    # answers of replayed items are the right answer or the confuser: the base's pretraining text
    assert all(a in (other[q]["choices"][other[q]["gold"]], other[q]["confuser"]) for q, a in replayed)


def test_config_hash_is_stable_and_sensitive() -> None:
    mini = ZooConfig.mini()
    assert mini.config_hash() == ZooConfig.mini().config_hash()
    assert ZooConfig.model_validate(mini.model_dump(mode="json")).config_hash() == mini.config_hash()
    assert mini.model_copy(update={"n_train": 601}).config_hash() != mini.config_hash()
    assert ZooConfig.full().config_hash() != mini.config_hash()


def test_config_rejects_unknown_or_unlisted_tasks() -> None:
    with pytest.raises(ValueError, match="unknown zoo tasks"):
        ZooConfig.model_validate({**ZooConfig.mini().model_dump(), "tasks": ("reverse", "juggle")})
    with pytest.raises(ValueError, match="must also be listed"):
        ZooConfig.model_validate({**ZooConfig.mini().model_dump(), "sweep_task": "add"})


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_at(0, 110, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 110, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 110, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(60, 110, 1.0, 10) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_at(35, 110, 1.0, 10) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_default_cache_root_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EVOMERGE_ZOO_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path


# ---------------------------------------------------------------- the mini zoo


def test_mini_zoo_layout(mini_zoo: Zoo) -> None:
    cfg = ZooConfig.mini()
    assert mini_zoo.config_hash == cfg.config_hash()
    assert sorted(mini_zoo.experts) == sorted(cfg.expert_tasks)
    assert len(mini_zoo.sweep) == len(cfg.sweep) >= 4
    assert mini_zoo.sweep_task == cfg.sweep_task
    assert mini_zoo.task_names == list(cfg.tasks)
    for path in [mini_zoo.base, *mini_zoo.experts.values(), *mini_zoo.sweep]:
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert mini_zoo.task_yaml("zoo_sort") == mini_zoo.task_yaml("sort") == mini_zoo.task_dir / "zoo_sort.yaml"
    with pytest.raises(KeyError, match="no task"):
        mini_zoo.split_file("juggle", "test")


def test_model_dirs_load_offline_and_tokenize_data_characters_singly(mini_zoo: Zoo) -> None:
    tok = AutoTokenizer.from_pretrained(mini_zoo.experts["sort"])
    model = AutoModelForCausalLM.from_pretrained(mini_zoo.experts["sort"])
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert not model.config.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("SORT:dbca= abcd")["input_ids"]
    # <s>, SORT, :, d, b, c, a, =, space, a, b, c, d
    assert len(ids) == 13 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[3:7]) == ["d", "b", "c", "a"]
    assert tok.decode(ids, skip_special_tokens=True) == "SORT:dbca= abcd"


def test_splits_are_disjoint_and_sized(mini_zoo: Zoo) -> None:
    cfg = ZooConfig.mini()
    sizes = {"train": cfg.n_train, "validation": cfg.n_validation, "test": cfg.n_test}
    for task in mini_zoo.task_names:
        queries = {split: [item["query"] for item in read_jsonl(mini_zoo.split_file(task, split))] for split in sizes}
        assert {split: len(q) for split, q in queries.items()} == sizes
        seen = [q for qs in queries.values() for q in qs]
        assert len(set(seen)) == len(seen), f"{task}: a query occurs in two splits (or twice)"


def test_every_expert_beats_base_and_other_experts_on_its_task(mini_zoo: Zoo) -> None:
    assert_experts_best_on_own_task(mini_zoo, margin=0.1)


def test_uniform_merge_of_experts_beats_base_on_expert_tasks(mini_zoo: Zoo) -> None:
    assert_uniform_merge_beats_base(mini_zoo, margin=0.1)


def test_sweep_models_beat_base_on_sweep_task(mini_zoo: Zoo) -> None:
    table = mini_zoo.table()
    col = f"{mini_zoo.sweep_task}/validation"
    assert min(table[p.name][col] for p in mini_zoo.sweep) > table["base"][col] + 0.2


def test_table_matches_unbatched_loglikelihood(mini_zoo: Zoo) -> None:
    """The batched scorer against a one-sequence-at-a-time reference on the raw model."""
    tok = AutoTokenizer.from_pretrained(mini_zoo.base)
    model = AutoModelForCausalLM.from_pretrained(mini_zoo.experts["reverse"]).eval()
    items = read_jsonl(mini_zoo.split_file("reverse", "validation"))[:40]
    correct = 0
    with torch.no_grad():
        for item in items:
            n_ctx = len(tok(item["query"])["input_ids"])
            scores = []
            for choice in item["choices"]:
                ids = torch.tensor([tok(f"{item['query']} {choice}")["input_ids"]])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
                scores.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(n_ctx, ids.shape[1])))
            correct += scores.index(max(scores)) == item["gold"]
    assert accuracy(model, tok, items, batch_size=7) == correct / len(items)


def test_ensemble_logprobs_average_probabilities_or_logits(mini_zoo: Zoo) -> None:
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in mini_zoo.sweep[:2]]
    ids = AutoTokenizer.from_pretrained(mini_zoo.base)(["CLOSE:([{= }])"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        z1, z2 = (m(input_ids=ids).logits for m in models)
        probs = ensemble_logprobs(models, "probs")(ids)
        logits = ensemble_logprobs(models, "logits")(ids)
    assert torch.allclose(probs.exp(), (z1.softmax(-1) + z2.softmax(-1)) / 2, atol=1e-6)
    assert torch.allclose(logits.exp(), ((z1 + z2) / 2).softmax(-1), atol=1e-6)
    assert not torch.allclose(probs, logits, atol=1e-4)
    items = read_jsonl(mini_zoo.split_file("brackets", "validation"))
    tok = AutoTokenizer.from_pretrained(mini_zoo.base)
    assert accuracy(ensemble_logprobs(models[:1], "probs"), tok, items) == accuracy(models[0], tok, items)
    with pytest.raises(ValueError, match="average must be"):
        ensemble_logprobs(models, "median")  # type: ignore[arg-type]


def test_lm_eval_yaml_scores_equal_the_table(mini_zoo: Zoo) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task = "shift"
    manager = TaskManager(include_path=str(mini_zoo.task_dir), include_defaults=False)
    assert f"zoo_{task}" in manager.all_tasks
    cfg = yaml.safe_load(mini_zoo.task_yaml(task).read_text())
    assert cfg["output_type"] == "multiple_choice"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == mini_zoo.split_file(task, "test")

    name = f"expert_{task}"
    lm = HFLM(
        pretrained=AutoModelForCausalLM.from_pretrained(mini_zoo.model_dir(name)),
        tokenizer=AutoTokenizer.from_pretrained(mini_zoo.model_dir(name)),
        device="cpu",
        batch_size=64,
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[f"zoo_{task}", mini_zoo.task_config(task, "validation")],
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )["results"]
    row = mini_zoo.table()[name]
    assert out[f"zoo_{task}"]["acc,none"] == pytest.approx(row[f"{task}/test"], abs=1e-9)
    assert out[f"zoo_{task}_validation"]["acc,none"] == pytest.approx(row[f"{task}/validation"], abs=1e-9)


def test_loading_a_moved_zoo_repoints_the_yaml_data_paths(mini_zoo: Zoo, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(mini_zoo.root, moved, ignore=shutil.ignore_patterns("*.safetensors"))
    zoo = Zoo.load(moved)
    files = yaml.safe_load(zoo.task_yaml("sort").read_text())["dataset_kwargs"]["data_files"]
    assert files["validation"] == str(moved.resolve() / "tasks" / "sort" / "validation.jsonl")
    generation = yaml.safe_load((zoo.task_dir / "zoo_sort_gen.yaml").read_text())
    assert generation["dataset_kwargs"]["data_files"] == files and generation["output_type"] == "generate_until"
    assert yaml.safe_load(mini_zoo.task_yaml("sort").read_text())["dataset_kwargs"]["data_files"] != files


def test_build_returns_existing_zoo_of_same_config_without_rebuilding(mini_zoo: Zoo) -> None:
    before = (mini_zoo.root / "zoo.json").stat().st_mtime_ns
    again = build_zoo(mini_zoo.root, ZooConfig.mini(), progress=False)
    assert again.root == mini_zoo.root
    assert (mini_zoo.root / "zoo.json").stat().st_mtime_ns == before


def test_build_refuses_a_zoo_of_another_config(mini_zoo: Zoo) -> None:
    with pytest.raises(ValueError, match="another config"):
        build_zoo(mini_zoo.root, micro_config(), progress=False)


# ---------------------------------------------------------------- build mechanics (micro config)


def test_build_refuses_nonempty_dir_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a zoo.*force"):
        build_zoo(out, micro_config(), progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    zoo = build_zoo(out, micro_config(), force=True, progress=False)
    assert not (out / "notes.txt").exists() and zoo.config_hash == micro_config().config_hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # no temp or trash dirs left


def test_interrupted_build_leaves_no_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Interrupted(Exception):
        pass

    calls = []

    def train_then_fail(*args: object, **kwargs: object) -> float:
        calls.append(kwargs.get("desc"))
        if len(calls) == 2:  # the base trained and was saved; fail in the first expert
            raise Interrupted
        return 0.0

    from faults import dead_pid

    from evomerge import outdir

    killed = tmp_path / f".zoo.partial-{dead_pid()}-{outdir._HOST}-0123abcd"  # what a kill -9 of a build leaves
    (killed / "base").mkdir(parents=True)
    monkeypatch.setattr(build_module, "train", train_then_fail)
    with pytest.raises(Interrupted):
        build_zoo(tmp_path / "zoo", micro_config(), progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither this build's temporary dir nor the killed one's


def test_same_config_builds_bit_identical_weights(tmp_path: Path) -> None:
    first = build_zoo(tmp_path / "a", micro_config(), progress=False)
    torch.manual_seed(1234)  # a different global RNG state must not matter
    second = build_zoo(tmp_path / "b", micro_config(), progress=False)
    assert sha256_of_models(first) == sha256_of_models(second)
    assert first.table() == second.table()


def test_cached_zoo_builds_once_into_hash_dir(tmp_path: Path) -> None:
    zoo = cached_zoo(micro_config(), tmp_path)
    assert zoo.root == (tmp_path / micro_config().config_hash()).resolve()
    mtime = (zoo.root / "zoo.json").stat().st_mtime_ns
    assert (cached_zoo(micro_config(), tmp_path).root / "zoo.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_mini_zoo_rebuild_is_bit_identical(mini_zoo: Zoo, tmp_path: Path) -> None:
    again = build_zoo(tmp_path / "mini", ZooConfig.mini(), progress=False)
    assert sha256_of_models(again) == sha256_of_models(mini_zoo)


@pytest.mark.slow
def test_full_zoo(tmp_path: Path) -> None:
    zoo = build_zoo(tmp_path / "full", ZooConfig.full(), progress=False)
    assert len(zoo.experts) >= 4 and len(zoo.sweep) >= 8
    assert_experts_best_on_own_task(zoo, margin=0.1)
    assert_uniform_merge_beats_base(zoo, margin=0.2)
