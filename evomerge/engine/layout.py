"""Flat layout: every model's tensors in one buffer per model, and the live model's tensors bound to one buffer
laid out the same way, so a run of consecutive tensors is one slice of each.

Each merged tensor lives at an ``ALIGN``-entry aligned offset (vector loads stay aligned; per-block tables of the
kernels, :mod:`evomerge.engine.kernels`, never straddle two tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from evomerge.checkpoint import Checkpoint
from evomerge.recipe import RecipeError

__all__ = ["ALIGN", "LiveTargets", "SourceStacks", "Span", "all_finite", "common_dtype", "load_model", "model_class",
           "refuse_nonfinite", "rows"]

ALIGN = 64  # entries: every tensor starts at a multiple of this in the flat buffers


def all_finite(t: Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf: one float64 reduction (NaN/Inf propagate; fp32 values cannot overflow it)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def refuse_nonfinite(name: str, tensors: Sequence[Tensor], paths: Sequence[str]) -> None:
    """RecipeError naming tensor ``name`` and the models (``paths``, one per tensor) whose copy of it holds NaN/Inf:
    such a source cannot be merged, whatever the recipe."""
    bad = [str(p) for p, t in zip(paths, tensors) if not all_finite(t)]
    if bad:
        raise RecipeError(f"tensor '{name}' holds NaN/Inf in {bad}; it cannot be merged")


def rows(stack: Tensor, idx: list[int]) -> Tensor:
    """``stack[idx]``, as a view (no copy) when ``idx`` is a contiguous ascending run."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return stack[idx[0] : idx[0] + len(idx)]
    return stack[idx]


