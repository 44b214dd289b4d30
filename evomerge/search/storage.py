"""Where a study lives, who may run it, and how trials left behind by a dead process are run again.

Storages: a SQLite file (one process: ``evomerge search`` / ``soup``, or one ``evomerge worker``) or PostgreSQL
(many workers on many machines). Both are Optuna RDB storages with heartbeats: a running trial's process writes one
every ``heartbeat_s`` seconds.

Resume converges: when a run starts, every trial a dead process left RUNNING is failed (user_attr ``error`` says it
was interrupted) and a new trial with the same parameters and kind is queued (``retry_of`` names the original);
a soup's interrupted step is re-scored by the soup's own resume (its steps are recipes, not parameters). Which
trials are dead:

- a local SQLite study is held by one process, proven by a lock file next to it (``study.db.lock``, an exclusive
  ``flock`` the kernel releases when the process dies, holding its PID). The process that holds the lock knows every
  RUNNING trial is an orphan, and retries it at once (no grace period); a second process is refused, naming the
  holder's PID;
- on a shared storage (PostgreSQL), a trial whose heartbeat is older than ``grace_s`` (its process stopped; failed by
  Optuna's :func:`optuna.storages.fail_stale_trials` before each trial, retried by :func:`_retry_stale`), or that never
  sent one and started more than ``grace_s`` ago without storing its recipe (its process died between Optuna's ask
  and its first heartbeat).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from evomerge.outdir import OutputWriteError, write_error
from evomerge.search import trials as records

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"
INTERRUPTED = "Interrupted: the process running this trial died; it was queued again with the same parameters"


class StudyInUse(ValueError):
    """A local SQLite study is held by another live process."""


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL, None for any other storage."""
    return Path(url.removeprefix(SQLITE_PREFIX)) if url.startswith(SQLITE_PREFIX) else None


SCHEMES = ("sqlite", "postgresql", "mysql")  # SQLAlchemy dialects Optuna's RDBStorage is tested with


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: the form of a storage URL in every message, log line, report
    and run.json."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://[^:/@]*):[^/]*@", r"\1:***@", url)


def unmasked_for_libpq(url: str) -> str:
    """A URL read back from run.json (password ``***``) without the password: the PostgreSQL client then takes it
    from ``PGPASSWORD`` or ``~/.pgpass``."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://[^:/@]*):\*\*\*@", r"\1@", url)


def check_storage(url: str, *, must_exist: bool = False) -> None:
    """Raise ValueError with one line (the URL masked) when ``url`` cannot serve a study: an unknown scheme, a
    missing SQLite file when ``must_exist`` (a worker joins a study; it must not create an empty one), a missing
    driver, a server that cannot be reached or refuses the login. Creates nothing; called before any run dir."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    shown = mask_url(url)
    try:
        scheme = make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError:
        scheme = url.partition(":")[0]
    if scheme not in SCHEMES:
        raise ValueError(f"unknown storage scheme {scheme!r} in {shown}; use sqlite:///PATH (one process) or "
                         "postgresql://USER:PASSWORD@HOST/DB (many workers; also mysql://...)")
    path = sqlite_path(url)
    if path is not None:
        if must_exist and not path.is_file():
            raise ValueError(f"no SQLite study at {path}; start it with `evomerge search` first (a worker joins an "
                             "existing study), or pass the URL of the file it created")
        return
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10} if scheme == "postgresql" else {})
    except ImportError as exc:
        raise ValueError(f"no database driver for {shown} ({exc}): for PostgreSQL, pip install -e "
                         "'.[distributed]'") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        if "authentication" in detail or "password" in detail:
            raise ValueError(f"the storage server refused the login of {shown} ({detail}); check the user and "
                             "password in the URL") from None
        raise ValueError(f"cannot reach the storage server of {shown} ({mask_url(detail)}); check the host, the "
                         "port and that the server runs") from None
    finally:
        engine.dispose()


# What a storage out of space says: SQLite's "database or disk is full"; PostgreSQL's "could not extend file ...: No
# space left on device" (and "could not write to file" for its temporary files)
_FULL_MESSAGES = ("database or disk is full", "no space left on device", "could not extend file")


def storage_full(exc: BaseException, url: str) -> OutputWriteError | None:
    """The one-line error for ``exc`` when it, or an exception it was raised from, says the study's storage ran out
    of space, naming the SQLite file (and what is free beside it) or the server; None for any other exception.
    Optuna wraps the database's error (``StorageInternalError`` from ``OperationalError``), so the chain is read."""
    seen: BaseException | None = exc
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)) or \
                any(m in str(seen).lower() for m in _FULL_MESSAGES):
            path = sqlite_path(url)
            if path is not None:
                error = write_error(OSError(errno.ENOSPC, "no space left"), path)
                return OutputWriteError(errno.ENOSPC, f"{error} (the study database; or pass --storage elsewhere)")
            return OutputWriteError(errno.ENOSPC, f"the storage server of {mask_url(url)} has no space left "
                                                  f"({str(seen).strip().splitlines()[0]}); free space on the server")
        seen = seen.__cause__ or seen.__context__
    return None


