"""``PerplexityEvaluator``: sliding-window perplexity and bits per byte of the live model on local text.

Each document is tokenized as ``[prefix] + tokens(text)`` (prefix: the tokenizer's BOS, else EOS), so every
text token ``x_t`` (``t >= 1``) is predicted. Windows follow the Hugging Face sliding-window recipe
("Perplexity of fixed-length models", transformers docs): window ``k`` covers positions
``[k * stride, min(k * stride + max_length, N))`` and scores only the positions no earlier window scored (the
overlap is context; its labels are ``-100`` in the recipe), so each token is scored exactly once, with at least
``max_length - stride`` tokens of context once past the first window. With ``L = sum_t -log p(x_t | window
context)`` over the ``T`` scored tokens and ``B`` UTF-8 bytes of the texts:

    nll_per_token = L / T,   perplexity = exp(L / T),   bits_per_byte = L / (B * ln 2)

(bits per byte: Gao et al., "The Pile", 2020, sec. 5). The objective is ``bits_per_byte``, direction minimize;
per-item scores are per-document bits per byte.

Documents: a ``.jsonl`` file gives one document per line (its ``text_field``); a ``.txt`` file one document per
paragraph (blocks separated by blank lines, surrounding whitespace stripped). Fidelity scores the first
``ceil(f * n)`` documents of a seeded permutation, like the lm-eval evaluator.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evomerge.evaluate.base import (
    EvalResult,
    EvaluationError,
    Objective,
    check_fidelity,
    fidelity_count,
    result_from_metrics,
    scoring_mode,
    seeded_order,
)

METRICS = ("perplexity", "bits_per_byte", "nll_per_token")


@dataclass(frozen=True)
class Window:
    """One forward pass: input positions ``[begin, end)`` of a document; positions ``>= first_target`` are scored."""

    doc: int
    begin: int
    end: int
    first_target: int


def check_window(max_length: int, stride: int) -> None:
    """:class:`EvaluationError` unless ``1 <= stride < max_length`` (every scored token then has context)."""
    if not 1 <= stride < max_length:
        raise EvaluationError(
            f"need 1 <= stride < max_length, got stride={stride}, max_length={max_length}; "
            "stride is the number of new tokens per window, the rest of the window is context"
        )


def sliding_windows(n_tokens: int, max_length: int, stride: int, doc: int = 0) -> list[Window]:
    """The HF recipe's windows over a document of ``n_tokens`` (position 0 is the prefix, never a target).

    Window ``k`` spans ``[k * stride, min(k * stride + max_length, n_tokens))`` and scores positions from the end
    of the previous window (from 1 in the first); the last window reaches ``n_tokens``. Requires
    ``1 <= stride < max_length`` so that every scored position has context inside its window.
    """
    check_window(max_length, stride)
    windows: list[Window] = []
    prev_end = 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(doc, begin, end, prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Non-empty documents of a ``.jsonl`` (one per line, field ``text_field``) or ``.txt`` (one per paragraph)."""
    if not path.is_file():
        raise EvaluationError(f"perplexity data file {path} does not exist")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{path}:{lineno} is not valid JSON: {err}") from err
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise EvaluationError(f"{path}:{lineno} has no string field {text_field!r}; set text_field=")
            docs.append(record[text_field])
    elif path.suffix == ".txt":
        docs = [paragraph.strip() for paragraph in path.read_text(encoding="utf-8").split("\n\n")]
    else:
        raise EvaluationError(f"perplexity data must be a .txt or .jsonl file, got {path}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EvaluationError(f"{path} holds no non-empty documents")
    return docs


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor, window: Window) -> torch.Tensor:
    """``-sum log p(x_t | x_<t)`` over the window's scored positions, from the logits of ``input_ids[begin:end]``.

    ``logits[j]`` predicts ``input_ids[j + 1]`` (positions relative to ``begin``), in float32.
    """
    first = window.first_target - window.begin
    n = window.end - window.begin
    logprobs = F.log_softmax(logits[first - 1 : n - 1].float(), dim=-1)
    return -logprobs.gather(1, input_ids[first:n, None])[:, 0].sum()


