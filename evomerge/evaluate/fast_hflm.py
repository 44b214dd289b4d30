"""lm-eval's ``HFLM`` over a live model, minus the per-call work that does not depend on the weights.

Scoring a multiple-choice request ``(context, continuation)`` means

    loglikelihood = sum_{j} log p(cont_j | context, cont_<j),   is_greedy = all_j argmax_v p(v | ...) == cont_j

(lm-eval's ``loglikelihood`` request type; Gao et al., "A framework for few-shot language model evaluation",
2021-2024). Stock ``HFLM`` re-tokenizes every request on every call and post-processes the model output one
request at a time (a ``log_softmax`` over every position of the batch, then per request an ``argmax``, a
``gather`` and a host sync). During a merge search the same requests are scored again and again while only the
weights change, so :class:`FastHFLM` overrides these steps and keeps everything else of ``HFLM``:

* :meth:`FastHFLM.tok_encode` and :meth:`FastHFLM._encode_pair` are memoized: token ids depend on the
  tokenizer, not on the weights.
* :meth:`FastHFLM._loglikelihood_tokens` keeps lm-eval's request order, grouping (requests that share
  ``context + continuation[:-1]`` run once) and batches, so the model sees exactly the same input tensors, but
  takes ``log_softmax`` only at the scored positions and gathers every request of a batch at once; the results
  reach the host in one transfer per call. The batches (input tensors and gather indices, on the device) of a
  request list are built once and reused when the same requests come again, as they do for every candidate.
  Sums are accumulated in float64 (lm-eval sums in the softmax dtype), so log-likelihoods agree with stock
  ``HFLM`` to float rounding.

  One deliberate difference: when grouped requests have continuations of different lengths, stock ``HFLM``
  (0.4.13) gathers a shorter continuation's log-probs at the *first* positions of the longest one's slice while
  its greedy check uses the *last* positions; here both use the last positions, which are the ones that predict
  that continuation. Grouped requests in a multiple-choice doc share the context and have equal lengths, so
  this does not arise there.

``_model_call`` skips ``HFLM``'s autocast context when no mixed precision is configured. Seq2seq models and
``batch_size="auto"`` fall back to the stock implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator

Request = tuple[tuple[str, str], list[int], list[int]]
MAX_PLANS = 8


def _sort_key(req: Request) -> tuple[int, tuple[int, ...]]:
    """lm-eval's batching order: longest ``context + continuation`` first, ties by token ids."""
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _group_key(req: Request) -> list[int]:
    """lm-eval's grouping key: requests with equal ``context + continuation[:-1]`` share one forward pass."""
    return req[1] + req[2][:-1]


@dataclass
class _Batch:
    """One forward pass and where to read its answers: rows/cols of the scored positions, then per scored token
    its row in those positions, its token id and the answer it belongs to."""

    input_ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    token_rows: torch.Tensor
    tokens: torch.Tensor
    answer_ids: torch.Tensor
    n_answers: int


@dataclass
class _Plan:
    """The batches of one request list, the request strings in computed order, and for each request (input order)
    the position of its answer in computed order."""

    batches: list[_Batch]
    req_strs: list[tuple[str, str] | None]
    positions: list[int]