@dataclass(frozen=True)
class Span:
    """Where a tensor lives in the flat buffers: entries ``[offset, offset + numel)``."""

    offset: int
    numel: int
    shape: torch.Size

    @property
    def end(self) -> int:
        return self.offset + self.numel

    @property
    def blocks(self) -> int:
        """Blocks of ``ALIGN`` entries the tensor occupies."""
        return -(-self.numel // ALIGN)


def model_class(config: object, names: Sequence[str]) -> type:
    """``AutoModelForCausalLM`` when the checkpoint is a causal LM, else the bare ``AutoModel``. A causal LM: its
    config's ``architectures`` name one (``*ForCausalLM``, or any class of transformers' causal-LM mapping, such as
    GPT-2's ``GPT2LMHeadModel``), or, without ``architectures``, its tensor names are a head model's: an
    ``lm_head``, or every name under the causal LM's ``base_model_prefix`` (a GPT-2 LM ties its head to
    ``transformer.wte``, so it saves only ``transformer.*`` names; the bare ``GPT2Model``'s carry no prefix)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    if archs:
        classes = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ([v] if isinstance(v, str) else v)}
        causal = any(a.endswith("ForCausalLM") or a in classes for a in archs)
    else:
        causal = "lm_head.weight" in names or _under_causal_prefix(config, names)
    return AutoModelForCausalLM if causal else AutoModel


def _under_causal_prefix(config: object, names: Sequence[str]) -> bool:
    """Whether every name starts with ``<prefix>.``, the ``base_model_prefix`` of the config's causal-LM class."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    entry = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None) or "")
    cls = getattr(transformers, entry if isinstance(entry, str) else (entry or [""])[0], None)
    prefix = getattr(cls, "base_model_prefix", "") if cls is not None else ""
    return bool(prefix and names) and all(n.startswith(prefix + ".") for n in names)


def load_model(path: str | Path, *, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Load an HF dir as a live model (causal LM when the config says so), on ``device`` in ``dtype``, eval mode."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with Checkpoint.open(path) as ck:
        cls = model_class(config, ck.names)
    model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    return model.to(device).eval()


def common_dtype(checkpoints: Sequence[Checkpoint], names: Sequence[str]) -> torch.dtype:
    """The dtype every model's merged tensors fit in without loss (torch's type promotion over all of them)."""
    dtype = checkpoints[0].dtype(names[0]) if names else torch.float32
    for ck in checkpoints:
        for name in names:
            dtype = torch.promote_types(dtype, ck.dtype(name))
    return dtype


class SourceStacks:
    """Every model's merged tensors, in the models' common dtype, and where each tensor's entries go (``spans``,
    in ``names`` order, aligned), read once.

    Resident: one flat [models, entries] buffer (on ``storage``; pinned and streamed per tensor when that is the
    CPU while computing on CUDA), so a run of consecutive tensors is one slice. Mapped (``mapped=True``, when the
    memory plan says the copies do not fit): the tensors stay in the checkpoint files, memory-mapped, and are read
    per tensor (:mod:`evomerge.engine.memory`).
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], paths: Sequence[str], names: Sequence[str],
                 storage: torch.device, device: torch.device, *, mapped: bool = False) -> None:
        self.device = device
        self.spans: dict[str, Span] = {}
        offset = 0
        first = checkpoints[0]
        for name in names:
            shape = torch.Size(first.shape(name))
            self.spans[name] = Span(offset, math.prod(shape), shape)
            offset += self.spans[name].blocks * ALIGN
        self.total = offset
        self.dtype = common_dtype(checkpoints, names)
        self.n_models = len(checkpoints)
        self.paths = list(paths)
        pin = storage.type == "cpu" and device.type == "cuda"
        self.flat = None if mapped else torch.zeros(self.n_models, self.total, dtype=self.dtype, device=storage,
                                                     pin_memory=pin)
        self._tensors: dict[str, list[Tensor]] = {}  # mapped: each model's tensor, as the checkpoint maps it
        self._stacks: dict[str, Tensor] = {}  # resident: [models, *shape] views of the flat buffer
        for name in names:
            span = self.spans[name]
            stored = [ck.get(name) for ck in checkpoints]
            if self.flat is None:  # mapped: read per merge; a NaN/Inf source then shows in the merged tensor's check
                self._tensors[name] = stored
                continue
            refuse_nonfinite(name, stored, paths)
            stack = self.flat[:, span.offset : span.end]
            for i, tensor in enumerate(stored):
                stack[i].copy_(tensor.reshape(-1))
            self._stacks[name] = stack.view(self.n_models, *span.shape)

    @property
    def resident(self) -> bool:
        return self.flat is not None

    def refuse_nonfinite(self, name: str) -> None:
        """:func:`refuse_nonfinite` for tensor ``name`` of every model (mapped sources are checked only when a merged
        tensor is not finite: reading them all at load would defeat the mapping)."""
        refuse_nonfinite(name, [self._select(name, [i])[0] for i in range(self.n_models)], self.paths)

    def nbytes(self, name: str) -> int:
        """Bytes of one model's tensor ``name`` in the common dtype."""
        return self.spans[name].numel * self.dtype.itemsize

    def _select(self, name: str, idx: list[int]) -> Tensor:
        """Tensor ``name`` of the models ``idx`` as [len(idx), *shape] (a view when resident and contiguous)."""
        if self.flat is not None:
            return rows(self._stacks[name], idx)
        return torch.stack([self._tensors[name][i].to(self.dtype) for i in idx])

    def stack(self, name: str) -> Tensor:
        """Tensor ``name`` of every model, [models, *shape] (resident: a view of the flat buffer)."""
        return self._select(name, list(range(self.n_models)))

    def extent(self, run: Sequence[str]) -> tuple[int, int]:
        """Entries ``[begin, end)`` of a run of consecutive tensors."""
        return self.spans[run[0]].offset, self.spans[run[-1]].end

    def run_rows(self, run: Sequence[str], idx: list[int]) -> Tensor:
        """The entries of a run of tensors for models ``idx``, [len(idx), entries], on the compute device (mapped:
        a run is one tensor, read now)."""
        if self.flat is None:
            if len(run) != 1:
                raise ValueError("memory-mapped sources are merged one tensor at a time")
            return self._select(run[0], idx).view(len(idx), -1).to(self.device, non_blocking=True)
        begin, end = self.extent(run)
        return rows(self.flat[:, begin:end], idx).to(self.device, non_blocking=True)

    def fp32(self, name: str, base: int | None, sources: list[int]) -> tuple[Tensor | None, Tensor]:
        """Tensor ``name`` of the base ([*S], None without a base) and of the sources ([N, *S]), fp32 on the compute
        device."""
        src = self._select(name, sources).to(self.device, torch.float32, non_blocking=True)
        base_t = None if base is None else self._select(name, [base])[0].to(self.device, torch.float32,
                                                                              non_blocking=True)
        return base_t, src

    def task_vectors(self, name: str, base: int, sources: list[int]) -> Tensor:
        """``τ_i = source_i − base`` of tensor ``name`` as [N, numel], fp32 on the compute device."""
        base_t, src = self.fp32(name, base, sources)
        return (src - base_t).view(len(sources), -1)


class LiveTargets:
    """The live model's tensors that merges write, bound (when they can share one) to views of one flat buffer
    laid out like :class:`SourceStacks`, so a run of consecutive tensors is written as one slice."""

    def __init__(self, model: nn.Module, names: Sequence[str], merged: Sequence[str], spans: dict[str, Span],
                 total: int, dtype: torch.dtype, device: torch.device) -> None:
        live = dict(model.state_dict(keep_vars=True))
        missing = [n for n in names if n not in live]
        if missing:
            raise RecipeError(
                f"the live model has no tensor named {missing[:3]} (of {len(missing)} missing); "
                "is the checkpoint saved by a different transformers architecture than its config says?"
            )
        self.tensors: dict[str, Tensor] = {n: live[n] for n in names}
        self._merged, self._spans, self._total = list(merged), spans, total
        self._dtype, self._device = dtype, device
        self.flat = self._bind()

    def _bind(self) -> Tensor | None:
        """Rebind the merged tensors to views of one flat buffer. None (per-tensor writes) when they cannot share one
        buffer: tensors shared between names (tied weights), another dtype or device, or none to merge."""
        live = [self.tensors[n] for n in self._merged]
        shared = len({t.data_ptr() for t in live}) < len(live)
        if not live or shared or any(t.dtype != self._dtype or t.device.type != self._device.type for t in live):
            return None
        out = torch.zeros(self._total, dtype=self._dtype, device=live[0].device)
        for name, tensor in zip(self._merged, live):
            span = self._spans[name]
            view = out[span.offset : span.end].view(tensor.shape)
            view.copy_(tensor)
            tensor.data = view
        self._bound = [t.data_ptr() for t in live]
        return out

    def check_binding(self) -> None:
        """Rebind when the live tensors were replaced since (e.g. by ``model.to``), keeping their values."""
        if self.flat is not None and [self.tensors[n].data_ptr() for n in self._merged] != self._bound:
            self.flat = self._bind()

    def out(self, run: Sequence[str]) -> Tensor:
        """The flat entries a run of consecutive tensors is written to (one tensor's own storage when unbound)."""
        if self.flat is None:
            return self.tensors[run[0]].view(-1)
        return self.flat[self._spans[run[0]].offset : self._spans[run[-1]].end]

    def state_dict(self) -> dict[str, Tensor]:
        """The live model's tensors under the checkpoint's names (CPU copies)."""
        return {n: t.detach().to("cpu").contiguous() for n, t in self.tensors.items()}
