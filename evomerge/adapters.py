"""PEFT LoRA adapter dirs as merge sources: reading, checking against the base, and the model an adapter makes.

A LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") stores, for each target
module of a base model, factors ``A`` [r, d_in] and ``B`` [d_out, r]; the model it makes is the base with
``W + ΔW``, ``ΔW = s · B A`` (transposed for ``fan_in_fan_out`` modules such as GPT-2's Conv1D and for embeddings),
``s = lora_alpha / r`` or ``lora_alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievski 2023, rsLoRA), ``r`` and
``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` where they name it. This is what PEFT's
``merge_and_unload`` writes (in fp32 the same operations: ``W + (B @ A) · s``, so the same bits).

A dir is an adapter when it holds ``adapter_config.json`` or adapter weights (``adapter_model.safetensors``;
``adapter_model.bin`` only with ``allow_pickle``, read with ``torch.load(weights_only=True)``). Everything is
checked when it is opened, before any tensor work, each problem one line naming the fix: a missing
``adapter_config.json``; a PEFT type other than LoRA or a LoRA variant whose merged model is not ``W + s B A``
(DoRA, LoRA biases, aLoRA, QALoRA, trainable tokens, parameter targets, PiSSA / OLoRA / CorDA / LoRA-GA / LoftQ
initialisations that change the base); target modules the base does not have; factor shapes that do not fit the
base's tensors. Other saved tensors (``modules_to_save``, trained biases with ``bias: all | lora_only``) replace the
base's tensor of the same name, as PEFT loads them; a targeted embedding's own weight, which PEFT saves whether or
not training changed it, only where it differs from the base's.

``base_model_name_or_path`` naming another model only warns: the shapes are checked strictly, and names are not
reliable (an adapter trained on a local dir that moved since, or on a hub id of which the base is a local copy).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from evomerge.checkpoint import Checkpoint, CheckpointError
from evomerge.outdir import building, check_target, refuse_symlink
from evomerge.recipe.schema import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, is_adapter_dir

__all__ = ["ADAPTER_CONFIG", "AdapterCheckpoint", "AdapterError", "LoraAdapter", "LoraFactors", "adapted_tensor",
           "adapter_source",
           "is_adapter_dir", "save_adapter"]

log = logging.getLogger(__name__)

PREFIX = "base_model.model."  # PEFT's saved names: this, the module path in the base model, then the LoRA part

# Config keys of LoRA variants whose merged model is not W + s·B·A (or that change the base): refused when set.
_VARIANTS: dict[str, str] = {
    "use_dora": "DoRA (a magnitude vector rescales W + BA per column)",
    "lora_bias": "a LoRA bias on lora_B",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA (the adapter acts only after its invocation tokens)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication (the adapted model has other layers than the base)",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# saved suffix -> factor; embeddings store theirs as bare parameters ([r, num_embeddings], [dim, r]): ΔW transposed
_LORA_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "embedding A",
               "lora_embedding_B": "embedding B"}
_BASE_LAYER = "base layer"  # the part of a wrapped layer's own weight, which PEFT saves for targeted embeddings


class AdapterError(CheckpointError):
    """An adapter dir that cannot be a source on this base; the message names the problem and the fix."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's factors: ``A`` [r, d_in], ``B`` [d_out, r], the scale ``s``, whether ``ΔW`` is transposed
    (``fan_in_fan_out`` modules and embeddings, whose stored weight is [d_in, d_out]) and whether the module is an
    embedding (PEFT stores its factors as ``lora_embedding_A`` [r, num_embeddings] / ``lora_embedding_B`` [dim, r]:
    ``A`` and ``B`` here, ``d_in`` the vocabulary)."""

    A: Tensor
    B: Tensor
    scale: float
    transpose: bool
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes

    def to(self, device: torch.device) -> LoraFactors:
        return LoraFactors(self.A.to(device), self.B.to(device), self.scale, self.transpose, self.embedding)

    def delta(self) -> Tensor:
        """``ΔW = s · B A`` (transposed where the weight is stored [d_in, d_out]), fp32: in PEFT's order of
        operations (``transpose(B @ A) * s``, ``LoraLayer.get_delta_weight``), so fp32 factors give PEFT's bits."""
        product = self.B.float() @ self.A.float()
        return (product.T if self.transpose else product) * self.scale


