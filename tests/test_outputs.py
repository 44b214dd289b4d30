"""Output dirs under faults: kill -9 at each step of an export or a --force replace, stale temporary dirs, symlinked
--out, umask permissions, shard paths outside the model dir, and full disks (a real 2 MiB tmpfs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from faults import dead_pid, fill
from tiny_models import tiny_family

import evomerge.checkpoint as ckpt_module
from evomerge import outdir
from evomerge.checkpoint import Checkpoint, CheckpointError, load_state_dict, save_hf_dir
from evomerge.cli import main
from evomerge.outdir import OutputPathError, OutputWriteError, format_size, make_partial, move_into_place, recover
from evomerge.recipe import Recipe

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}


def tensors(value: float, n: int = 1000) -> dict[str, torch.Tensor]:
    return {"model.layers.0.mlp.up_proj.weight": torch.full((n,), value), "model.norm.weight": torch.ones(4) * value}


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --------------------------------------------------------------------------------------------------
# kill -9 at each step of a replace (a bare subprocess: evomerge.outdir imports no torch)
# --------------------------------------------------------------------------------------------------

# The subprocess builds the new dir and replaces ``out`` with it; the patched step kills it with SIGKILL (no
# finally, no atexit: what a kill -9 or a power cut leaves behind).
KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from evomerge import outdir
    out, step, use_exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename, real_exchange, real_remove = os.rename, outdir._exchange, outdir._remove
    renames = []
    def rename(a, b):
        real_rename(a, b)
        renames.append(b)
        if step == f"after-rename-{len(renames)}":
            die()
    def exchange(a, b):
        if not use_exchange:
            return False
        assert real_exchange(a, b), "this file system cannot exchange"
        if step == "after-exchange":
            die()
        return True
    outdir.os.rename = rename
    outdir._exchange = exchange
    def remove(path):
        if step == "while-removing-old":
            next(path.iterdir()).unlink()  # half removed
            die()
        real_remove(path)
    outdir._remove = remove
    built = outdir.make_partial(out)
    (built / "weights").write_text("new")
    if step == "while-writing":
        die()
    outdir.move_into_place(built, out, force=True)
""")


