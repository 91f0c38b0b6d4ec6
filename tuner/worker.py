"""Running trials against a shared study: storage, heartbeats, the exact trial budget, signals, retries.

Many worker processes (on many machines) can pull trials from one study in PostgreSQL. The rules they keep:

- The budget is exact: a worker takes a trial only while finished + running trials are fewer than
  ``n_trials``, checked under a PostgreSQL advisory lock so two workers cannot both take the last slot. A worker
  that vanishes while it holds the lock loses it after the grace period (the server ends its idle transaction).
- A trial whose worker died (no heartbeat for ``grace_period`` seconds) is marked FAIL by whichever worker
  notices, its MLflow run is closed KILLED, and a retry with the same parameters is queued; the failed trial
  then no longer counts towards the budget, its retry does.
- SIGTERM and Ctrl-C end the running trial as FAIL (its run closed), queue its retry, and stop the worker.
- Transient storage errors (a database restart) are retried a bounded number of times with backoff. A trial
  created just as the connection dropped (the worker asked again, so nobody runs it) never gets a heartbeat;
  an idle worker fails it after the grace period and queues its retry, as for a dead worker's trial.
- SQLite serves one process: a second worker on the same SQLite file is refused (a lock held while running).
"""

from __future__ import annotations

import copy
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, runtime_checkable

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.errors import PERMANENT_MARKERS, StorageError
from tuner.paths import MLFLOW_TABLES, not_an_sqlite_file, sqlite_tables
from tuner.tracking import Tracker, mask_password

log = logging.getLogger(__name__)

T = TypeVar("T")

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RETRY_OF = "tuner.retry_of"
RETRY_COUNT = "tuner.retry_count"
#: User attribute of a failed trial that held no slot of the budget (see enqueue_retry): it neither counts nor is
#: retried.
SURPLUS = "tuner.surplus"
#: User attribute of a trial failed because it was lost (its worker died, was stopped, or lost the database), not
#: because of its parameters: why. Written before the trial is failed, so that a lost trial whose retry was never
#: queued (its worker killed in between) is found and queued later (see retry_lost_trials).
LOST = "tuner.lost"
#: User attribute of a trial whose MLflow run could not be created: its run's metrics (per epoch and final) and
#: tags, which tuner.study.create_runs_left_out needs besides what Optuna holds; replaced by the run's id (and
#: RUN_REBUILT) once the run is made.
RUN_LEFT_OUT = "mlflow_run_left_out"
#: User attribute of a trial whose run was made after the fact, without model files.
RUN_REBUILT = "mlflow_run_rebuilt"
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"
LOST_TO_STORAGE = "lost to a storage error"


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    # Heartbeats and fail_stale_trials are marked experimental, and ask() warns that heartbeats are meant for
    # optimize(): this module drives them itself (its own heartbeat thread), so the warnings say nothing new.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


class TrialFailed(Exception):
    """A trial that cannot produce a value (non-finite loss or objective); recorded FAIL, the study goes on."""


class TrialLost(Exception):
    """A trial cut short by the storage (a database restart), not by its own result: failed and queued again."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, like KeyboardInterrupt on Ctrl-C (neither is an ``Exception``)."""


# --------------------------------------------------------------------------------------------------------------
# Storage


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def find_study(name: str, storage: str | optuna.storages.BaseStorage) -> optuna.Study | None:
    """The stored study, or None when there is none of that name. Imports optuna only (``tuner status``).

    Raises:
        StorageError: The storage cannot be reached.
    """
    path = sqlite_path(storage) if isinstance(storage, str) else None
    if path is not None and name not in sqlite_study_names(path):
        # Opening an SQLite URL would create the file and tables, and on a file whose tables another process is
        # still making it would write the schema version too, failing that process: when only looking, do not.
        return None
    where = mask_password(storage) if isinstance(storage, str) else type(storage).__name__

    def look() -> optuna.Study | None:
        if isinstance(storage, str) and not _has_study_tables(storage):
            return None  # opening the storage would make Optuna's tables in a database only looked at
        # One storage object for both looks: each URL opened anew would build its own engine.
        opened = optuna.storages.get_storage(storage) if isinstance(storage, str) else storage
        if name not in optuna.get_all_study_names(opened):
            return None
        return optuna.load_study(study_name=name, storage=opened)

    try:
        # A worker that starts while the database restarts rides it out, as a running one does.
        return retrying(look, what=f"open {where}", attempts=OPEN_ATTEMPTS)
    except Exception as exc:  # storage drivers raise many types; every one means "cannot reach it"
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"study.storage: cannot open {where}: {storage_error_summary(exc)}") from None


