"""MergeEngine: materializes recipes in place, into the parameters of one live ``transformers`` model.

The engine reads every model of the search once (base and sources), keeps their tensors resident on the compute
device (or in pinned CPU memory when they exceed a memory budget, streamed per tensor), and for each candidate
recipe writes the merged tensors straight into the live model: no disk, no new model object per candidate.
Only tensors whose resolved parameters changed since the previous candidate are merged again.

Arithmetic is fp32; results are stored in the live model's dtype. Stochastic methods (DARE, DELLA) draw from the
counter-based generator of :mod:`evomerge.methods.counter_rng` keyed per tensor by ``(recipe.seed, tensor name)``,
so the same recipe gives the same masks on CPU and CUDA, whatever order the tensors are merged in.

The engine coordinates plan -> merge -> verify; its parts (numbers in results/merge_throughput_*.md):

- :mod:`~evomerge.engine.layout`: the flat buffers (every model's tensors in one buffer per model, the live
  model's merged tensors bound to views of one buffer in the same layout), so a run of consecutive tensors with
  the same parameters is one slice;
- :mod:`~evomerge.engine.inputs`: what is kept across candidates because it depends on the models or the seed
  only (thresholds, sorted magnitudes, DELLA's ranks, Gram matrices, stored draws), within memory budgets;
- :mod:`~evomerge.engine.kernels`: the entrywise merge -- upcast, the method's formula, cast into the live tensor
  -- as one ``torch.compile`` kernel (eager numerics: bit-identical to the plain formula) or eagerly in
  cache-sized chunks (bit-identical too: the formula is entrywise).

Methods flagged ``elementwise`` in the registry are merged per run of tensors (linear, task arithmetic) or per
tensor with their per-tensor inputs; the others by the plain formula on the whole tensor. Non-finite results are
detected on the stored entries (min and max per run) with one device synchronisation per candidate.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from evomerge.adapters import AdapterCheckpoint
from evomerge.checkpoint import save_hf_dir
from evomerge.engine.device import compute_device, keep_cpu_heap
from evomerge.engine.inputs import DRAWS_SHARE, KEPT_SHARE, KeptInputs, tensor_seed
from evomerge.engine.kernels import COMPILE_MIN_ENTRIES, CPU_CHUNK, KernelInputs, Kernels, fused_merge, value_range
from evomerge.engine.layout import LiveTargets, SourceStacks, all_finite, common_dtype, load_model
from evomerge.engine.lowrank import LowRankStacks, check_factor_sources, has_adapters, stack_bytes
from evomerge.engine.memory import (
    HEADROOM,
    MemoryPlan,
    adapter_run_bytes,
    adapter_select_bytes,
    available_bytes,
    model_working_set,
    plan_memory,
)
from evomerge.engine.plan import (
    DTYPES,
    live_dtype,
    method_kwargs,
    open_sources,
    plan_params,
    recipe_indices,
    recipe_method,
)
from evomerge.methods import MergeMethod, get_method
from evomerge.methods.counter_rng import row_keys
from evomerge.methods.spec import Coefficients, Draws, Ranks, Statistic, Thresholds
from evomerge.modelcard import Provenance, provenance_files
from evomerge.recipe import Recipe, RecipeError

if TYPE_CHECKING:
    from evomerge.progress import RunProgress

log = logging.getLogger(__name__)

class MergeError(RuntimeError):
    """A merge that produced an unusable result (e.g. NaN/Inf); the message names the tensor."""


@dataclass
class MergeStats:
    """What one :meth:`MergeEngine.materialize` call did."""

    merged: int = 0
    skipped: int = 0
    seconds: float = 0.0
    bytes_moved: int = 0
    names: list[str] = field(default_factory=list)


class MergeEngine:
    """Holds base + sources on a device and writes merges into a live model.

    Parameters
    ----------
    models:
        Paths of every model a recipe may name (base and sources), all of one architecture.
    device:
        ``"cuda"``, ``"cpu"`` or a torch device; default: CUDA when available.
    dtype:
        dtype of the live model (``"float32"``, ``"bfloat16"``, ``"float16"``); default: the first model's.
    memory_budget:
        bytes of source tensors allowed on the compute device; above it they stay in pinned CPU memory and are
        streamed per tensor. Default: no limit on CPU, 80% of free memory on CUDA.
    allow_pickle:
        read ``pytorch_model.bin`` checkpoints (with ``torch.load(weights_only=True)``).
    compile, compile_min_entries, chunk_entries:
        how entrywise kernels run (:class:`~evomerge.engine.kernels.Kernels`).
    draws_budget, kept_budget:
        bytes the stored draws, and the sorted magnitudes and ranks together, may take
        (:class:`~evomerge.engine.inputs.KeptInputs`); default: a quarter each of the memory free after loading.
    methods:
        the methods recipes will use (a search space's), so that the memory plan leaves out the working sets of the
        others (DELLA's magnitude ranks, the largest); default: any method. A recipe of another method still merges.
    """

    def __init__(
        self,
        models: Sequence[str | Path],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        memory_budget: int | None = None,
        allow_pickle: bool = False,
        compile: bool | None = None,
        compile_min_entries: int = COMPILE_MIN_ENTRIES,
        chunk_entries: int = CPU_CHUNK,
        draws_budget: int | None = None,
        kept_budget: int | None = None,
        methods: Collection[str] | None = None,
    ) -> None:
        self._ranked = methods is None or any(get_method(m).needs(Ranks) is not None for m in methods)
        opened = open_sources(models, allow_pickle=allow_pickle)
        if opened.skipped:
            log.info("not merged (buffers the model rebuilds, saved by some checkpoints only): %s",
                     ", ".join(opened.skipped))
        self.paths, self.checkpoints, self.names = opened.paths, opened.checkpoints, opened.names
        kept = opened.kept
        self.device = compute_device(device)
        self.num_layers = opened.num_layers
        self.dtype = live_dtype(dtype, self.checkpoints[0])
        storage = self._storage_device(memory_budget)
        self.memory = self._plan_memory(storage)
        if self.device.type == "cpu" and self.memory.sources == "resident":
            # mapped sources leave no room for a heap that keeps freed pages (measured: results/memory_limit.md)
            keep_cpu_heap()
        self.model = load_model(self.paths[0], device=self.device, dtype=self.dtype)
        stacks = LowRankStacks if has_adapters(self.checkpoints) else SourceStacks
        self.sources = stacks(self.checkpoints, self.paths, self.names, storage, self.device,
                              mapped=self.memory.sources == "mapped")
        self.targets = LiveTargets(self.model, kept, self.names, self.sources.spans, self.sources.total,
                                   self.dtype, self.device)
        self.kernels = Kernels(self.device, self.sources.total, compile=compile,
                               compile_min_entries=compile_min_entries, chunk_entries=chunk_entries)
        free = available_bytes(self.device)
        if self.memory.sources == "mapped":  # only what the plan left beyond the live model and the working set
            free = min(free, max(0, int(HEADROOM * self.memory.available) - self.memory.mapped_need))
        self.inputs = KeptInputs(
            self.sources, self.kernels,
            draws_budget=int(DRAWS_SHARE * free) if draws_budget is None else draws_budget,
            kept_budget=int(KEPT_SHARE * free) if kept_budget is None else kept_budget)
        self._last: dict[str, tuple] = {}
        self._statistics: dict[str, list[dict[str, Tensor]]] = {}

    # --------------------------------------------------------------------------------------------- set-up
    def _storage_device(self, memory_budget: int | None) -> torch.device:
        if self.device.type == "cpu":
            return self.device
        need = sum(ck.nbytes(n) for ck in self.checkpoints for n in self.names)
        budget = memory_budget if memory_budget is not None else int(0.8 * available_bytes(self.device))
        if need <= budget:
            return self.device
        log.info("sources need %.1f GiB > budget %.1f GiB: streaming from pinned CPU memory",
                 need / 2**30, budget / 2**30)
        return torch.device("cpu")

    def _plan_memory(self, storage: torch.device) -> MemoryPlan:
        """Where the sources can live (:func:`~evomerge.engine.memory.plan_memory`), before anything is loaded: the
        live model and one tensor's working set on the compute device; the sources beside them when they are kept
        there, else in CPU memory (pinned, streamed to the GPU), or memory-mapped when that does not fit either."""
        first = self.checkpoints[0]
        live = sum(math.prod(first.shape(n)) * (self.dtype.itemsize if first.dtype(n).is_floating_point
                                                else first.dtype(n).itemsize) for n in first.names)
        itemsize = common_dtype(self.checkpoints, self.names).itemsize
        sources = stack_bytes(self.checkpoints, self.names, itemsize)
        working = model_working_set(first, self.names, n_models=len(self.paths), device_type=self.device.type,
                                    ranked=self._ranked)
        run_rows = 0
        adapted = [math.prod(first.shape(n)) for ck in self.checkpoints if isinstance(ck, AdapterCheckpoint)
                   for n in (*ck.adapter.factors, *ck.adapter.replaced) if n in self.names]
        if adapted:  # adapter sources' tensors are formed (W + s·B·A) as a merge reads them
            sizes = {"largest_adapted": max(adapted), "n_models": len(self.paths), "itemsize": itemsize}
            working = max(working, adapter_select_bytes(**sizes))
            run_rows = adapter_run_bytes(merged_entries=sum(math.prod(first.shape(n)) for n in self.names), **sizes)
        if storage == self.device:  # sources beside the live model
            return plan_memory(live_model=live, source_bytes=sources, working_set=working,
                               n_models=len(self.paths), available=available_bytes(self.device), run_rows=run_rows)
        plan_memory(live_model=live, source_bytes=0, working_set=working, n_models=len(self.paths),
                    available=available_bytes(self.device), run_rows=run_rows)  # the GPU must hold the live model
        return plan_memory(live_model=0, source_bytes=sources, working_set=0, n_models=len(self.paths),
                           available=available_bytes(storage))

    # ------------------------------------------------------------------------------------------- recipes
    def indices(self, recipe: Recipe) -> tuple[int | None, list[int]]:
        """Positions of the recipe's base and sources among the engine's models."""
        return recipe_indices(self.paths, recipe)

    def check(self, recipe: Recipe) -> MergeMethod:
        """Validate a recipe against the registry and the loaded models before any tensor work."""
        method = recipe_method(recipe)
        _, sources = self.indices(recipe)
        if method.takes_factors:
            check_factor_sources(self.checkpoints, self.paths, sources, method.name)
        if recipe.dtype is not None and DTYPES[recipe.dtype] != self.dtype:
            raise RecipeError(f"recipe dtype {recipe.dtype} differs from the live model's {self.dtype}")
        if method.statistic and method.statistic not in self._statistics:
            raise RecipeError(
                f"method '{method.name}' needs '{method.statistic}' statistics; call engine.set_statistics"
                f"('{method.statistic}', ...) (statistics from evomerge.methods.statistics: fisher_diagonal / "
                "gram_matrices, one dict per model)"
            )
        return method

    # --------------------------------------------------------------------------------------------- merging
    def plan(self, recipe: Recipe) -> tuple[MergeMethod, int | None, list[int], dict[str, dict[str, object]]]:
        """Validate ``recipe`` and resolve its parameters for every tensor, before any tensor work.

        Every tensor's resolved values are checked against the method's ranges, so a gradient or a per-filter
        value that is out of range anywhere in the stack fails here, not half-way through a merge.
        """
        self.check(recipe)
        base, sources = self.indices(recipe)
        method, resolved = plan_params(recipe, self.names, self.num_layers)
        return method, base, sources, resolved

    def materialize(self, recipe: Recipe) -> MergeStats:
        """Write the merge described by ``recipe`` into ``self.model`` in place; returns what was done.

        Raises MergeError naming the tensor when a merged tensor holds NaN/Inf; the tensors merged by that call
        are then merged again by the next one.
        """
        method, base, sources, resolved = self.plan(recipe)
        seed = recipe.seed if method.stochastic else None
        keys = {n: (method.name, base, tuple(sources), repr(sorted(p.items())), seed) for n, p in resolved.items()}
        stats = MergeStats()
        start = time.perf_counter()
        with torch.no_grad():
            self.targets.check_binding()
            todo = [n for n in self.names if self._last.get(n) != keys[n]]
            for name in todo:
                self._last.pop(name, None)
            self.inputs.prefetch(method, todo, base, sources)
            checks = [
                (run, self._merge_run(method, base, sources, run, resolved[run[0]], recipe.seed))
                for run in self._runs(method, todo, keys, recipe.seed, len(sources))
            ]
            self._verify(method, checks)
        for name in todo:
            self._last[name] = keys[name]
            stats.bytes_moved += self.sources.nbytes(name) * (len(sources) + (base is not None)) + \
                self.targets.tensors[name].nbytes
        stats.merged, stats.skipped, stats.names = len(todo), len(self.names) - len(todo), todo
        stats.seconds = time.perf_counter() - start
        return stats

    def _runs(
        self, method: MergeMethod, todo: list[str], keys: Mapping[str, tuple], seed: int, n_sources: int
    ) -> list[list[str]]:
        """Tensors merged together: maximal runs of neighbours (in the flat layout) with the same parameters, for
        entrywise methods when the live tensors share one buffer (and, for stochastic ones, when the draws of the
        seed fit the noise store); else one each (angle-based methods: coefficients per tensor; DELLA: ranks)."""
        # per-tensor inputs (coefficients, ranks) and data statistics are made for one tensor at a time
        per_tensor = any(isinstance(need, Coefficients | Ranks | Statistic) for need in method.inputs)
        stored_draws = not method.stochastic or self.inputs.noise_store(seed, n_sources) is not None
        groupable = method.elementwise and not per_tensor and self.targets.flat is not None \
            and self.sources.resident and stored_draws
        if not groupable:
            return [[name] for name in todo]
        position = {n: i for i, n in enumerate(self.names)}
        runs: list[list[str]] = []
        for name in todo:
            last = runs[-1][-1] if runs else None
            if last is not None and position[last] + 1 == position[name] and keys[last] == keys[name]:
                runs[-1].append(name)
            else:
                runs.append([name])
        return runs

    def _merge_run(
        self, method: MergeMethod, base: int | None, sources: list[int], run: list[str],
        params: Mapping[str, object], seed: int,
    ) -> Tensor:
        """Merge the tensors of ``run`` (one tensor, or a run of an entrywise method) into the live model;
        returns a 0-d tensor that is finite iff the merged values are (checked later, all at once)."""
        host = method_kwargs(method, params, len(sources))
        inputs = self._entrywise_inputs(method, run, base, sources, host, seed)
        if inputs is None:
            target = self.targets.tensors[run[0]]
            target.copy_(self._merge_whole(method, run[0], base, sources, params, seed))
            return value_range(target)
        src = self.sources.run_rows(run, sources)
        base_row = None if base is None else self.sources.run_rows(run, [base])[0]
        out = self.targets.out(run)
        kwargs = self.inputs.on_device(host)
        self.kernels.run(method.name, fused_merge, out.shape[0],
                         lambda begin, end, f: f(method.fn, out[begin:end], src[:, begin:end],
                                                 None if base_row is None else base_row[begin:end], kwargs,
                                                 inputs.chunk(begin, end)))
        return value_range(out)

    def _entrywise_inputs(
        self, method: MergeMethod, run: list[str], base: int | None, sources: list[int], host: dict[str, object],
        seed: int,
    ) -> KernelInputs | None:
        """What makes ``method`` entrywise on ``run``: thresholds, draws, ranks (returned) and angle-based
        coefficients (added to ``host``). None when the run must be merged whole by the plain formula: a method
        that is not entrywise or needs data statistics, a live tensor that is not contiguous and not bound, a
        combination per output row, ranks that do not fit their budget."""
        if not method.elementwise or method.statistic:
            return None
        if self.targets.flat is None and not self.targets.tensors[run[0]].is_contiguous():
            return None
        inputs = KernelInputs()
        for need in method.inputs:
            match need:
                case Coefficients():
                    host[need.kwarg] = self.inputs.coefficients(method, need, run[0], base, sources, host)
                    if host[need.kwarg].shape[0] > 1:  # type: ignore[union-attr]
                        return None
                case Ranks():
                    ranks = self.inputs.relative_ranks(run[0], base, sources)  # type: ignore[arg-type]
                    if ranks is None:
                        return None
                    inputs.entries[need.kwarg] = ranks
                case Thresholds():
                    inputs.blocks[need.kwarg] = self.inputs.threshold_tables(need, run, base, sources, host)
                case Draws() if self.inputs.noise_store(seed, len(sources)) is not None:
                    inputs.entries[need.kwarg] = self.inputs.noise(run, seed, len(sources))
                case Draws():  # nothing stored: the run is one tensor (_runs), drawn in the kernel
                    inputs.keys = row_keys(tensor_seed(seed, run[0]), len(sources)).to(self.device, non_blocking=True)
        return inputs

    def _merge_whole(
        self, method: MergeMethod, name: str, base: int | None, sources: list[int],
        params: Mapping[str, object], seed: int,
    ) -> Tensor:
        """``method.fn`` on the whole fp32 tensor, by the plain formula (no chunks, no caches); a factor method on
        the sources' LoRA factors."""
        if method.takes_factors:
            factors, transpose = self.sources.factors(name, sources)  # type: ignore[attr-defined]
            base_t = self.sources.fp32(name, base, [base])[0]  # type: ignore[list-item]
            return method.fn(base_t, factors, transpose=transpose, **method_kwargs(method, params, len(sources)))
        base_t, src = self.sources.fp32(name, base, sources)
        kwargs = self.inputs.on_device(method_kwargs(method, params, len(sources)))
        need = method.needs(Coefficients)
        if need is not None:
            kwargs[need.kwarg] = self.inputs.coefficients(method, need, name, base, sources, kwargs)
        extra = method.whole_tensor_inputs(tensor_seed(seed, name), self._tensor_statistics(method, name, sources))
        return method.fn(base_t, src, **kwargs, **extra)

    def _verify(self, method: MergeMethod, checks: list[tuple[list[str], Tensor]]) -> None:
        """One synchronisation for the whole candidate: MergeError naming the first tensor whose stored entries
        hold NaN/Inf (only runs whose check value is non-finite are inspected, with the exact float64 check)."""
        if not checks:
            return
        finite = torch.isfinite(torch.stack([c.float() for _, c in checks])).all(1).tolist()
        for (run, _), ok in zip(checks, finite):
            bad = [] if ok else [n for n in run if not all_finite(self.targets.tensors[n].float())]
            if bad:
                self.sources.refuse_nonfinite(bad[0])  # a mapped source holding NaN/Inf is named, like at load
                raise MergeError(f"merge of '{bad[0]}' with {method.name} produced NaN/Inf; check its parameters")

    def invalidate(self) -> None:
        """Forget what the live model holds, so the next materialize merges every tensor (use after changing
        the model's weights by other means)."""
        self._last.clear()

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by what the engine keeps across candidates (beyond the models themselves): stored DARE/DELLA
        draws, sorted task-vector magnitudes, DELLA ranks, Gram matrices, thresholds."""
        return self.inputs.cache_bytes()

    def clear_caches(self) -> None:
        """Drop everything :meth:`cache_bytes` counts (e.g. before switching to a search over other sources); it is
        recomputed when needed."""
        self.inputs.clear()

    # ---------------------------------------------------------------------------------------- statistics
    def set_statistics(self, kind: str, per_model: Sequence[Mapping[str, Tensor]]) -> None:
        """Data statistics (``fisher`` diagonals or ``gram`` matrices) for each engine model, in model order."""
        if len(per_model) != len(self.paths):
            raise RecipeError(f"need {kind} statistics for all {len(self.paths)} models, got {len(per_model)}")
        self._statistics[kind] = [dict(m) for m in per_model]
        self.invalidate()

    def has_statistics(self, kind: str) -> bool:
        return kind in self._statistics

    def _tensor_statistics(self, method: MergeMethod, name: str, sources: list[int]) -> Tensor | None:
        if not method.statistic:
            return None
        per_model = self._statistics[method.statistic]
        if name not in per_model[sources[0]]:
            return None
        return torch.stack([per_model[i][name] for i in sources]).to(self.device, torch.float32)

    # ------------------------------------------------------------------------------------------- output
    def state_dict(self) -> dict[str, Tensor]:
        """The live model's tensors under the checkpoint's names (CPU copies)."""
        return self.targets.state_dict()

    def export(self, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, force: bool = False,
               max_shard_size: int = 2 * 1024**3, provenance: Provenance | None = None,
               progress: RunProgress | None = None) -> Path:
        """Write the live model as an HF dir (atomic; refuses an existing dir unless ``force``), with the tokenizer
        files of ``tokenizer_dir`` when given, in shards of at most ``max_shard_size`` bytes, and the model card,
        recipes and metadata of ``provenance`` (:func:`evomerge.modelcard.provenance`); ``progress``: the phases of
        :func:`~evomerge.checkpoint.save_hf_dir`."""
        return save_hf_dir(self.state_dict(), out_dir, config=self.model.config, tokenizer_dir=tokenizer_dir,
                           force=force, max_shard_size=max_shard_size, progress=progress,
                           **provenance_files(provenance))
