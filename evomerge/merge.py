"""Recipe → merged HF dir on disk: the Python API behind ``evomerge merge``, and the memory checks of the merges
that hold a whole new model (a layer stack, a mixture of experts) before they start."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.calibration import prepare
from evomerge.checkpoint import TOKENIZER_FILES, Checkpoint, save_hf_dir
from evomerge.engine import MergeEngine
from evomerge.engine.device import compute_device
from evomerge.engine.memory import Need, available_bytes, check_fits, layer_stack_bytes, model_working_set
from evomerge.engine.plan import live_dtype
from evomerge.engine.stacking import layer_plan, stack_layers
from evomerge.engine.streaming import stream_merge
from evomerge.methods import get_method, validate_params
from evomerge.methods.spec import Ranks
from evomerge.modelcard import Provenance, provenance, provenance_files
from evomerge.outdir import check_target, recover
from evomerge.recipe import AnyRecipe, MoeRecipe, Recipe, RecipeError, StackRecipe

if TYPE_CHECKING:
    from evomerge.progress import RunProgress


def tokenizer_dir(recipe: AnyRecipe) -> Path | None:
    """Where the merged model's tokenizer comes from: ``tokenizer_source`` (must hold one), else the base or first
    model when it has tokenizer files, else None (a bare weights-only model)."""
    if recipe.tokenizer_source:
        path = Path(recipe.tokenizer_source)
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise RecipeError(f"tokenizer_source {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...)")
        return path
    path = Path(recipe.base or recipe.model_paths()[0])
    return path if any((path / f).is_file() for f in TOKENIZER_FILES) else None


def check_values(recipe: Recipe) -> None:
    """The recipe's method, sources and every number it sets, against the registry, before any model is loaded
    (MethodError naming the problem). The engine checks again per tensor, with the values resolved."""
    method = get_method(recipe.method)
    for scope in (recipe.parameters, *(s.parameters for s in recipe.sources)):
        validate_params(method, scope, len(recipe.sources), recipe.base is not None, resolved=False,
                        recipe=True)


def _shard_bytes(total: int, largest: int, max_shard_size: int) -> int:
    """Bytes of the largest shard a writer of ``total`` bytes holds: ``max_shard_size``, or a tensor over it (its
    own shard), at most everything (safetensors serialises a shard's bytes before writing them)."""
    return min(total, max(max_shard_size, largest))


def _fits(needs: Sequence[Need], device: torch.device, *, what: str, fixes: str) -> None:
    """:func:`~evomerge.engine.memory.check_fits` against this machine's free memory (CPU, and the GPU's when
    ``device`` is one)."""
    check_fits(needs, what=what, fixes=fixes, available=available_bytes(torch.device("cpu")),
               device_available=available_bytes(device) if device.type == "cuda" else None)


def stack_needs(checkpoints: Mapping[str, Checkpoint], layers: Sequence[tuple[str, int]], *,
                dtype: torch.dtype | None, live: bool, device: torch.device, max_shard_size: int = 2 * 1024**3,
                ) -> list[Need]:
    """What building a layer stack of ``layers`` (model, layer) holds (:mod:`evomerge.engine.stacking`): its
    tensors as read (copies, in their stored dtype); then either (``live``, a search's trial) the live model in
    ``dtype``, made on CPU and moved to ``device``, or (written to disk) their cast to ``dtype`` (when it differs
    from the stored one) and one output shard."""
    read = layer_stack_bytes(checkpoints, layers)
    first = checkpoints[layers[0][0]]
    stored = live_dtype(None, first)
    target = dtype or stored
    cast = layer_stack_bytes(checkpoints, layers, itemsize=target.itemsize)
    needs = [Need("the stacked model's tensors as read", read)]
    if live:
        needs.append(Need("the stacked model", cast))
        if device.type == "cuda":
            needs.append(Need("the stacked model on the compute device", cast, device=True))
        return needs
    if target != stored:
        needs.append(Need(f"their cast to {str(target).removeprefix('torch.')}", cast))
    largest = max(math.prod(first.shape(n)) for n in first.names) * target.itemsize
    return [*needs, Need("one output shard", _shard_bytes(cast, largest, max_shard_size))]


def check_stack_memory(checkpoints: Mapping[str, Checkpoint], layers: Sequence[tuple[str, int]], *,
                       dtype: torch.dtype | None, device: torch.device, live: bool = False,
                       max_shard_size: int = 2 * 1024**3) -> None:
    """Refuse a layer stack (:func:`stack_needs`) that does not fit, before any layer is read (one line)."""
    _fits(stack_needs(checkpoints, layers, dtype=dtype, live=live, device=device, max_shard_size=max_shard_size),
          device, what=f"a layer stack of {len(layers)} layers",
          fixes="free memory, stack fewer layers (max_layers), or build it in a smaller dtype (dtype: bfloat16)"
                + ("" if live else "; lower --max-shard-size"))


def moe_needs(recipe: MoeRecipe, *, device: torch.device, max_shard_size: int = 2 * 1024**3,
              allow_pickle: bool = False) -> list[Need]:
    """What building and exporting ``recipe``'s mixture of experts holds (:class:`evomerge.moe.MoeModel`), from file
    headers: the live MoE in its dtype on ``device`` (the base's tensors outside the MLPs, every expert's MLPs, the
    routers); one layer's expert MLPs as read, fused and stacked, and cast; the base in bfloat16 for hidden-state
    gates; a dense merge's engine (its live model twice, while bound, and its working set; the sources memory-mapped
    at the least); the export's CPU copy of the MoE and one output shard."""
    from evomerge.moe.arch import MLP_PARTS, mlp_name, open_moe_inputs

    inputs = open_moe_inputs(recipe, allow_pickle=allow_pickle)
    base, n = inputs.base, len(recipe.experts)
    dtype = live_dtype(recipe.dtype, base)
    mlps = {i: [mlp_name(i, part) for part in MLP_PARTS] for i in range(base.num_layers)}
    mlp_names = {name for names in mlps.values() for name in names}

    def entries(name: str) -> int:
        return math.prod(base.shape(name))

    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    outside = sum(entries(name) for name in base.names if name not in mlp_names and not name.endswith(".inv_freq")
                  and not (tied and name == "lm_head.weight"))
    layer = max((sum(entries(name) for name in names) for names in mlps.values()), default=0)
    routers = base.num_layers * n * base.config.hidden_size
    live = (outside + n * layer * base.num_layers + routers) * dtype.itemsize
    stored = base.dtype(mlps[0][0]).itemsize if mlps else dtype.itemsize
    needs = [Need("the live MoE", live, device=True),
             Need("one layer's expert MLPs read and stacked", n * layer * (2 * stored + dtype.itemsize))]
    dense_model = sum(entries(name) for name in base.names) * dtype.itemsize
    if recipe.gate_mode.startswith("hidden"):
        needs.append(Need("the base in bfloat16 for hidden-state gates", dense_model // dtype.itemsize * 2))
    if recipe.dense_layers is not None:
        models = len(dict.fromkeys([recipe.base, *(e.model for e in recipe.experts)]))
        ranked = get_method(recipe.dense_layers.method).needs(Ranks) is not None
        working = model_working_set(base, base.names, n_models=models, device_type=device.type, ranked=ranked)
        needs.append(Need("the dense merge's live model and working set", 2 * dense_model + working, device=True))
    largest = max(2 * n * math.prod(base.shape(mlps[0][0])) if mlps else 0,
                  max(entries(name) for name in base.names)) * dtype.itemsize  # a layer's fused gate_up is one tensor
    shard = _shard_bytes(live, largest, max_shard_size)
    return [*needs, Need("its copy for export", live), Need("one output shard", shard)]


def check_moe_memory(recipe: MoeRecipe, *, device: str | torch.device | None = None,
                     max_shard_size: int = 2 * 1024**3, allow_pickle: bool = False) -> None:
    """Refuse an MoE (:func:`moe_needs`) that does not fit, before any weight is loaded (one line)."""
    compute = compute_device(device)
    _fits(moe_needs(recipe, device=compute, max_shard_size=max_shard_size, allow_pickle=allow_pickle), compute,
          what=f"a mixture of {len(recipe.experts)} experts",
          fixes="free memory, build it in a smaller dtype (dtype: bfloat16), or use fewer experts")


def merge_to_dir(
    recipe: AnyRecipe,
    out: str | Path,
    *,
    device: str | torch.device | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int = 2 * 1024**3,
    card: Provenance | None = None,
    progress: RunProgress | None = None,
) -> Path:
    """Merge ``recipe`` and write the result atomically as an HF dir (config, safetensors, tokenizer, and what
    :mod:`evomerge.modelcard` adds: model card, recipes, generation config, metadata; ``card``: those of a search,
    with its scores, else the recipe's own).

    Tensor by tensor (:func:`~evomerge.engine.streaming.stream_merge`: one shard of ``max_shard_size`` bytes and one
    tensor's working set in memory, bit-identical to the engine's merge), except for methods that need data
    statistics (Fisher, RegMean), which load the models into a :class:`MergeEngine` with the live model.

    All checks (existing output, a symbolic link as output, recipe validity, source compatibility, parameter
    ranges, memory) run before any tensor work; a failure at any point leaves no output dir behind. Temporary dirs
    that killed merges left beside ``out`` are cleaned first (an old output found renamed aside is restored).

    An MoE recipe is built by :class:`evomerge.moe.MoeModel` (its checks, of models, architectures, shapes and
    prompts, also run before any weight is loaded).

    ``progress`` (``evomerge merge``'s display, :class:`~evomerge.progress.RunProgress`) shows the phases: ``read
    sources`` (opening and checking them; loading them, for an engine or an MoE), ``merge tensors`` (counted per
    tensor when merged as it is written; else the engine's merge), ``write shards`` (counted per tensor; an MoE's
    export), ``model card`` (tokenizer, model card, recipes).
    """
    out = Path(out).expanduser()
    recover(out)
    check_target(out, force)
    if progress is not None:
        progress.start("read sources")
    if isinstance(recipe, MoeRecipe):
        from evomerge.moe import MoeModel

        check_moe_memory(recipe, device=device, max_shard_size=max_shard_size, allow_pickle=allow_pickle)
        card = card or provenance(recipe, name=out.name)
        model = MoeModel(recipe, device=device, allow_pickle=allow_pickle)
        if progress is not None:
            progress.start("write shards")
        return model.export(out, force=force, max_shard_size=max_shard_size, provenance=card)
    if isinstance(recipe, Recipe):
        check_values(recipe)
    tokenizer = tokenizer_dir(recipe)
    card = card or provenance(recipe, name=out.name)
    if isinstance(recipe, StackRecipe):
        checkpoints = {p: Checkpoint.open(p, allow_pickle=allow_pickle) for p in recipe.model_paths()}
        dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
        layers = [(m, j) for m, j, _ in layer_plan(recipe, {p: ck.num_layers for p, ck in checkpoints.items()})]
        check_stack_memory(checkpoints, layers, dtype=dtype, device=torch.device("cpu"),
                           max_shard_size=max_shard_size)
        state, config = stack_layers(recipe, checkpoints)
        if dtype is not None:
            state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
            config.dtype = recipe.dtype
        return save_hf_dir(state, out, config=config, tokenizer_dir=tokenizer, force=force,
                           max_shard_size=max_shard_size, progress=progress, **provenance_files(card))
    if not get_method(recipe.method).statistic:
        return stream_merge(recipe, out, device=device, tokenizer_dir=tokenizer, force=force,
                            allow_pickle=allow_pickle, max_shard_size=max_shard_size, provenance=card,
                            progress=progress)
    engine = MergeEngine(recipe.model_paths(), device=device, dtype=recipe.dtype, allow_pickle=allow_pickle)
    from transformers import AutoTokenizer

    prepare(engine, recipe, recipe.calibration, AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None)
    if progress is not None:
        progress.start("merge tensors")
    engine.materialize(recipe)
    return engine.export(out, tokenizer_dir=tokenizer, force=force, max_shard_size=max_shard_size, provenance=card,
                         progress=progress)
