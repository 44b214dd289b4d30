"""Per-candidate cost of evaluating with lm-eval vs the bare forward passes over the same docs.

For each Llama shape (random weights: the timing depends on shapes and token counts, not on the values) it
times, per candidate, after one warm-up call:

* ``LmEvalEvaluator.score`` (this package: requests prepared once, memoized tokenization, batched scoring);
* stock ``lm_eval.simple_evaluate`` with one reused stock ``HFLM`` around the same model and one reused
  ``TaskManager`` (no cache, ``bootstrap_iters=0``, ``log_samples=False``) — the straightforward use of lm-eval;
* the bare forward passes: the same deduplicated ``context + continuation[:-1]`` token sequences that the
  harness runs, tokenized the same way, sorted longest first, in batches of the same size, right-padded,
  ``model(input_ids=batch)`` under ``torch.inference_mode`` — the floor.

overhead = (harness seconds - bare seconds) / bare seconds. A cProfile of one call of each harness splits its
time into model forward, template rendering (Jinja), tokenization and the rest.

Generation rows (the zoo's ``zoo_<task>_gen`` tasks: greedy ``generate_until``, ``strict-match`` filter, exact
match): the same three, where the floor is a bare batched greedy decode with the KV cache -- the same prompts,
tokenized by lm-eval (left-padded, longest first, batches of the same size),
``model.generate(max_new_tokens=max_gen_toks, do_sample=False, use_cache=True)`` with no stop strings (random weights
rarely produce a stop string, so both run to ``max_gen_toks``).

Tasks: the tiny zoo's (``evomerge.zoo.cached_zoo``) when it is available, else generated multiple-choice
tasks of the same shape (short queries, 4 choices).

    python benchmarks/eval_overhead.py                          # CPU, shapes 128x4 and 512x8
    python benchmarks/eval_overhead.py --device cuda --shapes 128x4,1024x16,2048x22
    python benchmarks/eval_overhead.py --quick                  # a smoke run: one small shape, few docs, 1 repeat

Writes results/eval_overhead[_<device>].md (machine, command, table, profile).
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.evaluate import LmEvalEvaluator, write_multiple_choice_task
from evomerge.zoo.taskfiles import MAX_GEN_TOKS

LETTERS = "abcdefghij"
PROFILE_PARTS = {  # label -> function names whose cumulative time is that part
    "model forward": ("_model_call",),
    "templates (Jinja)": ("apply_template",),
    "tokenization": ("tok_encode",),
}


def generated_tasks(root: Path, n_docs: int) -> tuple[list[str], Path, PreTrainedTokenizerFast]:
    """Zoo-shaped tasks (``REV:abc=`` -> ``cba`` style, 4 choices) and a byte-level BPE trained on their text."""
    rng = random.Random(0)
    names = []
    texts = []
    for op, fn in (("REV", lambda s: s[::-1]), ("SORT", lambda s: "".join(sorted(s))), ("UP", str.upper)):
        items = []
        for _ in range(n_docs):
            s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
            answer = fn(s)
            choices = [answer] + ["".join(rng.sample(answer, len(answer))) for _ in range(3)]
            rng.shuffle(choices)
            items.append({"query": f"{op}:{s}=", "choices": choices, "gold": choices.index(answer)})
            texts.append(f"{op}:{s}= {answer}")
        name = f"gen_{op.lower()}"
        write_multiple_choice_task(root, name, {"validation": items, "test": items})
        names.append(name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return names, root, tokenizer


def zoo_tasks(generation: bool = False) -> tuple[list[str], Path, Any]:
    """The mini zoo's task names (multiple choice, or their generation variants), task dir and tokenizer."""
    from evomerge.zoo import ZooConfig, cached_zoo
    from evomerge.zoo.taskfiles import generation_name, lm_eval_name

    zoo = cached_zoo(ZooConfig.mini())
    names = [(generation_name if generation else lm_eval_name)(t) for t in zoo.task_names]
    return names, Path(zoo.task_dir), AutoTokenizer.from_pretrained(zoo.base)


