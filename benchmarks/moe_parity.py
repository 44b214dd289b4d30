"""Parity with mergekit-moe: the same MoE config through ``mergekit-moe`` (its own venv) and ``evomerge merge``.

Each case is a mergekit-moe config over the mini zoo (a Llama base and its 4 experts, prompts drawn from each
expert's task's train split), run by ``mergekit-moe CONFIG OUT --device cpu --random-seed SEED`` and by
``evomerge merge CONFIG``; the outputs are compared tensor by tensor, per group (routers, experts, the shared expert,
the base's attention / norms / embeddings / head). The ``exported`` cases go the other way: an evomerge MoE recipe
exported with ``to_mergekit_moe_yaml`` and run by mergekit-moe, against evomerge's own build of the recipe. The
``qwen`` cases are Qwen2-MoE (``architecture: qwen``, one shared expert: the base, or expert 0 with a
``residual_scale``): mergekit-moe writes each expert's MLP under its own names (``mlp.experts.E.gate_proj.weight``,
...), which transformers fuses when it loads them; they are fused here the same way (``experts.gate_up_proj[E] =
cat(gate_proj, up_proj)``, ``experts.down_proj[E] = down_proj``) before the comparison.

    python benchmarks/moe_parity.py [--quick] [--mergekit-bin /tmp/venv-bench/bin/mergekit-yaml]
    -> results/moe_parity.md / .csv
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from candidate_turnaround import find_mergekit  # noqa: E402
from mergekit_parity import GroupDiff, Result, compare, read_tensors, run_info  # noqa: E402

from evomerge.merge import merge_to_dir  # noqa: E402
from evomerge.recipe import MoeRecipe, load_recipe  # noqa: E402
from evomerge.recipe.moe import to_mergekit_moe_yaml  # noqa: E402
from evomerge.zoo import Zoo, ZooConfig, cached_zoo  # noqa: E402

GROUPS = ("router", "experts", "base")
QWEN_GROUPS = ("router", "experts", "shared", "base")
N_PROMPTS = 8


@dataclass(frozen=True)
class Case:
    name: str
    gate_mode: str = "hidden"
    negative: bool = False  # each expert's negative prompts: the other experts' positive ones
    dtype: str | None = None
    residual_scale: float | None = None  # on expert 0
    seed: int = 0
    exported: bool = False  # evomerge recipe -> to_mergekit_moe_yaml -> mergekit-moe
    shared: str | None = None  # Qwen2-MoE's shared expert: "base" (with prompts) or "expert" (expert 0)
    shared_residual_scale: float | None = None
    quick: bool = False
    tolerance: str = "exact"  # every tensor bit-identical (mergekit_parity.Result judges it)

    @property
    def groups(self) -> tuple[str, ...]:
        return QWEN_GROUPS if self.shared else GROUPS


CASES = [
    Case("hidden", quick=True),
    Case("hidden_negative", negative=True),
    Case("hidden_avg", gate_mode="hidden_avg"),
    Case("cheap_embed", gate_mode="cheap_embed", negative=True, quick=True),
    Case("random", gate_mode="random", seed=3, quick=True),
    Case("uniform_random", gate_mode="uniform_random", seed=1),
    Case("bf16_residual_scale", dtype="bfloat16", residual_scale=0.5),
    Case("exported", negative=True, exported=True, quick=True),
    Case("qwen_hidden", shared="base", quick=True),
    Case("qwen_cheap_embed_negative", gate_mode="cheap_embed", negative=True, shared="base"),
    Case("qwen_random_shared_expert", gate_mode="random", seed=2, shared="expert", shared_residual_scale=0.5,
         quick=True),
    Case("qwen_bf16_exported", dtype="bfloat16", shared="base", exported=True),
]


def prompts(zoo: Zoo, task: str, n: int = N_PROMPTS) -> list[str]:
    """The first ``n`` queries of ``task``'s train split (the zoo's experts' own task)."""
    lines = zoo.split_file(task, "train").read_text().splitlines()[:n]
    return [json.loads(line)["query"] for line in lines]