class PerplexityEvaluator:
    """Sliding-window perplexity over local text (see the module doc for the windows and formulas).

    Args:
        path: a ``.jsonl`` (one document per line) or ``.txt`` (one per paragraph) file.
        max_length: tokens per window (default: the model's ``max_position_embeddings``, at most 1024).
        stride: new tokens per window (default ``max_length // 2``); ``1 <= stride < max_length``.
        text_field: JSONL field holding the text.
        limit: at most this many documents (from the seeded permutation).
        batch_size: windows per forward pass.
        seed: seed of the document permutation used for fidelity subsets; None keeps file order.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_length: int | None = None,
        stride: int | None = None,
        text_field: str = "text",
        limit: int | None = None,
        batch_size: int = 8,
        seed: int | None = 0,
    ) -> None:
        if limit is not None and not (isinstance(limit, int) and limit >= 1):
            raise EvaluationError(f"limit must be a positive number of documents, got {limit!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.path = Path(path)
        self.max_length = max_length
        self.stride = stride
        self.text_field = text_field
        self.limit = limit
        self.batch_size = batch_size
        self.seed = seed
        self.objective = Objective(("bits_per_byte",), direction="minimize")
        self.check()
        order = seeded_order(len(self.documents), seed)
        self.order = order[:limit] if limit is not None else order
        self._token_cache: tuple[Any, list[list[int]]] | None = None

    def check(self, model: Any = None) -> None:
        """Read the documents (errors name the file and line) and check the window sizes against ``model``."""
        self.documents = read_documents(self.path, self.text_field)
        if self.max_length is not None:
            check_window(self.max_length, self.stride or max(1, self.max_length // 2))
        if model is not None:
            check_window(*self._window_sizes(model))

    def _window_sizes(self, model: Any) -> tuple[int, int]:
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1024
        max_length = self.max_length or min(int(context), 1024)
        if max_length > context:
            raise EvaluationError(f"max_length={max_length} exceeds the model's context of {context} positions")
        return max_length, self.stride or max(1, max_length // 2)

    def _token_ids(self, tokenizer: Any) -> list[list[int]]:
        """``[prefix] + tokens(doc)`` per document, tokenized once per tokenizer object."""
        if self._token_cache is None or self._token_cache[0] is not tokenizer:
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if prefix is None:
                raise EvaluationError("the tokenizer has neither a BOS nor an EOS token to start each document with")
            ids = [[prefix, *tokenizer(doc, add_special_tokens=False)["input_ids"]] for doc in self.documents]
            self._token_cache = (tokenizer, ids)
        return self._token_cache[1]

    def score(self, model: Any, tokenizer: Any, *, fidelity: float = 1.0) -> EvalResult:
        """Perplexity, bits per byte and NLL per token on the first ``ceil(fidelity * n)`` documents."""
        fidelity = check_fidelity(fidelity)
        start = time.perf_counter()
        max_length, stride = self._window_sizes(model)
        ids = self._token_ids(tokenizer)
        docs = self.order[: fidelity_count(len(self.order), fidelity)]
        windows = [w for d in docs for w in sliding_windows(len(ids[d]), max_length, stride, doc=d)]
        device = next(model.parameters()).device
        nll = dict.fromkeys(docs, 0.0)
        with scoring_mode(model):
            for i in range(0, len(windows), self.batch_size):
                batch = windows[i : i + self.batch_size]
                for w, value in zip(batch, _batch_nll(model, ids, batch, device), strict=True):
                    nll[w.doc] += value
        n_tokens = {d: len(ids[d]) - 1 for d in docs}
        n_bytes = {d: len(self.documents[d].encode("utf-8")) for d in docs}
        total_nll, total_tokens, total_bytes = sum(nll.values()), sum(n_tokens.values()), sum(n_bytes.values())
        metrics = {
            "perplexity": math.exp(total_nll / total_tokens),
            "bits_per_byte": total_nll / (total_bytes * math.log(2)),
            "nll_per_token": total_nll / total_tokens,
        }
        per_item = {"bits_per_byte": [nll[d] / (n_bytes[d] * math.log(2)) for d in docs]}
        return result_from_metrics(
            self.objective, metrics, per_item, n_items=len(docs), seconds=time.perf_counter() - start, fidelity=fidelity
        )


def _batch_nll(model: Any, ids: Sequence[list[int]], windows: Sequence[Window], device: torch.device) -> list[float]:
    """NLL of each window (token ids of its doc in ``ids``), from one right-padded forward pass.

    Causal attention: the padding after a window never affects its positions.
    """
    width = max(w.end - w.begin for w in windows)
    rows = [ids[w.doc][w.begin : w.end] for w in windows]
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    return torch.stack([window_nll(logits[b], input_ids[b], w) for b, w in enumerate(windows)]).tolist()