def llama(hidden: int, layers: int, vocab: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def bare_batches(args: list[tuple[str, ...]], lm: HFLM, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The harness's forward inputs: lm-eval's tokenization, one sequence per ``context + cont[:-1]``, longest first."""
    unique: dict[tuple[int, ...], list[int]] = {}
    for context, continuation in args:
        ctx, cont = lm._encode_pair(context, continuation)
        unique.setdefault(tuple(ctx + cont[:-1]), (ctx + cont)[-(lm.max_length + 1):][:-1])
    seqs = sorted(unique.values(), key=len, reverse=True)
    batches = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = len(chunk[0])
        batches.append(torch.tensor([s + [0] * (width - len(s)) for s in chunk], device=device))
    return batches


def timed(fns: dict[str, Callable[[], Any]], repeats: dict[str, int], device: torch.device) -> dict[str, float]:
    """Median wall seconds per call of each function, after one warm-up call each.

    The calls are interleaved round by round (bare, ours, stock, bare, ...) so that a drift of the machine
    (clocks ramping up, other load) affects them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for round_ in range(max(repeats.values())):
        for name, fn in fns.items():
            if round_ >= repeats[name]:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def profile(fn: Callable[[], Any]) -> dict[str, float]:
    """Seconds of one ``fn`` call in each :data:`PROFILE_PARTS` part, plus ``total`` and ``other``."""
    prof = cProfile.Profile()
    prof.enable()
    start = time.perf_counter()
    fn()
    total = time.perf_counter() - start
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts = {label: sum(v[3] for (_, _, name), v in stats.items() if name in names)
             for label, names in PROFILE_PARTS.items()}
    return {**parts, "other": total - sum(parts.values()), "total": total}


@dataclass
class Harnesses:
    """A random-weight Llama with our evaluator and stock lm-eval around it, each as a per-candidate call."""

    model: LlamaForCausalLM
    evaluator: LmEvalEvaluator
    stock_lm: HFLM
    ours: Callable[[], Any]
    stock: Callable[[], Any]

    def seconds(self, bare: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> dict[str, float]:
        """Median seconds of bare, ours and stock (stock repeated half as often: it is the slow one)."""
        return timed({"bare": bare, "ours": self.ours, "stock": self.stock},
                     {"bare": args.repeats, "ours": args.repeats, "stock": max(1, args.repeats // 2)}, device)


def harnesses(hidden: int, layers: int, tasks: list[str], task_dir: Path, tokenizer: Any, args: argparse.Namespace,
              device: torch.device) -> Harnesses:
    model = llama(hidden, layers, len(tokenizer), device, getattr(torch, args.dtype))
    evaluator = LmEvalEvaluator(tasks, include_path=task_dir, split="validation", limit=args.limit,
                                batch_size=args.batch_size, include_defaults=False)
    stock_lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)

    def ours() -> None:
        evaluator.score(model, tokenizer)

    def stock() -> None:
        simple_evaluate(stock_lm, tasks=tasks, task_manager=manager, limit=args.limit, bootstrap_iters=0,
                        log_samples=False, cache_requests=False)

    return Harnesses(model, evaluator, stock_lm, ours, stock)


def run_shape(hidden: int, layers: int, tasks: list[str], task_dir: Path, tokenizer: Any, args: argparse.Namespace,
              device: torch.device) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    h = harnesses(hidden, layers, tasks, task_dir, tokenizer, args, device)
    model, evaluator = h.model, h.evaluator
    batches = bare_batches(evaluator.request_args(), h.stock_lm, args.batch_size, device)

    def bare() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch)

    seconds = h.seconds(bare, args, device)
    n_docs = sum(len(ids) for ids in evaluator.doc_ids().values())
    row = {
        "shape": f"{hidden}x{layers}", "params": sum(p.numel() for p in model.parameters()), "docs": n_docs,
        "requests": len(evaluator.request_args()), "forward batches": len(batches),
        "tokens": sum(b.numel() for b in batches), "bare s": seconds["bare"], "ours s": seconds["ours"],
        "stock s": seconds["stock"],
    }
    return row, {"LmEvalEvaluator.score": profile(h.ours), "stock simple_evaluate": profile(h.stock)}


def bare_generation_batches(args: list[tuple[str, ...]], lm: HFLM, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """The generation prompts as lm-eval's ``generate_until`` encodes them: longest first, left-padded batches."""
    contexts = sorted({a[0] for a in args}, key=lambda c: -len(lm.tok_encode(c)))
    return [lm.tok_batch_encode(contexts[i : i + batch_size], left_truncate_len=lm.max_length - MAX_GEN_TOKS)
            for i in range(0, len(contexts), batch_size)]


def run_generation(hidden: int, layers: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Per-candidate seconds of the zoo's generation tasks: ours, stock ``simple_evaluate``, bare greedy decode."""
    tasks, task_dir, tokenizer = zoo_tasks(generation=True)
    h = harnesses(hidden, layers, tasks, task_dir, tokenizer, args, device)
    model, evaluator = h.model, h.evaluator
    batches = bare_generation_batches(evaluator.request_args(), h.stock_lm, args.batch_size)

    def bare() -> None:
        with torch.inference_mode():
            for input_ids, mask in batches:
                model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                               max_new_tokens=MAX_GEN_TOKS, do_sample=False, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id)

    seconds = h.seconds(bare, args, device)
    return {"shape": f"{hidden}x{layers}", "params": sum(p.numel() for p in model.parameters()),
            "docs": sum(len(ids) for ids in evaluator.doc_ids().values()), "requests": len(evaluator.request_args()),
            "forward batches": len(batches), "bare s": seconds["bare"], "ours s": seconds["ours"],
            "stock s": seconds["stock"]}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def markdown(rows: list[dict[str, Any]], profiles: dict[str, dict[str, dict[str, float]]], source: str,
             device: torch.device, args: argparse.Namespace, generation: list[dict[str, Any]]) -> str:
    pct = lambda s, bare: f"{100 * (s - bare) / bare:+.0f}%"  # noqa: E731
    lines = [
        "# Evaluation overhead per candidate", "",
        f"Machine: {machine(device)}. Weights {args.dtype}. Tasks: {source}; split validation, "
        f"limit {args.limit} docs/task, "
        f"batch size {args.batch_size}; median of {args.repeats} calls (stock: {max(1, args.repeats // 2)}) "
        "after one warm-up, the three interleaved call by call.", "",
        f"Command: `{' '.join(['python', *sys.argv])}`", "",
        "overhead = (harness s - bare forward s) / bare forward s. Bare forward: the same deduplicated token "
        "sequences in the same batches, `model(input_ids=batch)` only.", "",
        "| shape (hidden x layers) | params | docs | requests | forward batches | tokens | bare forward s "
        "| LmEvalEvaluator s | overhead | stock simple_evaluate s | stock overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {r['docs']} | {r['requests']} | {r['forward batches']} "
            f"| {r['tokens']} | {r['bare s']:.3f} | {r['ours s']:.3f} | {pct(r['ours s'], r['bare s'])} "
            f"| {r['stock s']:.3f} | {pct(r['stock s'], r['bare s'])} |"
        )
    if generation:
        lines += ["", f"## Generation: the zoo's `zoo_<task>_gen` tasks (greedy, max_gen_toks {MAX_GEN_TOKS})", "",
                  "Bare: batched greedy `model.generate` with the KV cache over the same prompts and batches.", "",
                  "| shape (hidden x layers) | params | docs | requests | generate batches | bare greedy decode s "
                  "| LmEvalEvaluator s | overhead | stock simple_evaluate s | stock overhead |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in generation:
            lines.append(
                f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {r['docs']} | {r['requests']} | {r['forward batches']} "
                f"| {r['bare s']:.3f} | {r['ours s']:.3f} | {pct(r['ours s'], r['bare s'])} "
                f"| {r['stock s']:.3f} | {pct(r['stock s'], r['bare s'])} |"
            )
    lines += ["", "## Where the time goes (cProfile of one call; profiling slows Python code down)", "",
              "| shape | harness | total s | model forward s | templates (Jinja) s | tokenization s | other s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for shape, per_harness in profiles.items():
        for name, p in per_harness.items():
            lines.append(f"| {shape} | {name} | {p['total']:.3f} | {p['model forward']:.3f} "
                         f"| {p['templates (Jinja)']:.3f} | {p['tokenization']:.3f} | {p['other']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="128x4,512x8", help="comma-separated HIDDENxLAYERS Llama shapes")
    parser.add_argument("--limit", type=int, default=200, help="docs per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tasks", choices=("auto", "zoo", "generated"), default="auto")
    parser.add_argument("--generation", choices=("on", "off"), default="on",
                        help="also time the zoo's generation tasks (first shape only)")
    parser.add_argument("--quick", action="store_true", help="smoke run: shape 64x2, 8 docs/task, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.limit, args.repeats = "64x2", 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        found = None if args.tasks == "generated" else zoo_tasks()
        tasks, task_dir, tokenizer = found or generated_tasks(Path(tmp), args.limit)
        source = f"tiny zoo {tasks}" if found else f"generated {tasks}"
        rows, profiles = [], {}
        for shape in args.shapes.split(","):
            hidden, layers = (int(x) for x in shape.split("x"))
            row, prof = run_shape(hidden, layers, tasks, task_dir, tokenizer, args, device)
            rows.append(row)
            profiles[row["shape"]] = prof
            print(row, flush=True)
    generation = []
    if args.generation == "on":
        hidden, layers = (int(x) for x in args.shapes.split(",")[0].split("x"))
        generation.append(run_generation(hidden, layers, args, device))
        print(generation[-1], flush=True)
    text = markdown(rows, profiles, source, device, args, generation)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "eval_overhead.md" if device.type == "cpu" else f"eval_overhead_{device.type}_{args.dtype}.md"
    path = args.out / (f"quick_{name}" if args.quick else name)
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
