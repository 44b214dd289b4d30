"""LoRA compositions (evomerge.methods.lorahub): LoraHub's factor sums and the exact rank sum, in the engine and the
streaming merge, written as a merged PEFT adapter (optionally SVD-reduced), and against PEFT's add_weighted_adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lora_models import lora_family
from safetensors.torch import load_file

from evomerge.adapters import save_adapter
from evomerge.engine import MergeEngine
from evomerge.engine.lowrank import merged_adapter
from evomerge.engine.streaming import stream_merge
from evomerge.recipe import Recipe, RecipeError

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    return {k: str(v) for k, v in lora_family(tmp_path_factory.mktemp("lorahub")).items()}


def _recipe(family: dict[str, str], method: str, weights: list[float], names=("plain", "plain2"),
            **params: object) -> Recipe:
    return Recipe(method=method, base=family["base"], parameters=params,
                  sources=[{"model": family[n], "parameters": {"weight": w}} for n, w in zip(names, weights)])


def _factors(path: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    saved = load_file(f"{path}/adapter_model.safetensors")
    stem = "base_model.model." + module.removesuffix(".weight")
    return saved[stem + ".lora_A.weight"], saved[stem + ".lora_B.weight"]


def test_lorahub_sums_the_factors_and_rank_sum_is_exact(family):
    w = [0.7, -0.4]
    base = load_file(f"{family['base']}/model.safetensors")
    (a1, b1), (a2, b2) = _factors(family["plain"], Q), _factors(family["plain2"], Q)
    s1, s2 = 8 / 4, 16 / 4  # lora_alpha / r
    engine = MergeEngine([family["base"], family["plain"], family["plain2"]], device="cpu")
    engine.materialize(_recipe(family, "lorahub", w))
    got = engine.state_dict()
    # the paper's composition: (Σ w_i √s_i B_i)(Σ w_i √s_i A_i), cross terms included
    A = w[0] * math.sqrt(s1) * a1 + w[1] * math.sqrt(s2) * a2
    B = w[0] * math.sqrt(s1) * b1 + w[1] * math.sqrt(s2) * b2
    torch.testing.assert_close(got[Q], base[Q] + B @ A, rtol=1e-6, atol=1e-6)
    # k_proj is adapted by plain2 only: its factors alone, weight applied on both sides (w²)
    a, b = _factors(family["plain2"], K)
    torch.testing.assert_close(got[K], base[K] + (w[1] ** 2 * s2) * (b @ a), rtol=1e-6, atol=1e-6)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])
    engine.materialize(_recipe(family, "lorahub", w, rank_sum=True))
    exact = engine.state_dict()
    torch.testing.assert_close(exact[Q], base[Q] + w[0] * s1 * (b1 @ a1) + w[1] * s2 * (b2 @ a2), rtol=1e-6, atol=1e-6)


def test_lorahub_streams_as_the_engine_merges_and_refuses_full_sources(family, tmp_path):
    recipe = _recipe(family, "lorahub", [0.5, 1.2])
    engine = MergeEngine([family["base"], family["plain"], family["plain2"]], device="cpu")
    engine.materialize(recipe)
    written = load_file(f"{stream_merge(recipe, tmp_path / 'out', device='cpu')}/model.safetensors")
    for name, tensor in engine.state_dict().items():
        assert torch.equal(written[name], tensor), name
    with pytest.raises(RecipeError, match="are full checkpoints"):
        stream_merge(_recipe(family, "lorahub", [1.0, 1.0], names=("plain", "ft")), tmp_path / "x", device="cpu")
    with pytest.raises(RecipeError, match="also save full tensors"):
        MergeEngine([family["base"], family["plain"], family["saved"]], device="cpu").materialize(
            _recipe(family, "lorahub", [1.0, 1.0], names=("plain", "saved")))
    with pytest.raises(ValueError, match="one rank"):
        stream_merge(_recipe(family, "lorahub", [1.0, 1.0], names=("plain", "rslora")), tmp_path / "y", device="cpu")


@pytest.mark.parametrize("method,params", [("lorahub", {}), ("lorahub", {"rank_sum": True}),
                                           ("task_arithmetic", {"lambda": 0.8}), ("linear", {})])
def test_the_merged_adapter_loads_in_peft_and_gives_the_merged_models_logits(family, tmp_path, method, params):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    recipe = _recipe(family, method, [0.6, 0.9], **params)
    modules, base = merged_adapter(recipe)
    out = save_adapter(modules, tmp_path / "adapter", base=base)
    full = stream_merge(recipe, tmp_path / "full", device="cpu")
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out)(ids).logits
        full_logits = LlamaForCausalLM.from_pretrained(full)(ids).logits
    # the same update: W x + B (A x) against (W + B A) x, fp32 rounding of the two orders
    torch.testing.assert_close(peft_logits, full_logits, rtol=1e-5, atol=1e-5)


def test_svd_reduces_the_merged_adapter_to_the_best_low_rank_product(family):
    recipe = _recipe(family, "lorahub", [0.6, 0.9], rank_sum=True)
    exact, _ = merged_adapter(recipe)
    reduced, _ = merged_adapter(recipe, rank=3)
    A, B = exact[Q].A, exact[Q].B
    a, b = reduced[Q].A, reduced[Q].B
    assert A.shape[0] == 8 and a.shape == (3, 16) and b.shape == (16, 3)
    S = torch.linalg.svdvals(B @ A)
    # Eckart-Young: the error of the best rank-3 approximation is the norm of the dropped singular values
    torch.testing.assert_close(torch.linalg.norm(B @ A - b @ a), torch.linalg.norm(S[3:]), rtol=1e-4, atol=1e-5)
    assert merged_adapter(recipe, rank=16)[0][Q].rank == 8  # a rank above the product's keeps it exact
    with pytest.raises(RecipeError, match="does not keep a merge of adapters low-rank"):
        merged_adapter(_recipe(family, "ties", [1.0, 1.0]))


WTE, C_ATTN = "transformer.wte.weight", "transformer.h.1.attn.c_attn.weight"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> dict[str, str]:
    """A tiny GPT-2 (Conv1D weights stored [d_in, d_out], the embedding tied to the head) and two PEFT adapters of
    one rank, scales 2 and 4, on its c_attn (Conv1D) and wte (embedding) modules."""
    from lora_models import save_adapter as peft_adapter
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2-lora")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        root / "base")
    paths = {"base": str(root / "base")}
    for i, alpha in enumerate((4, 8)):
        paths[f"a{i}"] = str(peft_adapter(root / "base", root / f"a{i}", 20 + i, model_class="GPT2LMHeadModel", r=2,
                                          lora_alpha=alpha, fan_in_fan_out=True, target_modules=["c_attn", "wte"]))
    return paths


def _gpt2_recipe(gpt2: dict[str, str], method: str, weights: list[float], **params: object) -> Recipe:
    return Recipe(method=method, base=gpt2["base"], parameters=params,
                  sources=[{"model": gpt2[f"a{i}"], "parameters": {"weight": w}} for i, w in enumerate(weights)])


def _saved(path: str | Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of ``module`` as PEFT saved them: ``lora_embedding_A/B`` on an embedding, ``lora_A/B.weight`` else."""
    saved = load_file(f"{path}/adapter_model.safetensors")
    stem = "base_model.model." + module.removesuffix(".weight")
    if f"{stem}.lora_embedding_A" in saved:
        return saved[f"{stem}.lora_embedding_A"], saved[f"{stem}.lora_embedding_B"]
    return saved[f"{stem}.lora_A.weight"], saved[f"{stem}.lora_B.weight"]