def mergekit_config(case: Case, zoo: Zoo) -> dict[str, Any]:
    """The case's mergekit-moe config (experts_per_token 2 over the zoo's 4 experts)."""
    tasks = list(zoo.experts)
    experts = []
    for i, task in enumerate(tasks):
        expert: dict[str, Any] = {"source_model": str(zoo.experts[task]), "positive_prompts": prompts(zoo, task)}
        if case.negative:
            expert["negative_prompts"] = [p for other in tasks if other != task for p in prompts(zoo, other, 2)]
        if case.residual_scale is not None and i == 0:
            expert["residual_scale"] = case.residual_scale
        experts.append(expert)
    config = {"base_model": str(zoo.base), "gate_mode": case.gate_mode, "experts_per_token": 2, "experts": experts}
    if case.shared:  # Qwen2-MoE: one shared expert, its gate from prompts of every task (none for random gates)
        shared: dict[str, Any] = {"source_model": str(zoo.base if case.shared == "base" else zoo.experts[tasks[0]])}
        if case.gate_mode != "random":
            shared["positive_prompts"] = [p for task in tasks for p in prompts(zoo, task, 2)]
        if case.shared_residual_scale is not None:
            shared["residual_scale"] = case.shared_residual_scale
        config |= {"architecture": "qwen", "shared_experts": [shared]}
    return config | ({"dtype": case.dtype} if case.dtype else {})


