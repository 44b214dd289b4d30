"""Recipe → merged HF dir on disk: the Python API behind ``evomerge merge``."""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.calibration import prepare
from evomerge.checkpoint import TOKENIZER_FILES, Checkpoint, save_hf_dir
from evomerge.engine import MergeEngine
from evomerge.engine.stacking import stack_layers
from evomerge.engine.streaming import stream_merge
from evomerge.methods import get_method, validate_params
from evomerge.modelcard import Provenance, provenance, provenance_files
from evomerge.outdir import check_target, recover
from evomerge.recipe import AnyRecipe, MoeRecipe, Recipe, RecipeError, StackRecipe


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


def merge_to_dir(
    recipe: AnyRecipe,
    out: str | Path,
    *,
    device: str | torch.device | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int = 2 * 1024**3,
    card: Provenance | None = None,
) -> Path:
    """Merge ``recipe`` and write the result atomically as an HF dir (config, safetensors, tokenizer, and what
    :mod:`evomerge.modelcard` adds: model card, recipes, generation config, metadata; ``card``: those of a search,
    with its scores, else the recipe's own).

    Tensor by tensor (:func:`~evomerge.engine.streaming.stream_merge`: one shard of ``max_shard_size`` bytes and one
    tensor's working set in memory, bit-identical to the engine's merge), except for methods that need data
    statistics (Fisher, RegMean), which load the models into a :class:`MergeEngine` with the live model.

    All checks (existing output, a symbolic link as output, recipe validity, source compatibility, parameter
    ranges) run before any tensor work; a failure at any point leaves no output dir behind. Temporary dirs that
    killed merges left beside ``out`` are cleaned first (an old output found renamed aside is restored).

    An MoE recipe is built by :class:`evomerge.moe.MoeModel` (its checks, of models, architectures, shapes and
    prompts, also run before any weight is loaded).
    """
    out = Path(out).expanduser()
    recover(out)
    check_target(out, force)
    if isinstance(recipe, MoeRecipe):
        from evomerge.moe import MoeModel

        card = card or provenance(recipe, name=out.name)
        return MoeModel(recipe, device=device, allow_pickle=allow_pickle).export(
            out, force=force, max_shard_size=max_shard_size, provenance=card)
    if isinstance(recipe, Recipe):
        check_values(recipe)
    tokenizer = tokenizer_dir(recipe)
    card = card or provenance(recipe, name=out.name)
    if isinstance(recipe, StackRecipe):
        checkpoints = {p: Checkpoint.open(p, allow_pickle=allow_pickle) for p in recipe.model_paths()}
        state, config = stack_layers(recipe, checkpoints)
        if recipe.dtype:
            state = {n: t.to(getattr(torch, recipe.dtype)) if t.is_floating_point() else t for n, t in state.items()}
            config.dtype = recipe.dtype
        return save_hf_dir(state, out, config=config, tokenizer_dir=tokenizer, force=force,
                           max_shard_size=max_shard_size, **provenance_files(card))
    if not get_method(recipe.method).statistic:
        return stream_merge(recipe, out, device=device, tokenizer_dir=tokenizer, force=force,
                            allow_pickle=allow_pickle, max_shard_size=max_shard_size, provenance=card)
    engine = MergeEngine(recipe.model_paths(), device=device, dtype=recipe.dtype, allow_pickle=allow_pickle)
    from transformers import AutoTokenizer

    prepare(engine, recipe, recipe.calibration, AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None)
    engine.materialize(recipe)
    return engine.export(out, tokenizer_dir=tokenizer, force=force, max_shard_size=max_shard_size, provenance=card)