def adapter_source(base: Tensor, factors: LoraFactors) -> Tensor:
    """The adapted tensor ``W + ΔW`` in fp32, from the base tensor ``W`` (any dtype) -- what PEFT's
    ``merge_and_unload`` computes (``weight += delta``) for fp32 weights."""
    return base.float() + factors.delta().to(base.device)


def adapted_tensor(base: Tensor, factors: LoraFactors | None, saved: Tensor | None, dtype: torch.dtype) -> Tensor:
    """One tensor of the model an adapter makes, in ``dtype`` (the base tensor's): the saved tensor where the
    adapter stores one (``modules_to_save``; an embedding's ``base_layer`` PEFT saves when it targets embeddings),
    else the base's ``W``, plus ``ΔW`` where the adapter has factors."""
    weight = base if saved is None else saved.to(base.device)
    return (weight if factors is None else adapter_source(weight, factors)).to(dtype)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"adapter dir {directory} has no {ADAPTER_CONFIG}; evomerge needs it to know r, lora_alpha "
                           "and the target modules (save the adapter with peft's model.save_pretrained(dir))")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object (a PEFT LoraConfig)")
    return config


def _check_variant(config: Mapping[str, Any], where: Path) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{where}: peft_type {kind!r} is not supported; evomerge reads LoRA adapters only "
                           "(peft_type LORA)")
    for key, what in _VARIANTS.items():
        if config.get(key):
            raise AdapterError(f"{where}: {key} is set ({what}); evomerge merges plain LoRA adapters only (W + s·BA); "
                               "merge this adapter into its base with peft's merge_and_unload and use that dir")
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"{where}: init_lora_weights {config['init_lora_weights']!r} trains on a changed base; "
                           "save it converted to plain LoRA (peft's save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=...)) or merge it with merge_and_unload")


