"""One progress display for a whole run: the phase it is in, each phase with its own count and ETA where it has one.

A search goes through ``load models -> baselines -> search trials -> confirm -> test scoring -> export -> report``
(a soup has ``soup steps``, a sweep ``sweep trials``; phases a run does not have are not shown); ``evomerge merge``
through ``read sources -> merge tensors -> write shards -> model card`` (:func:`evomerge.merge.merge_to_dir`). The
display is one live tqdm line on stderr, ``<run>: <phase>``, with tqdm's count, rate and ETA for a phase with a
known size and the elapsed time for the others (loading, export, report); a finished phase stays as one line above
it, so what a run did reads top to bottom. Log lines written while a phase is live go through ``tqdm.write`` and do
not cut the bar. Disabled (``--quiet``; ``progress=False`` in the Python API) it prints nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

#: The phases' names, in the order a run (then ``evomerge merge``) goes through them.
PHASES = ("load models", "baselines", "search trials", "soup steps", "sweep trials", "confirm", "test scoring",
          "export", "report", "read sources", "merge tensors", "write shards", "model card")


_COUNTED = "{desc} {percentage:3.0f}%|{bar}{r_bar}"  # tqdm's default, without the colon after the description
_TIMED = "{desc} [{elapsed}{postfix}]"


class RunProgress:
    """The display of one run: at most one live phase at a time."""

    def __init__(self, name: str, *, enabled: bool = True) -> None:
        self.name = name
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.label: str | None = None  # the live phase's
        self._logging = contextlib.ExitStack()

    def start(self, label: str, total: int | None = None, *, done: int = 0, unit: str = "trial") -> tqdm:
        """End the live phase, if any, and start ``label``: a count to ``total`` (``done`` of them already, e.g. a
        resumed study's: they do not count in the rate), or without ``total`` a phase that shows its elapsed time."""
        if label not in PHASES:
            raise ValueError(f"unknown phase {label!r}; one of {', '.join(PHASES)}")
        self.end()
        if self.enabled:  # Optuna's logger does not propagate: its "Trial N failed" lines are redirected by name
            self._logging.enter_context(logging_redirect_tqdm([logging.root, logging.getLogger("optuna")],
                                                              tqdm_class=tqdm))
        self.bar = tqdm(total=total, initial=done, desc=f"{self.name}: {label}", unit=unit, leave=True,
                        disable=not self.enabled, bar_format=_COUNTED if total is not None else _TIMED)
        self.label = label
        return self.bar

    def advance(self) -> None:
        """One more item done in the live phase (nothing when there is none)."""
        if self.bar is not None:
            self.bar.update(1)

    def end(self) -> None:
        """Leave the live phase's last state as its line (nothing when there is none)."""
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
