"""One progress display for a whole run: the phase it is in, each phase with its own count and ETA where it has one.

A search goes through ``load models -> baselines -> search trials -> confirm -> test scoring -> export -> report``
(a soup has ``soup steps``, a sweep ``sweep trials``; phases a run does not have are not shown); ``evomerge merge``
through ``read sources -> merge tensors -> write shards -> model card`` (:func:`evomerge.merge.merge_to_dir`). The
display is one live tqdm line on stderr, ``<run>: <phase>``, with tqdm's count, rate and ETA for a phase with a
known size and the elapsed time for the others (loading, export, report); a finished phase stays as one line above
it, so what a run did reads top to bottom. Log lines written while a phase is live go through ``tqdm.write`` and do
not cut the bar. Disabled (``--quiet``; ``progress=False`` in the Python API) it prints nothing.

tqdm redraws only when a count moves, so a long item (one test-split score, an export) would leave the elapsed time
and ETA frozen: a ticker thread redraws the live line when it has not been drawn for :data:`TTY_TICK_S` seconds on a
terminal, :data:`LOG_TICK_S` when stderr is a file or pipe (each redraw appends a line there: a log gets one a
minute, not one a second).

The libraries' own bars stay off through :mod:`evomerge.noise` (``TQDM_DISABLE``); this display passes ``disable``
itself, which that switch does not override.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

#: The phases' names, in the order a run (then ``evomerge merge``) goes through them.
PHASES = ("load models", "baselines", "search trials", "soup steps", "sweep trials", "confirm", "test scoring",
          "export", "report", "read sources", "merge tensors", "write shards", "model card")
#: Seconds without a redraw after which the ticker redraws the live line: on a terminal, in a log (file or pipe).
TTY_TICK_S = 1.0
LOG_TICK_S = 60.0
_POLL_S = 0.25  # how often the ticker thread looks

_COUNTED = "{desc} {percentage:3.0f}%|{bar}{r_bar}"  # tqdm's default, without the colon after the description
_TIMED = "{desc} [{elapsed}{postfix}]"


class RunProgress:
    """The display of one run: at most one live phase at a time. ``clock`` (seconds) times the phases and the
    ticker (a test's fake clock); ``tick_s``: seconds between redraws of a live line that does not move (default:
    :data:`TTY_TICK_S` on a terminal, else :data:`LOG_TICK_S`)."""

    def __init__(self, name: str, *, enabled: bool = True, clock: Callable[[], float] = time.time,
                 tick_s: float | None = None) -> None:
        self.name = name
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.label: str | None = None  # the live phase's
        self.clock = clock
        self.tick_s = tick_s
        self._logging = contextlib.ExitStack()
        self._lock = threading.Lock()  # the ticker thread and the run's own calls draw the same bar
        self._stop: threading.Event | None = None
        self._ticker: threading.Thread | None = None

    def start(self, label: str, total: int | None = None, *, done: int = 0, unit: str = "trial") -> tqdm:
        """End the live phase, if any, and start ``label``: a count to ``total`` (``done`` of them already, e.g. a
        resumed study's: they do not count in the rate), or without ``total`` a phase that shows its elapsed time."""
        if label not in PHASES:
            raise ValueError(f"unknown phase {label!r}; one of {', '.join(PHASES)}")
        self.end()
        if self.enabled:  # Optuna's logger does not propagate: its "Trial N failed" lines are redirected by name
            self._logging.enter_context(logging_redirect_tqdm([logging.root, logging.getLogger("optuna")],
                                                              tqdm_class=tqdm))
        bar = tqdm(total=total, initial=done, desc=f"{self.name}: {label}", unit=unit, leave=True,
                   disable=not self.enabled, bar_format=_COUNTED if total is not None else _TIMED)
        if self.enabled:
            bar._time = self.clock  # tqdm reads its clock through this attribute (tqdm.std); the ticker's is ours
            bar.start_t = bar.last_print_t = self.clock()
            if self.tick_s is None:
                self.tick_s = TTY_TICK_S if _is_tty(bar.fp) else LOG_TICK_S
        with self._lock:
            self.bar, self.label = bar, label
        if self.enabled and self._ticker is None:
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick_until_stopped, name="evomerge-progress", daemon=True)
            self._ticker.start()
        return bar

    def advance(self) -> None:
        """One more item done in the live phase (nothing when there is none)."""
        with self._lock:
            if self.bar is not None:
                self.bar.update(1)

    def tick(self) -> bool:
        """Redraw the live line (its elapsed time and ETA) when it has not been drawn for ``tick_s`` seconds; what
        the ticker thread calls. Whether it redrew."""
        with self._lock:
            bar = self.bar
            if bar is None or bar.disable or self.tick_s is None or self.clock() - bar.last_print_t < self.tick_s:
                return False
            bar.refresh()
            bar.last_print_t = self.clock()
            return True

    def _tick_until_stopped(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(_POLL_S):
            self.tick()

    def end(self) -> None:
        """Leave the live phase's last state as its line (nothing when there is none); stop the ticker."""
        if self._ticker is not None:
            assert self._stop is not None
            self._stop.set()
            self._ticker.join()
            self._ticker = self._stop = None
        with self._lock:
            if self.bar is not None:
                self.bar.close()
            self.bar, self.label = None, None
        self._logging.close()

    @contextlib.contextmanager
    def phase(self, label: str, total: int | None = None, *, done: int = 0, unit: str = "trial") -> Iterator[tqdm]:
        """:meth:`start` ``label`` for the block, :meth:`end` it however the block ends."""
        bar = self.start(label, total, done=done, unit=unit)
        try:
            yield bar
        finally:
            self.end()


def _is_tty(stream: object) -> bool:
    """Whether tqdm's output stream (a wrapper that passes ``isatty`` on) is a terminal."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no such method; a closed stream
        return False