def run_mergekit_moe(binary: Path, config: Path, out: Path, seed: int) -> None:
    """``mergekit-moe CONFIG OUT --device cpu --random-seed SEED``; RuntimeError with its stderr tail on failure."""
    cmd = [str(binary), str(config), str(out), "--device", "cpu", "--random-seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def moe_group(name: str) -> str:
    if ".mlp.gate." in name or ".mlp.shared_expert_gate." in name:
        return "router"
    return "experts" if ".mlp.experts." in name else "shared" if ".mlp.shared_expert." in name else "base"


_PER_EXPERT = re.compile(r"^(?P<layer>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>(gate|up|down)_proj)\.weight$")


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert MLP tensors (``L.mlp.experts.E.gate_proj.weight``, ..., as mergekit-moe writes Qwen2-MoE) fused as
    transformers loads them (``conversion_mapping.py``, qwen2_moe): ``L.mlp.experts.gate_up_proj`` = the experts'
    ``cat(gate_proj, up_proj)`` stacked, ``L.mlp.experts.down_proj`` their ``down_proj`` stacked; other tensors as
    they are."""
    out, parts = {}, {}
    for name, tensor in tensors.items():
        match = _PER_EXPERT.match(name)
        if match is None:
            out[name] = tensor
        else:
            parts.setdefault(match["layer"], {})[(int(match["expert"]), match["part"])] = tensor
    for layer, found in parts.items():
        experts = sorted({e for e, _ in found})
        out[f"{layer}.gate_up_proj"] = torch.stack([torch.cat([found[e, "gate_proj"], found[e, "up_proj"]])
                                                    for e in experts])
        out[f"{layer}.down_proj"] = torch.stack([found[e, "down_proj"] for e in experts])
    return out


def compare_moe(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                groups: tuple[str, ...] = GROUPS) -> dict[str, GroupDiff]:
    """:func:`mergekit_parity.compare` per MoE group (the same names and dtypes required)."""
    out = {}
    theirs = fuse_experts(theirs)
    for group in groups:
        mine = {n: t for n, t in ours.items() if moe_group(n) == group}
        other = {n: t for n, t in theirs.items() if moe_group(n) == group}
        extra = sorted(set(mine) - set(other))
        if extra:
            raise AssertionError(f"evomerge output has tensors mergekit-moe's lacks: {extra[:5]}")
        diffs = list(compare(mine, other).values())
        out[group] = GroupDiff(group, sum(d.tensors for d in diffs), sum(d.entries for d in diffs),
                               max(d.max_abs for d in diffs), sum(d.differing for d in diffs),
                               max(d.max_ulp for d in diffs))
    return out


def run_case(case: Case, zoo: Zoo, binary: Path, root: Path) -> Result:
    """Both tools on the case's config; ``binary``: mergekit-moe."""
    work = root / case.name
    work.mkdir(parents=True)
    config = work / "config.yml"
    data = mergekit_config(case, zoo)
    if case.exported:
        recipe = load_recipe_data(data, work, seed=case.seed)
        config.write_text(to_mergekit_moe_yaml(recipe))
        ours = merge_to_dir(recipe, work / "evomerge", device="cpu")
    else:
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        recipe = load_recipe(config)
        assert isinstance(recipe, MoeRecipe)
        ours = merge_to_dir(recipe.model_copy(update={"seed": case.seed}), work / "evomerge", device="cpu")
    try:
        run_mergekit_moe(binary, config, work / "mergekit", case.seed)
        return Result(case, compare_moe(read_tensors(ours), read_tensors(work / "mergekit"), case.groups))
    except (RuntimeError, AssertionError) as exc:
        return Result(case, error=str(exc).splitlines()[0])


def load_recipe_data(data: dict[str, Any], work: Path, seed: int) -> MoeRecipe:
    """An evomerge MoE recipe (``kind: moe``) with the config's models and prompts, read back from its own YAML."""
    def expert(e: dict[str, Any]) -> dict[str, Any]:
        return {"model": e["source_model"], "positive_prompts": e.get("positive_prompts", []),
                "negative_prompts": e.get("negative_prompts", []), "residual_scale": e.get("residual_scale", 1.0)}

    recipe = MoeRecipe(base=data["base_model"], gate_mode=data["gate_mode"],
                       experts_per_token=data["experts_per_token"], dtype=data.get("dtype"),
                       experts=[expert(e) for e in data["experts"]],
                       shared_experts=[expert(e) for e in data.get("shared_experts", [])], seed=seed)
    (work / "recipe.yml").write_text(recipe.to_yaml())
    loaded = load_recipe(work / "recipe.yml")
    assert loaded == recipe
    return recipe


COLUMNS = ["case", "gate_mode", "dtype", "group", "tensors", "max_abs_diff", "entries_differing", "max_ulp", "status"]


def _rows(r: Result) -> list[list[str]]:
    head = [r.case.name, r.case.gate_mode, r.case.dtype or "float32"]
    if r.error:
        return [head + ["-", "-", "-", "-", "-", f"ERROR: {r.error}"]]
    return [head + [d.group, str(d.tensors), f"{d.max_abs:.3g}", str(d.differing), str(d.max_ulp),
                    "ok" if d.max_ulp == 0 else "DIFFERS"] for d in (r.diffs[g] for g in r.case.groups)]


def write_results(out: Path, results: list[Result], info: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [cells for r in results for cells in _rows(r)]
    with open(out / "moe_parity.csv", "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    lines = [
        "# Parity with mergekit-moe: the same MoE config through both tools", "",
        "Each case is a mergekit-moe config over the mini zoo (Llama base, 4 experts, 8 positive prompts each from "
        "its task's train split, experts_per_token 2), run by `mergekit-moe CONFIG OUT --device cpu --random-seed "
        "SEED` and by `evomerge merge CONFIG`; `exported` is an evomerge recipe exported with "
        "`to_mergekit_moe_yaml`; `qwen_*` are Qwen2-MoE (`architecture: qwen`, one shared expert: the base with 2 "
        "prompts of every task, or expert 0 with residual_scale 0.5), mergekit-moe's per-expert tensors fused as "
        "transformers loads them. Groups: `router` (`mlp.gate.weight`, Qwen2-MoE's `mlp.shared_expert_gate.weight`), "
        "`experts` (`mlp.experts.gate_up_proj`, `down_proj`), `shared` (`mlp.shared_expert.*`), `base` (attention "
        "with Qwen2-MoE's zero q/k/v biases, norms, embeddings, head). `max_ulp` 0 = bit-identical. The `hidden` "
        "gates come from a bfloat16 forward pass of the base, which evomerge runs as mergekit-moe does (same "
        "tokenization, padding, positions, dtype), so they are bit-identical on one machine and library version; "
        "another CPU, torch build or attention kernel may change their last bfloat16 bits (not measured here).",
        "",
        f"- command: `python {' '.join(info['argv'])}` (evomerge at {info['revision']})",
        f"- machine: {info['machine']}",
        f"- mergekit side: {info['mergekit']}",
        f"- date: {info['date']}; {info['seconds']} s",
        f"- result: {sum(r.ok for r in results)} of {len(results)} cases bit-identical in every group",
        "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
        *["| " + " | ".join(cells) + " |" for cells in rows], "",
    ]
    (out / "moe_parity.md").write_text("\n".join(lines))


def moe_binary(mergekit_bin: str | None) -> Path:
    """mergekit-moe beside the mergekit-yaml :func:`find_mergekit` finds."""
    binary = find_mergekit(mergekit_bin).parent / "mergekit-moe"
    if not binary.is_file():
        raise SystemExit(f"{binary} not found: install mergekit (it ships mergekit-moe) in that venv")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the cases marked quick")
    parser.add_argument("--mergekit-bin", help="mergekit-yaml of the venv whose mergekit-moe runs; default: PATH, "
                                               "then /tmp/venv-bench/bin")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    binary = moe_binary(args.mergekit_bin)
    zoo = cached_zoo(ZooConfig.mini())
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="evomerge-moe-parity-"))
    try:
        results = []
        for case in (c for c in CASES if c.quick or not args.quick):
            results.append(run_case(case, zoo, binary, root))
            for cells in _rows(results[-1]):
                print(" | ".join(cells), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_results(Path(args.out), results, run_info(binary, start))
    if not all(r.ok for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
