"""Router rows of an MoE built from dense experts: from prompts (hidden states, token embeddings) or seeded noise.

The conventions are mergekit-moe 0.1.5's (``mergekit/moe/router.py``, ``scripts/moe.py``), so that the same config
gives the same router tensors:

- prompts are tokenized with the base's tokenizer, each prefixed with the BOS token's text, no other special
  tokens, padded on the left with the BOS id (the EOS token when there is no BOS);
- ``hidden`` / ``hidden_last``: the base model is run in bfloat16 with ``output_hidden_states``; the state entering
  layer ``l`` (``hidden_states[l]``, the embeddings for layer 0) is taken at the last position of each prompt and
  averaged over the prompts; ``hidden_avg`` averages over every position of the padded batch instead (padding
  included, as mergekit does);
- ``cheap_embed``: the sum of the token embeddings of every non-padding token of the prompts, normalised, the same
  row for every layer (float32);
- an expert's row is ``v(positive) − v(negative)`` (the second term only with negative prompts), divided by its L2
  norm clamped at 1e-8;
- ``random``: ``N(0, 1)`` rows of shape (layers, experts, hidden) from one torch generator seeded with ``seed``
  (``mergekit-moe --random-seed SEED`` seeds torch's global generator and draws the same tensor);
  ``uniform_random``: ``U(−1/√h, 1/√h)`` from the same generator (torch.nn.Linear's initialisation);
- the rows of a layer (experts and shared expert together) are checked as mergekit-moe checks them
  (``warn_degenerate_gates``): a 2-norm condition number above 5 means nearly linearly dependent rows, e.g. two
  experts with nearly the same prompts; :func:`degenerate_warning` is one warning line naming the layers and the two
  most alike experts (:class:`~evomerge.moe.MoeModel` logs each distinct one once).

evomerge's additions (:func:`router_rows`): the rows ``g`` mixed with seeded unit-norm noise ``ẑ`` and scaled per
layer, ``s_l·((1 − r)·g + r·ẑ)``: ``s`` is an inverse softmax temperature of the router (its logits are ``x·Wᵀ``),
``r`` the weight of random routing vs the prompts' directions (``ẑ`` drawn from ``seed + 1``, so that it is not the
``random`` gate's own draw).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from evomerge.recipe import MoeExpert

__all__ = ["DEGENERATE_CONDITION", "PromptGates", "cheap_embed_rows", "degenerate_layers", "degenerate_warning",
           "expert_rows", "hidden_rows", "most_alike", "random_rows", "router_rows", "tokenize_prompts"]

#: mergekit-moe's threshold on the condition number of a layer's gate rows (``warn_degenerate_gates``)
DEGENERATE_CONDITION = 5.0


def tokenize_prompts(tokenizer: object, prompts: Sequence[str]) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` of ``prompts`` as mergekit-moe tokenizes them (module docstring)."""
    tok = tokenizer  # a transformers tokenizer; its padding settings are changed, as mergekit changes them
    tok.padding_side = "left"  # type: ignore[attr-defined]
    if tok.bos_token_id is not None:  # type: ignore[attr-defined]
        tok.pad_token_id = tok.bos_token_id  # type: ignore[attr-defined]
    else:
        tok.pad_token = tok.eos_token  # type: ignore[attr-defined]
    bos = tok.bos_token or ""  # type: ignore[attr-defined]
    batch = tok([bos + p for p in prompts], return_tensors="pt", padding=True,  # type: ignore[operator]
                add_special_tokens=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def hidden_rows(model: torch.nn.Module, tokens: dict[str, Tensor], *, last: bool) -> Tensor:
    """(layers, hidden): the hidden state entering each layer, at the last position (``last``) or averaged over
    positions, then averaged over the prompts; in the model's dtype (mergekit: bfloat16)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in tokens.items()}, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # (layers, batch, positions, hidden)
    states = states[:, :, -1, :] if last else states.sum(dim=2) / states.shape[2]
    return states.sum(dim=1) / states.shape[1]


def cheap_embed_rows(embed: Tensor, tokens: dict[str, Tensor], num_layers: int) -> Tensor:
    """(layers, hidden), float32: the normalised sum of the prompts' token embeddings (padding masked out), repeated
    for every layer. ``embed[ids]`` is what mergekit's one-hot product computes, entry for entry."""
    h = embed.float()[tokens["input_ids"]]
    summed = (h * tokens["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)


def expert_rows(expert: MoeExpert, rows_of: Callable[[Sequence[str]], Tensor]) -> Tensor:
    """(layers, hidden): ``rows_of(positive) − rows_of(negative)``, divided by its L2 norm clamped at 1e-8."""
    rows = rows_of(expert.positive_prompts)
    if expert.negative_prompts:
        rows -= rows_of(expert.negative_prompts)
    rows /= rows.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
    return rows


def random_rows(seed: int, shape: tuple[int, int, int], *, uniform: bool = False) -> Tensor:
    """(layers, experts, hidden) float32 rows from a CPU generator seeded with ``seed``: ``N(0, 1)``, or with
    ``uniform`` ``U(−1/√h, 1/√h)`` computed as mergekit does (``rand·2·scale − scale``)."""
    generator = torch.Generator().manual_seed(seed)
    if not uniform:
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=generator) * 2 * scale - scale


class PromptGates:
    """Router rows of the prompt gate modes for one base, per expert (layers, hidden), each prompt set computed once;
    the tokenizer and, for the ``hidden*`` modes, the bfloat16 base model are loaded on first use and kept."""

    def __init__(self, base: Path, num_layers: int, embed: Callable[[], Tensor]) -> None:
        self.base, self.num_layers, self._embed = base, num_layers, embed
        self._tokenizer: object = None
        self._model: torch.nn.Module | None = None
        self._table: Tensor | None = None
        self._rows: dict[tuple, Tensor] = {}

    def _tokens(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.base), trust_remote_code=False)
        return tokenize_prompts(self._tokenizer, prompts)

    def _rows_of(self, gate_mode: str, prompts: Sequence[str]) -> Tensor:
        if gate_mode == "cheap_embed":
            if self._table is None:
                self._table = self._embed()
            return cheap_embed_rows(self._table, self._tokens(prompts), self.num_layers)
        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(str(self.base), dtype=torch.bfloat16,
                                                               trust_remote_code=False).eval()
        return hidden_rows(self._model, self._tokens(prompts), last=gate_mode != "hidden_avg")

    def rows(self, gate_mode: str, experts: Sequence[MoeExpert]) -> Tensor:
        """(layers, experts, hidden): every expert's row (:func:`expert_rows`) in ``gate_mode``."""
        out = []
        for expert in experts:
            key = (gate_mode, tuple(expert.positive_prompts), tuple(expert.negative_prompts))
            if key not in self._rows:
                self._rows[key] = expert_rows(expert, lambda prompts: self._rows_of(gate_mode, prompts))
            out.append(self._rows[key])
        return torch.stack(out).permute(1, 0, 2)


def router_rows(gates: Tensor, scale: Sequence[float], random_weight: float, seed: int) -> Tensor:
    """(layers, experts, hidden) float32 router rows ``s_l·((1 − r)·g + r·ẑ)`` with ``ẑ`` the seeded normal rows
    normalised to unit length (module docstring); ``s = 1, r = 0`` gives ``g`` itself, bit for bit."""
    rows = gates.float()
    if random_weight:
        noise = random_rows(seed + 1, tuple(rows.shape))  # type: ignore[arg-type]
        noise /= noise.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        rows = (1 - random_weight) * rows + random_weight * noise
    if any(s != 1.0 for s in scale):
        rows = rows * torch.tensor(scale, dtype=torch.float32).view(-1, 1, 1)
    return rows


def degenerate_layers(rows: Tensor, threshold: float = DEGENERATE_CONDITION) -> list[int]:
    """The layers ``l`` of (layers, experts, hidden) gate rows whose matrix ``rows[l]`` has a 2-norm condition number
    ``σ_max / σ_min`` above ``threshold``: nearly linearly dependent rows (mergekit-moe's rule and threshold)."""
    return [layer for layer in range(rows.shape[0]) if float(torch.linalg.cond(rows[layer].float())) > threshold]


def most_alike(rows: Tensor, layers: Sequence[int]) -> tuple[int, int, float]:
    """``(i, j, c)``: the two experts (``i < j``) whose rows have the highest cosine similarity ``c``, averaged over
    ``layers`` of (layers, experts, hidden) rows; needs at least two experts."""
    unit = rows[list(layers)].float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cosine = (unit @ unit.transpose(1, 2)).mean(dim=0)
    cosine.fill_diagonal_(-math.inf)
    i, j = divmod(int(cosine.argmax()), cosine.shape[0])
    return min(i, j), max(i, j), float(cosine[i, j])


def degenerate_warning(rows: Tensor, names: Sequence[str]) -> str | None:
    """One warning line when some layers' gate rows are degenerate (:func:`degenerate_layers`), naming those layers
    and the two most alike experts there (``names``: one per row); None when none is."""
    layers = degenerate_layers(rows)
    if not layers or rows.shape[1] < 2:
        return None
    i, j, cosine = most_alike(rows, layers)
    where = ("every layer" if len(layers) == rows.shape[0] else
             f"layer{'s' * (len(layers) > 1)} {', '.join(str(layer) for layer in layers)}")
    message = (f"the router rows of {where} are nearly linearly dependent (condition number above "
               f"{DEGENERATE_CONDITION:g}, mergekit-moe's rule); the most alike are {names[i]} and {names[j]} (cosine "
               f"{cosine:.3f}): their prompts may be too similar, and some experts will be underused")
    return message
