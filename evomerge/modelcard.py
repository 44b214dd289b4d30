"""What a merged model dir says about how it was made: model card, recipes, generation config, safetensors metadata.

:func:`provenance` gives the files written beside the weights of every merged dir (``evomerge merge`` and a
search's ``best_model/``) and the metadata stored in every safetensors header:

* ``README.md``: a Hugging Face model card (YAML front matter with ``base_model``, ``tags: [merge, evomerge]``,
  ``library_name``; then the method, the sources, the scores on validation / test when the recipe comes from a
  search, the evomerge version, the recipe and, when mergekit can run it, the mergekit YAML). ``base_model`` holds
  Hub ids only (:func:`hub_id`: what the Hub links and validates); models known only by a local path are listed in
  the card's body instead;
* ``recipe.yaml`` (``evomerge merge recipe.yaml`` rebuilds the dir bit for bit) and ``mergekit_config.yml`` (the
  name mergekit gives its own copy) when the method exists in mergekit; for a mixture of experts
  ``mergekit_moe_config.yml`` when mergekit-moe can build it;
* ``generation_config.json`` copied verbatim from the base, else from the first source that has one, so chat models
  keep their list of ``eos_token_id`` and their sampling defaults;
* safetensors metadata ``format: pt`` (what transformers checks), ``evomerge_version`` and ``evomerge_recipe`` (the
  recipe as compact JSON), so a single shard found alone still says how it was made.

No torch import: the recipe, the method registry's flags and the sources' files are all it reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evomerge import __version__
from evomerge.recipe import AnyRecipe, MoeRecipe, Recipe, StackRecipe
from evomerge.recipe.mergekit import to_mergekit_yaml
from evomerge.recipe.moe import MERGEKIT_MOE_CONFIG, mergekit_moe_exportable
from evomerge.recipe.schema import MOE_NAMES

__all__ = ["GENERATION_CONFIG", "MERGEKIT_RECIPE", "MODEL_CARD", "RECIPE", "Provenance", "SplitScores",
           "generation_config_source", "hub_id", "mergekit_exportable", "mergekit_file", "model_card", "provenance",
           "provenance_files", "weights_metadata"]

MODEL_CARD = "README.md"
RECIPE = "recipe.yaml"
MERGEKIT_RECIPE = "mergekit_config.yml"
GENERATION_CONFIG = "generation_config.json"

# A Hub repo id: ``namespace/name``, each part letters, digits, ``-``, ``_``, ``.``, at most 96 characters, not
# starting or ending with ``-`` / ``.``, without ``--`` or ``..`` (huggingface_hub's validate_repo_id rules)
_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_PART}/{_PART}")
# a snapshot in huggingface_hub's cache: .../models--{namespace}--{name}/snapshots/{revision}
_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")


@dataclass(frozen=True)
class SplitScores:
    """The exported recipe's scores on one split (``validation``, ``test``): metric -> value, and the standard error
    of the metrics that have one."""

    split: str
    metrics: Mapping[str, float]
    stderr: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Provenance:
    """Files (relative name -> text) written beside the weights, and the metadata of every safetensors file."""

    files: Mapping[str, str]
    metadata: Mapping[str, str]


def provenance_files(provenance: Provenance | None) -> dict[str, Mapping[str, str]]:
    """``provenance`` as the ``extra_files`` and ``metadata`` keywords of :func:`evomerge.checkpoint.save_hf_dir`
    (none for None: a bare weights dir)."""
    return {} if provenance is None else {"extra_files": provenance.files, "metadata": provenance.metadata}


def generation_config_source(recipe: AnyRecipe) -> Path | None:
    """The model dir whose ``generation_config.json`` the merged model gets: the base, else the first model of the
    recipe (in :meth:`Recipe.model_paths` order) that has one; None when none has."""
    return next((Path(p) for p in recipe.model_paths() if (Path(p) / GENERATION_CONFIG).is_file()), None)


def hub_id(model: str) -> str | None:
    """The Hugging Face Hub id a recipe's model path stands for, or None for a local model: a path written as a repo
    id (``namespace/name``, e.g. a dir cloned there), or a snapshot in huggingface_hub's cache
    (``.../models--namespace--name/snapshots/REV`` -> ``namespace/name``). A bare name (``base``) or any other path
    is local: evomerge reads local dirs only, and a name without a namespace is far more often a relative dir than
    one of the Hub's few legacy ids."""
    cached = _CACHE_SNAPSHOT.search(model)
    if cached:
        return cached["repo"].replace("--", "/")
    return model if _REPO_ID.fullmatch(model) else None


def mergekit_exportable(recipe: AnyRecipe) -> bool:
    """Whether mergekit can run the recipe: a layer stack, and every merge method but the data-aware ones (Fisher,
    RegMean), which exist in evomerge only; mergekit-moe an MoE without evomerge's search keys."""
    if isinstance(recipe, StackRecipe):
        return True
    if isinstance(recipe, MoeRecipe):
        return mergekit_moe_exportable(recipe)
    from evomerge.methods import get_method  # the registry imports torch: only when asked

    return get_method(recipe.method).statistic is None and recipe.calibration is None


def mergekit_file(recipe: AnyRecipe) -> str:
    """The name of the mergekit (or mergekit-moe) config written beside the weights: the names those tools use."""
    return MERGEKIT_MOE_CONFIG if isinstance(recipe, MoeRecipe) else MERGEKIT_RECIPE


