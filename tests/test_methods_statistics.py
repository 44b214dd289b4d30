"""Diagonal Fisher and input Gram statistics on a tiny random Llama, against independent computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.methods.statistics import fisher_diagonal, gram_matrices


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def _ids(seed: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def _reference_fisher(model: nn.Module, sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over sequences of the squared gradient of sum_t log p(x_{t+1} | x_<=t), via torch.func."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def log_likelihood(p: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (ids.unsqueeze(0),)).logits[0]
        return torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None]).sum()

    squares = [{k: g.square() for k, g in grad(log_likelihood)(params, ids).items()} for ids in sequences]
    return {name: torch.stack([s[name] for s in squares]).mean(0) for name in params}


def test_fisher_matches_per_example_torch_func(model: LlamaForCausalLM) -> None:
    batches = [{"input_ids": _ids(1, (2, 6))}, {"input_ids": _ids(2, (2, 6))}, {"input_ids": _ids(3, (2, 6))}]
    fisher = fisher_diagonal(model, batches, n_batches=2)  # the third batch is not used
    expected = _reference_fisher(model, [*batches[0]["input_ids"], *batches[1]["input_ids"]])
    assert fisher.keys() == dict(model.named_parameters()).keys()
    for name, value in expected.items():
        assert torch.allclose(fisher[name], value, rtol=1e-4, atol=1e-9), name
    assert fisher["model.embed_tokens.weight"].abs().sum() > 0


def test_fisher_ignores_padding(model: LlamaForCausalLM) -> None:
    ids = _ids(4, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    padded = fisher_diagonal(model, [{"input_ids": ids, "attention_mask": mask}])
    expected = _reference_fisher(model, [ids[0], ids[1, :4]])
    for name, value in expected.items():
        assert torch.allclose(padded[name], value, rtol=1e-4, atol=1e-9), name


def test_fisher_restores_model_state(model: LlamaForCausalLM) -> None:
    frozen = model.model.norm.weight
    frozen.requires_grad_(False)
    model.train()
    try:
        fisher = fisher_diagonal(model, [{"input_ids": _ids(5, (1, 5))}])
        assert not frozen.requires_grad and model.training
        assert fisher["model.norm.weight"].abs().sum() > 0  # frozen parameters still get a Fisher
        assert all(p.grad is None for p in model.parameters())
    finally:
        frozen.requires_grad_(True)
        model.eval()


def _captured_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input [B, T, in], recorded by pre-hooks of the test's own."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_gram_matches_inputs_and_hidden_states(model: LlamaForCausalLM) -> None:
    batches = [{"input_ids": _ids(6, (2, 5))}, {"input_ids": _ids(7, (3, 4))}]
    grams = gram_matrices(model, batches)
    linear_names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(grams) == sorted(linear_names) and len(linear_names) == 2 * 7 + 1
    expected: dict[str, torch.Tensor] = {}
    for batch in batches:
        for name, x in _captured_inputs(model, batch).items():
            rows = x.reshape(-1, x.shape[-1]).double()
            expected[f"{name}.weight"] = expected.get(f"{name}.weight", 0) + rows.T @ rows
    for key, value in expected.items():
        assert torch.allclose(grams[key].double(), value, rtol=1e-5, atol=1e-5), key
        assert grams.counts[key] == 2 * 5 + 3 * 4
    # independent of hooks: q_proj of layer l sees input_layernorm(hidden state l)
    with torch.no_grad():
        hidden = model(**batches[0], output_hidden_states=True).hidden_states
        for layer in range(2):
            x = model.model.layers[layer].input_layernorm(hidden[layer]).reshape(-1, 16).double()
            x2 = _captured_inputs(model, batches[1])[f"model.layers.{layer}.self_attn.q_proj"].reshape(-1, 16)
            reference = x.T @ x + x2.double().T @ x2.double()
            assert torch.allclose(grams[f"model.layers.{layer}.self_attn.q_proj.weight"].double(), reference, atol=1e-5)


def _linear_hooks(model: nn.Module) -> list[object]:
    """Forward hooks left on nn.Linear modules (transformers keeps hooks of its own on decoder layers)."""
    return [h for m in model.modules() if isinstance(m, nn.Linear) for h in m._forward_hooks.values()]


def test_gram_excludes_padding_and_removes_hooks(model: LlamaForCausalLM) -> None:
    ids = _ids(8, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    padded = gram_matrices(model, [{"input_ids": ids, "attention_mask": mask}])
    separate = gram_matrices(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :3]}])
    for key in separate:
        assert torch.allclose(padded[key], separate[key], atol=1e-5), key
        assert padded.counts[key] == 9
    assert not _linear_hooks(model)
    with pytest.raises(KeyError):
        gram_matrices(model, [{"ids": ids}])  # bad batch: the hooks must still be removed
    assert not _linear_hooks(model)