def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, Tensor]:
    if (directory / ADAPTER_WEIGHTS).is_file():
        try:
            with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for broken headers
            raise AdapterError(f"cannot read {directory / ADAPTER_WEIGHTS}: {exc}") from exc
    if (directory / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise AdapterError(f"{directory} holds only {ADAPTER_PICKLE} (a pickle); pass --allow-pickle "
                               "(allow_pickle=True) to read it with torch.load(weights_only=True), or re-save the "
                               "adapter with safetensors")
        try:
            state = torch.load(directory / ADAPTER_PICKLE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"cannot read {directory / ADAPTER_PICKLE} with torch.load(weights_only=True): "
                               f"{exc}") from exc
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise AdapterError(f"{directory / ADAPTER_PICKLE} does not hold a flat name -> tensor state dict")
        return dict(state)
    raise AdapterError(f"adapter dir {directory} has no weights: looked for {ADAPTER_WEIGHTS} and {ADAPTER_PICKLE}")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first key of ``patterns`` that names ``module`` (the key, a regex, matches the module path's
    end at a dot boundary), else ``default``: PEFT's rule for ``rank_pattern`` / ``alpha_pattern``
    (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _split_key(key: str) -> tuple[str, str | None]:
    """``(module path in the base, LoRA part: 'A' | 'B' | 'embedding A' | 'embedding B')`` of a saved name,
    ``(tensor name, 'base layer')`` for a wrapped layer's own weight, or ``(tensor name, None)`` for another saved
    full tensor (``modules_to_save``, biases)."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if ".base_layer." in name:  # the wrapped layer's own weight (PEFT saves embeddings' when targeted)
        return name.replace(".base_layer.", "."), _BASE_LAYER
    for suffix, part in _LORA_PARTS.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], part
    return name, None


class LoraAdapter:
    """A checked LoRA adapter on a base checkpoint: ``factors`` per base tensor name (``<module>.weight``) and
    ``replaced`` (saved full tensors that take the base's place)."""

    def __init__(self, path: Path, config: dict[str, Any], factors: dict[str, LoraFactors],
                 replaced: dict[str, Tensor]) -> None:
        self.path, self.config, self.factors, self.replaced = path, config, factors, replaced

    @classmethod
    def open(cls, path: str | Path, base: Checkpoint, *, transposed: Collection[str] = (),
             allow_pickle: bool = False) -> LoraAdapter:
        """Read the adapter dir at ``path`` and check it against ``base`` (AdapterError naming the problem).

        ``transposed``: the base's weights stored [d_in, d_out] (transformers' ``Conv1D``, GPT-2): PEFT decides
        ``fan_in_fan_out`` by the module's type (True for ``Conv1D``, False for ``nn.Linear``, whatever the config
        says), and so does evomerge."""
        directory = Path(path).expanduser().resolve()
        config = _read_config(directory)
        _check_variant(config, directory)
        _warn_other_base(config, directory, base)
        parts: dict[str, dict[str, Tensor]] = {}
        replaced: dict[str, Tensor] = {}
        base_layers: dict[str, Tensor] = {}
        for key, tensor in _read_weights(directory, allow_pickle).items():
            name, part = _split_key(key)
            if part is None:
                replaced[name] = tensor
            elif part == _BASE_LAYER:
                base_layers[name] = tensor
            else:
                parts.setdefault(name, {})[part] = tensor
        absent = [f"{m}.weight" for m in parts if f"{m}.weight" not in base]
        absent += [n for n in [*replaced, *base_layers] if n not in base]
        if absent:
            raise AdapterError(f"{directory}: target module(s) absent from the base {base.path}: {absent[:3]} "
                               f"({len(absent)} in all); is the adapter trained on another architecture?")
        # PEFT saves a targeted embedding's own weight ("auto"): the base's, unless training changed it (a resized or
        # trained vocabulary); only a changed one replaces the base's tensor, so that an unchanged one keeps the
        # adapter factors-only (composable, writable as a merged adapter)
        for name, tensor in base_layers.items():
            stored = base.get(name)
            if tensor.dtype != stored.dtype or tensor.shape != stored.shape or not torch.equal(tensor, stored):
                replaced[name] = tensor
        factors = {f"{m}.weight": _factors(directory, m, p, config, base, f"{m}.weight" in transposed)
                   for m, p in parts.items()}
        for name, tensor in replaced.items():
            if tuple(tensor.shape) != base.shape(name):
                raise AdapterError(f"{directory}: saved tensor {name!r} has shape {tuple(tensor.shape)}, the base's "
                                   f"{base.shape(name)}; the adapter is for another model")
        bad = [n for n, f in factors.items() if not (torch.isfinite(f.A).all() and torch.isfinite(f.B).all())]
        bad += [n for n, t in replaced.items() if not torch.isfinite(t).all()]
        if bad:
            raise AdapterError(f"{directory}: tensor(s) for {bad[:3]} hold NaN/Inf; the adapter cannot be merged")
        return cls(directory, config, factors, replaced)

    def nbytes(self, name: str) -> int:
        """Bytes stored for base tensor ``name`` (its factors or its replacement; 0 where the adapter is the base)."""
        if name in self.factors:
            return self.factors[name].nbytes
        return self.replaced[name].nbytes if name in self.replaced else 0

    @property
    def total_bytes(self) -> int:
        return sum(f.nbytes for f in self.factors.values()) + sum(t.nbytes for t in self.replaced.values())


def _factors(directory: Path, module: str, parts: Mapping[str, Tensor], config: Mapping[str, Any], base: Checkpoint,
             fan_in_fan_out: bool) -> LoraFactors:
    """The checked factors of one module: both present, 2-D, of one rank (the config's for that module), and
    ``B A`` of the base weight's shape."""
    embedding = set(parts) == {"embedding A", "embedding B"}
    if not embedding and set(parts) != {"A", "B"}:
        raise AdapterError(f"{directory}: module {module!r} has {sorted(parts)} but not both lora_A and lora_B")
    A, B = (parts["embedding A"], parts["embedding B"]) if embedding else (parts["A"], parts["B"])
    if A.dim() != 2 or B.dim() != 2:
        raise AdapterError(f"{directory}: module {module!r} has {A.dim()}-D factors; evomerge merges LoRA on linear "
                           "and embedding layers only (not convolutions)")
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha"))
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{directory}: {ADAPTER_CONFIG} needs an integer r >= 1 and a number lora_alpha "
                           f"(module {module!r}: r={r!r}, lora_alpha={alpha!r})")
    if A.shape[0] != r or B.shape[1] != r:
        raise AdapterError(f"{directory}: module {module!r} has factors of rank {A.shape[0]} / {B.shape[1]}, "
                           f"{ADAPTER_CONFIG} says r={r}")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factors = LoraFactors(A, B, float(scale), transpose=fan_in_fan_out or embedding, embedding=embedding)
    dense = (B.shape[0], A.shape[1])
    shape = dense[::-1] if factors.transpose else dense
    if shape != base.shape(f"{module}.weight"):
        raise AdapterError(f"{directory}: module {module!r} makes a delta of shape {shape}, the base's weight is "
                           f"{base.shape(f'{module}.weight')}; the adapter is for another model")
    return factors


def _warn_other_base(config: Mapping[str, Any], directory: Path, base: Checkpoint) -> None:
    named = config.get("base_model_name_or_path")
    if not named or Path(str(named)).name == base.path.name or Path(str(named)).expanduser().resolve() == base.path:
        return
    log.warning("adapter %s names base %r, the recipe's base is %s; merging it because every factor fits the base's "
                "shapes (check that it is the model the adapter was trained on)", directory, named, base.path)


class AdapterCheckpoint:
    """The model an adapter makes (its base with ``W + ΔW`` on the target modules), read like a
    :class:`~evomerge.checkpoint.Checkpoint`: the base's names, shapes, dtypes and config; :meth:`get` forms one
    tensor (``W + ΔW`` rounded to the base tensor's dtype, a replaced tensor, or the base's own)."""

    def __init__(self, adapter: LoraAdapter, base: Checkpoint) -> None:
        self.adapter, self.base = adapter, base

    @property
    def path(self) -> Path:
        return self.adapter.path

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def model_type(self) -> str | None:
        return self.base.model_type

    @property
    def architecture(self) -> str | None:
        return self.base.architecture

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    @property
    def names(self) -> list[str]:
        return self.base.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        """Bytes the adapter stores for ``name`` (factors, a replaced tensor, or 0)."""
        return self.adapter.nbytes(name)

    def get(self, name: str, device: str | torch.device = "cpu") -> Tensor:
        """Tensor ``name`` of the adapted model, formed on ``device`` (the product ``B A`` is computed there)."""
        factors, saved = self.adapter.factors.get(name), self.adapter.replaced.get(name)
        if factors is None and saved is None:
            return self.base.get(name, device)
        factors = None if factors is None else factors.to(torch.device(device))
        return adapted_tensor(self.base.get(name, device), factors, saved, self.base.dtype(name))

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base.names)

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> AdapterCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({str(self.path)!r} on {str(self.base.path)!r})"


def save_adapter(modules: Mapping[str, LoraFactors], out: str | Path, *, base: str | Path,
                 force: bool = False) -> Path:
    """Write a PEFT LoRA dir (``adapter_config.json`` + ``adapter_model.safetensors``) holding the factors of each
    base weight (``<module>.weight``), on ``base``, in PEFT's layout: ``lora_A.weight`` / ``lora_B.weight`` for linear
    and ``Conv1D`` modules (``fan_in_fan_out: true`` when any is a ``Conv1D``: PEFT decides it per module type
    anyway), ``lora_embedding_A`` / ``lora_embedding_B`` for embeddings; ``r`` the largest rank and ``lora_alpha`` its
    scale, other modules through ``rank_pattern`` / ``alpha_pattern`` (``alpha = s · r``); atomic like every output
    (:mod:`evomerge.outdir`). ``peft.PeftModel.from_pretrained(base_model, out)`` loads it."""
    if not modules:
        raise ValueError("no adapted module to save")
    target = Path(out).expanduser()
    refuse_symlink(target)
    target = target.resolve()
    check_target(target, force)
    stems = {name: name.removesuffix(".weight") for name in modules}
    ranks = {stems[n]: f.rank for n, f in modules.items()}
    alphas = {stems[n]: _plain(f.rank * f.scale) for n, f in modules.items()}
    r = max(ranks.values())
    alpha = _plain(r * next(f.scale for f in modules.values() if f.rank == r))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r},
              "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != alpha},
              "base_model_name_or_path": str(base), "bias": "none", "lora_dropout": 0.0, "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": any(f.transpose and not f.embedding for f in modules.values()),
              "modules_to_save": None, "inference_mode": True, "task_type": None}
    tensors = {}
    for name, f in modules.items():
        module = PREFIX + stems[name]
        a, b = ("lora_embedding_A", "lora_embedding_B") if f.embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{module}.{a}"] = f.A.detach().to("cpu").contiguous()
        tensors[f"{module}.{b}"] = f.B.detach().to("cpu").contiguous()
    with building(target, force=force) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return target


def _plain(x: float) -> int | float:
    """``x`` as an int where it is one (``lora_alpha: 8``, not ``8.0``, as PEFT writes it)."""
    return int(x) if float(x).is_integer() else x
