"""Malformed YAML in every file evomerge reads: one ``FILE:LINE:COLUMN: problem`` line, no traceback, no work done."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.recipe import load_recipe
from evomerge.search.config import RunConfig
from evomerge.search.space import SearchSpace
from evomerge.yamlfile import YamlFileError, load_yaml

# (text, 1-based line and column of the problem as PyYAML marks it, words of PyYAML's own problem)
MALFORMED = [
    ("method: linear\nsources: [{model: a}, {model: b}\nbase: c\n", 3, 1,
     "expected ',' or ']', but got '<scalar>' (while parsing a flow sequence that starts at line 2, column 10)"),
    ("method: linear\n  weight: 1: 2\n", 2, 9, "mapping values are not allowed here"),
    ("method: linear\n\tsources: []\n", 2, 1, "found character '\\t' that cannot start any token"),
]


@pytest.mark.parametrize(("text", "line", "column", "problem"), MALFORMED)
def test_load_yaml_names_file_line_column_and_problem(tmp_path: Path, text: str, line: int, column: int,
                                                       problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(YamlFileError) as err:
        load_yaml(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}:{column}: invalid YAML: ")
    assert problem in message and "\n" not in message


def test_python_tag_is_refused_in_one_line_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.yaml"
    path.write_text(f"method: linear\nsources: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(YamlFileError) as err:
        load_yaml(path)
    assert str(err.value).startswith(f"{path}:2:10: the tag !!python/object/apply:os.system is refused")
    assert "\n" not in str(err.value) and not marker.exists()


def test_repeated_key_and_non_utf8_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("method: linear\nparameters: {weight: 1}\nparameters: {weight: 2}\n")
    with pytest.raises(YamlFileError, match=r"dup\.yaml:3:1: invalid YAML: key 'parameters' appears twice"):
        load_yaml(path)
    path.write_bytes(b"method: lin\xe9ar\n")
    with pytest.raises(YamlFileError, match=r"not UTF-8 text \(byte 11"):
        load_yaml(path)
    path.write_text("")
    assert load_yaml(path) is None
    path.write_text("a: {x: 1}\nb: {x: 1}\n")  # the same key in two different mappings is fine
    assert load_yaml(path) == {"a": {"x": 1}, "b": {"x": 1}}


def test_every_reader_uses_the_one_loader(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MALFORMED[0][0])
    for read in (load_recipe, RunConfig.from_yaml, SearchSpace.from_yaml):
        with pytest.raises(YamlFileError, match=rf"{path}:3:1: invalid YAML"):
            read(path)
    # a mergekit config goes through the same reader before it is recognized by its merge_method key
    path.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1, density: [0.5}\n")
    with pytest.raises(YamlFileError, match=rf"{path}:4:"):
        load_recipe(path)


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: ")
    return lines[0]


def test_cli_commands_print_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MALFORMED[1][0])
    out = tmp_path / "merged"
    assert f"{bad}:2:9: invalid YAML: mapping values" in _cli_error(capsys, ["merge", str(bad), "--out", str(out)])
    for command in ("search", "soup"):
        assert f"{bad}:2:9:" in _cli_error(capsys, [command, str(bad), "--out", str(tmp_path / "run")])
    # a run config that parses, pointing to a malformed search space: refused before any model is read
    config = tmp_path / "search.yaml"
    config.write_text(f"name: t\nsources: [{tmp_path / 'missing'}]\nspace: bad.yaml\nevaluator: {{type: perplexity}}\n")
    assert f"{bad}:2:9:" in _cli_error(capsys, ["search", str(config), "--out", str(tmp_path / "run")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "search.yaml"]  # no run dir, no output


def test_cli_subprocess_python_tag_no_traceback(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"evomerge: error: {recipe}:1:1: the tag !!python/object/apply:os.system is "
                                   "refused: evomerge reads plain YAML data only and never builds Python objects from "
                                   "a file; write the value as a plain number, string, list or mapping")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_invalid_configs_and_spaces_are_one_line_with_each_problem(tmp_path: Path) -> None:
    from evomerge.search.config import ConfigError
    from evomerge.search.space import SpaceError

    run = tmp_path / "run.yaml"
    run.write_text("base: b\nsources: [s]\nsamplr: tpe\nn_trials: many\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(run)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{run}: ")
    assert "samplr: unknown key (did you mean 'sampler'?)" in text and "; n_trials: " in text
    space = tmp_path / "space.yaml"
    space.write_text("method: ties\nparameters: {weight: {low: 0.0, hihg: 1.0}}\nlayer_group: 2\n")
    with pytest.raises(SpaceError) as err:
        SearchSpace.from_yaml(space)
    text = str(err.value)
    assert "\n" not in text and "range" not in text  # the union's tag is not a key the user wrote
    assert "parameters.weight.hihg: unknown key (see the format in evomerge/search/space.py)" in text
    assert "layer_group: unknown key" in text
