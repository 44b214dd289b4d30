"""Synthetic multiple-choice text tasks of the tiny zoo, as seeded generators.

Every item is ``{"query": str, "choices": [str, str, str, str], "gold": int, "confuser": str}``:
the model continues ``query`` with ``" " + choice``; the right answer sits at ``choices[gold]``.
Each task has a *confuser*, a systematic mistake (the unreversed string, the descending order, a
carry decided wrongly, ...). The base model's pretraining text shows the confuser instead of the
answer at a configured rate, so the base learns each skill but does not prefer the right answer;
an expert fine-tuned on clean answers flips that preference for its task with a small, local
weight change, which keeps task vectors roughly additive. The confuser is always one of the
distractors; the others are near misses (off-by-one numbers, one adjacent swap, one wrong letter).

Queries have no spaces, so the only space is the answer delimiter; the task keyword is upper
case and the data lower case (see :mod:`evomerge.zoo.tokenizer`).

========  ===================  =========  =========================================
name      query                answer     confuser
========  ===================  =========  =========================================
add       ``17+25=``           ``42``     carry out of the units wrong: ``32``
reverse   ``REV:abcd=``        ``dcba``   the input copied: ``abcd``
sort      ``SORT:dbca=``       ``abcd``   descending: ``dcba``
count     ``COUNT:a:abacad=``  ``3``      one too many: ``4``
length    ``LEN:abcde=``       ``5``      one too many: ``6``
shift     ``SHIFT:abc=``       ``bcd``    shifted by two: ``cde``
rotate    ``ROT:abcd=``        ``bcda``   rotated right: ``dabc``
rotr      ``ROTR:abcd=``       ``dabc``   rotated left: ``bcda`` (rotate's answer)
back      ``BACK:bcd=``        ``abc``    shifted forward: ``cde`` (shift's answer)
swap      ``SWAP:abcde=``      ``badce``  the input copied: ``abcde``
brackets  ``CLOSE:([{=``       ``}])``    closers in opening order: ``)]}``
========  ===================  =========  =========================================
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

N_CHOICES = 4
LETTERS = "abcdefghij"
OPENERS = "([{<"
CLOSER_OF = {"(": ")", "[": "]", "{": "}", "<": ">"}

Item = dict[str, object]


@dataclass(frozen=True)
class Problem:
    """One task instance before the choices are shuffled.

    ``confuser`` is the task's systematic mistake (see the module docstring); it is always the
    first distractor and ``near_misses`` fill the rest.
    """

    query: str
    answer: str
    confuser: str
    near_misses: tuple[str, ...]


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    """A random string of ``lo..hi`` letters from :data:`LETTERS`."""
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _swap_adjacent(s: str, i: int) -> str:
    """``s`` with the characters at ``i`` and ``i + 1`` exchanged."""
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :]


def _string_near_misses(answer: str, alphabet: str, rng: random.Random) -> list[str]:
    """Generic near misses of a string answer: adjacent swaps and single-character substitutions."""
    out = [_swap_adjacent(answer, i) for i in range(len(answer) - 1)]
    for i, c in enumerate(answer):
        other = rng.choice([a for a in alphabet if a != c])
        out.append(answer[:i] + other + answer[i + 1 :])
    rng.shuffle(out)
    return out


def _number_near_misses(answer: int, offsets: tuple[int, ...]) -> list[str]:
    """Distractors ``answer + d`` for ``d`` in ``offsets``, skipping negative numbers."""
    return [str(answer + d) for d in offsets if answer + d >= 0]


def gen_add(rng: random.Random, max_operand: int) -> Problem:
    """``a+b=`` with ``0 <= a, b <= max_operand``; answer ``a + b``.

    Confuser: the carry out of the units digit decided wrongly (``a + b - 10`` when there is a
    carry, ``a + b + 10`` when there is none).
    """
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    total = a + b
    confuser = total - 10 if a % 10 + b % 10 >= 10 else total + 10
    return Problem(f"{a}+{b}=", str(total), str(confuser), tuple(_number_near_misses(total, (1, -1, 2, -2, 11, -11))))


def gen_reverse(rng: random.Random, max_len: int) -> Problem:
    """``REV:s=`` for a letter string ``s``; answer ``s`` reversed. Confuser: ``s`` copied unreversed."""
    s = _letters(rng, 3, max_len)
    answer = s[::-1]
    return Problem(f"REV:{s}=", answer, s, tuple(_string_near_misses(answer, LETTERS, rng)))


def gen_sort(rng: random.Random, max_len: int) -> Problem:
    """``SORT:s=``; answer the letters of ``s`` in alphabetical order. Confuser: descending order."""
    s = _letters(rng, 3, max_len)
    answer = "".join(sorted(s))
    return Problem(f"SORT:{s}=", answer, answer[::-1], tuple(_string_near_misses(answer, LETTERS, rng)))


def gen_count(rng: random.Random, max_len: int) -> Problem:
    """``COUNT:c:s=``; answer how often letter ``c`` occurs in ``s`` (``c`` drawn from ``s`` half the time).

    Confuser: one too many (as if the ``c`` of the query were counted too).
    """
    s = _letters(rng, 3, max_len)
    c = rng.choice(s) if rng.random() < 0.5 else rng.choice(LETTERS)
    n = s.count(c)
    return Problem(f"COUNT:{c}:{s}=", str(n), str(n + 1), tuple(_number_near_misses(n, (-1, 2, -2, 3))))


def gen_rotate(rng: random.Random, max_len: int) -> Problem:
    """``ROT:s=``; answer ``s`` rotated left by one (first letter moved to the end). Confuser: rotated right."""
    s = _letters(rng, 3, max_len)
    answer = s[1:] + s[0]
    return Problem(f"ROT:{s}=", answer, s[-1] + s[:-1], (s, *_string_near_misses(answer, LETTERS, rng)))


def gen_length(rng: random.Random, max_len: int) -> Problem:
    """``LEN:s=``; answer the number of letters in ``s`` (``3..max_len``, at most 9). Confuser: one too many."""
    s = _letters(rng, 3, max_len)
    n = len(s)
    return Problem(f"LEN:{s}=", str(n), str(n + 1), tuple(_number_near_misses(n, (-1, 2, -2, 3))))


def _shift(s: str, k: int) -> str:
    """Caesar shift of lowercase letters by ``k`` (wrapping within a-z)."""
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in s)


def gen_shift(rng: random.Random, max_len: int) -> Problem:
    """``SHIFT:s=``; answer every letter moved one forward (a->b). Confuser: moved two forward."""
    s = _letters(rng, 3, max_len)
    answer = _shift(s, 1)
    alphabet = _shift(LETTERS, 1)
    return Problem(f"SHIFT:{s}=", answer, _shift(s, 2), (s, *_string_near_misses(answer, alphabet, rng)))


def gen_rotr(rng: random.Random, max_len: int) -> Problem:
    """``ROTR:s=``; answer ``s`` rotated right by one (last letter moved to the front). Confuser: rotated left,
    the answer of ``rotate``: the two tasks share their input format and swap answer and confuser, so their
    task vectors pull the same weights in opposite directions."""
    s = _letters(rng, 3, max_len)
    answer = s[-1] + s[:-1]
    return Problem(f"ROTR:{s}=", answer, s[1:] + s[0], (s, *_string_near_misses(answer, LETTERS, rng)))


def gen_back(rng: random.Random, max_len: int) -> Problem:
    """``BACK:s=``; answer every letter moved one back (b->a, a->z). Confuser: moved one forward, the answer of
    ``shift`` (the same conflict as ``rotr`` with ``rotate``)."""
    s = _letters(rng, 3, max_len)
    answer = _shift(s, -1)
    return Problem(f"BACK:{s}=", answer, _shift(s, 1), (s, *_string_near_misses(answer, _shift(LETTERS, -1), rng)))


def _swap_pairs(s: str) -> str:
    """``s`` with the letters of every pair ``(0, 1), (2, 3), ...`` exchanged; an odd last letter stays."""
    return "".join(s[i + 1] + s[i] for i in range(0, len(s) - 1, 2)) + (s[-1] if len(s) % 2 else "")


def gen_swap(rng: random.Random, max_len: int) -> Problem:
    """``SWAP:s=``; answer ``s`` with neighbouring letters exchanged pairwise (``abcde`` -> ``badce``).
    Confuser: ``s`` copied (as for ``reverse``, which moves the same letters differently)."""
    s = _letters(rng, 3, max_len)
    answer = _swap_pairs(s)
    return Problem(f"SWAP:{s}=", answer, s, (s[::-1], *_string_near_misses(answer, LETTERS, rng)))


def gen_brackets(rng: random.Random, max_len: int) -> Problem:
    """``CLOSE:p=`` for ``3..max_len`` random opening brackets ``p``; answer the closers that balance
    ``p``, innermost first (``CLOSE:([{= }])``). Confuser: the closers in opening order (``)]}``)."""
    prefix = "".join(rng.choice(OPENERS) for _ in range(rng.randint(3, max_len)))
    answer = "".join(CLOSER_OF[o] for o in reversed(prefix))
    closers = "".join(CLOSER_OF.values())
    extended = [answer + c for c in closers]
    rng.shuffle(extended)
    misses = (*_string_near_misses(answer, closers, rng), answer[:-1], *extended)
    return Problem(f"CLOSE:{prefix}=", answer, answer[::-1], misses)


Generator = Callable[[random.Random, int], Problem]

#: task name -> (generator, default size knob: largest operand or longest string)
TASKS: dict[str, tuple[Generator, int]] = {
    "add": (gen_add, 99),
    "reverse": (gen_reverse, 6),
    "sort": (gen_sort, 6),
    "count": (gen_count, 8),
    "length": (gen_length, 9),
    "shift": (gen_shift, 6),
    "rotate": (gen_rotate, 6),
    "rotr": (gen_rotr, 6),
    "back": (gen_back, 6),
    "swap": (gen_swap, 6),
    "brackets": (gen_brackets, 7),
}


#: tasks whose rule commutes with a consistent relabelling of these characters (any permutation of them),
#: so a relabelled item is another valid item: the label-preserving augmentation of fine-tunes
SYMMETRIES: dict[str, str] = {
    "reverse": LETTERS,
    "rotate": LETTERS,
    "rotr": LETTERS,
    "swap": LETTERS,
    "brackets": OPENERS,
}


def relabel(task: str, text: str, rng: random.Random) -> str:
    """``text`` (a query or an answer of ``task``) under a random permutation of the task's symmetry alphabet
    (:data:`SYMMETRIES`); for brackets each closer follows its opener. Task keywords are upper case and untouched.

    The permutation is drawn from ``rng``: call it with equal ``rng`` states for a query and its answer.
    """
    alphabet = SYMMETRIES[task]
    image = list(alphabet)
    rng.shuffle(image)
    mapping = dict(zip(alphabet, image, strict=True))
    if task == "brackets":
        mapping |= {CLOSER_OF[a]: CLOSER_OF[b] for a, b in zip(alphabet, image, strict=True)}
    return text.translate(str.maketrans(mapping))


def to_item(problem: Problem, rng: random.Random) -> Item:
    """Multiple-choice item: the answer, the confuser and the first distinct near misses, shuffled.

    Raises ValueError when a problem has fewer than three distinct near misses (a generator bug).
    """
    distractors: list[str] = []
    for cand in (problem.confuser, *problem.near_misses):
        if cand != problem.answer and cand and cand not in distractors:
            distractors.append(cand)
        if len(distractors) == N_CHOICES - 1:
            break
    else:
        raise ValueError(f"task item {problem.query!r} has fewer than {N_CHOICES - 1} distinct distractors")
    choices = [problem.answer, *distractors]
    rng.shuffle(choices)
    return {
        "query": problem.query,
        "choices": choices,
        "gold": choices.index(problem.answer),
        "confuser": problem.confuser,
    }


def generate_items(task: str, n: int, seed: int, size: int | None = None) -> list[Item]:
    """``n`` items of ``task`` with pairwise distinct queries, deterministic in ``seed``.

    ``size`` overrides the task's size knob (see :data:`TASKS`). Raises ValueError when the task's
    query space is too small for ``n`` distinct items.
    """
    if task not in TASKS:
        raise ValueError(f"unknown zoo task {task!r}; known tasks: {sorted(TASKS)}")
    gen, default_size = TASKS[task]
    rng = random.Random(f"{task}:{seed}")
    items: list[Item] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(f"task {task!r} (size {size}) cannot produce {n} distinct queries; lower the item counts")
        problem = gen(rng, default_size if size is None else size)
        if problem.query in seen:
            continue
        seen.add(problem.query)
        items.append(to_item(problem, rng))
    return items


def answer_pairs(items: list[Item], confuser_rate: float = 0.0, seed: int = 0) -> list[tuple[str, str]]:
    """``(query, answer)`` training pairs; each answer replaced by the item's confuser with probability
    ``confuser_rate`` (seeded), which is how the base model's pretraining text is made noisy."""
    rng = random.Random(seed)
    pairs = []
    for item in items:
        answer = item["confuser"] if rng.random() < confuser_rate else item["choices"][item["gold"]]  # type: ignore[index]
        pairs.append((str(item["query"]), str(answer)))
    return pairs


def augment_pairs(
    task: str, pairs: list[tuple[str, str]], rate: float, seed: int, held_out: set[str]
) -> list[tuple[str, str]]:
    """``pairs`` with each pair replaced, with probability ``rate`` (seeded), by its image under a random
    relabelling (:func:`relabel`, the same permutation for query and answer); an image whose query is in
    ``held_out`` (the validation and test queries) is not used, the pair stays as it was."""
    rng = random.Random(f"augment:{seed}")
    out = []
    for query, answer in pairs:
        if rng.random() < rate:
            draw = rng.random()
            image = (relabel(task, query, random.Random(draw)), relabel(task, answer, random.Random(draw)))
            if image[0] not in held_out:
                query, answer = image
        out.append((query, answer))
    return out


def split_items(items: list[Item], sizes: dict[str, int]) -> dict[str, list[Item]]:
    """Cut ``items`` into consecutive, hence disjoint, splits of the given sizes (in dict order)."""
    if sum(sizes.values()) > len(items):
        raise ValueError(f"split sizes {sizes} need {sum(sizes.values())} items, got {len(items)}")
    out: dict[str, list[Item]] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = items[start : start + size]
        start += size
    return out