class FastHFLM(HFLM):
    """``HFLM`` with memoized tokenization and batched log-likelihood post-processing (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encodings: dict[tuple[str, bool | None, int | None], list[int]] = {}
        self._pairs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._plans: dict[tuple[Any, ...], _Plan] = {}

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """``HFLM.tok_encode``, memoized on its arguments (the tokenizer never changes for this object)."""
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        hit = self._encodings.get(key)
        if hit is None:
            hit = self._encodings[key] = super().tok_encode(string, add_special_tokens, left_truncate_len)
        return list(hit)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``(context, continuation)`` tokenization, memoized on the two strings."""
        hit = self._pairs.get((context, continuation))
        if hit is None:
            hit = self._pairs[(context, continuation)] = super()._encode_pair(context, continuation)
        return list(hit[0]), list(hit[1])

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of a causal LM, as in ``HFLM._model_call`` minus its autocast context when no mixed precision is
        asked for (leaving even a disabled autocast context clears its cache: ~0.3 ms per forward pass)."""
        if self.mixed_precision_dtype is not None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with torch.no_grad():
            return self.model(inps).logits

    def _plan(self, requests: list[Request]) -> _Plan:
        """Batches as stock ``HFLM`` forms them (lm-eval's ``Collator``), with the index tensors to read answers."""
        collator = Collator(
            requests, sort_fn=_sort_key, group_by="contexts" if self.logits_cache else None, group_fn=_group_key
        )
        placeholder = torch.empty(1, 0, 0)
        batches: list[_Batch] = []
        req_strs: list[tuple[str, str] | None] = []
        for chunk in collator.get_batched(n=int(self.batch_size)):
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            rows: list[int] = []
            cols: list[int] = []
            token_rows: list[int] = []
            tokens: list[int] = []
            answer_ids: list[int] = []
            n_answers = 0
            for b, ((req_str, ctx, cont), inp) in enumerate(zip(chunk, inputs, strict=True)):
                if not 0 < len(cont) <= len(inp):
                    raise ValueError(f"continuation of {len(cont)} tokens does not fit an input of {len(inp)} tokens")
                first = len(rows)  # row b predicts its continuation at positions [len(inp) - len(cont), len(inp))
                rows.extend([b] * len(cont))
                cols.extend(range(len(inp) - len(cont), len(inp)))
                for member_str, member_cont, _ in collator.get_cache(
                    req_str=req_str, cxt_toks=ctx, cont_toks=cont, logits=placeholder
                ):
                    offset = first + len(cont) - len(member_cont)
                    token_rows.extend(range(offset, offset + len(member_cont)))
                    tokens.extend(member_cont)
                    answer_ids.extend([n_answers] * len(member_cont))
                    req_strs.append(member_str)
                    n_answers += 1

            def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.long, device=self.device)

            batches.append(_Batch(
                input_ids=tensor([x + [0] * (width - len(x)) for x in inputs]), rows=tensor(rows), cols=tensor(cols),
                token_rows=tensor(token_rows), tokens=tensor(tokens), answer_ids=tensor(answer_ids),
                n_answers=n_answers,
            ))
        return _Plan(batches=batches, req_strs=req_strs, positions=collator.get_original(list(range(len(req_strs)))))

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, continuation is the greedy decode)`` per request, in input order.

        The batch plan of a request list is built once and reused while the same requests come again.
        """
        if self.backend != "causal" or self.batch_size == "auto":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if not requests:
            return []
        key = tuple((r[0], tuple(r[1]), tuple(r[2])) for r in requests)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = self._plan(requests)
        lls: list[torch.Tensor] = []
        greedy: list[torch.Tensor] = []
        for batch in plan.batches:
            logits = self._model_call(batch.input_ids)  # [batch, width, vocab]
            logprobs = F.log_softmax(logits[batch.rows, batch.cols], dim=-1, dtype=self.softmax_dtype)[batch.token_rows]
            token_lp = logprobs.gather(1, batch.tokens[:, None])[:, 0].double()
            misses = (logprobs.argmax(dim=-1) != batch.tokens).int()
            zeros = torch.zeros(batch.n_answers, device=logprobs.device)
            lls.append(zeros.double().index_add_(0, batch.answer_ids, token_lp))
            greedy.append(zeros.int().index_add_(0, batch.answer_ids, misses) == 0)
        answers = list(zip(torch.cat(lls).tolist(), torch.cat(greedy).tolist(), strict=True))
        for req_str, answer in zip(plan.req_strs, answers, strict=True):
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, answer)
        return [answers[p] for p in plan.positions]
