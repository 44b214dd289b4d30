"""Data statistics for data-aware merges: diagonal Fisher (Fisher merging) and input Gram matrices (RegMean).

Both take a causal LM (``model(input_ids=..., attention_mask=...)`` returning ``.logits``, as transformers'
``*ForCausalLM``) and an iterable of batches ``{"input_ids": [B, T], "attention_mask": [B, T] (optional),
"labels": [B, T] (optional, -100 = ignored)}``; tensors are moved to the model's device. Padding positions
(``attention_mask == 0``) are excluded from both statistics. The model's train/eval mode and its parameters'
``requires_grad`` flags are restored afterwards, and its ``.grad`` fields are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]


def _on_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


def _labels(batch: Batch) -> Tensor:
    """Next-token targets: ``batch["labels"]`` if given, else ``input_ids`` with padding set to -100."""
    if "labels" in batch:
        return batch["labels"]
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return labels


def sequence_log_likelihood(model: nn.Module, example: Batch) -> Tensor:
    """``log p(y|x) = Σ_t log p(y_{t+1} | y_{≤t})`` of one example ([1, T] tensors) over its non-ignored targets.

    Labels are shifted inside (position t predicts label t+1), as in transformers' causal-LM loss.
    """
    logits = model(input_ids=example["input_ids"], attention_mask=example.get("attention_mask")).logits
    targets = _labels(example)[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, picked, 0.0).sum()


def _examples(batches: Iterable[Batch], n_batches: int | None, device: torch.device) -> Iterator[Batch]:
    """Single examples ([1, T] tensors) with at least one target, from the first ``n_batches`` batches."""
    for batch in islice(batches, n_batches):
        batch = _on_device(batch, device)
        for row in range(batch["input_ids"].shape[0]):
            example = {key: value[row : row + 1] for key, value in batch.items()}
            if bool((_labels(example)[:, 1:] != -100).any()):
                yield example


def fisher_diagonal(
    model: nn.Module, batches: Iterable[Batch], *, n_batches: int | None = None
) -> dict[str, Tensor]:
    """Empirical diagonal Fisher ``F = mean_examples (∂ log p(y|x) / ∂θ)²`` of a causal LM, per parameter.

    Per example (one backward per sequence; a batch's loss would square the sum of gradients, not sum the
    squares): ``log p(y|x)`` is the sequence log-likelihood of its own tokens (:func:`sequence_log_likelihood`,
    labels = the shifted ``input_ids``), so ``y`` is the data, not a sample from the model (empirical Fisher).
    Examples without any target are skipped. Keys are ``model.named_parameters()`` names (state-dict names;
    a tied weight appears once, under its first name); values are float32 on the parameters' device.
    Uses the first ``n_batches`` batches (all when None). Matena & Raffel 2022.
    """
    named = dict(model.named_parameters())
    params = list(named.values())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    count = 0
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        device = params[0].device
        for example in _examples(batches, n_batches, device):
            grads = torch.autograd.grad(sequence_log_likelihood(model, example), params, allow_unused=True)
            for name, grad in zip(named, grads):
                if grad is not None:
                    sums[name] += grad.float().square()
            count += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("fisher_diagonal got no example with a target token: pass non-empty batches")
    return {name: total / count for name, total in sums.items()}


class GramStats(dict[str, Tensor]):
    """``{weight name: Σ x xᵀ}`` with ``counts[weight name]`` = number of token positions summed."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}


def gram_matrices(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    module_filter: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
) -> GramStats:
    """Input Gram matrices ``G = Σ_x x xᵀ`` [in, in] of every ``module_filter`` layer (RegMean statistics).

    A forward hook on each matching module sums ``x xᵀ`` over all non-padding token positions of the module's
    input ``x`` (float32). Keys are the layer's weight names (``"model.layers.0.mlp.up_proj.weight"``), the
    state-dict names of the tensors RegMean merges; ``.counts`` holds the positions per key. Hooks are removed
    afterwards, also on error. Jin et al. 2023.
    """
    stats = GramStats()
    attention: list[Tensor | None] = [None]  # mask of the batch being run, read by the hooks

    def hook(key: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def accumulate(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach()
            mask = attention[0]
            rows = x[mask.bool()] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            rows = rows.float()
            gram = rows.T @ rows
            stats[key] = stats[key] + gram if key in stats else gram
            stats.counts[key] = stats.counts.get(key, 0) + rows.shape[0]

        return accumulate

    handles = [
        module.register_forward_hook(hook(f"{name}.weight"))
        for name, module in model.named_modules()
        if isinstance(module, module_filter)
    ]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                batch = _on_device(batch, device)
                attention[0] = batch.get("attention_mask")
                model(input_ids=batch["input_ids"], attention_mask=attention[0])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats
