"""Sources that are LoRA adapters, kept as their low-rank factors: N adapters of rank r cost N·r·(d_in + d_out)
entries per target module, not N full models.

:class:`LowRankStacks` is the kind of :class:`~evomerge.engine.layout.SourceStacks` the engine uses when some of its
models are adapters (:mod:`evomerge.adapters`): the full models (the base first) are held as before (resident or
memory-mapped); an adapter's tensor is formed when a merge reads it -- ``W + ΔW`` from the base row on a target
module (:func:`~evomerge.adapters.adapter_source`, rounded to the base tensor's dtype, as the checkpoint PEFT's
``merge_and_unload`` saves holds it), its saved tensor where it replaces one, the base row elsewhere -- so every
merge method applies unchanged to the task vectors ``τ_i = source_i − base``, and the engine (which merges only
tensors whose parameters changed) forms the dense products only for the tensors it merges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from evomerge.adapters import AdapterCheckpoint, LoraFactors, adapted_tensor
from evomerge.checkpoint import Checkpoint
from evomerge.engine.layout import SourceStacks
from evomerge.engine.plan import method_kwargs, open_sources, plan_params, recipe_indices
from evomerge.methods import MergeMethod
from evomerge.methods.lorahub import Factors, compose_factors, rank_sum, svd_factors
from evomerge.recipe import Recipe, RecipeError
from evomerge.recipe.schema import recipe_kind

__all__ = ["LOW_RANK_MERGES", "LowRankStacks", "check_factor_sources", "has_adapters", "merged_adapter",
           "module_factors", "stack_bytes"]


def has_adapters(checkpoints: Sequence[Checkpoint | AdapterCheckpoint]) -> bool:
    return any(isinstance(ck, AdapterCheckpoint) for ck in checkpoints)


def stack_bytes(checkpoints: Sequence[Checkpoint | AdapterCheckpoint], names: Sequence[str], itemsize: int) -> int:
    """Bytes the sources take once loaded: a full model's merged tensors in the common dtype (``itemsize``), an
    adapter's stored factors and replaced tensors."""
    full = sum(math.prod(checkpoints[0].shape(n)) for n in names) * itemsize
    return sum(ck.adapter.total_bytes if isinstance(ck, AdapterCheckpoint) else full for ck in checkpoints)


def check_factor_sources(checkpoints: Sequence[Checkpoint | AdapterCheckpoint], paths: Sequence[str],
                         sources: Sequence[int], method: str) -> None:
    """RecipeError unless every source of a factor method (``MergeMethod.takes_factors``) is a
    LoRA adapter with factors only (a saved full tensor has no factors to compose)."""
    full = [paths[i] for i in sources if not isinstance(checkpoints[i], AdapterCheckpoint)]
    if full:
        raise RecipeError(f"method '{method}' composes LoRA adapters; {full[:2]} are full checkpoints (merge them "
                          "with a task-vector method such as task_arithmetic or ties)")
    saved = [paths[i] for i in sources if checkpoints[i].adapter.replaced]  # type: ignore[union-attr]
    if saved:
        raise RecipeError(f"method '{method}' composes LoRA factors; {saved[:2]} also save full tensors "
                          "(modules_to_save, a changed embedding base layer), which have no factors: merge them with a "
                          "task-vector method")


def module_factors(per_source: Sequence[Mapping[str, LoraFactors]], name: str) -> tuple[list[Factors | None], bool]:
    """Each source's ``(A, B, scale)`` on tensor ``name`` (None where it does not adapt it), and whether the delta
    is transposed there."""
    found = [f.get(name) for f in per_source]
    transpose = any(f.transpose for f in found if f is not None)
    return [None if f is None else (f.A, f.B, f.scale) for f in found], transpose


class LowRankStacks(SourceStacks):
    """Full models as in :class:`SourceStacks` (the first one is the adapters' base), adapters as factors on the
    compute device; model indices are the engine's (full models and adapters in the order given)."""

    def __init__(self, checkpoints: Sequence[Checkpoint | AdapterCheckpoint], paths: Sequence[str],
                 names: Sequence[str], storage: torch.device, device: torch.device, *, mapped: bool = False) -> None:
        full = [i for i, ck in enumerate(checkpoints) if not isinstance(ck, AdapterCheckpoint)]
        super().__init__([checkpoints[i] for i in full], [paths[i] for i in full], names, storage, device,
                         mapped=mapped)
        self._row = {i: r for r, i in enumerate(full)}  # engine model index -> row of the full models
        self._base_dtypes = {n: checkpoints[0].dtype(n) for n in names}
        self._factors: dict[int, dict[str, LoraFactors]] = {}
        self._replaced: dict[int, dict[str, Tensor]] = {}
        for i, ck in enumerate(checkpoints):
            if isinstance(ck, AdapterCheckpoint):
                # on the compute device, where every product B A is formed (as the streaming merge forms it)
                self._factors[i] = {n: f.to(device) for n, f in ck.adapter.factors.items() if n in self.spans}
                self._replaced[i] = {n: t.to(device) for n, t in ck.adapter.replaced.items() if n in self.spans}
        self.n_models = len(checkpoints)

    def _adapter_tensor(self, i: int, name: str, base: Tensor) -> Tensor:
        """Adapter ``i``'s tensor ``name`` in the common dtype, from the base's (``base``, in that dtype)."""
        factors, saved = self._factors[i].get(name), self._replaced[i].get(name)
        if factors is None and saved is None:
            return base
        return adapted_tensor(base, factors, saved, self._base_dtypes[name]).to(self.dtype)

    def _select(self, name: str, idx: list[int]) -> Tensor:
        """As :meth:`SourceStacks._select`; with adapters among ``idx``, on the compute device."""
        rows = [self._row.get(i) for i in idx]
        if all(r is not None for r in rows):
            return super()._select(name, rows)  # type: ignore[arg-type]
        base = super()._select(name, [0])[0].to(self.device)
        return torch.stack([super()._select(name, [r])[0].to(self.device) if r is not None
                            else self._adapter_tensor(i, name, base) for i, r in zip(idx, rows)])

    def run_rows(self, run: Sequence[str], idx: list[int]) -> Tensor:
        """As :meth:`SourceStacks.run_rows`; an adapter's rows are the base's entries of the run with its formed
        tensors written over their spans."""
        rows = [self._row.get(i) for i in idx]
        if all(r is not None for r in rows):
            return super().run_rows(run, rows)  # type: ignore[arg-type]
        if len(run) == 1:
            return self._select(run[0], idx).view(len(idx), -1).to(self.device, non_blocking=True)
        if self.flat is None:
            raise ValueError("memory-mapped sources are merged one tensor at a time")
        begin, end = self.extent(run)
        out = torch.empty(len(idx), end - begin, dtype=self.dtype, device=self.device)
        for j, (i, r) in enumerate(zip(idx, rows)):
            out[j].copy_(self.flat[0 if r is None else r, begin:end])
            if r is None:
                for name in run:
                    if name in self._factors[i] or name in self._replaced[i]:
                        span = self.spans[name]
                        view = out[j, span.offset - begin : span.end - begin].view(span.shape)
                        view.copy_(self._adapter_tensor(i, name, view.clone()))
        return out

    def factors(self, name: str, sources: list[int]) -> tuple[list[Factors | None], bool]:
        """:func:`module_factors` of the adapters ``sources`` on tensor ``name`` (on the compute device)."""
        return module_factors([self._factors.get(i, {}) for i in sources], name)


#: Merges of adapter sources that stay low-rank, and so can be written as one adapter (:func:`merged_adapter`).
LOW_RANK_MERGES = ("lorahub", "task_arithmetic", "linear")


def _low_rank(method: MergeMethod, kwargs: Mapping[str, object], factors: list[Factors | None]) \
        -> tuple[Tensor, Tensor]:
    """The merged factors of one module: LoraHub's composition (``lorahub``), or the rank sum with the weights
    ``λ w_i`` of task arithmetic (``/ Σ w`` with normalize) or ``w_i / Σ w`` of a normalized linear merge (which is
    ``θ_0 + Σ_i (w_i / Σ w) τ_i`` when every source is an adapter on the base)."""
    weight = kwargs["weight"]
    if method.name == "lorahub":
        return (rank_sum if kwargs["rank_sum"] else compose_factors)(factors, weight)  # type: ignore[arg-type]
    if method.name == "task_arithmetic":
        scale = float(kwargs["lam"]) / (float(weight.sum()) if kwargs["normalize"] else 1.0)  # type: ignore[union-attr]
    elif kwargs["normalize"]:
        scale = 1.0 / float(weight.sum())  # type: ignore[union-attr]
    else:
        raise RecipeError("linear with normalize: false scales the base by Σ w, which no adapter on it can express; "
                          "use normalize: true or task_arithmetic")
    return rank_sum(factors, weight * scale)  # type: ignore[operator]


def merged_adapter(recipe: Recipe, *, rank: int | None = None,
                   allow_pickle: bool = False) -> tuple[dict[str, LoraFactors], str]:
    """The merge of a recipe on LoRA adapter sources as one adapter: the factors of each adapted base weight (fp32,
    scale 1; on ``Conv1D`` weights and embeddings transposed as the sources' are, so that
    :func:`~evomerge.adapters.save_adapter` writes them in PEFT's layout), and the base's path. ``rank``: every
    module's ``B A`` reduced to that rank by SVD (:func:`svd_factors`, on the untransposed ``B A`` [d_out, d_in], so
    the same for every kind of module; the exact product when it is already of that rank or lower). Merges that are
    not low-rank (TIES, DARE, ...: entrywise selections of the dense products) are refused: write the full model
    instead."""
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"a merged adapter is a parameter merge of LoRA adapter sources; a {recipe_kind(recipe)} "
                          "recipe has none: drop --adapter-out")
    if recipe.method not in LOW_RANK_MERGES:
        raise RecipeError(f"method '{recipe.method}' does not keep a merge of adapters low-rank; a merged adapter is "
                          f"written for {', '.join(LOW_RANK_MERGES)} only (write the full model for the others)")
    if rank is not None and rank < 1:
        raise RecipeError(f"the adapter rank must be at least 1, got {rank}")
    opened = open_sources(recipe.model_paths(), allow_pickle=allow_pickle)
    _, sources = recipe_indices(opened.paths, recipe)
    method, resolved = plan_params(recipe, opened.names, opened.num_layers)
    check_factor_sources(opened.checkpoints, opened.paths, sources, method.name)
    per_source = [opened.checkpoints[i].adapter.factors for i in sources]
    modules: dict[str, LoraFactors] = {}
    for name in opened.names:
        factors, transpose = module_factors(per_source, name)
        if all(f is None for f in factors):
            continue
        A, B = _low_rank(method, method_kwargs(method, resolved[name], len(sources)), factors)
        if rank is not None and rank < A.shape[0]:
            A, B = svd_factors(B @ A, rank)
        embedding = any(f[name].embedding for f in per_source if name in f)
        modules[name] = LoraFactors(A, B, 1.0, transpose, embedding)
    return modules, opened.paths[0]