def _has_study_tables(url: str) -> bool:
    """Whether the database behind ``url`` holds Optuna's tables, read without making them."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        return sqlalchemy.inspect(engine).has_table("studies")
    finally:
        engine.dispose()


def sqlite_study_names(path: Path) -> list[str]:
    """Read-only: the studies an SQLite file holds; none while its tables are still being made, or no file.

    Raises:
        StorageError: The file is not an SQLite database.
    """
    import sqlite3
    from contextlib import closing

    if not path.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return [row[0] for row in conn.execute("SELECT study_name FROM studies ORDER BY study_id")]
    except sqlite3.OperationalError:  # no tables yet (another process is making them), or a database of another kind
        return []
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"study.storage: {path} is not an SQLite database ({exc})") from None


def load_existing(name: str, storage: str) -> optuna.Study:
    """Open a stored study by name.

    Raises:
        StorageError: No such study (the names present are listed) or the storage is unreachable.
    """
    study = find_study(name, storage)
    if study is None:
        path = sqlite_path(storage)
        if path is not None:
            names = sqlite_study_names(path)
        else:
            names = optuna.get_all_study_names(storage) if _has_study_tables(storage) else []
        listing = ", ".join(names) if names else "none"
        raise StorageError(f"study {name!r} not found in {mask_password(storage)}; studies there: {listing}")
    return study


def make_storage(
    url: str,
    *,
    heartbeat_interval: int,
    grace_period: int,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    create_tables: bool = True,
) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and connection checks, or a StorageError naming the (masked) URL."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs: dict[str, Any] = {}
    if not is_sqlite(url):
        # A pooled connection can die with a database restart: test it before use instead of failing a trial.
        engine_kwargs = {"pool_pre_ping": True}
    try:
        with _quiet_optuna():
            storage = _open_rdb(url, engine_kwargs, heartbeat_interval, grace_period, on_stale, create_tables)
        if is_sqlite(url):
            fast_sqlite(storage)
        return storage
    except StorageError:
        raise
    except Exception as exc:  # drivers raise many types (bad URL, missing driver, refused login)
        raise StorageError(f"study.storage: cannot open {mask_password(url)}: {type(exc).__name__}: {exc}") from None


def fast_sqlite(storage: optuna.storages.RDBStorage) -> None:
    """Write-ahead logging with ``synchronous=NORMAL`` on every connection of an SQLite storage.

    Optuna commits on every report and attribute, some 50 times per trial. In SQLite's default mode each
    commit waits for the disk: here 2 to 20 ms per commit, as long as an epoch of a small network. With a
    write-ahead log and NORMAL synchronisation a commit does not wait (about 1.7 ms); the file stays consistent
    after a crash, and a power cut can lose the last commits, not the study. Readers (``tuner status``, the
    dashboard) no longer block the writer. The log mode stays with the file.
    """
    from sqlalchemy import event

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    # Connections opened while the tables were made predate the listener.
    storage.engine.dispose()


def _open_rdb(
    url: str,
    engine_kwargs: dict[str, Any],
    heartbeat_interval: int,
    grace_period: int,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None,
    create_tables: bool,
) -> optuna.storages.RDBStorage:
    return retrying(
        lambda: optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale,
            skip_table_creation=not create_tables,
        ),
        what=f"open {mask_password(url)}",
        # Opening a storage fails sooner (about 15 s): a wrong URL is a mistake to report, not an outage to wait out.
        attempts=OPEN_ATTEMPTS,
    )


def is_transient(exc: BaseException | None) -> bool:
    """A lost or refused database connection, possibly wrapped (Optuna re-raises it as StorageInternalError);
    not one that says the URL's database, user or password is wrong."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OperationalError | InterfaceError):
            text = str(exc).lower()
            return not any(marker in text for marker in PERMANENT_MARKERS)
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def storage_error_summary(exc: BaseException) -> str:
    """The error's type and first line: a driver's message goes on with the SQL and a link to its docs."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


#: Attempts of a storage call made while a study runs: a database server restarting (a checkpoint on a busy
#: machine) can take longer than a quarter of a minute, and a worker should ride it out (about 64 s in all).
RESTART_ATTEMPTS = 8
OPEN_ATTEMPTS = 6


def retrying(fn: Callable[[], T], *, what: str, attempts: int = RESTART_ATTEMPTS, first_wait: float = 0.5) -> T:
    """Call ``fn``, retrying transient database errors with exponential backoff (about 64 s in all by default).

    Raises:
        StorageError: Still failing after the last attempt.
    """
    wait = first_wait
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(
                    f"study.storage: cannot {what} after {attempts} attempts: {storage_error_summary(exc)}"
                ) from None
            # One line each: the driver's message goes on with the SQL and a link, five times over.
            log.warning(
                "storage error (attempt %d/%d, retrying in %.1fs): %s",
                attempt,
                attempts,
                wait,
                storage_error_summary(exc),
            )
            time.sleep(wait)  # backoff before reconnecting, not synchronisation
            wait *= 2
    raise AssertionError("unreachable")


@contextmanager
def sqlite_single_process(url: str) -> Iterator[None]:
    """Hold an exclusive lock beside an SQLite study file; refuse a second process.

    The lock dies with its process (even on kill -9), so a crashed run never blocks the next one.

    Raises:
        StorageError: Another process holds the lock.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    problem = not_an_sqlite_file(path)
    if not problem and sqlite_tables(path) >= MLFLOW_TABLES:
        problem = f"{path} is an MLflow tracking store; give the study a file of its own"
    if problem:
        raise StorageError(f"study.storage: {url} cannot hold the study: {problem}")
    lock_path = path.with_name(path.name + ".lock")
    # The folders this makes, outermost first, to remove again if nothing is stored in them.
    made = [folder for folder in reversed(lock_path.parents) if not folder.exists()]
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle: IO[str] = open(lock_path, "a+")  # noqa: SIM115 (held for the whole block)
    except OSError as exc:
        raise StorageError(
            f"study.storage: {url} cannot hold the study: cannot make {lock_path}: {exc.strerror or exc}"
        ) from None
    locked = False
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StorageError(
                f"study.storage: {url} is in use by another tuner process (pid {holder}); SQLite serves one worker "
                "process. For several workers use PostgreSQL: --storage postgresql+psycopg://USER@HOST/DB"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        if locked and not path.exists():
            # Nothing was stored (the command failed before the study file was made): leave nothing behind.
            # Unlinked while still held, so no other process can have locked this file in the meantime.
            lock_path.unlink(missing_ok=True)
            for folder in reversed(made):
                with suppress(OSError):  # not empty (another process wrote there meanwhile): it stays
                    folder.rmdir()
        handle.close()


def _rdb_backend(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    """The database storage behind Optuna's caching layer; None for another kind of storage."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


#: Databases whose upsert tuner writes itself, to store a trial's records in one statement each.
_BATCHED_DIALECTS = ("sqlite", "postgresql")


def behind_a_server(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the study lives in a database server (PostgreSQL, MySQL): each call waits on a round trip."""
    backend = _rdb_backend(storage)
    return backend is not None and backend.engine.dialect.name != "sqlite"


def _batched_backend(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    backend = _rdb_backend(storage)
    return backend if backend is not None and backend.engine.dialect.name in _BATCHED_DIALECTS else None


def _upsert_insert(backend: optuna.storages.RDBStorage) -> Any:
    """The dialect's ``insert``, whose statements take ``on_conflict_do_update`` (a batched backend's)."""
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if backend.engine.dialect.name == "postgresql" else sqlite.insert


def _updatable_trial(conn: Any, backend: optuna.storages.RDBStorage, trial_id: int) -> Any:
    """The trial's row (state, study_id), after Optuna's check that a finished trial is not changed."""
    from optuna.storages._rdb.models import TrialModel
    from sqlalchemy import select

    found = conn.execute(select(TrialModel.state, TrialModel.study_id).where(TrialModel.trial_id == trial_id))
    row = found.one_or_none()
    if row is None:
        raise KeyError(f"no trial with id {trial_id}")
    backend.check_trial_is_updatable(trial_id, TrialState(row.state))
    return row


def _advisory_key(name: str) -> int:
    """A PostgreSQL advisory lock's key (signed 64 bits) from a name."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _pg_locks_parts(key: int) -> dict[str, int]:
    """An advisory key as pg_locks shows it: its high and low 32 bits (``classid``, ``objid``)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return {"high": unsigned >> 32, "low": unsigned & 0xFFFF_FFFF}


def _budget_lock_key(study: optuna.Study) -> int:
    # From the whole name: studies of one database whose names share a prefix neither serialise each other's
    # takes nor count each other's waiting workers.
    return _advisory_key(study.study_name)


def workers_waiting(study: optuna.Study) -> int:
    """How many other workers wait for the study's budget lock now (PostgreSQL; 0 elsewhere)."""
    backend = _rdb_backend(study._storage)
    if backend is None or backend.engine.dialect.name != "postgresql":
        return 0
    from sqlalchemy import text

    waiting = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1"
        " AND classid::bigint = :high AND objid::bigint = :low"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    with backend.engine.connect() as conn:
        return int(conn.scalar(waiting, _pg_locks_parts(_budget_lock_key(study))) or 0)


@contextmanager
def budget_lock(study: optuna.Study) -> Iterator[None]:
    """Serialise "is there a slot left? then take a trial" across processes (PostgreSQL advisory lock)."""
    backend = _rdb_backend(study._storage)
    engine = backend.engine if backend is not None else None
    if engine is None or engine.dialect.name != "postgresql":
        yield
        return
    from sqlalchemy import text

    key = _budget_lock_key(study)
    _, grace = heartbeat_settings(study)
    with engine.connect() as conn:
        if grace:
            # The holder's transaction sits idle while it takes the trial on another connection. A holder that
            # vanishes then (a machine gone) would hold every other worker until the server notices the dead
            # connection, hours later by default: the server ends the transaction after the grace period instead,
            # which frees the lock, as a heartbeat that old marks a worker dead.
            timeout_ms = int(grace * 1000)
            conn.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {timeout_ms}"))
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()


@contextmanager
def repair_lock(study: optuna.Study) -> Iterator[Callable[[], bool]]:
    """A check, made before each repair, that this process alone may repair the study's MLflow runs: on PostgreSQL
    while it holds the study's repair lock (an advisory lock, taken without waiting, that a worker's death or a
    database restart frees); elsewhere never (SQLite's own file lock is what answers there)."""
    backend = _rdb_backend(study._storage)
    engine = backend.engine if backend is not None else None
    if engine is None or engine.dialect.name != "postgresql":
        yield lambda: False
        return
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    key = _advisory_key(f"repairs:{study.study_name}")
    mine = text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()"
        " AND objsubid = 1 AND classid::bigint = :high AND objid::bigint = :low"
    )
    with engine.connect() as conn:
        held = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}))
        conn.commit()  # a session's lock: no transaction left idle while the repairs write to MLflow

        def still_held() -> bool:
            if not held:
                return False
            try:
                found = conn.scalar(mine, _pg_locks_parts(key))
                conn.commit()
            except DBAPIError:  # the session is gone, and the lock with it
                return False
            return bool(found)

        try:
            yield still_held
        finally:
            # A connection the database dropped (a restart) has freed the lock with its session.
            with suppress(DBAPIError):
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    conn.commit()


