"""Model construction and the small, seeded training loop of the tiny zoo.

Training minimises the usual next-token cross-entropy of a causal LM,
``L = -(1/|M|) sum_{t in M} log p(x_t | x_<t)``, over the positions ``M`` that carry a label:
every token of ``<s> query answer</s>`` when pretraining the base, only the answer tokens
(`` answer</s>``) when fine-tuning experts and sweep models. With label smoothing ``eps`` (Szegedy et al.
2016) the target of each position is ``(1 - eps) * onehot + eps / V`` over the ``V`` tokens. AdamW
(Loshchilov & Hutter, 2019) with a linear warm-up and a cosine decay to zero (Loshchilov & Hutter, 2017, SGDR)
drives it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.config import ModelShape, TrainSpec

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """Right-padded token ids, attention mask and labels (``IGNORE_INDEX`` where not trained)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)``, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 ``LlamaForCausalLM`` of ``shape`` (GQA, untied embeddings), seeded."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def encode(pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast, *, answer_only: bool) -> Encoded:
    """Token ids of ``<s>query answer</s>`` for every pair; labels on all tokens or on the answer only.

    The answer boundary is where lm-eval puts it: the tokens of ``query`` alone are the context.
    """
    rows: list[list[int]] = []
    starts: list[int] = []
    for query, answer in pairs:
        ids = tokenizer(f"{query} {answer}")["input_ids"] + [tokenizer.eos_token_id]
        rows.append(ids)
        starts.append(len(tokenizer(query)["input_ids"]) if answer_only else 1)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, start) in enumerate(zip(rows, starts, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, start : len(ids)] = input_ids[i, start : len(ids)]
    return Encoded(input_ids, attention_mask, labels)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate at ``step``: ``peak * step / warmup`` while warming up, then
    ``peak * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing ``eps`` (module docstring), the mean over labelled positions:
    position ``t`` predicts ``labels[:, t + 1]``; ``IGNORE_INDEX`` positions do not count."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=eps,
    )


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index batches that walk through seeded permutations of ``range(n)``, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def train(
    model: LlamaForCausalLM, data: Encoded, spec: TrainSpec, *, batch_size: int, desc: str, progress: bool
) -> float:
    """Train ``model`` in place on ``data`` for ``spec.steps`` AdamW steps; returns the mean loss of the last 10%.

    AdamW with betas (0.9, 0.98), weight decay on weight matrices only, gradient norm clipped at 1,
    learning rate from :func:`lr_at`. Deterministic for a fixed thread count: the batch order and
    any randomness come from ``spec.seed``.
    """
    if data.input_ids.shape[1] > model.config.max_position_embeddings:
        raise ValueError(
            f"training sequences of {data.input_ids.shape[1]} tokens exceed the model's "
            f"max_positions={model.config.max_position_embeddings}; raise ModelShape.max_positions"
        )
    torch.manual_seed(spec.seed)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, int(spec.warmup_frac * spec.steps))
    tail: list[float] = []
    bar = tqdm(total=spec.steps, desc=desc, disable=not progress, leave=False)
    for step, idx in enumerate(_batches(len(data.input_ids), batch_size, spec.steps, spec.seed)):
        width = int(data.attention_mask[idx].sum(1).max())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec.steps, spec.lr, warmup)
        labels = data.labels[idx, :width]
        out = model(
            input_ids=data.input_ids[idx, :width],
            attention_mask=data.attention_mask[idx, :width],
            labels=None if spec.label_smoothing else labels,
        )
        loss_t = out.loss if not spec.label_smoothing else smoothed_loss(out.logits, labels, spec.label_smoothing)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss_t.detach())
        if step >= spec.steps - max(1, spec.steps // 10):
            tail.append(loss)
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    model.eval()
    return sum(tail) / len(tail)
