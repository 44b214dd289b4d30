"""The one reader of YAML files for the whole package (recipes, mergekit configs, run configs, search spaces, zoo
task files): safe loading only, and one clear error for a malformed file.

A file that does not parse raises :class:`YamlFileError` whose message is ``FILE:LINE:COLUMN: <the parser's
problem>`` (1-based, like compilers and editors), never a PyYAML traceback. Tags that would build Python objects
(``!!python/object``, ``!!python/name``, ...) are refused by the safe loader anyway; the message says so in one
line. A key given twice in one mapping is refused too: PyYAML silently keeps the last one, which hides typos such
as two ``parameters:`` blocks. No torch import: this module sits at the bottom of the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["YamlFileError", "load_yaml"]


class YamlFileError(ValueError):
    """A YAML file cannot be parsed; the message names the file, line, column and the problem."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (the second would silently win)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def _problem(exc: yaml.YAMLError) -> str:
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"invalid YAML: {exc}"
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag:yaml.org,2002:python/" in (exc.problem or ""):
        tag = (exc.problem or "").split("tag:yaml.org,2002:", 1)[1].rstrip("'")
        return (f"the tag !!{tag} is refused: evomerge reads plain YAML data only and never builds Python objects "
                "from a file; write the value as a plain number, string, list or mapping")
    context = f" ({exc.context})" if exc.context else ""
    if exc.context and exc.context_mark is not None:
        start = exc.context_mark
        context = f" ({exc.context} that starts at line {start.line + 1}, column {start.column + 1})"
    return f"invalid YAML: {exc.problem}{context}"


def load_yaml(path: str | Path) -> Any:
    """Parse the YAML file at ``path`` with the safe loader (``None`` for an empty file).

    Raises :class:`YamlFileError` (``FILE:LINE:COLUMN: problem``) for a malformed file, a Python tag, a repeated
    key or a file that is not UTF-8 text; ``FileNotFoundError`` / ``OSError`` when it cannot be read at all.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise YamlFileError(f"{where}: {_problem(exc)}") from None