def rewrite_finished_trial_attrs(
    study: optuna.Study, trial: FrozenTrial, attrs: dict[str, Any], drop: Sequence[str] = ()
) -> bool:
    """Set ``attrs`` and remove the ``drop`` keys among a finished trial's user attributes, in one transaction;
    False (nothing written) where the storage is not a database tuner writes itself. Written in SQL, since Optuna
    changes no attribute of a finished trial."""
    backend = _batched_backend(study._storage)
    if backend is None:
        return False
    from optuna.storages._rdb.models import TrialUserAttributeModel
    from sqlalchemy import delete

    with backend.engine.begin() as conn:
        if attrs:
            conn.execute(_user_attrs_upsert(backend, trial._trial_id, attrs))
        if drop:
            conn.execute(
                delete(TrialUserAttributeModel).where(
                    TrialUserAttributeModel.trial_id == trial._trial_id, TrialUserAttributeModel.key.in_(list(drop))
                )
            )
    return True


# --------------------------------------------------------------------------------------------------------------
# Budget and retries


@dataclass(frozen=True)
class Budget:
    """How much of ``n_trials`` is spent: finished trials (retried failures excluded), running, queued."""

    used: int
    running: int
    waiting: int
    total: int

    @property
    def slot_free(self) -> bool:
        return self.used + self.running < self.total

    @property
    def done(self) -> bool:
        return self.used >= self.total and self.running == 0


def budget(study: optuna.Study, total: int) -> Budget:
    """The budget's state. In a database it is counted there: loading the trials a worker checks it against
    cost 5 to 20 ms per trial taken, and grows with the study."""
    backend = _rdb_backend(study._storage)
    if backend is not None:
        return _budget_in_sql(study, backend, total)
    return budget_of_trials(study.get_trials(deepcopy=False), total)


def budget_of_trials(trials: Sequence[FrozenTrial], total: int) -> Budget:
    replaced = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    replaced |= {t.number for t in trials if SURPLUS in t.user_attrs}
    used = sum(1 for t in trials if t.state in FINISHED_STATES and t.number not in replaced)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return Budget(used=used, running=running, waiting=waiting, total=total)


