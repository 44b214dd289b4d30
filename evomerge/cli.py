"""Command line: a thin layer over the Python API.

    evomerge merge RECIPE.yaml --out DIR [--device cpu|cuda] [--force]     materialize a recipe into an HF dir
    evomerge search CONFIG.yaml [--n-trials N] [--storage URL]             search for the best merge recipe
    evomerge soup CONFIG.yaml                                              uniform and greedy model soups
    evomerge sweep CONFIG.yaml                                             methods x hyperparameter grids
    evomerge worker --storage URL --study NAME                             join a shared study as one more worker
    evomerge report RUN_DIR [--out DIR]                                    tables and plots of a run
    evomerge zoo build DIR [--preset full|bench|mini] [--force]            build the offline tiny model zoo
    evomerge zoo lora DIR [--out OUT] [--mini]                             LoRA adapters on the zoo's tasks

Errors reach the user as one line, `evomerge: error: ...`, with exit code 2 for bad input (a malformed file, an
invalid recipe or config, an output that exists or is a link) and 1 for faults at run time (a full disk, a failed
merge). `--debug` (or EVOMERGE_DEBUG=1) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge import __version__
from evomerge.noise import quiet_third_party
from evomerge.outdir import OutputWriteError, write_error

if TYPE_CHECKING:
    from evomerge.search.config import RunConfig

log = logging.getLogger("evomerge")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def byte_size(text: str) -> int:
    """``500MB``, ``2GiB``, ``1.5gb`` or a number of bytes, as bytes (argparse type: a bad value is one line)."""
    number = text.strip().lower().rstrip("bikmg")
    unit = text.strip().lower()[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 500MB, 2GiB or a number of bytes")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least one byte")
    return int(value)


def cmd_merge(args: argparse.Namespace) -> None:
    from evomerge.merge import merge_to_dir
    from evomerge.progress import RunProgress
    from evomerge.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    adapter = None
    if args.adapter_out:  # computed (and refused when the merge is not low-rank) before the long merge
        from evomerge.engine.lowrank import merged_adapter

        adapter = merged_adapter(recipe, rank=args.adapter_rank, allow_pickle=args.allow_pickle)
    progress = RunProgress(Path(args.out).name, enabled=not args.quiet)  # on stderr, as a search's display
    try:
        out = merge_to_dir(recipe, args.out, device=args.device, force=args.force, allow_pickle=args.allow_pickle,
                           max_shard_size=args.max_shard_size, progress=progress)
    finally:
        progress.end()
    print(f"merged model written to {out}")
    if adapter is not None:
        from evomerge.adapters import save_adapter

        modules, base = adapter
        print(f"merged adapter written to {save_adapter(modules, args.adapter_out, base=base, force=args.force)}")


def _run_config(args: argparse.Namespace) -> RunConfig:
    from evomerge.search.config import RunConfig

    return RunConfig.from_yaml(args.config, n_trials=args.n_trials, storage=args.storage, out=args.out,
                               device=args.device, seed=args.seed)


# Bad input: a malformed or invalid file (RecipeError, SpaceError, YamlFileError, CheckpointError, pydantic's
# ValidationError are all ValueErrors), a missing input, an output that exists.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


@contextmanager
def _writing(path: Path, after: str = "") -> Iterator[None]:
    """Turn an OSError raised while writing under ``path`` into one OutputWriteError line, ``after`` appended."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, _USER_ERRORS):  # a missing input, not a write fault
            raise
        error = exc if isinstance(exc, OutputWriteError) else write_error(exc, Path(exc.filename or path))
        raise OutputWriteError(error.errno, f"{error}{after}") from exc


@contextmanager
def _run_faults(config: RunConfig) -> Iterator[None]:
    """One line for a write fault of a run: under its run dir (:func:`_writing`) or in its study's storage (a full
    disk under the SQLite file, a server out of space), each saying that the study is intact."""
    from evomerge.search.storage import storage_full

    kept = _study_kept(config)
    try:
        with _writing(config.run_dir, kept):
            yield
    except OutputWriteError:
        raise
    except Exception as exc:
        full = storage_full(exc, config.storage_url)
        if full is None:
            raise
        raise OutputWriteError(full.errno, f"{full}{kept}") from exc


def _study_kept(config: RunConfig) -> str:
    return (f"; the study {config.name!r} is intact (every finished trial is stored): re-run the same command to "
            "resume, finished trials are not run again")


def cmd_search(args: argparse.Namespace) -> None:
    from evomerge.search.study import run_search

    config = _run_config(args)
    with _run_faults(config):
        summary = run_search(config, export=not args.no_export, progress=not args.quiet)
    print(f"best trial {summary['best_trial']}: validation {summary['best_value']:.4f}; report: {summary['report']}")


def cmd_soup(args: argparse.Namespace) -> None:
    from evomerge.search.study import run_soup

    config = _run_config(args)
    with _run_faults(config):
        summary = run_soup(config, export=not args.no_export, progress=not args.quiet)
    print(f"greedy soup kept {summary['kept']}; report: {summary['report']}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from evomerge.search.sweep import load_sweep_config, run_sweep

    config = load_sweep_config(args.config, storage=args.storage, out=args.out, device=args.device, seed=args.seed)
    with _run_faults(config):
        summary = run_sweep(config, progress=not args.quiet)
    print(f"validation picks {summary['best_point']} (validation {summary['best_value']:.4f}); report: "
          f"{summary['report']}")


def cmd_worker(args: argparse.Namespace) -> None:
    from evomerge.search.study import run_worker

    run_worker(args.storage, args.study, n_trials=args.n_trials, device=args.device, progress=not args.quiet)


def cmd_report(args: argparse.Namespace) -> None:
    from evomerge.report import load_study, write_report

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "report"
    study = load_study(run_dir)
    with _writing(out):
        summary = write_report(study, out, title=run_dir.name, run_dir=run_dir)
    print(f"report written to {summary}")


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from evomerge.zoo import ZooConfig, build_zoo

    config = getattr(ZooConfig, "mini" if args.mini else args.preset)()
    zoo = build_zoo(Path(args.dir), config, force=args.force)
    print(f"zoo ready in {zoo.root}")


def cmd_zoo_lora(args: argparse.Namespace) -> None:
    from evomerge.zoo import Zoo
    from evomerge.zoo.lora import LoraZooConfig, build_lora_zoo

    zoo = Zoo.load(args.dir)
    config = LoraZooConfig.mini() if args.mini else LoraZooConfig.full()
    out = build_lora_zoo(zoo, Path(args.out) if args.out else zoo.root / "lora", config, force=args.force)
    print(f"LoRA adapters ready in {out.root}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the libraries' own progress bars and INFO lines")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings, errors and the result line only: no "
                                                                   "progress display")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (also: EVOMERGE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="materialize a recipe (evomerge or mergekit YAML) into an HF dir")
    merge.add_argument("recipe", help="recipe YAML (evomerge format, or a mergekit config with merge_method)")
    merge.add_argument("--out", required=True, help="output HF dir (must not exist unless --force)")
    merge.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    merge.add_argument("--force", action="store_true", help="replace an existing output dir")
    merge.add_argument("--max-shard-size", type=byte_size, default=2 * 1024**3, metavar="SIZE",
                       help="largest safetensors shard, e.g. 500MB, 2GiB or bytes (default 2GiB); the merge holds one "
                            "shard in memory at a time")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="read pytorch_model.bin checkpoints (torch.load with weights_only=True)")
    merge.add_argument("--adapter-out", default=None, metavar="DIR",
                       help="also write the merge as one PEFT LoRA dir (LoRA adapter sources; lorahub, "
                            "task_arithmetic, linear)")
    merge.add_argument("--adapter-rank", type=int, default=None, metavar="K",
                       help="reduce the merged adapter to rank K by SVD")
    merge.set_defaults(func=cmd_merge)

    for name, func, text in [("search", cmd_search, "search for the best merge recipe (Optuna study)"),
                             ("soup", cmd_soup, "uniform and greedy model soups of the config's sources"),
                             ("sweep", cmd_sweep, "every point of a grid of merge methods x hyperparameters")]:
        run = sub.add_parser(name, help=text)
        run.add_argument("config", help="run config YAML (see README: models, space or sweep, evaluator, budget)")
        run.add_argument("--storage", help="Optuna storage URL (default: sqlite file in the run dir)")
        run.add_argument("--out", help="run dir (default: runs/<name>)")
        run.add_argument("--device", help="cpu or cuda")
        run.add_argument("--seed", type=int, help="override the config's seed")
        if name != "sweep":  # a sweep's trials are its grid, and it compares points rather than export one
            run.add_argument("--n-trials", type=int, help="override the config's n_trials")
            run.add_argument("--no-export", action="store_true", help="do not write the best merged model")
        run.set_defaults(func=func)

    worker = sub.add_parser("worker", help="run trials of an existing study (many processes / machines)")
    worker.add_argument("--storage", required=True, help="e.g. postgresql://user:pw@host/db")
    worker.add_argument("--study", required=True, help="study name (the config is read from the study)")
    worker.add_argument("--n-trials", type=int, help="stop when the study holds this many finished searched trials")
    worker.add_argument("--device", help="cpu or cuda")
    worker.set_defaults(func=cmd_worker)

    report = sub.add_parser("report", help="tables and plots of a run dir")
    report.add_argument("run_dir")
    report.add_argument("--out", help="output dir (default: RUN_DIR/report, where the run itself writes it)")
    report.set_defaults(func=cmd_report)

    zoo = sub.add_parser("zoo", help="the offline tiny model zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="build the zoo (base, experts, soup sweep, tasks, score table)")
    build.add_argument("dir", help="output dir")
    build.add_argument("--preset", choices=["full", "bench", "mini"], default="full",
                       help="full: the demo's zoo (default); bench: the method benchmarks' zoo; mini: the tests'")
    build.add_argument("--mini", action="store_true", help="the small zoo used by unit tests, same as --preset mini")
    build.add_argument("--force", action="store_true", help="replace a different zoo in DIR")
    build.set_defaults(func=cmd_zoo_build)
    lora = zoo_sub.add_parser("lora", help="train PEFT LoRA adapters on a built zoo's tasks (one per task and rank)")
    lora.add_argument("dir", help="a built zoo")
    lora.add_argument("--out", default=None, help="output dir (default: DIR/lora; the zoo's own files are not changed)")
    lora.add_argument("--mini", action="store_true", help="the small setting of the tests (for a --mini zoo)")
    lora.add_argument("--force", action="store_true", help="replace a different LoRA stage in the output dir")
    lora.set_defaults(func=cmd_zoo_lora)
    return parser


def _fail(exc: BaseException, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    print(f"evomerge: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    if not args.verbose:
        quiet_third_party()
    debug = args.debug or os.environ.get("EVOMERGE_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except _USER_ERRORS as exc:
        return _fail(exc, str(exc), 2, debug)
    except (OSError, RuntimeError) as exc:  # faults at run time: a full disk, a merge that produced NaN, ...
        return _fail(exc, str(exc), 1, debug)
    except Exception as exc:  # a bug: still no traceback unless asked for
        return _fail(exc, f"internal error {type(exc).__name__}: {exc} (run with --debug for the traceback and "
                          "please report it)", 1, debug)
    except KeyboardInterrupt:  # Ctrl-C: the trial it stopped is FAIL, completed ones are kept
        print("evomerge: interrupted; the study keeps every finished trial: re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
