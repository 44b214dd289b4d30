"""Read Hugging Face model dirs lazily, check they can be merged, and export merged weights atomically.

Reading
    :class:`Checkpoint` opens a local model dir (``config.json`` plus ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``). Tensor names, shapes and dtypes come from the safetensors headers; a
    tensor's data is read only when :meth:`Checkpoint.get` asks for it. Pickle checkpoints
    (``pytorch_model.bin``) are refused unless the caller opts in with ``allow_pickle=True`` (CLI
    ``--allow-pickle``), because unpickling can execute arbitrary code; even then they are read with
    ``torch.load(..., weights_only=True)``.

Tensor naming (layer index, filter kind) lives in :mod:`evomerge.naming`.

Compatibility
    :func:`check_compatible` checks, from metadata alone, that sources can be merged tensor by tensor.

Writing
    :func:`save_hf_dir` writes a state dict as a standard Hugging Face dir (single file or shards plus an
    index), building it in a temporary dir beside the target and renaming it into place, so a reader never
    sees a half-written model and a failure leaves nothing behind.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from evomerge.naming import layer_index, tensor_filter
from evomerge.outdir import (
    apply_umask,
    check_free_space,
    check_target,
    make_partial,
    move_into_place,
    recover,
    refuse_symlink,
    write_error,
)

if TYPE_CHECKING:
    from evomerge.progress import RunProgress

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "IncompatibleCheckpointsError",
    "TOKENIZER_FILES",
    "check_compatible",
    "load_state_dict",
    "plan_shards",
    "save_hf_dir",
]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

#: Files copied from ``tokenizer_dir`` by :func:`save_hf_dir` (those that exist).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)

# safetensors header dtype codes -> torch dtypes.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Config keys holding the number of transformer blocks, in the order they are tried.
_NUM_LAYER_KEYS: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class CheckpointError(ValueError):
    """A model dir cannot be read as asked (missing files, refused pickle, broken index, ...)."""


class IncompatibleCheckpointsError(CheckpointError):
    """Sources differ in model type, architecture, tensor names or tensor shapes."""


# --------------------------------------------------------------------------------------------------
# Shard readers
# --------------------------------------------------------------------------------------------------


class _ShardReader(Protocol):
    """Read access to the tensors of one weights file."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> Tensor: ...


class _SafetensorsShard:
    """One ``.safetensors`` file, kept open (memory-mapped); metadata comes from the header only."""

    def __init__(self, path: Path) -> None:
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for broken headers
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc

    def names(self) -> list[str]:
        # offset_keys (safetensors >= 0.5.3) gives the on-disk order; older versions list names sorted.
        return list(getattr(self._handle, "offset_keys", self._handle.keys)())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handle.get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has safetensors dtype {code}, which evomerge does not map to torch")
        return _SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> Tensor:
        return self._handle.get_tensor(name)


class _PickleShard:
    """One ``pytorch_model.bin`` file, loaded with ``weights_only=True`` and memory-mapped."""

    def __init__(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {path} with torch.load(weights_only=True, mmap=True): {exc}. Only plain tensor state "
                "dicts in torch's zip format are accepted; convert the checkpoint to safetensors "
                "(model.save_pretrained(dir, safe_serialization=True)) on a trusted machine."
            ) from exc
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a flat name -> tensor state dict")
        self._state: dict[str, Tensor] = dict(state)

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def get(self, name: str) -> Tensor:
        # A copy, like safetensors' get_tensor: callers may modify it without touching the cached mmap.
        return self._state[name].clone()


# --------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------


def _files_found(directory: Path, limit: int = 20) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not entries:
        return "the dir is empty"
    shown = ", ".join(entries[:limit])
    return f"found: {shown}" + (f", ... ({len(entries) - limit} more)" if len(entries) > limit else "")


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index_path} is not a valid index (expected a JSON object with 'weight_map'): {exc}"
        ) from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' must be a non-empty mapping of tensor name -> shard file")
    # Lexical check, so that the symlinks of a Hugging Face cache snapshot (to ../../blobs/...) keep working.
    outside = sorted({str(s) for s in weight_map.values() if Path(str(s)).is_absolute() or ".." in Path(str(s)).parts})
    if outside:
        raise CheckpointError(
            f"{index_path} names shard files outside the model dir: {', '.join(outside)}; an index may only name "
            "files inside its own dir (a plain file name such as model-00001-of-00002.safetensors)")
    missing = sorted({shard for shard in weight_map.values() if not (index_path.parent / shard).is_file()})
    if missing:
        raise CheckpointError(f"{index_path} refers to shard files that do not exist: {', '.join(missing)}")
    return {str(name): str(shard) for name, shard in weight_map.items()}