def _budget_in_sql(study: optuna.Study, backend: optuna.storages.RDBStorage, total: int) -> Budget:
    from optuna.storages._rdb.models import TrialModel
    from sqlalchemy import func, select

    of_study = TrialModel.study_id == study._study_id
    by_state = select(TrialModel.state, func.count()).where(of_study).group_by(TrialModel.state)
    with backend.engine.connect() as conn:
        counts = {TrialState(state): n for state, n in conn.execute(by_state)}
        replaced = {
            int(json.loads(value)) if key == RETRY_OF else number
            for _, number, _, key, value in conn.execute(_marks_query(study, (RETRY_OF, SURPLUS)))
        }
        # A failed trial whose retry is queued no longer counts: its retry does. Nor does a surplus one.
        replaced_finished = 0
        if replaced:
            finished_replaced = select(func.count()).where(
                of_study, TrialModel.number.in_(replaced), TrialModel.state.in_(FINISHED_STATES)
            )
            replaced_finished = conn.scalar(finished_replaced) or 0
    used = sum(counts.get(state, 0) for state in FINISHED_STATES) - replaced_finished
    return Budget(
        used=used,
        running=counts.get(TrialState.RUNNING, 0),
        waiting=counts.get(TrialState.WAITING, 0),
        total=total,
    )


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Number of trials in each state, every state listed.

    In a database the rows are counted there: loading 10,000 trials to count them took 4 s on SQLite.
    """
    counts = {state.name: 0 for state in TrialState}
    backend = _rdb_backend(study._storage)
    if backend is not None:
        from optuna.storages._rdb.models import TrialModel
        from sqlalchemy import func, select

        query = (
            select(TrialModel.state, func.count())
            .where(TrialModel.study_id == study._study_id)
            .group_by(TrialModel.state)
        )
        with backend.engine.connect() as conn:
            for state, n in conn.execute(query):
                counts[TrialState(state).name] += n
        return counts
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts


def _user_attrs_upsert(backend: optuna.storages.RDBStorage, trial_id: int, attrs: dict[str, Any]) -> Any:
    """One statement that stores ``attrs`` among a trial's user attributes, replacing those of the same keys."""
    from optuna.storages._rdb.models import TrialUserAttributeModel

    rows = [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    upsert = _upsert_insert(backend)(TrialUserAttributeModel).values(rows)
    return upsert.on_conflict_do_update(
        index_elements=[TrialUserAttributeModel.trial_id, TrialUserAttributeModel.key],
        set_={"value_json": upsert.excluded.value_json},
    )


def record_trial(
    trial: optuna.Trial, user_attrs: dict[str, Any], intermediate_values: dict[int, float] | None = None
) -> None:
    """Store user attributes (and intermediate values, by step) of a running trial at once, as
    ``trial.set_user_attr`` and ``trial.report`` do one by one.

    Optuna writes each in a transaction of its own: 2 to 4 ms each on SQLite or PostgreSQL, and more when the
    server is busy, some 25 per trial. In a SQLite or PostgreSQL study they go in one transaction here;
    elsewhere one by one.
    """
    steps = intermediate_values or {}
    if not user_attrs and not steps:
        return
    backend = _batched_backend(trial.storage)
    if backend is None:
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        for step, reported in sorted(steps.items()):
            trial.report(reported, step)
        return
    from optuna.storages._rdb.models import TrialIntermediateValueModel

    insert = _upsert_insert(backend)
    trial_id = trial._trial_id
    statements = []
    if user_attrs:
        statements.append(_user_attrs_upsert(backend, trial_id, user_attrs))
    if steps:
        stored = TrialIntermediateValueModel.intermediate_value_to_stored_repr
        step_rows = [
            {"trial_id": trial_id, "step": step, "intermediate_value": value, "intermediate_value_type": kind}
            for step, (value, kind) in ((step, stored(reported)) for step, reported in sorted(steps.items()))
        ]
        steps_insert = insert(TrialIntermediateValueModel).values(step_rows)
        statements.append(
            steps_insert.on_conflict_do_update(
                index_elements=[TrialIntermediateValueModel.trial_id, TrialIntermediateValueModel.step],
                set_={
                    "intermediate_value": steps_insert.excluded.intermediate_value,
                    "intermediate_value_type": steps_insert.excluded.intermediate_value_type,
                },
            )
        )
    with backend.engine.begin() as conn:
        _updatable_trial(conn, backend, trial_id)  # before anything is written
        for statement in statements:
            conn.execute(statement)
    # What Optuna's own calls do after their writes: the trial object answers from this copy.
    trial._cached_frozen_trial.user_attrs.update(user_attrs)
    trial._cached_frozen_trial.intermediate_values.update(steps)


class _ParamsHeldBack:
    """Stands in for a trial's storage: keeps the parameters its suggest calls store, forwards the rest."""

    def __init__(self, storage: optuna.storages.BaseStorage, drawn: list[tuple[str, float, Any]]) -> None:
        self._storage = storage
        self._drawn = drawn

    def set_trial_param(self, trial_id: int, name: str, value: float, distribution: Any) -> None:
        self._drawn.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


#: Per storage object and study id: the distribution each parameter name was first stored with. A name's
#: distribution must stay compatible for the life of a study, so one look at the database per name suffices; kept
#: as long as the storage object, as Optuna's own cache is (a study deleted and made again gets a new one).
_STORED_DISTRIBUTIONS: weakref.WeakKeyDictionary[optuna.storages.RDBStorage, dict[int, dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


@contextmanager
def params_stored_at_once(trial: optuna.Trial) -> Iterator[None]:
    """Within the block, the parameters ``trial.suggest_*`` draws are stored as it ends, in one transaction.

    Optuna stores each in a transaction of its own (three or four statements and a commit): some 40 round trips
    for a trial of ten parameters, each a wait on a database server busy with other workers. In a SQLite or
    PostgreSQL study; elsewhere the block changes nothing. Parameters drawn before an error in the block are
    stored all the same, as they would have been one by one; a parameter whose distribution does not fit the
    study's (ValueError, as from Optuna) is refused with the block's others.
    """
    storage = trial.storage
    backend = _batched_backend(storage)
    if backend is None:
        yield
        return
    drawn: list[tuple[str, float, Any]] = []
    trial.storage = _ParamsHeldBack(storage, drawn)  # type: ignore[assignment]
    try:
        yield
    except BaseException:
        with suppress(Exception):  # the block's error is the one to report
            _store_params(backend, trial, drawn)
        raise
    finally:
        trial.storage = storage
    _store_params(backend, trial, drawn)


def _store_params(
    backend: optuna.storages.RDBStorage, trial: optuna.Trial, drawn: list[tuple[str, float, Any]]
) -> None:
    if not drawn:
        return
    from optuna.distributions import check_distribution_compatibility, distribution_to_json, json_to_distribution
    from optuna.storages._rdb.models import TrialModel, TrialParamModel
    from sqlalchemy import insert, literal, select, union_all

    trial_id = trial._trial_id
    with backend.engine.begin() as conn:
        found = _updatable_trial(conn, backend, trial_id)
        known = _STORED_DISTRIBUTIONS.setdefault(backend, {}).setdefault(found.study_id, {})
        unseen = sorted({name for name, _, _ in drawn} - set(known))
        if unseen:
            # One statement for all names: any one stored distribution per name (all must be compatible).
            firsts = [
                select(TrialParamModel.param_name, TrialParamModel.distribution_json)
                .join(TrialModel, TrialModel.trial_id == TrialParamModel.trial_id)
                .where(TrialModel.study_id == found.study_id, TrialParamModel.param_name == literal(name))
                .limit(1)
                .subquery()
                for name in unseen
            ]
            for name, stored in conn.execute(union_all(*(select(first) for first in firsts))):
                known[name] = json_to_distribution(stored)
        for name, _, distribution in drawn:
            if name in known:
                # Raises ValueError, before anything is written, as Optuna's own call does.
                check_distribution_compatibility(known[name], distribution)
        conn.execute(
            insert(TrialParamModel),
            [
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": value,
                    "distribution_json": distribution_to_json(distribution),
                }
                for name, value, distribution in drawn
            ],
        )
    for name, _, distribution in drawn:
        known.setdefault(name, distribution)


def enqueue_retry(
    study: optuna.Study, trial: FrozenTrial, max_retries: int, total: int | None = None, *, counted: bool = True
) -> bool:
    """Queue a failed trial's parameters again, unless it has been retried ``max_retries`` times already, or (given
    the study's ``total``) it held no slot of the budget.

    ``counted`` False: the trial was stopped by a signal (Ctrl-C, SIGTERM), no fault of its own, so the retry
    neither counts against ``max_retries`` nor is refused by it: stopping a study again and again (``docker
    compose stop``) must not drop a trial's parameters.

    Queues at most one retry per trial: a call repeated after a lost connection may find its first one stored.

    A trial holds no slot when the study's finished and running trials fill the budget without it. A database
    restart can make such a trial: Optuna retries a trial's creation by itself, for seconds, after the worker
    counted the free slots under a lock that the restart released, and the other workers meanwhile took them. Its
    retry would be left queued once the budget is spent; so it is marked :data:`SURPLUS` instead, and no longer
    counts.
    """
    count = int(trial.user_attrs.get(RETRY_COUNT, 0))
    if counted and count >= max_retries:
        log.warning("trial %d failed %d times; not retried again", trial.number, count + 1)
        return False
    # Two callers may queue one lost trial at once: its own worker, seeing the storage error, and another's stale
    # check. Both would find no retry and queue one, and the second retry, left queued once the budget is spent,
    # would strand. So the look and the queueing happen under the budget lock (another process) and a lock of
    # this process (a heartbeat thread).
    with _retry_lock, budget_lock(study):
        # Read in SQL (see _marks): under the lock, loading every trial of a large study kept the others waiting.
        if any(m.key == RETRY_OF and int(m.value) == trial.number for m in _marks(study)):
            return True
        if total is not None and _mark_if_surplus(study, trial, total):
            return False
        # A queued trial lost before it drew its parameters holds them only as the queue's fixed parameters.
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        study.enqueue_trial(params, user_attrs={RETRY_OF: trial.number, RETRY_COUNT: count + (1 if counted else 0)})
    return True


_retry_lock = threading.Lock()


def _mark_if_surplus(study: optuna.Study, trial: FrozenTrial, total: int) -> bool:
    """Mark the failed ``trial`` :data:`SURPLUS` if the budget is full without it (see enqueue_retry).

    Only in a database study, the one kind a restart reaches; the mark is written in SQL, since Optuna changes no
    attribute of a finished trial.
    """
    backend = _batched_backend(study._storage)
    if backend is None:
        return False
    state = budget(study, total)
    # The trial is failed and not replaced, so ``used`` counts it.
    if state.used - 1 + state.running < total:
        return False
    from optuna.storages._rdb.models import TrialUserAttributeModel

    reason = f"created beyond n_trials={total} during a database outage; not retried and not counted"
    insert = _upsert_insert(backend)
    mark = insert(TrialUserAttributeModel).values(trial_id=trial._trial_id, key=SURPLUS, value_json=json.dumps(reason))
    with backend.engine.begin() as conn:
        conn.execute(mark.on_conflict_do_nothing(index_elements=["trial_id", "key"]))
    log.warning("trial %d %s", trial.number, reason)
    return True


def fail_unstarted_trials(study: optuna.Study, first_seen: dict[int, float], grace: float) -> list[int]:
    """Fail RUNNING trials that never had a heartbeat for longer than ``grace`` seconds; returns their ids.

    Such a trial was created by a worker that lost its connection before it heard back (a database restart
    during ``ask``): the worker asked again and nobody runs the first one. Optuna's stale check only looks at
    trials with a heartbeat, so without this every worker would wait for it forever. A live worker records the
    heartbeat of a trial as it takes it, so one without a heartbeat after a grace period is lost. ``first_seen``
    (trial id to this process's monotonic clock, kept by the caller between calls) measures the wait, so clocks
    of different machines are never compared. The stale-trial callback runs for each, as for a lost heartbeat.
    """
    storage = study._storage
    backend = _rdb_backend(storage)
    if not grace or backend is None:
        return []
    from optuna.storages._rdb.models import TrialHeartbeatModel, TrialModel
    from sqlalchemy import exists, select

    never_beaten = (
        select(TrialModel.trial_id)
        .where(TrialModel.study_id == study._study_id, TrialModel.state == TrialState.RUNNING)
        .where(~exists().where(TrialHeartbeatModel.trial_id == TrialModel.trial_id))
    )
    with backend.engine.connect() as conn:
        unstarted = set(conn.scalars(never_beaten))
    now = time.monotonic()
    for trial_id in set(first_seen) - unstarted:
        del first_seen[trial_id]
    due = []
    for trial_id in sorted(unstarted):
        if now - first_seen.setdefault(trial_id, now) <= grace:
            continue
        del first_seen[trial_id]
        due.append(trial_id)
    failed = fail_lost_trials(study, due, "was taken but never started (its worker lost the database)")
    return [trial._trial_id for trial in failed]


def fail_stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Optuna's ``fail_stale_trials`` (RUNNING trials whose heartbeat is older than the grace period), done by
    :func:`fail_lost_trials`; returns the trials this call failed."""
    backend = _rdb_backend(study._storage)
    if backend is None or not backend.get_heartbeat_interval():
        return []
    stale = backend._get_stale_trial_ids(study._study_id)
    return fail_lost_trials(study, stale, "lost its heartbeat (its worker is gone)")


def fail_lost_trials(study: optuna.Study, trial_ids: Sequence[int], why: str) -> list[FrozenTrial]:
    """Fail each of these RUNNING trials and run the stale-trial callback (its retry) for each this call failed.

    Each trial is read before it is failed, and each step is retried on its own. Optuna's stale check reads a
    trial back after failing it, so a restart in between left the trial failed with no retry, and the trials
    after it unchecked: the retried call no longer finds them RUNNING.
    """
    storage = study._storage
    backend = _rdb_backend(storage)
    on_stale = backend.get_heartbeat_stale_trial_callback() if backend is not None else None
    failed = []
    for trial_id in trial_ids:
        trial = retrying(functools.partial(storage.get_trial, trial_id), what="read a lost trial")
        if trial.state != TrialState.RUNNING:
            continue
        trial = copy.deepcopy(trial)
        if not retrying(_mark_lost_once(storage, trial_id, why), what=f"mark lost trial {trial.number}"):
            continue
        trial.user_attrs[LOST] = why
        if not retrying(_fail_once(storage, trial_id), what=f"fail lost trial {trial.number}"):
            continue
        trial.state = TrialState.FAIL
        trial.datetime_complete = datetime.datetime.now()
        failed.append(trial)
        log.warning("trial %d %s: failed", trial.number, why)
        if on_stale is not None:
            on_stale(study, trial)
    return failed


def _mark_lost_once(storage: optuna.storages.BaseStorage, trial_id: int, why: str) -> Callable[[], bool]:
    """Mark the running trial :data:`LOST`; whether it was still running (its own worker may have finished it)."""

    def mark() -> bool:
        try:
            storage.set_trial_user_attr(trial_id, LOST, why)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    return mark


@dataclass(frozen=True)
class _Mark:
    """A trial's :data:`LOST`, :data:`SURPLUS` or :data:`RETRY_OF` user attribute."""

    trial_id: int
    number: int
    state: TrialState
    key: str
    value: Any


def _marks(study: optuna.Study) -> list[_Mark]:
    """Every trial's lost, surplus and retry marks; in a database read there, without loading the trials."""
    keys = (LOST, SURPLUS, RETRY_OF)
    backend = _rdb_backend(study._storage)
    if backend is None:
        return [
            _Mark(t._trial_id, t.number, t.state, key, t.user_attrs[key])
            for t in study.get_trials(deepcopy=False)
            for key in keys
            if key in t.user_attrs
        ]
    with backend.engine.connect() as conn:
        return [
            _Mark(trial_id, number, TrialState(state), key, json.loads(value))
            for trial_id, number, state, key, value in conn.execute(_marks_query(study, keys))
        ]


def started_trial_count(study: optuna.Study) -> int:
    """The study's trials but the queued (WAITING) ones; in a database counted there, without loading a trial (a
    study of thousands takes seconds to load, and a worker's start would wait on it)."""
    backend = _rdb_backend(study._storage)
    if backend is None:
        return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING)
    from optuna.storages._rdb.models import TrialModel
    from sqlalchemy import func, select

    query = (
        select(func.count())
        .select_from(TrialModel)
        .where(TrialModel.study_id == study._study_id, TrialModel.state != TrialState.WAITING)
    )
    with backend.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def finished_trials_marked(study: optuna.Study, key: str) -> list[FrozenTrial]:
    """The study's finished trials that hold user attribute ``key``; in a database found there, loading only them."""
    backend = _rdb_backend(study._storage)
    if backend is None:
        return [t for t in study.get_trials(deepcopy=False, states=FINISHED_STATES) if key in t.user_attrs]
    with backend.engine.connect() as conn:
        rows = conn.execute(_marks_query(study, (key,))).all()
    found = [study._storage.get_trial(row.trial_id) for row in rows if TrialState(row.state) in FINISHED_STATES]
    return sorted(found, key=lambda trial: trial.number)


def settled_by_server_clock(study: optuna.Study, numbers: set[int], seconds: float) -> set[int] | None:
    """Of these finished trials, those whose last heartbeat is over ``seconds`` old by the database server's clock
    (PostgreSQL; a trial's end follows its last heartbeat within one interval). None elsewhere: there only the
    workers' clocks say when a trial ended."""
    backend = _rdb_backend(study._storage)
    if backend is None or backend.engine.dialect.name != "postgresql":
        return None
    from optuna.storages._rdb.models import TrialHeartbeatModel, TrialModel
    from sqlalchemy import bindparam, select, text

    # Compared in the database, as Optuna compares heartbeats: LOCALTIMESTAMP is its now() in the session's time
    # zone, the one the heartbeats were stored in.
    old_enough = text("trial_heartbeats.heartbeat < LOCALTIMESTAMP - make_interval(secs => :seconds)").bindparams(
        bindparam("seconds", float(seconds))
    )
    query = (
        select(TrialModel.number)
        .join(TrialHeartbeatModel, TrialHeartbeatModel.trial_id == TrialModel.trial_id)
        .where(
            TrialModel.study_id == study._study_id,
            TrialModel.number.in_(sorted(numbers)),
            TrialModel.state.in_(FINISHED_STATES),
            old_enough,
        )
    )
    with backend.engine.connect() as conn:
        return set(conn.scalars(query))


def _marks_query(study: optuna.Study, keys: Sequence[str]) -> Any:
    """Rows (trial id, number, state, key, value as JSON) of the study's user attributes with these keys."""
    from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel
    from sqlalchemy import select

    return (
        select(
            TrialModel.trial_id,
            TrialModel.number,
            TrialModel.state,
            TrialUserAttributeModel.key,
            TrialUserAttributeModel.value_json,
        )
        .join(TrialModel, TrialModel.trial_id == TrialUserAttributeModel.trial_id)
        .where(TrialModel.study_id == study._study_id, TrialUserAttributeModel.key.in_(keys))
    )


@dataclass(frozen=True)
class Losses:
    """Failed trials that were lost (their worker died, was stopped or lost the database) rather than failed by
    their training: how many, how many of them are queued again (or ran again), how many held no slot."""

    lost: int
    queued_again: int
    surplus: int


def losses(study: optuna.Study) -> Losses:
    """How many of the study's failed trials were lost; in a database counted there, without loading the trials."""
    marks = _marks(study)
    retried = {int(m.value) for m in marks if m.key == RETRY_OF}
    # Trials of studies made before the lost mark count by their retry.
    lost = ({m.number for m in marks if m.key in (LOST, SURPLUS)} | retried) & _failed_numbers(study)
    return Losses(
        lost=len(lost),
        queued_again=len(retried & lost),
        surplus=len({m.number for m in marks if m.key == SURPLUS} & lost),
    )


def _failed_numbers(study: optuna.Study) -> set[int]:
    backend = _rdb_backend(study._storage)
    if backend is None:
        return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    from optuna.storages._rdb.models import TrialModel
    from sqlalchemy import select

    query = select(TrialModel.number).where(TrialModel.study_id == study._study_id, TrialModel.state == TrialState.FAIL)
    with backend.engine.connect() as conn:
        return set(conn.scalars(query))


def retry_lost_trials(study: optuna.Study, max_retries: int, total: int | None = None) -> list[int]:
    """Queue a retry for each lost trial (:data:`LOST`, failed) that has none, nor is surplus or out of retries;
    returns their numbers.

    A lost trial is failed and then queued again, in two writes. A worker killed between them (kill -9, a machine
    gone) leaves it failed with no retry, and the study one trial short of ``n_trials`` good ones; the next worker
    to look finds it here. In a database study (the only kind several workers share).
    """
    if _rdb_backend(study._storage) is None:
        return []
    marks = _marks(study)
    passed_over = {int(m.value) for m in marks if m.key == RETRY_OF} | {m.number for m in marks if m.key == SURPLUS}
    unretried = sorted(
        {
            (m.number, m.trial_id)
            for m in marks
            if m.key == LOST and m.state == TrialState.FAIL and m.number not in passed_over
        }
    )
    queued = []
    for number, trial_id in unretried:
        trial = study._storage.get_trial(trial_id)
        if int(trial.user_attrs.get(RETRY_COUNT, 0)) >= max_retries:
            continue  # its last failure was reported when it happened
        log.warning("lost trial %d was failed but never queued again (its worker died): queued now", number)
        if enqueue_retry(study, trial, max_retries, total):
            queued.append(number)
    return queued


def _fail_once(storage: optuna.storages.BaseStorage, trial_id: int) -> Callable[[], bool]:
    """Fail the trial; whether this caller failed it. A finished trial was finished by someone else, unless an
    earlier attempt of this caller, whose reply a restart lost, committed."""
    attempts = 0

    def fail() -> bool:
        nonlocal attempts
        attempts += 1
        try:
            return storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return attempts > 1

    return fail


def stale_trial_handler(
    tracker: Tracker, max_retries: int, lost: str, total: int | None = None
) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Called for each trial failed because its worker is gone (``lost`` says how that was found): close its
    MLflow run KILLED, queue the retry."""

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        tracker.close_lost_run(
            trial.user_attrs.get("mlflow_run_id"),
            f"worker lost: {lost}; retried with the same params",
            study.study_name,
            trial.number,
        )
        # Retried here: the trial is already FAIL, so a caller's retry would not find it again to queue it.
        retrying(lambda: enqueue_retry(study, trial, max_retries, total), what=f"queue lost trial {trial.number} again")

    return on_stale


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds from a daemon thread.

    The same thread looks for other workers' lost trials every ``check_every`` seconds, so a dead worker's
    trial is failed and retried within about the grace period even while every live worker is mid-trial.
    """

    def __init__(self, study: optuna.Study, trial_id: int, interval: int, check_every: float) -> None:
        self._study = study
        self._storage = study._storage
        self._trial_id = trial_id
        self._interval = interval
        self._check_every = check_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        last_check = time.monotonic()
        # The first beat was recorded as the trial was taken (_take_trials): the next is due an interval later.
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]
                if time.monotonic() - last_check >= self._check_every:
                    last_check = time.monotonic()
                    with _quiet_optuna():
                        fail_stale_trials(self._study)
            except Exception as exc:  # a missed beat is retried on the next tick; the grace period absorbs it
                log.warning("heartbeat of trial %d failed: %s", self._trial_id, exc)

    def __enter__(self) -> Heartbeat:
        if self._interval:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def heartbeat_settings(study: optuna.Study) -> tuple[int, float]:
    """(heartbeat interval, grace period) in seconds; interval 0 when the storage keeps no heartbeats."""
    backend = _rdb_backend(study._storage)
    interval = backend.get_heartbeat_interval() if backend is not None else None
    if not interval:
        return 0, 0.0
    grace = getattr(backend, "grace_period", None) or 2 * interval
    return int(interval), float(grace)