def run_killed(script: str, *args: str) -> None:
    """Run ``script`` in a subprocess with this checkout's evomerge; it must end killed by SIGKILL."""
    env = {**os.environ, "PYTHONPATH": str(Path(outdir.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# (step, use renameat2's exchange, what the final name holds right after the kill)
KILL_POINTS = [
    ("while-writing", True, "old"),
    ("after-exchange", True, "new"),
    ("while-removing-old", True, "new"),
    ("after-rename-1", False, None),  # fallback: the old dir is aside, nothing under the final name until recover
    ("after-rename-2", False, "new"),
    ("while-removing-old", False, "new"),
]


@pytest.mark.parametrize(("step", "exchange", "right_after"), KILL_POINTS)
def test_kill_during_replace_leaves_old_or_new_and_recover_cleans(tmp_path: Path, step: str, exchange: bool,
                                                                  right_after: str | None) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "weights").write_text("old")
    (out / "more").write_text("old")
    (tmp_path / "unrelated.txt").write_text("keep")
    run_killed(KILL_SCRIPT, str(out), step, "1" if exchange else "0")
    now = (out / "weights").read_text() if out.exists() else None
    assert now == right_after
    assert len(entries(tmp_path)) > (2 if out.exists() else 1)  # the killed process left a temporary dir
    recover(out)
    assert entries(tmp_path) == ["merged", "unrelated.txt"]
    assert (out / "weights").read_text() == (right_after or "old")


def test_recover_spares_live_and_foreign_dirs(tmp_path: Path) -> None:
    out = tmp_path / "best_model"
    mine = make_partial(out)  # this live process
    dead = tmp_path / f".best_model.partial-{dead_pid()}-{outdir._HOST}-0123abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_text("half")
    other_host = "abcdef" if outdir._HOST != "abcdef" else "fedcba"
    foreign = tmp_path / f".best_model.partial-{dead_pid()}-{other_host}-0123abcd"
    foreign.mkdir()
    legacy = tmp_path / ".best_model.partial-x1y2z3"  # no PID in the name: it cannot be told apart from a live one
    legacy.mkdir()
    recover(out)
    assert entries(tmp_path) == sorted([mine.name, foreign.name, legacy.name])


def test_save_hf_dir_cleans_a_killed_export(tmp_path: Path) -> None:
    """A real export killed with SIGKILL after its first shard; the next export into that parent cleans up."""
    script = textwrap.dedent("""
        import os, signal, sys, torch
        import evomerge.checkpoint as ckpt
        real = ckpt.save_file
        def save_file(tensors, filename, metadata):
            real(tensors, filename, metadata=metadata)
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save_file = save_file
        ckpt.save_hf_dir({"a": torch.ones(100), "b": torch.zeros(100)}, sys.argv[1], config={"model_type": "llama"},
                         max_shard_size=400, force=True)
    """)
    out = tmp_path / "merged"
    save_hf_dir(tensors(1.0), out, config=CONFIG)
    run_killed(script, str(out))
    left = [n for n in entries(tmp_path) if n != "merged"]
    assert len(left) == 1 and left[0].startswith(".merged.partial-")
    assert torch.equal(load_state_dict(out)["model.norm.weight"], torch.ones(4))  # the old output, untouched
    save_hf_dir(tensors(2.0), out, config=CONFIG, force=True)
    assert entries(tmp_path) == ["merged"]
    assert torch.equal(load_state_dict(out)["model.norm.weight"], torch.full((4,), 2.0))


# --------------------------------------------------------------------------------------------------
# paths: symlinks, umask, shard index
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return tiny_family(tmp_path_factory.mktemp("outputs-family"), n=2)


def recipe_file(family: tuple[Path, list[Path]], tmp_path: Path) -> Path:
    base, fts = family
    path = tmp_path / "recipe.yaml"
    Recipe(method="linear", sources=[{"model": str(f)} for f in fts]).to_yaml(path)
    return path


def test_cli_merge_refuses_symlinked_out_and_keeps_the_target(family: tuple[Path, list[Path]], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    link = tmp_path / "link"
    link.symlink_to(target)
    recipe = recipe_file(family, tmp_path)
    assert main(["merge", str(recipe), "--out", str(link), "--force", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == (f"evomerge: error: output path {link} is a symbolic link (to {target}); evomerge never writes "
                   "through a link, which would replace the target's contents: pass the target dir itself, or remove "
                   "the link\n")
    assert entries(target) == ["thesis.tex"] and link.is_symlink()
    assert entries(tmp_path) == ["link", "precious", "recipe.yaml"]
    with pytest.raises(OutputPathError, match="symbolic link"):  # the library refuses it too
        save_hf_dir(tensors(1.0), link, config=CONFIG, force=True)
    assert entries(target) == ["thesis.tex"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_dirs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = save_hf_dir(tensors(1.0), tmp_path / "out", config=CONFIG, extra_files={"notes/a.md": "x"})
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # 0o755 / 0o750, not mkdtemp's 0o700
    assert ((out / "notes").stat().st_mode & 0o777) == 0o777 & ~umask
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in out.iterdir() if p.is_file())


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_shards_outside_the_dir_is_refused(tmp_path: Path, shard: str) -> None:
    model = save_hf_dir(tensors(1.0), tmp_path / "m", config=CONFIG, max_shard_size=1000)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = shard
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    save_hf_dir(tensors(3.0), tmp_path / "outside", config=CONFIG)  # a real file at ../outside.safetensors
    (tmp_path / "outside.safetensors").symlink_to(tmp_path / "outside" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"names shard files outside the model dir: " + shard.replace(".", r"\.")):
        Checkpoint.open(model)


def test_index_through_symlinked_shards_inside_the_dir_still_reads(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot: shard names are plain, the files are links to ../../blobs."""
    model = save_hf_dir(tensors(1.0), tmp_path / "m", config=CONFIG, max_shard_size=1000)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in model.glob("*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(Path("..") / "blobs" / shard.name)
    assert torch.equal(load_state_dict(model)["model.norm.weight"], torch.ones(4))


# --------------------------------------------------------------------------------------------------
# full disks: a real 2 MiB tmpfs
# --------------------------------------------------------------------------------------------------


def test_export_that_cannot_fit_is_refused_before_writing(tiny_disk: Path) -> None:
    old = save_hf_dir(tensors(1.0, n=100), tiny_disk / "merged", config=CONFIG)
    state = tensors(2.0, n=600_000)  # 2.4 MB of weights on a 2 MiB disk
    with pytest.raises(OutputWriteError) as err:
        save_hf_dir(state, tiny_disk / "merged", config=CONFIG, force=True)
    needed = 600_004 * 4 + 64 * 1024 + 2 * 256
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    assert str(err.value) == (f"no space left on the device to write {old}: about {format_size(needed)} are needed, "
                              f"{format_size(free)} are free there; free some space or choose another path")
    assert entries(tiny_disk) == ["merged"] and torch.equal(load_state_dict(old)["model.norm.weight"], torch.ones(4))


def test_disk_filling_up_during_export_is_one_error_and_leaves_the_old_output(
        tiny_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-check passes, then another writer fills the disk before shard 2: a real ENOSPC from safetensors."""
    old = save_hf_dir(tensors(1.0, n=100), tiny_disk / "merged", config=CONFIG)
    real_save = ckpt_module.save_file
    written: list[str] = []

    def save_then_fill(state: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
        if written:
            fill(tiny_disk / "other-writer")
        real_save(state, filename, metadata=metadata)
        written.append(filename)

    monkeypatch.setattr(ckpt_module, "save_file", save_then_fill)
    state = {"a": torch.ones(100_000), "b": torch.ones(100_000)}  # 2 x 400 kB shards
    with pytest.raises(OutputWriteError) as err:
        save_hf_dir(state, old, config=CONFIG, force=True, max_shard_size=500_000)
    assert len(written) == 1
    message = str(err.value)
    assert message.startswith(f"no space left on the device to write {old}: about ")
    assert isinstance(err.value.__cause__, ckpt_module.SafetensorError) and "\n" not in message
    assert entries(tiny_disk) == ["merged", "other-writer"]  # no partial dir
    assert torch.equal(load_state_dict(old)["model.norm.weight"], torch.ones(4))


def test_read_only_file_system_is_one_error(tiny_disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True, timeout=30)
    with pytest.raises(OutputWriteError) as err:
        save_hf_dir(tensors(1.0), tiny_disk / "merged", config=CONFIG)
    assert str(err.value).startswith(f"cannot write {tiny_disk / 'merged'}: Read-only file system (")
    assert entries(tiny_disk) == []


def test_write_error_wraps_enospc_and_others() -> None:
    full = outdir.write_error(OSError(28, "No space left on device"), Path("/nonexistent/x"), needed=3 << 20)
    assert isinstance(full, OutputWriteError) and full.errno == 28
    assert str(full).startswith("no space left on the device to write /nonexistent/x: about 3 MiB are needed, ")
    denied = outdir.write_error(PermissionError(13, "Permission denied", "/a/b"), Path("/a"))
    assert str(denied) == "cannot write /a: Permission denied (/a/b)"
    assert format_size(512) == "512 B" and format_size(1536) == "1.5 KiB" and format_size(5 << 30) == "5 GiB"


def test_move_into_place_without_force_refuses(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    built = make_partial(out)
    with pytest.raises(FileExistsError, match="pass force=True"):
        move_into_place(built, out, force=False)