def weights_metadata(recipe: AnyRecipe) -> dict[str, str]:
    """The safetensors header metadata of a merged model's files (string to string, as the format requires)."""
    return {"format": "pt", "evomerge_version": __version__,
            "evomerge_recipe": json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))}


def _score_cell(value: float | None, stderr: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def _scores_table(scores: Sequence[SplitScores]) -> str:
    metrics = list(dict.fromkeys(m for s in scores for m, v in s.metrics.items() if isinstance(v, (int, float))))
    lines = [f"| metric | {' | '.join(s.split for s in scores)} |", "|---" * (len(scores) + 1) + "|"]
    for metric in metrics:
        cells = [_score_cell(s.metrics.get(metric), s.stderr.get(metric)) for s in scores]
        lines.append(f"| {metric} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _source_line(model: str, parameters: Mapping[str, object], role: str = "") -> str:
    params = f": `{json.dumps(dict(parameters), sort_keys=True)}`" if parameters else ""
    return f"- `{model}`{role}{params}"


def model_card(recipe: AnyRecipe, *, name: str, scores: Sequence[SplitScores] = (), origin: str | None = None) -> str:
    """The README.md of a merged model dir ``name`` built from ``recipe`` (HF model-card format: YAML front matter,
    then Markdown). ``scores``: the recipe's scores per split (a search's validation and test); ``origin``: one line
    on where the recipe comes from (a search's study and trial)."""
    moe = isinstance(recipe, MoeRecipe)
    hub = {p: hub_id(p) for p in recipe.model_paths()}
    ids = list(dict.fromkeys(i for i in hub.values() if i is not None))
    front = {**({"base_model": ids} if ids else {}), "library_name": "transformers",
             "tags": ["merge", "evomerge", *(["moe"] * moe)]}
    if mergekit_exportable(recipe):
        front["tags"].append("mergekit")
    seed = f", seed {recipe.seed}" if isinstance(recipe, (Recipe, MoeRecipe)) and recipe.seed else ""
    what = (f"A mixture of experts ({MOE_NAMES[recipe.output_architecture]}) of pre-trained models made with evomerge "
            f"{__version__}, gate mode "
            f"`{recipe.gate_mode}`, {recipe.experts_per_token} of {len(recipe.experts)} experts per token"
            if isinstance(recipe, MoeRecipe) else
            f"A merge of pre-trained models made with evomerge {__version__}, method `{recipe.method}`")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", f"# {name}", "",
             what + seed + (f", dtype {recipe.dtype}" if recipe.dtype else "") + "."]
    if origin:
        lines += ["", origin]
    lines += ["", "## Sources", ""]
    if isinstance(recipe, StackRecipe):
        lines += [f"- `{s.model}` layers {s.layer_range[0]}-{s.layer_range[1] - 1}"
                  + (f", scaled by {s.scale:g}" if s.scale != 1.0 else "") for s in recipe.slices]
    elif isinstance(recipe, MoeRecipe):
        lines.append(f"- `{recipe.base}` (base: attention, norms, embeddings and head)")
        lines += [f"- `{e.model}` (expert {i}: its MLPs, {len(e.positive_prompts)} positive / "
                  f"{len(e.negative_prompts)} negative prompts)" for i, e in enumerate(recipe.experts)]
        lines += [f"- `{e.model}` (shared expert: its MLPs, run for every token, {len(e.positive_prompts)} positive / "
                  f"{len(e.negative_prompts)} negative prompts for its gate)" for e in recipe.shared_experts]
    else:
        if recipe.base:
            lines.append(_source_line(recipe.base, {}, " (base: task vectors are taken against it)"))
        lines += [_source_line(s.model, s.parameters) for s in recipe.sources]
        if recipe.parameters:
            lines += ["", f"Parameters: `{json.dumps(recipe.parameters, sort_keys=True)}`"]
    local = [p for p, i in hub.items() if i is None]
    if local:
        lines += ["", "Local models (paths on the machine that made this merge, not Hugging Face Hub ids, so not in "
                  "`base_model`): " + ", ".join(f"`{p}`" for p in local) + "."]
    if scores:
        lines += ["", "## Scores", "", _scores_table(scores)]
    lines += ["", "## Recipe", "", f"Rebuild this dir bit for bit with `evomerge merge {RECIPE} --out DIR`:", "",
              "```yaml", recipe.to_yaml().rstrip(), "```"]
    if mergekit_exportable(recipe):
        tool = "mergekit-moe" if moe else "mergekit"
        lines += ["", f"### {tool}", "", f"The same recipe as a {tool} config ({mergekit_file(recipe)}):", "",
                  "```yaml", to_mergekit_yaml(recipe).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def provenance(recipe: AnyRecipe, *, name: str, scores: Sequence[SplitScores] = (),
               origin: str | None = None) -> Provenance:
    """Everything a merged dir ``name`` gets besides its config, weights and tokenizer (see the module docstring)."""
    files = {MODEL_CARD: model_card(recipe, name=name, scores=scores, origin=origin), RECIPE: recipe.to_yaml()}
    if mergekit_exportable(recipe):
        files[mergekit_file(recipe)] = to_mergekit_yaml(recipe)
    source = generation_config_source(recipe)
    if source is not None:
        files[GENERATION_CONFIG] = (source / GENERATION_CONFIG).read_text()
    return Provenance(files, weights_metadata(recipe))