_terminated = threading.Event()
_held = threading.Event()


@contextmanager
def sigterm_held() -> Iterator[None]:
    """Within the block SIGTERM is only remembered (:func:`check_terminated` raises it after): for the writes
    that record a finished trial, which a stop between them would leave half done. Only the main thread is
    interrupted by the signal, so elsewhere (a pack's settling threads) there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread() or _held.is_set():
        yield
        return
    try:
        _held.set()
        yield
    finally:
        _held.clear()


def check_terminated() -> None:
    """Raise :class:`Terminated` when SIGTERM arrived, even if the exception raised at the time was lost."""
    if _terminated.is_set():
        raise Terminated(f"signal {signal.SIGTERM.value}")


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread, so the running trial is closed properly.

    The signal is also remembered: Python drops an exception raised while it runs a finaliser (a database
    connection collected mid-step, say), so :func:`check_terminated` raises it again at the next epoch's end and
    before the next trial is taken.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _terminated.clear()

    def handler(signum: int, frame: object) -> None:
        _terminated.set()
        if not _held.is_set():
            raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class WorkResult:
    ran: int
    finished_study: bool


@runtime_checkable
class PackObjective(Protocol):
    """An objective that can run several trials at once (see :meth:`tuner.study.Objective.run_pack`)."""

    def __call__(self, trial: optuna.Trial) -> float | Sequence[float]: ...

    def run_pack(
        self,
        trials: Sequence[optuna.Trial],
        on_settled: Callable[[int, float | list[float] | Exception], None] | None = None,
    ) -> Sequence[float | Sequence[float] | Exception]: ...


def work(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float | Sequence[float]] | PackObjective,
    *,
    total: int,
    timeout: float | None = None,
    max_retries: int = 3,
    poll_interval: float = 1.0,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    pack: int = 1,
) -> WorkResult:
    """Take trials until the study holds ``total`` finished trials (counting every worker's), then return.

    Args:
        study: The shared study.
        objective: Called with each trial; raises ``optuna.TrialPruned`` or :class:`TrialFailed` to end it so.
        total: The study's ``n_trials``.
        timeout: Stop taking new trials after this many seconds.
        max_retries: How often a trial lost to a dead worker or a signal is queued again.
        poll_interval: Seconds between looks at the study while other workers hold the last slots.
        callbacks: Called after each trial this worker finishes.
        pack: Take up to this many trials at a time and hand them to ``objective.run_pack`` together (each
            counts towards the budget when taken, so the total stays exact).

    Returns:
        How many trials this worker finished, and whether the study is complete.
    """
    started = time.monotonic()
    ran = 0
    _, grace = heartbeat_settings(study)
    unstarted_since: dict[int, float] = {}
    with terminate_on_sigterm():
        while True:
            check_terminated()
            if timeout is not None and time.monotonic() - started > timeout:
                break
            with _quiet_optuna():
                retrying(lambda: fail_stale_trials(study), what="check for lost trials")
                taken = retrying(lambda: _take_trials(study, total, pack), what="take trials")
            if not taken:
                # Before the study counts as done: a lost trial left without a retry frees its slot once queued.
                if retrying(lambda: retry_lost_trials(study, max_retries, total), what="check for lost trials"):
                    continue
                state = retrying(lambda: budget(study, total), what="count trials")
                if state.done or state.running == 0:
                    break
                retrying(lambda: fail_unstarted_trials(study, unstarted_since, grace), what="check for lost trials")
                # Other workers hold the last slots; one may die and its retry need a taker.
                time.sleep(poll_interval)
                continue
            # The trials told so far: a stop (Ctrl-C, SIGTERM) still reports those finished before it.
            finished: list[FrozenTrial] = []
            try:
                if pack > 1 and isinstance(objective, PackObjective):
                    _run_pack(study, taken, objective, max_retries, total, finished)
                else:
                    for trial in taken:
                        _run_one(study, trial, objective, max_retries, total, finished)
            except (KeyboardInterrupt, Terminated):
                # One attempt each: retrying through a storage outage here could outlast the stop's grace period.
                for frozen in finished:
                    for callback in callbacks:
                        with suppress(Exception):
                            callback(study, frozen)
                raise
            ran += len(finished)
            for frozen in finished:
                for callback in callbacks:
                    # Callbacks read the study (the best value so far): a restart then must not end the worker.
                    retrying(functools.partial(callback, study, frozen), what=f"report trial {frozen.number}")
    return WorkResult(ran=ran, finished_study=retrying(lambda: budget(study, total), what="count trials").done)


def _take_trials(study: optuna.Study, total: int, most: int) -> list[optuna.Trial]:
    """Up to ``most`` trials, as many as the budget has slots for, under one hold of the budget lock: a pack's
    trials taken one by one made the other workers wait for the lock once per trial. Workers waiting for the
    lock meanwhile get their share of the free slots: a worker does not take them all while others stand idle."""
    with budget_lock(study):
        state = budget(study, total)
        free = state.total - state.used - state.running
        if min(most, free) > 1:
            most = min(most, math.ceil(free / (1 + workers_waiting(study))))
        trials = [_ask(study) for _ in range(min(most, free))]
        # Beating at once tells other workers they are taken (see fail_unstarted_trials), before the slow start-up.
        if trials and heartbeat_settings(study)[0]:
            record_heartbeats(study._storage, [trial._trial_id for trial in trials])
        return trials


def _ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``: the first queued trial, else a new one. To find the queued trials Optuna's ask reads every
    unfinished trial back with its parameters and attributes (50 ms a trial taken on a busy server, with a pack's
    trials queued); in a database study their ids are read here instead, and the rest is what Optuna's ask does."""
    backend = _rdb_backend(study._storage)
    if backend is None:
        return study.ask()
    from optuna.storages._rdb.models import TrialModel
    from sqlalchemy import select

    queued = (
        select(TrialModel.trial_id)
        .where(TrialModel.study_id == study._study_id, TrialModel.state == TrialState.WAITING)
        .order_by(TrialModel.number)
    )
    study._thread_local.cached_all_trials = None  # as ask does: the sampler reads the study afresh for each trial
    with backend.engine.connect() as conn:
        candidates = list(conn.scalars(queued))
    for trial_id in candidates:
        try:
            # False, or UpdateFinishedTrialError, when another worker took it first.
            if study._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                trial = optuna.Trial(study, trial_id)
                _cache_taken_trial(study, trial)
                return trial
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


def _cache_taken_trial(study: optuna.Study, trial: optuna.Trial) -> None:
    """Enter a trial taken from the queue in Optuna's storage cache, as its ``create_new_trial`` does for a trial
    it makes: the cache's ``set_trial_param`` looks the trial up there (Optuna's ask enters it by reading the
    study)."""
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo

    storage = study._storage
    if not isinstance(storage, _CachedStorage):
        return
    frozen = copy.deepcopy(trial._cached_frozen_trial)  # the trial object's own copy changes as it runs
    with storage._lock:
        storage._studies.setdefault(study._study_id, _StudyInfo())
        storage._add_trials_to_cache(study._study_id, [frozen])


def record_heartbeats(storage: optuna.storages.BaseStorage, trial_ids: Sequence[int]) -> None:
    """Record a heartbeat for each trial: in one statement in a SQLite or PostgreSQL study (Optuna's
    ``record_heartbeat`` is a transaction per trial), else one by one."""
    backend = _batched_backend(storage)
    if backend is None:
        for trial_id in trial_ids:
            storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        return
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from sqlalchemy import func

    insert = _upsert_insert(backend)
    # The database's clock, as Optuna's own beats and its stale check use.
    beats = insert(TrialHeartbeatModel).values(
        [{"trial_id": trial_id, "heartbeat": func.current_timestamp()} for trial_id in trial_ids]
    )
    upsert = beats.on_conflict_do_update(
        index_elements=[TrialHeartbeatModel.trial_id], set_={"heartbeat": beats.excluded.heartbeat}
    )
    with backend.engine.begin() as conn:
        conn.execute(upsert)


def _run_one(
    study: optuna.Study,
    trial: optuna.Trial,
    objective: Callable[[optuna.Trial], float | Sequence[float]],
    max_retries: int,
    total: int,
    finished: list[FrozenTrial],
) -> None:
    """Run one trial and tell Optuna how it ended; the told trial is appended to ``finished``."""
    interval, grace = heartbeat_settings(study)
    value: float | Sequence[float] | None = None
    try:
        with Heartbeat(study, trial._trial_id, interval, check_every=grace / 2):
            value = objective(trial)
    except optuna.TrialPruned:
        finished.append(_tell(study, trial, state=TrialState.PRUNED))
        return
    except TrialFailed as exc:
        log.info("trial %d failed: %s", trial.number, exc)
        finished.append(_tell(study, trial, state=TrialState.FAIL))
        return
    except (KeyboardInterrupt, Terminated):
        if value is not None:
            # The stop came as the heartbeat ended, after the trial had finished and its run was closed
            # FINISHED: it is recorded as what it is, not failed and run again.
            with sigterm_held():
                finished.append(_tell(study, trial, values=value))
            raise
        _fail_and_retry(study, trial, max_retries, total, INTERRUPTED)
        raise
    except Exception as exc:
        if not is_transient(exc):
            _tell(study, trial, state=TrialState.FAIL)
            raise
        # The database went away mid-trial (a restart): the trial is lost, not wrong; run it again.
        log.warning("trial %d lost to a storage error, queued again: %s", trial.number, exc)
        finished.append(_fail_and_retry(study, trial, max_retries, total, LOST_TO_STORAGE))
        return
    # A SIGTERM now would leave the finished trial RUNNING, its run FINISHED: it waits until the trial is told.
    with sigterm_held():
        finished.append(_tell(study, trial, values=value))
    check_terminated()


def _run_pack(
    study: optuna.Study,
    trials: list[optuna.Trial],
    objective: PackObjective,
    max_retries: int,
    total: int,
    finished: list[FrozenTrial],
) -> None:
    """Run trials as packs and tell Optuna how each ended; each told trial is appended to ``finished``."""
    interval, grace = heartbeat_settings(study)
    # Each trial is told as soon as its pack member leaves (see Objective.run_pack), not when the pack ends: the
    # pruner and the sampler see it at once, and it no longer shows RUNNING.
    told: dict[int, FrozenTrial] = {}
    # Outcomes handed over whose telling a stop cut short: the trial's run is closed, so it is told after all.
    settled: dict[int, float | Sequence[float] | Exception] = {}

    def record(index: int, frozen: FrozenTrial) -> None:
        told[index] = frozen
        finished.append(frozen)

    def tell(index: int, outcome: float | Sequence[float] | Exception) -> None:
        settled[index] = outcome
        # As in a trial run alone: a SIGTERM waits until the trial is told, then stops the pack.
        with sigterm_held():
            if isinstance(outcome, TrialLost):
                log.warning("trial %d lost to a storage error, queued again: %s", trials[index].number, outcome)
                record(index, _fail_and_retry(study, trials[index], max_retries, total, LOST_TO_STORAGE))
            else:
                record(index, _tell_outcome(study, trials[index], outcome))
        if threading.current_thread() is threading.main_thread():
            check_terminated()

    def unsettled() -> list[optuna.Trial]:
        return [t for i, t in enumerate(trials) if i not in told]

    try:
        with ExitStack() as beats:
            for i, trial in enumerate(trials):
                # One thread per trial keeps its heartbeat; the first also looks for other workers' lost trials.
                check_every = grace / 2 if i == 0 else math.inf
                beats.enter_context(Heartbeat(study, trial._trial_id, interval, check_every=check_every))
            outcomes = objective.run_pack(trials, on_settled=tell)
            # An objective that settles its trials only at the end: each is settled, to be told even after a stop.
            settled.update((i, outcome) for i, outcome in enumerate(outcomes) if i not in settled)
            for i, outcome in enumerate(outcomes):
                if i not in told:
                    tell(i, outcome)
    except (KeyboardInterrupt, Terminated):
        with sigterm_held():
            for index, outcome in settled.items():
                if index not in told and not isinstance(outcome, TrialLost):
                    record(index, _tell_outcome(study, trials[index], outcome))
            for trial in unsettled():
                _fail_and_retry(study, trial, max_retries, total, INTERRUPTED)
        raise
    except Exception as exc:
        transient = is_transient(exc)
        lost = unsettled()
        for trial in lost:
            if transient:
                finished.append(_fail_and_retry(study, trial, max_retries, total, LOST_TO_STORAGE))
            else:
                finished.append(_tell(study, trial, state=TrialState.FAIL))
        if not transient:
            raise
        log.warning("trials %s lost to a storage error, queued again: %s", [t.number for t in lost], exc)


def _tell_outcome(
    study: optuna.Study, trial: optuna.Trial, outcome: float | Sequence[float] | Exception
) -> FrozenTrial:
    if isinstance(outcome, optuna.TrialPruned):
        return _tell(study, trial, state=TrialState.PRUNED)
    if isinstance(outcome, Exception):
        log.info("trial %d failed: %s", trial.number, outcome)
        return _tell(study, trial, state=TrialState.FAIL)
    return _tell(study, trial, values=outcome)


#: What a stop (Ctrl-C, SIGTERM) did to the trials it cut short, in this process: (trial number, queued again).
#: Filled only once each trial's FAIL and retry are stored, so that what the CLI reports has happened.
CUT_SHORT: list[tuple[int, bool]] = []


def _fail_and_retry(study: optuna.Study, trial: optuna.Trial, max_retries: int, total: int, why: str) -> FrozenTrial:
    # A trial finished meanwhile (an attempt whose reply a restart lost, another worker's stale check) is left as
    # it is: the FAIL that follows skips it as well.
    retrying(_mark_lost_once(trial.storage, trial._trial_id, why), what=f"mark lost trial {trial.number}")
    frozen = _tell(study, trial, state=TrialState.FAIL)
    queued = retrying(
        lambda: enqueue_retry(study, frozen, max_retries, total, counted=why != INTERRUPTED),
        what=f"queue lost trial {trial.number} again",
    )
    if why == INTERRUPTED:
        CUT_SHORT.append((trial.number, queued))
    return frozen


def interrupted_summary() -> str:
    """What the stop did to the running trials, for the CLI's last line."""
    if not CUT_SHORT:
        return "no trial was cut short"
    queued = [n for n, again in CUT_SHORT if again]
    not_queued = [n for n, again in CUT_SHORT if not again]
    parts = []
    if queued:
        parts.append(f"trial(s) {', '.join(map(str, queued))} recorded FAIL and queued again")
    if not_queued:
        parts.append(f"trial(s) {', '.join(map(str, not_queued))} recorded FAIL, not queued again (see above)")
    return "; ".join(parts)


def _tell(
    study: optuna.Study,
    trial: optuna.Trial,
    *,
    state: TrialState | None = None,
    values: float | Sequence[float] | None = None,
) -> FrozenTrial:
    # values: one float, or a list with one value per objective in a multi-objective study.
    # skip_if_finished: after a reconnect the first attempt may have committed already.
    return retrying(lambda: _tell_once(study, trial, state, values), what=f"record trial {trial.number}")


def _tell_once(
    study: optuna.Study, trial: optuna.Trial, state: TrialState | None, values: float | Sequence[float] | None
) -> FrozenTrial:
    """``study.tell`` without its last step, which reads the whole trial back from the storage (six statements,
    a tenth of a trial's on a busy server) to return it: the trial object's own copy holds the same."""
    from optuna.study._tell import _tell_with_warning

    told_state, told_values, _ = _tell_with_warning(study, trial, values, state, skip_if_finished=True)
    frozen = copy.deepcopy(trial._cached_frozen_trial)
    frozen.state = told_state
    frozen.values = told_values
    frozen.datetime_complete = datetime.datetime.now()
    return frozen
