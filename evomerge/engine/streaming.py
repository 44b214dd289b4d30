"""A one-shot merge tensor by tensor: what ``evomerge merge`` runs, in mergekit's memory footprint.

No live model and no resident sources: each merged tensor is read from the (memory-mapped) checkpoints, merged by
the method's pure formula in fp32 on the compute device, cast to the output dtype and handed to the writer, which
holds one shard at a time (:class:`~evomerge.checkpoint.LazyTensors`). Peak memory is about one shard plus one
tensor's working set, whatever the number and size of the models; both are estimated before the first tensor is
read, and the merge is refused with the numbers when they do not fit
(:func:`~evomerge.engine.memory.check_stream_memory`).

The result is bit-identical to :meth:`MergeEngine.materialize` + :meth:`MergeEngine.export` of the same recipe: the
same plan (:mod:`evomerge.engine.plan`), the same formula (the engine's kernels are bit-identical to it), the same
per-tensor seeds, and the same tensors written (the first model's, rebuilt buffers left out). Methods that need
data statistics (Fisher, RegMean) need the live model and are merged by the engine instead.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from evomerge.adapters import AdapterCheckpoint
from evomerge.checkpoint import LazyTensors, plan_shards, save_hf_dir
from evomerge.engine.device import compute_device
from evomerge.engine.engine import MergeError
from evomerge.engine.inputs import tensor_seed
from evomerge.engine.layout import all_finite, refuse_nonfinite
from evomerge.engine.lowrank import check_factor_sources, module_factors
from evomerge.engine.memory import adapter_bytes, available_bytes, check_stream_memory, stream_working_set_bytes
from evomerge.engine.plan import live_dtype, method_kwargs, open_sources, plan_params, recipe_indices
from evomerge.modelcard import Provenance, provenance_files
from evomerge.naming import tensor_filter
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.progress import RunProgress

__all__ = ["stream_merge"]

log = logging.getLogger(__name__)


def stream_merge(recipe: Recipe, out: str | Path, *, device: str | torch.device | None = None,
                 tokenizer_dir: str | Path | None = None, force: bool = False, allow_pickle: bool = False,
                 max_shard_size: int = 2 * 1024**3, provenance: Provenance | None = None,
                 progress: RunProgress | None = None) -> Path:
    """Merge ``recipe`` tensor by tensor into the HF dir ``out`` (atomic, like :func:`save_hf_dir`, with the files and
    metadata of ``provenance``); every check (compatibility, parameters of every tensor) runs before the first
    tensor is merged. ``progress``: the tensors counted as they are merged (and written), phase ``merge tensors``."""
    from transformers import AutoConfig

    opened = open_sources(recipe.model_paths(), allow_pickle=allow_pickle)
    if opened.skipped:
        log.info("not merged (buffers the model rebuilds, saved by some checkpoints only): %s",
                 ", ".join(opened.skipped))
    first = opened.checkpoints[0]
    dtype = live_dtype(recipe.dtype, first)
    compute = compute_device(device)
    base, sources = recipe_indices(opened.paths, recipe)
    method, resolved = plan_params(recipe, opened.names, opened.num_layers)
    if method.statistic:
        raise ValueError(f"method '{method.name}' needs data statistics and the live model; merge it with "
                         "evomerge.merge.merge_to_dir (the engine path)")
    merged = set(opened.names)
    if method.takes_factors:
        check_factor_sources(opened.checkpoints, opened.paths, sources, method.name)

    def produce(name: str) -> Tensor:
        if name not in merged:  # integer buffers and the like: the first model's, as the engine's live model holds
            return first.get(name)
        base_t = None if base is None else opened.checkpoints[base].get(name, compute).to(torch.float32)
        kwargs = method_kwargs(method, resolved[name], len(sources))
        rows: list[Tensor] = []  # the dense rows read (to name a source holding NaN/Inf, as the engine does)
        if method.takes_factors:
            factors, transpose = module_factors([opened.checkpoints[i].adapter.factors for i in sources], name)
            result = method.fn(base_t, factors, transpose=transpose, **kwargs).to(dtype)
        else:
            # the rows are stacked at once, so their list is freed before the formula runs (one fp32 copy, not two)
            stack = torch.stack([opened.checkpoints[i].get(name, compute).to(torch.float32) for i in sources])
            extra = method.whole_tensor_inputs(tensor_seed(recipe.seed, name), None)
            result = method.fn(base_t, stack, **kwargs, **extra).to(dtype)
            rows = [*stack, *([] if base_t is None else [base_t])]
        if not all_finite(result):
            if rows:
                used = [*sources, *([] if base is None else [base])]
                refuse_nonfinite(name, rows, [opened.paths[i] for i in used])
            raise MergeError(f"merge of '{name}' with {method.name} produced NaN/Inf; check its parameters")
        return result.to("cpu")

    def out_bytes(name: str) -> int:
        size = first.nbytes(name)
        return size // first.dtype(name).itemsize * dtype.itemsize if name in merged else size

    config = AutoConfig.from_pretrained(opened.paths[0], trust_remote_code=False)
    config.dtype = dtype
    # a head tied to the embeddings is re-tied on load; the engine's export drops it too
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = [n for n in opened.kept if not (tied and tensor_filter(n) == "lm_head")]
    sizes = {n: out_bytes(n) for n in names}
    largest = max((math.prod(first.shape(n)) for n in opened.names), default=0)
    working = stream_working_set_bytes(method, largest_tensor=largest, n_sources=len(sources), base=base is not None)
    adapters = [ck for i in sources if isinstance(ck := opened.checkpoints[i], AdapterCheckpoint)]
    adapted = [(math.prod(first.shape(n)), n) for ck in adapters for n in (*ck.adapter.factors, *ck.adapter.replaced)]
    if adapted and not method.takes_factors:  # an adapter's row is formed, W + s·B·A, as it is read
        entries, name = max(adapted)
        working += adapter_bytes(first.dtype(name).itemsize) * entries
    check_stream_memory(
        shard=max((sum(sizes[n] for n in shard) for shard in plan_shards(sizes, max_shard_size)), default=0),
        working_set=working,
        available=available_bytes(torch.device("cpu")),
        working_available=available_bytes(compute) if compute.type == "cuda" else None,
        what=f"merging {len(sources)} sources with {method.name} tensor by tensor")
    lazy = LazyTensors(sizes, produce)
    return save_hf_dir(lazy, out, config=config, tokenizer_dir=tokenizer_dir, force=force,
                       max_shard_size=max_shard_size, progress=progress, tensors_phase="merge tensors",
                       **provenance_files(provenance))