def make_storage(url: str, *, heartbeat_s: int, grace_s: int) -> RDBStorage:
    """An RDB storage (SQLite file or PostgreSQL) with heartbeats: a RUNNING trial whose process sent no heartbeat
    for ``grace_s`` seconds (killed, machine lost) is failed by the next process that starts a trial, and queued
    again with the same parameters (:func:`_retry_stale`)."""
    check_heartbeat(heartbeat_s, grace_s)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and have been since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                          heartbeat_stale_trial_callback=_retry_stale, engine_kwargs={"pool_pre_ping": True})


def check_heartbeat(heartbeat_s: int, grace_s: int) -> None:
    if grace_s <= heartbeat_s:
        raise ValueError(f"grace_s ({grace_s}) must exceed heartbeat_s ({heartbeat_s}), or live trials are failed "
                         "by other workers; the defaults are 30 and 90")


# -------------------------------------------------------------------------------------------------- lock
class StudyLock:
    """The exclusive hold of one process on a local SQLite study: ``<db>.lock`` next to it, flock'ed, with the
    holder's PID inside. The kernel drops the flock when the process exits however it ends (kill -9 included), so a
    stale lock file never blocks a re-run. :meth:`check` refuses early, before anything is created or loaded."""

    def __init__(self, db: Path) -> None:
        self.path = db.with_name(db.name + ".lock")
        self._file: IO[str] | None = None

    def check(self) -> None:
        """Raise :class:`StudyInUse` if another live process holds the lock (creates nothing)."""
        if not self.path.is_file():
            return
        with open(self.path) as f:
            self._try(f)
            fcntl.flock(f, fcntl.LOCK_UN)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open until release(): the open file carries the flock
        try:
            self._try(f)
        except BaseException:
            f.close()
            raise
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays (a later run re-uses it)
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def _try(self, f: IO[str]) -> None:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise StudyInUse(
                f"the study {self.path.with_suffix('')} is in use by process {pid} (lock {self.path}); a local SQLite "
                "study runs in one process: for many processes use a PostgreSQL storage and `evomerge worker`"
            ) from None


# ---------------------------------------------------------------------------------------------- retries
def recover(study: optuna.Study, storage: RDBStorage, *, exclusive: bool, grace_s: int, retry: bool) -> list[int]:
    """Fail every trial of ``study`` left RUNNING by a dead process (see the module docstring for which ones) and,
    when ``retry`` (a study whose trials are parameter sets: searches), queue each again with the same parameters;
    ``exclusive`` (this process holds the study's lock) also retries the interrupted failures a dead process left
    without a retry. Returns the numbers of the trials failed here."""
    if not exclusive:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # heartbeat-stale trials; _retry_stale queues them again
    trials = study.get_trials(deepcopy=False)
    cutoff = datetime.now() - timedelta(seconds=grace_s)
    orphans = [t for t in trials if t.state == TrialState.RUNNING and (exclusive or (
        records.RECIPE not in t.user_attrs and t.datetime_start is not None and t.datetime_start < cutoff))]
    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for trial in orphans:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, records.ERROR, INTERRUPTED)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # it finished (or another worker failed it) since we read it
            continue
        failed.append(trial.number)
    if retry:
        retried = records.retried(trials)
        unretried = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried
                     and _interrupted(t)] if exclusive else []
        for trial in [*unretried, *(storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
                study_id, n)) for n in failed)]:
            _enqueue_retry(study, trial)
    if failed:
        log.info("trials %s were left RUNNING by a process that died: failed%s", failed,
                 " and queued again with the same parameters" if retry else "")
    return failed


def _interrupted(trial: FrozenTrial) -> bool:
    """A failure that was no fault of the trial: its process died (no error stored: failed by a heartbeat)."""
    error = records.trial_error(trial)
    return error is None or error == INTERRUPTED


def _enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    study.enqueue_trial(trial.params, user_attrs=records.retry_attrs(trial), skip_if_exists=False)


def _retry_stale(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat-stale callback: ``trial`` was just failed by this process (only one process can fail a
    trial, so it is queued once)."""
    if records.study_kind(study.user_attrs) in records.PARAMETER_KINDS:
        _enqueue_retry(study, trial)
