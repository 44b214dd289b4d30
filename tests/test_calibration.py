"""Data-aware merges through the engine: Fisher and RegMean statistics collected from calibration text."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_family
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from evomerge.merge import merge_to_dir
from evomerge.methods import get_method
from evomerge.methods.statistics import fisher_diagonal, gram_matrices
from evomerge.recipe import Recipe, RecipeError

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +="


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    base, fts = tiny_family(root, n=2)
    for path in (base, *fts):
        char_tokenizer().save_pretrained(path)
    data = root / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"{i}+{i + 3}={2 * i + 3} abc"}) for i in range(6)))
    return base, fts, data


def batches(data, n=6):
    tok = char_tokenizer()
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()][:n]
    return [dict(tok(texts[i : i + 4], return_tensors="pt", padding=True)) for i in range(0, len(texts), 4)]


@pytest.mark.parametrize(("method", "estimator", "params"),
                         [("fisher", fisher_diagonal, {"weight": 1.0}), ("regmean", gram_matrices, {})])
def test_engine_statistics_equal_independent_estimates(setup, tmp_path, method, estimator, params):
    base, fts, data = setup
    recipe = Recipe(method=method, sources=[{"model": str(p), "parameters": params} for p in fts],
                    calibration={"path": str(data), "batch_size": 4})
    out = merge_to_dir(recipe, tmp_path / "out", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    models = [AutoModelForCausalLM.from_pretrained(p) for p in fts]
    stats = [estimator(m, batches(data)) for m in models]
    fn = get_method(method).fn
    kwargs = {"weight": torch.ones(2)} if params else {}
    for name in ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]:
        stack = torch.stack([m.state_dict()[name] for m in models])
        expected = fn(None, stack, stats=torch.stack([s[name] for s in stats]), **kwargs)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    # the statistics matter: the merge differs from the plain average
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(merged[name], torch.stack([m.state_dict()[name] for m in models]).mean(0))


def test_missing_calibration_is_a_clear_error(setup, tmp_path):
    base, fts, _ = setup
    with pytest.raises(RecipeError, match="calibration"):
        merge_to_dir(Recipe(method="fisher", sources=[{"model": str(p)} for p in fts]), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