def _peft_merged(base: str, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload of ``adapter`` on ``base`` (GPT-2), checking it read wte as a LoRA embedding."""
    from peft import PeftModel
    from peft.tuners.lora import Embedding
    from transformers import GPT2LMHeadModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter)
    assert isinstance(model.base_model.model.transformer.wte, Embedding)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()  # still tied
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("method,params", [("lorahub", {}), ("task_arithmetic", {"lambda": 0.8})])
def test_merged_adapters_on_conv1d_and_embedding_weights_are_peft_adapters_of_the_merged_model(gpt2, tmp_path, method,
                                                                                              params):
    w, s = [0.6, -0.9], [4 / 2, 8 / 2]  # weights; scales lora_alpha / r
    recipe = _gpt2_recipe(gpt2, method, w, **params)
    modules, base = merged_adapter(recipe)
    assert modules[WTE].embedding and modules[WTE].transpose
    assert modules[C_ATTN].transpose and not modules[C_ATTN].embedding
    out = save_adapter(modules, tmp_path / "adapter", base=base)
    saved = load_file(f"{out}/adapter_model.safetensors")
    # PEFT's layout: the embedding's factors as bare parameters [r, vocab] / [dim, r], Conv1D's as lora_A/B.weight
    assert saved["base_model.model.transformer.wte.lora_embedding_A"].shape[1] == 64
    assert saved["base_model.model.transformer.wte.lora_embedding_B"].shape[0] == 16
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in saved
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = load_file(f"{stream_merge(recipe, tmp_path / 'full', device='cpu')}/model.safetensors")
    peft_merged = _peft_merged(base, out)
    for name, tensor in ours.items():
        torch.testing.assert_close(peft_merged[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # the composition computed here from the adapters' saved factors; both weights are stored [d_in, d_out]: ΔW^T
    W = load_file(f"{base}/model.safetensors")
    for name in (WTE, C_ATTN):
        (a0, b0), (a1, b1) = _saved(gpt2["a0"], name), _saved(gpt2["a1"], name)
        if method == "lorahub":  # (Σ w_i √s_i B_i)(Σ w_i √s_i A_i)
            r0, r1 = w[0] * math.sqrt(s[0]), w[1] * math.sqrt(s[1])
            delta = (r0 * b0 + r1 * b1) @ (r0 * a0 + r1 * a1)
        else:  # λ Σ w_i s_i B_i A_i
            delta = 0.8 * (w[0] * s[0] * (b0 @ a0) + w[1] * s[1] * (b1 @ a1))
        torch.testing.assert_close(ours[name], W[name] + delta.T, rtol=1e-5, atol=1e-6)
        assert not torch.equal(ours[name], W[name])


def test_svd_reduces_merged_embedding_and_conv1d_adapters_as_peft_then_loads_them(gpt2, tmp_path):
    recipe = _gpt2_recipe(gpt2, "task_arithmetic", [0.6, -0.9])  # the rank sum: rank 4 on each module
    exact, base = merged_adapter(recipe)
    reduced, _ = merged_adapter(recipe, rank=1)
    for name in (WTE, C_ATTN):
        full, low = exact[name], reduced[name]
        assert full.rank == 4 and low.rank == 1 and low.embedding == full.embedding and low.transpose
        S = torch.linalg.svdvals(full.B @ full.A)  # Eckart-Young on the untransposed B A [d_out, d_in]
        torch.testing.assert_close(torch.linalg.norm(full.B @ full.A - low.B @ low.A), torch.linalg.norm(S[1:]),
                                   rtol=1e-4, atol=1e-6)
    peft_merged = _peft_merged(base, save_adapter(reduced, tmp_path / "adapter", base=base))
    W = load_file(f"{base}/model.safetensors")
    for name in (WTE, C_ATTN):
        torch.testing.assert_close(peft_merged[name], W[name] + (reduced[name].B @ reduced[name].A).T,
                                   rtol=1e-6, atol=1e-6)


def test_a_llama_embedding_adapter_whose_base_layer_peft_saved_unchanged_composes_and_writes(family, tmp_path):
    # PEFT saves embed_tokens' own weight with the adapter ("auto"), unchanged: the adapter is still factors only
    from lora_models import save_adapter as peft_adapter
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    emb = peft_adapter(family["base"], tmp_path / "emb", 31, r=4, lora_alpha=8,
                       target_modules=["embed_tokens", "q_proj"])
    assert any(".base_layer." in k for k in load_file(f"{emb}/adapter_model.safetensors"))
    recipe = Recipe(method="lorahub", base=family["base"],
                    sources=[{"model": family["plain"], "parameters": {"weight": 0.7}},
                             {"model": str(emb), "parameters": {"weight": -0.5}}])
    modules, base = merged_adapter(recipe)
    assert modules["model.embed_tokens.weight"].embedding
    out = save_adapter(modules, tmp_path / "adapter", base=base)
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out).merge_and_unload().state_dict()
    written = load_file(f"{stream_merge(recipe, tmp_path / 'full', device='cpu')}/model.safetensors")
    _assert_same(written, merged, rtol=1e-6, atol=1e-6)
    assert not torch.equal(written["model.embed_tokens.weight"],
                           load_file(f"{base}/model.safetensors")["model.embed_tokens.weight"])


def _peft_merge(family, names, weights, combination_type, **kwargs) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(family["base"]), family[names[0]],
                                      adapter_name="a0")
    for i, name in enumerate(names[1:], start=1):
        model.load_adapter(family[name], adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(names))], weights, "merged",
                               combination_type=combination_type, **kwargs)
    model.set_adapter("merged")
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _evomerge(family, recipe) -> dict[str, torch.Tensor]:
    engine = MergeEngine(recipe.model_paths(), device="cpu")
    engine.materialize(recipe)
    return engine.state_dict()


def _assert_same(got, want, **tol):
    for name in got:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_peft_cat_is_the_exact_rank_sum_bit_for_bit(family):
    # the same operations in the same order: A = [(A_i w_i) s_i], B = [B_i], W + B A (scale 1)
    w = [0.7, 1.3]
    _assert_same(_evomerge(family, _recipe(family, "lorahub", w, rank_sum=True)),
                 _peft_merge(family, ["plain", "plain2"], w, "cat"), rtol=0, atol=0)


def test_peft_linear_is_lorahub_with_square_rooted_weights(family):
    # PEFT's linear puts √(w_i s_i) on both factors; LoraHub puts w_i √s_i: the same for w ≥ 0 with w -> √w, up to
    # the rounding of √w_i·√s_i against √(w_i s_i)
    w = [0.5, 1.4]
    _assert_same(_evomerge(family, _recipe(family, "lorahub", [math.sqrt(x) for x in w])),
                 _peft_merge(family, ["plain", "plain2"], w, "linear"), rtol=1e-6, atol=1e-6)


def test_peft_svd_is_task_arithmetic_of_the_products(family):
    # svd: Σ w_i s_i B_i A_i reduced to the full rank of the sum (8 ≥ its rank), i.e. task arithmetic on the adapters
    w = [0.7, 1.3]
    want = _peft_merge(family, ["plain", "plain2"], w, "svd", svd_rank=8)
    _assert_same(_evomerge(family, _recipe(family, "task_arithmetic", w)), want, rtol=1e-5, atol=1e-5)


def test_peft_ties_svd_is_ties_on_the_products(family):
    # equal weights: PEFT's disjoint mean (÷ count of agreeing entries) is evomerge's normalized one (÷ Σ agreeing w)
    want = _peft_merge(family, ["plain", "plain2"], [1.0, 1.0], "ties_svd", density=0.5, svd_rank=16,
                       svd_full_matrices=False)
    _assert_same(_evomerge(family, _recipe(family, "ties", [1.0, 1.0], density=0.5)), want, rtol=1e-5, atol=1e-5)


def test_one_hot_lorahub_weights_are_each_adapter_alone(family):
    # the declared "source alone" baselines (MergeMethod.source_alone_points): weight 1 for adapter i, 0 for the
    # others gives (√s B_i)(√s A_i) = s B_i A_i, adapter i's model up to the rounding of √s·√s
    from evomerge.methods import get_method

    engine = MergeEngine([family["base"], family["plain"], family["plain2"]], device="cpu")
    for i, name in enumerate(["plain", "plain2"]):
        (target,) = get_method("lorahub").source_alone_points(i, 2)
        engine.materialize(_recipe(family, "lorahub", target["weight"]))
        want = load_file(f"{family[name + '_full']}/model.safetensors")
        _assert_same(engine.state_dict(), want, rtol=1e-6, atol=1e-6)
