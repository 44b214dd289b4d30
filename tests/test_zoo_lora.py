"""The zoo's optional LoRA stage (evomerge/zoo/lora.py): PEFT adapters trained on the zoo's tasks, deterministic,
readable as merge sources, and the LoraHub leave-one-out sets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.engine.plan import open_sources
from evomerge.zoo.config import TrainSpec
from evomerge.zoo.lora import LoraSetting, LoraZoo, LoraZooConfig, build_lora_zoo, train_adapter
from evomerge.zoo.train import torch_threads

TINY = LoraZooConfig(settings=(LoraSetting(r=2, lora_alpha=4),), tasks=("reverse", "sort"),
                     target_modules=("q_proj", "v_proj", "down_proj"), train=TrainSpec(steps=20, lr=5e-3, seed=7),
                     table=False)  # scoring 3 models on 10 splits would cost more than the training


@pytest.fixture(scope="module")
def lora_zoo(mini_zoo, tmp_path_factory) -> LoraZoo:
    return build_lora_zoo(mini_zoo, tmp_path_factory.mktemp("zoo-lora") / "lora", TINY, progress=False)


def test_adapters_are_trained_per_task_deterministically_and_the_zoo_is_untouched(mini_zoo, lora_zoo):
    zoo_manifest = (mini_zoo.root / "zoo.json").read_text()
    assert sorted(lora_zoo.manifest["adapters"]) == ["lora_reverse_r2", "lora_sort_r2"]
    path = lora_zoo.adapter("sort")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and sorted(config["target_modules"]) == [
        "down_proj", "q_proj", "v_proj"]
    # the same config trains the same factors again (seeded init, fixed threads)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(mini_zoo.tokenizer_dir)
    with torch_threads(TINY.threads):
        model, _ = train_adapter(mini_zoo, tokenizer, "sort", TINY.settings[0], TINY)
    saved = load_file(f"{path}/adapter_model.safetensors")
    again = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    # trained: B moved away from its zero init; the adapter changes the base where it should
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)
    opened = open_sources([str(mini_zoo.base), str(path)])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(opened.checkpoints[1].get(name), opened.checkpoints[0].get(name))
    assert not (lora_zoo.root / "table.md").exists()  # table: false
    assert (mini_zoo.root / "zoo.json").read_text() == zoo_manifest


def test_lorahub_upstream_is_every_other_tasks_adapter(lora_zoo, mini_zoo, tmp_path):
    assert lora_zoo.upstream("sort") == [lora_zoo.adapter("reverse")]
    with pytest.raises(KeyError, match="no task 'nope'"):
        lora_zoo.upstream("nope")
    # a complete stage of the same config is returned as is; another config there is refused
    assert build_lora_zoo(mini_zoo, lora_zoo.root, TINY, progress=False).config_hash == lora_zoo.config_hash
    with pytest.raises(FileExistsError):
        build_lora_zoo(mini_zoo, lora_zoo.root, TINY.model_copy(update={"tasks": ("sort",)}), progress=False)
    with pytest.raises(ValueError, match="not tasks of the zoo"):
        build_lora_zoo(mini_zoo, tmp_path / "x", TINY.model_copy(update={"tasks": ("nope",)}), progress=False)


@pytest.mark.slow
def test_the_mini_stage_makes_each_adapter_best_on_its_own_task(mini_zoo, tmp_path):
    lz = build_lora_zoo(mini_zoo, tmp_path / "lora", LoraZooConfig.mini(), progress=False)
    # the table scores the base and each adapter on every task and split
    table = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:-1]]
             for line in (lz.root / "table.md").read_text().splitlines()[2:]}
    columns = (lz.root / "table.md").read_text().splitlines()[0].split("|")[2:-1]
    for name, entry in lz.manifest["adapters"].items():
        own = [i for i, c in enumerate(columns) if c.strip() == f"{entry['task']}/validation"][0]
        assert table[name][own] > table["base"][own] + 0.2, name



def test_the_table_scores_an_adapter_as_its_merged_model(mini_zoo, lora_zoo):
    """The LoRA stage's table (on by default) scores the PEFT model itself; it must score what the adapter's merged
    weights score (a PeftModel is not a PreTrainedModel: it was once taken for a log-prob function)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from evomerge.zoo.table import accuracy, model_logprobs
    from evomerge.zoo.taskfiles import read_jsonl

    tokenizer = PreTrainedTokenizerFast.from_pretrained(mini_zoo.tokenizer_dir)
    items = read_jsonl(mini_zoo.split_file("sort", "validation"))[:40]
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(mini_zoo.base), lora_zoo.adapter("sort"))
    ids = torch.tensor([tokenizer(items[0]["query"])["input_ids"]])
    with torch.no_grad():
        adapted = model_logprobs(peft_model)(ids)
        base = model_logprobs(LlamaForCausalLM.from_pretrained(mini_zoo.base))(ids)
    with_adapter = accuracy(peft_model, tokenizer, items)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(model_logprobs(merged)(ids), adapted, rtol=0, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-3  # the adapter is active when the PEFT model is scored
    assert accuracy(merged, tokenizer, items) == with_adapter
