"""Multiple-choice accuracy of zoo models, and the model x task table written after a build.

The metric is lm-eval's ``acc`` for ``output_type: multiple_choice`` (the task YAMLs use it):
for an item with query ``q`` and choices ``c_1..c_k``, the prediction is
``argmax_j sum_t log p(y_t | <s> q, y_<t)`` over the tokens ``y`` of ``" " + c_j`` (ties go to
the first choice), and ``acc`` is the fraction of items whose prediction is the gold index.
Tokens are split the way lm-eval's ``HFLM`` splits them: encode ``q + " " + c_j`` whole, encode
``q`` alone, and the continuation is everything after the context's tokens.

We score with our own batched loop rather than ``lm_eval.simple_evaluate``: on a 2-core CPU the
harness spends seconds per call building tasks and datasets, which alone would exceed the mini
zoo's time budget; ``tests/test_zoo.py`` checks that lm-eval gives the same numbers.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from evomerge.zoo.tasks import Item


def choice_requests(items: Sequence[Item], tokenizer: PreTrainedTokenizerFast) -> list[tuple[list[int], int]]:
    """For every (item, choice) in order: the full token ids and the number of continuation tokens."""
    out: list[tuple[list[int], int]] = []
    for item in items:
        n_ctx = len(tokenizer(str(item["query"]))["input_ids"])
        for choice in item["choices"]:  # type: ignore[union-attr]
            whole = tokenizer(f"{item['query']} {choice}")["input_ids"]
            out.append((whole, len(whole) - n_ctx))
    return out


#: input ids ``[batch, length]`` -> next-token log-probabilities ``[batch, length, vocab]`` (fp32)
TokenLogProbs = Callable[[torch.Tensor], torch.Tensor]


def model_logprobs(model: PreTrainedModel | torch.nn.Module) -> TokenLogProbs:
    """Next-token log-probabilities of one model: ``log_softmax`` of its logits."""
    return lambda ids: torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


def ensemble_logprobs(models: Sequence[PreTrainedModel], average: Literal["probs", "logits"]) -> TokenLogProbs:
    """Next-token log-probabilities of the output ensemble of ``models`` (Wortsman et al. 2022, "Model soups",
    the ensemble baseline): ``average="probs"``: ``log((1/M) sum_m softmax(z_m))``, the mean of the models'
    output distributions; ``average="logits"``: ``log_softmax((1/M) sum_m z_m)``, the mean of their logits."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    if average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")

    def logprobs(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(input_ids=ids).logits.float() for m in models])
        if average == "logits":
            return torch.log_softmax(logits.mean(0), dim=-1)
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(len(models))

    return logprobs


@torch.no_grad()
def continuation_logprobs(
    logprobs: TokenLogProbs,
    requests: Sequence[tuple[list[int], int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """``sum_t log p(y_t | prefix)`` over the last ``n_cont`` tokens of every request (fp32, on CPU), with ``p``
    from ``logprobs`` (:func:`model_logprobs`, :func:`ensemble_logprobs`) on ``device``.

    Requests are batched by length (right padding, so the causal mask keeps padding out of every
    scored position).
    """
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    scores = torch.empty(len(requests), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(requests[i][0]) for i in chunk) - 1
        inputs = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, i in enumerate(chunk):
            ids, n_cont = requests[i]
            n = len(ids) - 1
            inputs[row, :n] = torch.tensor(ids[:-1])
            targets[row, :n] = torch.tensor(ids[1:])
            mask[row, n - n_cont : n] = True
        logp = logprobs(inputs.to(device)).gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1)
        scores[chunk] = (logp * mask.to(device)).sum(-1).cpu()
    return scores


def choice_logprobs(
    model: PreTrainedModel | torch.nn.Module | TokenLogProbs,
    tokenizer: PreTrainedTokenizerFast,
    items: Sequence[Item],
    batch_size: int = 256,
) -> torch.Tensor:
    """``log p(choice | query)`` summed over the choice's tokens, for every choice of every item in order (lm-eval's
    ``loglikelihood`` requests of a multiple-choice task), under ``model``: any causal LM module (a ``transformers``
    model or a PEFT model wrapping one, on its own device) or an ensemble's :data:`TokenLogProbs` on CPU."""
    if isinstance(model, torch.nn.Module):  # a PeftModel is a Module, not a PreTrainedModel
        logprobs, device = model_logprobs(model), next(model.parameters()).device
    else:
        logprobs, device = model, torch.device("cpu")
    requests = choice_requests(items, tokenizer)
    return continuation_logprobs(logprobs, requests, tokenizer.pad_token_id, batch_size, device)


def accuracy(
    model: PreTrainedModel | torch.nn.Module | TokenLogProbs,
    tokenizer: PreTrainedTokenizerFast,
    items: Sequence[Item],
    batch_size: int = 256,
) -> float:
    """lm-eval ``acc`` of ``model`` (as in :func:`choice_logprobs`) on multiple-choice ``items`` (see the module
    docstring)."""
    n_choices = {len(item["choices"]) for item in items}  # type: ignore[arg-type]
    if len(n_choices) != 1:
        raise ValueError(f"items must all have the same number of choices, got {sorted(n_choices)}")
    scores = choice_logprobs(model, tokenizer, items, batch_size)
    pred = scores.view(len(items), n_choices.pop()).argmax(dim=1)
    gold = torch.tensor([int(item["gold"]) for item in items])  # type: ignore[arg-type]
    return int((pred == gold).sum()) / len(items)


Table = dict[str, dict[str, float]]  # model name -> column ("task/split") -> accuracy


def table_markdown(table: Table) -> str:
    """Markdown table: one row per model, one column per ``task/split``, accuracies with 3 decimals."""
    columns = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for name, row in table.items()]
    return "\n".join(lines) + "\n"


def table_csv(table: Table) -> str:
    """CSV with a ``model`` column and one column per ``task/split`` (full float precision)."""
    columns = list(next(iter(table.values())))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", *columns])
    for name, row in table.items():
        writer.writerow([name, *(repr(row[c]) for c in columns)])
    return buf.getvalue()


def read_table_csv(path: Path) -> Table:
    """Inverse of :func:`table_csv`."""
    with path.open(newline="") as f:
        return {row.pop("model"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def write_table(table: Table, out_dir: Path) -> None:
    """Write ``table.md`` and ``table.csv`` into ``out_dir``."""
    (out_dir / "table.md").write_text(table_markdown(table))
    (out_dir / "table.csv").write_text(table_csv(table))


def column(task: str, split: str) -> str:
    """Column name of ``task`` on ``split`` in a :data:`Table`."""
    return f"{task}/{split}"


def model_row(
    model: PreTrainedModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    splits: Mapping[tuple[str, str], Sequence[Item]],
    batch_size: int,
) -> dict[str, float]:
    """Accuracy of one model on every ``(task, split)`` item list, keyed by :func:`column`."""
    return {column(t, s): accuracy(model, tokenizer, items, batch_size) for (t, s), items in splits.items()}