def _pickle_refusal(directory: Path, found: str) -> CheckpointError:
    return CheckpointError(
        f"{directory} holds only a pickle checkpoint ({found}) and no safetensors weights. Loading a pickle can "
        "execute arbitrary code, so evomerge refuses it by default. If you trust its source, opt in with "
        "allow_pickle=True (CLI: --allow-pickle); it is then read with torch.load(weights_only=True). "
        "Better: convert it once to safetensors, e.g. "
        "AutoModel.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)."
    )


def _config_value(config: PretrainedConfig | Mapping[str, Any], key: str) -> Any:
    """``key`` from a config object or dict, looking into a nested text config (multimodal models) if needed."""
    if isinstance(config, Mapping):
        return next((c[key] for c in (config, config.get("text_config") or {}) if c.get(key) is not None), None)
    value = getattr(config, key, None)
    return getattr(config.get_text_config(), key, None) if value is None else value


class Checkpoint:
    """A local Hugging Face model dir, read lazily tensor by tensor.

    Open with :meth:`open`; use as a context manager (or call :meth:`close`) to release file handles.
    ``names``, :meth:`shape` and :meth:`dtype` read only file headers; :meth:`get` reads one tensor.
    Safetensors shards are opened on first use and their handles cached.

    Tied embeddings: names are reported exactly as stored. A model saved with
    ``tie_word_embeddings=True`` usually stores only the input embedding and no ``lm_head.weight``;
    that name is then absent here (transformers re-ties it when loading).
    """

    def __init__(
        self, path: Path, shard_files: Sequence[str], weight_map: Mapping[str, str] | None, pickle: bool
    ) -> None:
        """Use :meth:`open`; this stores an already validated layout."""
        self._path = path
        self._shard_files = list(shard_files)
        self._weight_map = None if weight_map is None else dict(weight_map)
        self._pickle = pickle
        self._readers: dict[str, _ShardReader] = {}
        self._name_to_shard: dict[str, str] | None = None
        self._config: PretrainedConfig | dict[str, Any] | None = None

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
        """Open the model dir at ``path``.

        Weights are looked up in this order: ``model.safetensors``, ``model.safetensors.index.json``
        (sharded), then, only with ``allow_pickle=True``, ``pytorch_model.bin`` and
        ``pytorch_model.bin.index.json``. Raises :class:`CheckpointError` naming what was looked for
        and what was found.
        """
        directory = Path(path).expanduser().resolve()
        if not directory.exists():
            raise CheckpointError(f"model dir {directory} does not exist (evomerge reads local dirs only, not hub ids)")
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is a file; pass the Hugging Face model dir that contains it")
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{directory} has no {CONFIG_NAME}; a Hugging Face model dir needs one "
                f"(write it with model.config.save_pretrained(dir)); {_files_found(directory)}"
            )
        if (directory / SAFE_WEIGHTS).is_file():
            return cls(directory, [SAFE_WEIGHTS], None, pickle=False)
        if (directory / SAFE_INDEX).is_file():
            weight_map = _read_index(directory / SAFE_INDEX)
            return cls(directory, list(dict.fromkeys(weight_map.values())), weight_map, pickle=False)
        pickle_files = [n for n in (PICKLE_WEIGHTS, PICKLE_INDEX) if (directory / n).is_file()]
        if pickle_files and not allow_pickle:
            raise _pickle_refusal(directory, ", ".join(pickle_files))
        if PICKLE_WEIGHTS in pickle_files:
            return cls(directory, [PICKLE_WEIGHTS], None, pickle=True)
        if PICKLE_INDEX in pickle_files:
            weight_map = _read_index(directory / PICKLE_INDEX)
            return cls(directory, list(dict.fromkeys(weight_map.values())), weight_map, pickle=True)
        raise CheckpointError(
            f"no weights in {directory}: looked for {SAFE_WEIGHTS}, {SAFE_INDEX}, {PICKLE_WEIGHTS}, {PICKLE_INDEX}; "
            f"{_files_found(directory)}"
        )

    # -- metadata ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """Absolute path of the model dir."""
        return self._path

    @property
    def is_pickle(self) -> bool:
        """Whether the weights come from a pickle checkpoint (opened with ``allow_pickle=True``)."""
        return self._pickle

    @property
    def config(self) -> PretrainedConfig | dict[str, Any]:
        """The model config: ``AutoConfig.from_pretrained(path)`` (never with remote code); the raw
        ``config.json`` dict when transformers does not know the model type."""
        if self._config is None:
            try:
                self._config = AutoConfig.from_pretrained(str(self._path), trust_remote_code=False)
            except (ValueError, KeyError, OSError):
                self._config = json.loads((self._path / CONFIG_NAME).read_text())
        return self._config

    @property
    def model_type(self) -> str | None:
        """``model_type`` from the config (e.g. ``"llama"``), ``None`` if the config has none."""
        return _config_value(self.config, "model_type")

    @property
    def architecture(self) -> str | None:
        """``config.architectures[0]`` (e.g. ``"LlamaForCausalLM"``), else the model type."""
        architectures = _config_value(self.config, "architectures")
        return architectures[0] if architectures else self.model_type

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks: the first of ``num_hidden_layers``, ``n_layer``, ``num_layers``,
        ``n_layers`` in the config; else one more than the highest :func:`layer_index` of the names."""
        for key in _NUM_LAYER_KEYS:
            value = _config_value(self.config, key)
            if isinstance(value, int):
                return value
        indices = [i for i in map(layer_index, self.names) if i is not None]
        if not indices:
            raise CheckpointError(f"{self._path}: the config names no layer count and no tensor has a layer index")
        return max(indices) + 1

    # -- tensors -------------------------------------------------------------------------------

    def _reader(self, shard: str) -> _ShardReader:
        if shard not in self._readers:
            path = self._path / shard
            self._readers[shard] = _PickleShard(path) if self._pickle else _SafetensorsShard(path)
        return self._readers[shard]

    def _shard_of(self) -> dict[str, str]:
        """Tensor name -> shard file, in file order (shard by shard, each in on-disk order)."""
        if self._name_to_shard is None:
            mapping: dict[str, str] = {}
            for shard in self._shard_files:
                stored = self._reader(shard).names()
                if self._weight_map is None:
                    mapping.update(dict.fromkeys(stored, shard))
                    continue
                claimed = {n for n, s in self._weight_map.items() if s == shard}
                absent = sorted(claimed.difference(stored))
                if absent:
                    raise CheckpointError(
                        f"{self._path}: the index puts {len(absent)} tensor(s) in {shard} that it does not contain, "
                        f"e.g. {absent[0]!r}"
                    )
                mapping.update((n, shard) for n in stored if n in claimed)
            self._name_to_shard = mapping
        return self._name_to_shard

    def _reader_for(self, name: str) -> _ShardReader:
        shards = self._shard_of()
        if name not in shards:
            close = difflib.get_close_matches(name, list(shards), n=3)
            hint = f"; similar names: {', '.join(map(repr, close))}" if close else ""
            raise KeyError(f"tensor {name!r} is not in checkpoint {self._path}{hint}")
        return self._reader(shards[name])

    @property
    def names(self) -> list[str]:
        """Tensor names as stored, in file order."""
        return list(self._shard_of())

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``, from the file header (no data read)."""
        return self._reader_for(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Torch dtype of tensor ``name``, from the file header (no data read)."""
        return self._reader_for(name).dtype(name)

    def nbytes(self, name: str) -> int:
        """Bytes tensor ``name`` takes in its stored dtype, from the file header (no data read)."""
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def get(self, name: str, device: str | torch.device = "cpu") -> Tensor:
        """Read tensor ``name`` and place it on ``device``."""
        return self._reader_for(name).get(name).to(device)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._shard_of()

    def __len__(self) -> int:
        return len(self._shard_of())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def close(self) -> None:
        """Drop cached file handles; the checkpoint reopens them if used again."""
        self._readers.clear()
        self._name_to_shard = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "pickle" if self._pickle else "safetensors"
        return f"Checkpoint({str(self._path)!r}, {kind}, {len(self._shard_files)} shard(s))"


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """All tensors of the model dir at ``path`` on CPU, in file order."""
    with Checkpoint.open(path, allow_pickle=allow_pickle) as checkpoint:
        return {name: checkpoint.get(name) for name in checkpoint.names}


# --------------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------------


def _source(i: int, checkpoint: Checkpoint) -> str:
    return f"source {i} ({checkpoint.path})"


def _type_mismatches(checkpoints: Sequence[Checkpoint]) -> list[str]:
    ref = checkpoints[0]
    problems = []
    for i, other in enumerate(checkpoints[1:], start=1):
        if other.model_type != ref.model_type:
            problems.append(
                f"{_source(i, other)} has model_type {other.model_type!r}, {_source(0, ref)} has {ref.model_type!r}"
            )
        ref_arch, other_arch = (_config_value(c.config, "architectures") for c in (ref, other))
        if ref_arch and other_arch and ref_arch[0] != other_arch[0]:
            problems.append(f"{_source(i, other)} is a {other_arch[0]}, {_source(0, ref)} is a {ref_arch[0]}")
    return problems


def _tensor_mismatches(checkpoints: Sequence[Checkpoint], skip: Collection[str]) -> list[str]:
    ref = checkpoints[0]
    ref_names = [n for n in ref.names if n not in skip]
    problems = []
    for i, other in enumerate(checkpoints[1:], start=1):
        src = _source(i, other)
        problems += [f"missing in {src}: {n!r} (present in {_source(0, ref)})" for n in ref_names if n not in other]
        problems += [
            f"{src} has extra tensor {n!r}, absent from {_source(0, ref)}"
            for n in other.names
            if n not in ref and n not in skip
        ]
        for name in ref_names:
            if name in other and other.shape(name) != ref.shape(name):
                problems.append(
                    f"{src}: {name!r} has shape {other.shape(name)}, {_source(0, ref)} has {ref.shape(name)}"
                )
    return problems


def check_compatible(
    checkpoints: Sequence[Checkpoint], *, skip: Collection[str] = (), max_reported: int = 5
) -> list[str]:
    """Raise :class:`IncompatibleCheckpointsError` unless all sources can be merged tensor by tensor.

    Every source is compared with source 0: same ``model_type`` (and same ``architectures[0]`` where
    both configs declare one), then the same tensor names and shapes. Dtypes may differ. Only headers
    are read. The error lists the first ``max_reported`` mismatches, naming source index and path.

    ``skip``: names that are not compared, the live model's non-persistent buffers (``embeddings.position_ids``
    of BERT, rotary ``inv_freq``), which some transformers versions save and others do not; the model rebuilds
    them, so there is nothing to merge. Returns the skipped names found in any source, sorted, for the caller to
    report.
    """
    if not checkpoints:
        raise ValueError("check_compatible needs at least one checkpoint")
    problems = _type_mismatches(checkpoints) or _tensor_mismatches(checkpoints, skip)
    if not problems:
        return sorted({n for ck in checkpoints for n in ck.names if n in skip})
    shown = "\n".join(f"  - {p}" for p in problems[:max_reported])
    more = f"\n  ... and {len(problems) - max_reported} more" if len(problems) > max_reported else ""
    raise IncompatibleCheckpointsError(
        f"{len(checkpoints)} checkpoints cannot be merged: {len(problems)} mismatch(es) against source 0; "
        f"merging needs one model type and identical tensor names and shapes:\n{shown}{more}"
    )


# --------------------------------------------------------------------------------------------------
# Atomic export
# --------------------------------------------------------------------------------------------------


def _separate_shared(state: Mapping[str, Tensor], tie_word_embeddings: bool) -> dict[str, Tensor]:
    """A copy of ``state`` in which no two tensors share storage (safetensors refuses shared storage).

    In a group of names sharing storage, LM-head names that alias an embedding are dropped when the
    config ties word embeddings (transformers re-ties them on load); every other duplicate is cloned.
    """
    groups: dict[tuple[torch.device, int], list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() > 0:
            groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    out = dict(state)
    for names in (g for g in groups.values() if len(g) > 1):
        kinds = {n: tensor_filter(n) for n in names}
        if tie_word_embeddings and "embed" in kinds.values():
            for name in [n for n in names if kinds[n] == "lm_head"]:
                del out[name]
            names = [n for n in names if kinds[n] != "lm_head"]
        for name in names[1:]:
            out[name] = state[name].clone()
    return out


@dataclass(frozen=True)
class LazyTensors:
    """Tensors produced one at a time while they are written: ``nbytes`` gives each name's size in bytes (in write
    order), ``get(name)`` produces the tensor (e.g. merges it). :func:`save_hf_dir` then holds one shard at a
    time, never the whole state dict."""

    nbytes: Mapping[str, int]
    get: Callable[[str], Tensor]

    @classmethod
    def of(cls, state: Mapping[str, Tensor]) -> LazyTensors:
        return cls({n: t.nbytes for n, t in state.items()}, lambda n: state[n])


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Greedy split in write order: a shard is closed when the next tensor would push it over ``max_shard_size``
    bytes; a tensor larger than the limit gets a shard of its own.

    Not huggingface_hub's ``split_state_dict_into_shards_factory``: it gives the same shards except that a tensor
    over the limit is moved ahead of the shard being filled, so shards no longer follow the write order that
    :class:`LazyTensors` produces them in (one shard held at a time)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(state: LazyTensors, directory: Path, max_shard_size: int, metadata: Mapping[str, str],
                   written: Callable[[], None] | None = None) -> None:
    """The shards of ``state`` (``written`` called after each tensor is produced)."""
    plan = plan_shards(state.nbytes, max_shard_size)
    if len(plan) == 1:
        files = [SAFE_WEIGHTS]
    else:
        files = [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    for file, names in zip(files, plan):
        tensors = {}
        for n in names:
            tensors[n] = state.get(n).detach().to("cpu").contiguous()
            if written is not None:
                written()
        save_file(tensors, str(directory / file), metadata={**metadata, "format": "pt"})
        del tensors  # one shard at a time
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(state.nbytes.values())},
            "weight_map": {n: file for file, names in zip(files, plan) for n in names},
        }
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(config: PretrainedConfig | Mapping[str, Any], directory: Path) -> None:
    if isinstance(config, PretrainedConfig):
        config.save_pretrained(str(directory))
    else:
        (directory / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(tokenizer_dir: Path, directory: Path) -> None:
    present = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    if not present:
        raise CheckpointError(
            f"tokenizer_dir {tokenizer_dir} holds none of the tokenizer files evomerge copies "
            f"({', '.join(TOKENIZER_FILES)}); pass the dir of a source model or tokenizer_dir=None"
        )
    for name in present:
        shutil.copy2(tokenizer_dir / name, directory / name)


def _write_extra_files(extra_files: Mapping[str, str], directory: Path) -> None:
    for relative, text in extra_files.items():
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"extra file name {relative!r} must be a relative path inside the output dir")
        target = directory / rel
        if target.exists():
            raise ValueError(f"extra file {relative!r} would overwrite a file save_hf_dir already wrote")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


# Config, safetensors headers (about 100 bytes per tensor name) and the index: an upper bound, not an exact count.
_METADATA_BYTES = 64 * 1024
_HEADER_BYTES_PER_TENSOR = 256


def _bytes_to_write(state: LazyTensors, tokenizer_dir: Path | None, extra_files: Mapping[str, str],
                    metadata: Mapping[str, str], max_shard_size: int) -> int:
    """Estimate of the bytes :func:`save_hf_dir` writes: tensor data, tokenizer files, extra files, metadata (the
    header metadata once per shard)."""
    tokenizer = 0 if tokenizer_dir is None else sum(
        (tokenizer_dir / n).stat().st_size for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file())
    extra = sum(len(text.encode()) for text in extra_files.values())
    data = sum(state.nbytes.values())
    header = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items()) * (data // max_shard_size + 1)
    return data + tokenizer + extra + header + _METADATA_BYTES + _HEADER_BYTES_PER_TENSOR * len(state.nbytes)


def _safetensors_os_error(exc: SafetensorError) -> OSError:
    """The OSError inside a safetensors write error (it reports ENOSPC as "... (os error 28)")."""
    match = re.search(r"\(os error (\d+)\)", str(exc))
    code = int(match.group(1)) if match else None
    return OSError(code, os.strerror(code) if code else str(exc))


def save_hf_dir(
    state_dict: Mapping[str, Tensor] | LazyTensors,
    out_dir: str | Path,
    *,
    config: PretrainedConfig | Mapping[str, Any],
    tokenizer_dir: str | Path | None = None,
    force: bool = False,
    max_shard_size: int = 2 * 1024**3,
    extra_files: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: RunProgress | None = None,
    tensors_phase: str = "write shards",
) -> Path:
    """Write ``state_dict`` as a Hugging Face model dir at ``out_dir`` and return its absolute path.

    Layout: ``config.json``; ``model.safetensors`` when all tensors fit in ``max_shard_size`` bytes,
    else ``model-0000i-of-0000N.safetensors`` shards (greedy, in state-dict order) plus
    ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``); every file carries
    ``metadata`` (strings; e.g. :func:`evomerge.modelcard.weights_metadata`) with ``{"format": "pt"}``, which
    transformers requires. Tokenizer files (:data:`TOKENIZER_FILES`) are copied from
    ``tokenizer_dir``; ``extra_files`` maps relative file names to text written beside them (e.g. a
    recipe YAML or README).

    ``state_dict`` may be :class:`LazyTensors` (each tensor produced when its shard is written, so only one
    shard is held at a time: ``evomerge merge``'s tensor-by-tensor path). Tensors of a mapping sharing storage are
    separated (see ``_separate_shared``): with ``tie_word_embeddings`` in
    the config an LM head aliasing the embedding is dropped, other aliases are cloned. Tensors are moved
    to CPU and made contiguous shard by shard.

    Atomicity (see :mod:`evomerge.outdir`): everything is written to a temporary dir beside ``out_dir`` (same
    file system) and renamed into place at the end; temporary dirs that killed exports left in that parent are
    cleaned first. Any exception leaves neither ``out_dir`` nor the temporary dir. An existing ``out_dir`` raises
    ``FileExistsError`` unless ``force=True``; with force it is replaced only after the new dir is complete. An
    ``out_dir`` that is a symbolic link is refused (:class:`~evomerge.outdir.OutputPathError`). Free space is
    checked before writing; a full disk or another OS error raises :class:`~evomerge.outdir.OutputWriteError`
    naming the path, the bytes needed and the bytes free.

    ``progress`` (:class:`~evomerge.progress.RunProgress`): the tensors written as the phase ``tensors_phase``,
    counted (``merge tensors`` when each is merged as it is written), then the rest as ``model card``.
    """
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    if not (state_dict.nbytes if isinstance(state_dict, LazyTensors) else state_dict):
        raise ValueError("state_dict is empty; there is nothing to save")
    out = Path(out_dir).expanduser()
    refuse_symlink(out)  # before resolve(), which would follow it
    out = out.resolve()
    check_target(out, force)
    tokenizer_path = None if tokenizer_dir is None else Path(tokenizer_dir).expanduser().resolve()
    if tokenizer_path is not None and not tokenizer_path.is_dir():
        raise CheckpointError(f"tokenizer_dir {tokenizer_path} is not a directory")
    if isinstance(state_dict, LazyTensors):  # produced one by one: no two share storage
        state = state_dict
    else:
        state = LazyTensors.of(_separate_shared(state_dict, bool(_config_value(config, "tie_word_embeddings"))))

    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    needed = _bytes_to_write(state, tokenizer_path, extra_files or {}, metadata or {}, max_shard_size)
    check_free_space(out, needed)
    try:
        building = make_partial(out)
    except OSError as exc:
        raise write_error(exc, out, needed) from exc
    try:
        try:
            _write_config(config, building)
            if progress is not None:
                progress.start(tensors_phase, len(state.nbytes), unit="tensor")
            _write_weights(state, building, max_shard_size, metadata or {},
                           None if progress is None else progress.advance)
            if progress is not None:
                progress.start("model card")
            if tokenizer_path is not None:
                _copy_tokenizer(tokenizer_path, building)
            _write_extra_files(extra_files or {}, building)
            apply_umask(building)
        except SafetensorError as exc:
            raise write_error(_safetensors_os_error(exc), out, needed) from exc
        except OSError as exc:
            raise write_error(exc, out, needed) from exc
        move_into_place(building, out, force=force)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return out
