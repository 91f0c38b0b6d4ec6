"""Experiment tracking. The one module that imports mlflow.

One parent run per study and one child run per trial, through ``MlflowClient`` with explicit run ids (the fluent
``mlflow.start_run`` is process-global state that breaks with threads and worker processes). Per-epoch metrics
are buffered and sent with ``log_batch``: one call per trial instead of one per value. Every write of a trial's
run, its creation included, is a job that goes out while trials train; the study knows the run by a key until
the run's id comes back (:data:`RUNS`), and records the id with the trial when the trial ends:

- with a local store (an SQLite file, a folder) in a writer process (:class:`ProcessWriter`), one per Python
  process, shared by its trackers: there the writes cost CPU, which a second thread would take from the training
  under the interpreter lock, and a second process takes from a free core;
- with a store across the network (a tracking server, a database server) on a background thread: they wait on
  the network, not on the CPU.

:meth:`MlflowTracker.drain` waits for them, and a study calls it before it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

from tuner.errors import TrackingError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Optuna trial state -> MLflow run status.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}

# log_batch accepts at most 1000 metrics per call.
_BATCH_LIMIT = 1000

#: Closing writes that may wait for the background writer before a trial's end waits for room: a bound on the
#: memory they hold (their files) and on what a stalled tracking server leaves unsent.
WRITE_QUEUE_LIMIT = 16

#: Tag of a run :meth:`MlflowTracker.create_run_left_out` has begun and not finished: the next repair deletes it
#: and makes it again.
REBUILDING = "tuner.rebuilding"


@dataclass(frozen=True)
class RunRecord:
    """A finished trial's run as the study can rebuild it after the fact (:meth:`Tracker.create_run_left_out`)."""

    params: dict[str, Any]
    tags: dict[str, str]
    curves: dict[str, dict[int, float]]  # metric name -> epoch -> value
    metrics: dict[str, float]  # final figures, logged at ``last_step`` as a trial's end logs them
    last_step: int  # the trial's last epoch
    state: str  # the trial's Optuna state
    started_ms: int
    ended_ms: int
    artifacts: dict[str, str | bytes]


def mask_password(url: str) -> str:
    """The URL with any password replaced by ``***``, for messages and tags."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Tracker(Protocol):
    """Where a study's runs are recorded; :class:`MlflowTracker` or :class:`NullTracker`."""

    #: Whether ``end_trial`` may be called from several threads at once.
    closes_from_threads: bool

    def start_study(
        self, study_name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None
    ) -> str | None:
        """Open (or reopen, given ``run_id``) the study's parent run; return its id."""
        ...

    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Open a child run for a trial (perhaps later, in the background); return the key the other calls take."""
        ...

    def run_id(self, run_key: str | None) -> str | None:
        """The id of the run opened as ``run_key``, waiting for its creation; None when it could not be created."""
        ...

    def log_epoch(self, run_key: str | None, epoch: int, metrics: dict[str, float]) -> None:
        """Buffer one epoch's metrics."""
        ...

    def end_trial(
        self,
        run_key: str | None,
        state: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, str | bytes],
        build_artifacts: Callable[[], dict[str, str | bytes]] | None = None,
    ) -> None:
        """Flush the buffer, log final metrics, tags and artifacts (path -> text or bytes), close with the status.

        ``build_artifacts`` makes more artifacts (the trial's plots); a tracker may call it later, on another
        thread or, pickled, in its writer process (:func:`call_by_name` makes such a call), so it must only read
        what no longer changes. One that cannot be pickled is called in this process."""
        ...

    def close_lost_run(self, run_id: str | None, reason: str, study_name: str, trial_number: int) -> None:
        """Close the run of a trial whose worker died: KILLED, with the reason as ``stop_reason``. Without
        ``run_id`` (the worker died before the trial's end recorded it) the run is found by its trial's tags."""
        ...

    def open_trial_runs(self, study_name: str) -> dict[int, str]:
        """The trial runs under the study's parent run that are still RUNNING, by trial number: each one's id."""
        ...

    def close_run_left_open(self, run_id: str, state: str, metrics: dict[str, float], reason: str) -> bool:
        """Close a finished trial's run whose end was never recorded (the store was unreachable then): with the
        status of the trial's Optuna ``state``, the ``metrics`` Optuna holds, and ``reason`` as a tag. Return
        whether it was closed (a failure is warned)."""
        ...

    def trial_runs(self, study_name: str) -> dict[int, tuple[str, bool]] | None:
        """The trial runs under the study's parent run, whatever their status, by trial number: each one's id and
        whether it is whole (not one :meth:`create_run_left_out` left half made); None when the store could not
        be searched."""
        ...

    def epoch_metrics(self, run_key: str | None) -> dict[str, dict[int, float]]:
        """The per-epoch metrics buffered for the run so far: name -> epoch -> value."""
        ...

    def create_run_left_out(self, number: int, run: RunRecord) -> str | None:
        """Create, whole and closed, the run of a finished trial whose run could not be created as it started;
        return its id, or None (warned) when the store failed. A run left half made keeps the tag
        :data:`REBUILDING`."""
        ...

    def discard_run(self, run_id: str) -> bool:
        """Delete a run (one left half made); return whether it was deleted (a failure is warned)."""
        ...

    def drain(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the writes still being sent; return how
        many are left unsent."""
        ...

    def end_study(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        """Log the study's summary metrics and close the parent run. It neither waits for the trials' writes nor
        depends on them: a stopped study drains them first, with a bound, a finished one after."""
        ...

    def ui_hint(self) -> str:
        """How a person opens the result."""
        ...


class NullTracker:
    """Tracks nothing; for tests and ``tracking.enabled: false``."""

    closes_from_threads = True

    def start_study(
        self, study_name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None
    ) -> str | None:
        return None

    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        return None

    def run_id(self, run_key: str | None) -> str | None:
        return None

    def log_epoch(self, run_key: str | None, epoch: int, metrics: dict[str, float]) -> None:
        return None

    def end_trial(
        self,
        run_key: str | None,
        state: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, str | bytes],
        build_artifacts: Callable[[], dict[str, str | bytes]] | None = None,
    ) -> None:
        return None

    def close_lost_run(self, run_id: str | None, reason: str, study_name: str, trial_number: int) -> None:
        return None

    def open_trial_runs(self, study_name: str) -> dict[int, str]:
        return {}

    def close_run_left_open(self, run_id: str, state: str, metrics: dict[str, float], reason: str) -> bool:
        return False

    def trial_runs(self, study_name: str) -> dict[int, tuple[str, bool]] | None:
        return None

    def epoch_metrics(self, run_key: str | None) -> dict[str, dict[int, float]]:
        return {}

    def create_run_left_out(self, number: int, run: RunRecord) -> str | None:
        return None

    def discard_run(self, run_id: str) -> bool:
        return False

    def drain(self, timeout: float | None = None) -> int:
        return 0

    def end_study(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        return None

    def ui_hint(self) -> str:
        return "tracking is disabled (tracking.enabled: false)"


def _local_sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    return None


#: MLflow's HTTP retries unless the user sets them: 3 retries 0, 2 and 4 s apart, 30 s a request. MLflow's own
#: (7 retries, back-off factor 2, 120 s) hold each request for about 4 minutes once a tracking server is gone:
#: every trial's end then waited that long for its run, and a stopped worker outlived its 60 s grace period.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _set_http_defaults() -> None:
    """Apply :data:`MLFLOW_HTTP_DEFAULTS` where the user set none (MLflow reads them at each request)."""
    for name, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


# How long a tracking server may take to accept a connection before a study refuses to start: MLflow's own
# requests retry with back-off for minutes, which is right mid-study but leaves a mistyped URI silent that long.
SERVER_CONNECT_TIMEOUT_S = 5.0


#: The port a tracking store's server listens on when its URI names none, by scheme (``postgresql+psycopg`` counts
#: as ``postgresql``).
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _check_server_reachable(uri: str) -> None:
    """Raise OSError at once when the server of an http(s) or database tracking URI does not accept a connection
    (MLflow retries either for minutes: its HTTP requests, and its database engine's creation)."""
    import socket

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]
    query = parse_qs(parts.query)
    if scheme not in DEFAULT_PORTS or not parts.hostname or "unix_socket" in query or "host" in query:
        return  # a local file, or a database reached through a socket file (the URL's host is then not used)
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:  # a port that is not a number from 0 to 65535
        raise OSError(str(exc)) from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=SERVER_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        hint = (
            "start one with `tuner ui` or `mlflow server`, or track to a local file (--tracking-uri "
            "sqlite:///mlruns/mlflow.db)"
            if scheme in ("http", "https")
            else "check that the database server runs and the URI's host and port"
        )
        raise OSError(f"no server accepts connections at {parts.hostname}:{port} ({reason}); {hint}") from None
    if scheme in ("http", "https"):
        return
    # The server is there; one connection tells whether it takes the URL's database, user and password, which
    # MLflow would otherwise try again for two minutes before a traceback.
    import sqlalchemy

    from tuner.errors import PERMANENT_MARKERS

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as exc:
        first = str(exc.orig or exc).strip().splitlines()
        if any(marker in str(exc).lower() for marker in PERMANENT_MARKERS):
            raise OSError(first[-1].strip() if first else str(exc)) from None
    finally:
        engine.dispose()


def _check_store(tracking_uri: str) -> None:
    """Refuse at once a store MLflow could not open, before MLflow retries it for minutes: a local SQLite path
    that is a folder or another kind of file, or a tracking server that accepts no connection.

    Raises:
        TrackingError: Naming the URI and why.
    """
    from tuner.paths import OPTUNA_TABLES, not_an_sqlite_file, sqlite_tables

    problem = None
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///") :])
        problem = not_an_sqlite_file(path)
        if not problem and sqlite_tables(path) >= OPTUNA_TABLES:
            problem = f"{path} holds Optuna studies (a study's storage); give MLflow a file of its own"
    else:
        try:
            _check_server_reachable(tracking_uri)
        except OSError as exc:
            problem = str(exc)
    if problem:
        raise TrackingError(f"tracking.uri: cannot use MLflow store {mask_password(tracking_uri)}: {problem}")


def mlflow_client(tracking_uri: str, *, registry: bool = False, checked: bool = False) -> Any:
    """The one way this module makes an ``MlflowClient``: with tuner's HTTP retry defaults (MLflow's own hold a
    request for minutes once a server is gone) and only for a store that can be opened (:func:`_check_store`).
    ``registry``: the model registry is the tracking store too (SQLite, PostgreSQL or a server). ``checked``: the
    caller ran :func:`_check_store` already (a connection to the server, or a read of the file, each time)."""
    _set_http_defaults()
    if not checked:
        _check_store(tracking_uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri if registry else None)


def _check_artifact_dir(location: str | None, what: str) -> None:
    """Refuse a local artifact folder that cannot be made before the study starts: its artifacts would be lost,
    each with a warning. Not local (a server's store, a bucket) or MLflow's default: nothing to check here."""
    from urllib.parse import unquote

    from tuner.paths import cannot_create

    if not location:
        return
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        _check_artifact_repository(location, what)
        return
    path = Path(unquote(parts.path)) if parts.scheme == "file" else Path(location)
    problem = cannot_create(path / "run")
    if problem:
        raise TrackingError(f"{what}: artifacts cannot be written under {path}: {problem}")


#: The package each remote artifact store needs, which MLflow imports only when the first artifact is written.
ARTIFACT_STORE_PACKAGES = {
    "s3": "boto3",
    "gs": "google.cloud.storage",
    "wasbs": "azure.storage.blob",
    "abfss": "azure.storage.filedatalake",
    "sftp": "paramiko",
    "hdfs": "pyarrow",
    "viewfs": "pyarrow",
}
#: Artifact URIs that only a server or a platform resolves: nothing to check here.
SERVER_RESOLVED_SCHEMES = ("mlflow-artifacts", "runs", "models", "dbfs")


def _check_artifact_repository(location: str, what: str) -> None:
    """Refuse an artifact store MLflow cannot write to before the study starts: an unknown scheme, or one whose
    package is not installed. Both would otherwise fail at each trial's first artifact, every model file lost."""
    import importlib.util

    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    scheme = urlsplit(location).scheme
    if scheme in SERVER_RESOLVED_SCHEMES:
        return
    package = ARTIFACT_STORE_PACKAGES.get(scheme)
    try:
        missing = package is not None and importlib.util.find_spec(package) is None
    except ModuleNotFoundError:  # a parent package (google.cloud, azure.storage) is missing
        missing = True
    if missing:
        raise TrackingError(
            f"{what}: {location} needs the Python package {package!r}, which is not installed; install it "
            "(pip install), or keep artifacts in a local folder or on a tracking server"
        )
    try:
        get_artifact_repository(location)
    except (MlflowException, ImportError) as exc:
        raise TrackingError(f"{what}: MLflow cannot write artifacts to {location}: {exc}") from None


def _write_ahead_log(path: Path) -> None:
    """Switch an SQLite MLflow store (created empty when missing) to write-ahead logging: one disk sync per
    commit instead of several. The mode stays with the file; a file that cannot switch stays as it was."""
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(path, timeout=30)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        log.warning("could not switch %s to write-ahead logging: %s", path, exc)


#: How a tracker's writes go out (``tracking.writes``, ``auto`` resolved by :func:`writes_for`).
Writes = Literal["process", "background", "inline"]

#: A write: given the store's ``MlflowClient``, it writes and returns what failed, as (what, error) pairs; it
#: may also raise. Picklable (a ``functools.partial`` of a module-level function) to run in the writer process.
Job = Callable[[Any], list[tuple[str, str]]]


@dataclass(frozen=True)
class CreatedRun:
    """A trial run a job created: its key (from :meth:`MlflowTracker.start_trial`), id and artifact URI; the id
    and URI are None when the store refused it."""

    key: str
    run_id: str | None
    artifact_uri: str | None


class RunIds:
    """The trial runs created by this process's jobs, or by its writer process (as it answered), by key.

    In the writer process the jobs created since its last answer are also kept, to be answered (``take_new``).
    """

    def __init__(self) -> None:
        self._found: dict[str, CreatedRun] = {}
        self._changed = threading.Condition()
        self.answering = False  # set in the writer process
        self._new: list[CreatedRun] = []

    def record(self, created: CreatedRun) -> None:
        with self._changed:
            self._found[created.key] = created
            if self.answering:
                self._new.append(created)
            self._changed.notify_all()

    def wait(self, key: str, timeout: float | None = None) -> CreatedRun | None:
        """The run of ``key`` once its creation has run (None after ``timeout`` seconds)."""
        with self._changed:
            self._changed.wait_for(lambda: key in self._found, timeout)
            return self._found.get(key)

    def take(self, key: str) -> CreatedRun | None:
        """The run of ``key``, if its creation has run, no longer kept here (its close carries it)."""
        with self._changed:
            return self._found.pop(key, None)

    def take_new(self) -> list[CreatedRun]:
        with self._changed:
            new, self._new = self._new, []
            return new


#: This process's trial runs by key.
RUNS = RunIds()


def writes_for(tracking_uri: str, writes: Writes | Literal["auto"] = "auto") -> Writes:
    """``writes``, or for ``auto`` how a store's writes go out: on a background thread across the network; for a
    local store in a writer process on a machine (or CPU affinity) of more than one core, else in line."""
    if writes != "auto":
        return writes
    if "://" in tracking_uri and not tracking_uri.startswith(("sqlite:", "file:")):
        return "background"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return "process" if cores > 1 else "inline"


def _run_job(what: str, job: Job, client: Any, on_error: Callable[[str, str], None]) -> None:
    try:
        failures = job(client)
    except Exception as exc:  # a defect in one job must not stop the writes after it
        failures = [(what, str(exc))]
    for failed, error in failures:
        on_error(failed, error)


class _JobQueue(Generic[T]):
    """Jobs in the order they run: those put ``first`` ahead of the others, each kind in the order put.

    A trial's run is created before the closing writes queued ahead of it (each job of a run is queued after its
    creation, so each run's own writes keep their order): the trial's end waits for that creation.
    """

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._n_first = 0  # the items at the front that were put first

    def put(self, item: T, first: bool) -> None:
        if first:
            self._items.insert(self._n_first, item)
            self._n_first += 1
        else:
            self._items.append(item)

    def pop(self) -> T:
        self._n_first = max(self._n_first - 1, 0)
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)


class BackgroundWriter:
    """Runs jobs one at a time, in the order given (those submitted ``first`` ahead of the others), on one daemon
    thread (or at once, in line, with ``inline``).

    A job's failures (what it returns, or its exception) go to ``on_error``. ``submit`` waits while ``limit``
    jobs are queued, so a slow store slows the study down instead of filling the memory.
    """

    def __init__(self, client: Any, limit: int, on_error: Callable[[str, str], None], *, inline: bool = False) -> None:
        self._client = client
        self._jobs: _JobQueue[tuple[str, Job]] = _JobQueue()
        self._busy = False
        self._limit = limit
        self._on_error = on_error
        self._inline = inline
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = ""

    def submit(self, what: str, job: Job, first: bool = False) -> None:
        if self._inline:
            _run_job(what, job, self._client, self._on_error)
            return
        with self._changed:
            self._changed.wait_for(lambda: len(self._jobs) < self._limit)
            self._jobs.put((what, job), first)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tuner-mlflow-writer", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def drain(self, timeout: float | None = None) -> list[str]:
        """Wait until every job submitted so far has run, or ``timeout`` seconds; return what has not run (the
        running job first)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._jobs and not self._busy, timeout)
            return ([self._running] if self._busy else []) + [what for what, _ in self._jobs]

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._jobs))
                what, job = self._jobs.pop()
                self._busy, self._running = True, what
                self._changed.notify_all()
            try:
                _run_job(what, job, self._client, self._on_error)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()


# --- the writer process ---------------------------------------------------------------------------------------
# Frames on its pipes: an 8-byte little-endian length, then a pickle. In: (sequence number, tracking URI, what,
# the pickled job, whether it goes first). Out: "ready" once it has imported MLflow, then (sequence number,
# failures, runs created) per job.

_FRAME_HEADER = struct.Struct("<Q")


def _write_frame(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """The next frame's pickle, or None at the end of the stream (a frame cut short counts as the end)."""
    header = stream.read(_FRAME_HEADER.size)
    if len(header) < _FRAME_HEADER.size:
        return None
    (size,) = _FRAME_HEADER.unpack(header)
    data = stream.read(size)
    return data if len(data) == size else None


class _Lane:
    """One tracker's entry to the shared writer process: its store, its client for the writes done here, where its
    failures go. A drain waits for every tracker's jobs: the process's writes go out in one order."""

    def __init__(self, writer: ProcessWriter, tracking_uri: str, client: Any, on_error: Callable[[str, str], None]):
        self.writer = writer
        self.tracking_uri = tracking_uri
        self.client = client
        self.on_error = on_error

    def submit(self, what: str, job: Job, first: bool = False) -> None:
        self.writer.submit(self, what, job, first)

    def drain(self, timeout: float | None = None) -> list[str]:
        return self.writer.drain(timeout)


class ProcessWriter:
    """Runs jobs in order in a child Python process (``serve_writes``), one per Python process.

    Until the child has imported MLflow (a second or two, on the other core) and after it has stopped, jobs run
    in line here instead, so a study never waits for it to start. Jobs sent and not yet answered when it stops
    (killed, crashed) are run again here, in order: MLflow drops metrics logged twice and keeps a parameter
    logged twice with the same value (a run the child created and did not answer is created again: the first
    stays RUNNING, without metrics). ``submit`` waits while ``limit`` jobs are unanswered. The child runs in its
    own session, so a Ctrl-C meant for the study does not cut its writes short; at the end of its input (this
    process gone) it finishes the jobs it holds and exits.
    """

    _shared: ProcessWriter | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> ProcessWriter:
        with cls._shared_lock:
            if cls._shared is None or cls._shared._pid != os.getpid():
                cls._shared = cls(WRITE_QUEUE_LIMIT)
            return cls._shared

    def __init__(self, limit: int) -> None:
        self._pid = os.getpid()
        self._limit = limit
        self._changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._here_lock = threading.Lock()  # jobs run here go one at a time, in order, as in the child
        self._pending: dict[int, tuple[str, Job, _Lane]] = {}  # sent, not answered
        self._running_here = 0
        self._sequence = 0
        self._state: Literal["starting", "ready", "stopped"] = "starting"
        self.sent = 0  # jobs sent to the child, and jobs run here instead (for benchmarks and tests)
        self.done_here = 0
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-c", "from tuner.tracking import serve_writes; serve_writes()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("could not start the MLflow writer process (%s); writing in line", exc)
            self._process, self._state = None, "stopped"
            return
        threading.Thread(target=self._read_answers, name="tuner-mlflow-answers", daemon=True).start()
        atexit.register(self.close)

    def lane(self, tracking_uri: str, client: Any, on_error: Callable[[str, str], None]) -> _Lane:
        return _Lane(self, tracking_uri, client, on_error)

    @property
    def pid(self) -> int | None:
        """The child's process id (None when it could not start)."""
        return self._process.pid if self._process is not None else None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the child takes jobs (True) or has stopped (False)."""
        with self._changed:
            self._changed.wait_for(lambda: self._state != "starting", timeout)
            return self._state == "ready"

    def submit(self, lane: _Lane, what: str, job: Job, first: bool = False) -> None:
        try:
            payload = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            payload = None  # a job that cannot travel runs here
        with self._send_lock:
            with self._changed:
                self._changed.wait_for(lambda: len(self._pending) < self._limit or self._state != "ready")
                sent = payload is not None and self._state == "ready"
                if sent:
                    self.sent += 1
                    self._sequence += 1
                    sequence = self._sequence
                    self._pending[sequence] = (what, job, lane)
            if sent:
                assert self._process is not None and self._process.stdin is not None
                try:
                    _write_frame(self._process.stdin, (sequence, lane.tracking_uri, what, payload, first))
                    return
                except (OSError, ValueError):
                    pass  # the child is gone: its reader thread redoes what it held, this one included
        if not sent:
            self._run_here([(what, job, lane)])
        else:
            self._stopped("its input closed")

    def drain(self, timeout: float | None = None) -> list[str]:
        """Wait until every job submitted so far has run, or ``timeout`` seconds; return what has not run."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending and not self._running_here, timeout)
            return [what for what, _, _ in self._pending.values()]

    def close(self) -> None:
        """End the child's input: it finishes the jobs it holds, then exits (this process does not wait)."""
        if self._process is None or self._process.stdin is None:
            return
        # At exit a thread may still wait in submit for room, holding the lock: the input is closed regardless.
        locked = self._send_lock.acquire(timeout=5)
        try:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        finally:
            if locked:
                self._send_lock.release()

    def _read_answers(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stream = self._process.stdout
        while (frame := _read_frame(stream)) is not None:
            try:
                answer = pickle.loads(frame)
            except Exception:  # a garbled answer: the child is treated as stopped, its unanswered jobs redone here
                log.warning("the MLflow writer process sent an unreadable answer; stopping it")
                self._process.kill()
                break
            if answer == "ready":
                with self._changed:
                    self._state = "ready"
                    self._changed.notify_all()
                continue
            sequence, failures, created = answer
            for run in created:  # known before the job counts as done: a drain then finds every run's id here
                RUNS.record(run)
            with self._changed:
                _, _, lane = self._pending.pop(sequence)
                self._changed.notify_all()
            for failed, error in failures:
                lane.on_error(failed, error)
        self._stopped(f"exit code {self._process.wait()}")

    def _stopped(self, reason: str) -> None:
        # Held from before the unanswered jobs are taken until they are done: a job submitted meanwhile, which
        # runs here too, waits for them and so keeps its place after them.
        with self._here_lock:
            with self._changed:
                if self._state == "stopped" and not self._pending:
                    return
                self._state = "stopped"
                redo = [self._pending.pop(n) for n in sorted(self._pending)]
                self._running_here += 1  # a drain waits for the redone jobs too
                self._changed.notify_all()
            try:
                if redo:
                    log.warning(
                        "the MLflow writer process stopped (%s); %d unanswered write(s) are done again here, and "
                        "the writes after them in line",
                        reason,
                        len(redo),
                    )
                self._run_all(redo)
            finally:
                with self._changed:
                    self._running_here -= 1
                    self._changed.notify_all()

    def _run_here(self, jobs: list[tuple[str, Job, _Lane]]) -> None:
        with self._here_lock:
            self._run_all(jobs)

    def _run_all(self, jobs: list[tuple[str, Job, _Lane]]) -> None:
        for what, job, lane in jobs:
            self.done_here += 1
            _run_job(what, job, lane.client, lane.on_error)


def start_writer_process(tracking_uri: str, writes: Writes | Literal["auto"] = "auto") -> ProcessWriter | None:
    """Start this process's writer process now, if a tracker of ``tracking_uri`` with ``writes`` would use it;
    return it (None when such a tracker would not)."""
    return ProcessWriter.shared() if writes_for(tracking_uri, writes) == "process" else None


def serve_writes() -> None:
    """The writer process's main: jobs from stdin, in order, each answered on stdout; at the end of stdin, finish
    and exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever else prints must not corrupt the answers
    jobs_in = sys.stdin.buffer
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    _set_http_defaults()  # it may have started before the study's tracker set them
    from mlflow import MlflowClient

    jobs: _JobQueue[tuple[int, str, str, bytes]] = _JobQueue()
    ended = False
    changed = threading.Condition()

    def read() -> None:
        # Read ahead, so the study's writes to the pipe never wait for a job to finish.
        nonlocal ended
        while (frame := _read_frame(jobs_in)) is not None:
            sequence, tracking_uri, what, payload, first = pickle.loads(frame)
            with changed:
                jobs.put((sequence, tracking_uri, what, payload), first)
                changed.notify()
        with changed:
            ended = True
            changed.notify()

    def next_job() -> tuple[int, str, str, bytes] | None:
        with changed:
            changed.wait_for(lambda: bool(jobs) or ended)
            return jobs.pop() if jobs else None

    threading.Thread(target=read, name="tuner-mlflow-jobs", daemon=True).start()
    listening = True

    def answer(message: Any) -> None:
        nonlocal listening
        if listening:
            try:
                _write_frame(answers, message)
            except OSError:  # the study's process is gone: its jobs are still done, unanswered
                listening = False

    answer("ready")
    RUNS.answering = True
    clients: dict[str, Any] = {}
    while (job_in := next_job()) is not None:
        sequence, tracking_uri, what, payload = job_in
        try:
            job = pickle.loads(payload)
            if tracking_uri not in clients:
                clients[tracking_uri] = MlflowClient(tracking_uri)
            failures = job(clients[tracking_uri])
        except Exception as exc:  # answered as a failure: the study counts it and goes on
            failures = [(what, str(exc))]
        answer((sequence, failures, RUNS.take_new()))


def call_by_name(target: str, *args: Any) -> Callable[[], Any]:
    """A picklable call of ``module:function`` with ``args``: the module is imported where the call is made (in the
    writer process, the plotting code, which the study's process then need not import)."""
    return functools.partial(_call_by_name, target, *args)


def _call_by_name(target: str, *args: Any) -> Any:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


# --- the jobs ---------------------------------------------------------------------------------------------------


def open_run(
    key: str, experiment_id: str, run_name: str, tags: dict[str, str], params: list[Any], client: Any
) -> list[tuple[str, str]]:
    """Create a trial's run, record its id under ``key`` (:data:`RUNS`), log its parameters."""
    try:
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    except Exception as exc:  # any failure: the study waits for this key's outcome
        RUNS.record(CreatedRun(key, None, None))
        return [(f"start of {run_name}", str(exc))]
    RUNS.record(CreatedRun(key, run.info.run_id, run.info.artifact_uri))
    return describe_run(run.info.run_id, params, [], client)


def describe_run(run_id: str, params: list[Any], tags: list[Any], client: Any) -> list[tuple[str, str]]:
    """Log a run's parameters (100 per call) and tags."""
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    if tags:
        client.log_batch(run_id, tags=tags)
    return []


def _send(client: Any, run_id: str, items: list[Any], tags: list[Any]) -> None:
    """Send ``items`` (metrics) in batches; ``tags`` ride along with the first batch."""
    for i in range(0, max(len(items), 1 if tags else 0), _BATCH_LIMIT):
        client.log_batch(run_id, metrics=items[i : i + _BATCH_LIMIT], tags=(tags or []) if i == 0 else [])


def close_run(
    tracking_uri: str,
    run: CreatedRun,
    items: list[Any],
    tags: list[Any],
    status: str,
    artifacts: dict[str, str | bytes],
    build_artifacts: Callable[[], dict[str, str | bytes]] | None,
    client: Any,
) -> list[tuple[str, str]]:
    """A trial run's closing writes: metrics, tags, files (``build_artifacts`` drawn here), then its end. A run
    whose id was not known when the close was sent is looked up here, where its creation ran."""
    from mlflow.exceptions import MlflowException

    created = RUNS.take(run.key)
    if run.run_id is None and created is not None:
        run = created
    run_id, artifact_uri = run.run_id, run.artifact_uri
    if run_id is None:
        return []  # never created: its creation's failure was counted
    failures = []
    try:
        _send(client, run_id, items, tags)
        files = dict(artifacts)
        if build_artifacts is not None:
            try:
                files.update(build_artifacts())
            except Exception as exc:  # a figure that cannot be drawn must not lose the other files
                failures.append((f"drawing the plots of run {run_id}", str(exc)))
        _log_files(client, tracking_uri, run_id, files, artifact_uri)
    except (MlflowException, OSError) as exc:
        failures.append((f"logging of run {run_id}", str(exc)))
    finally:
        # Always close the run, even when logging failed: a run left RUNNING misleads the UI.
        try:
            client.set_terminated(run_id, status=status)
        except MlflowException as exc:
            failures.append((f"closing run {run_id}", str(exc)))
    return failures


def _log_files(
    client: Any, tracking_uri: str, run_id: str, artifacts: dict[str, str | bytes], artifact_uri: str | None
) -> None:
    import tempfile

    if not artifacts:
        return
    # Written into one folder and sent in one call: each call looks the run up and opens its artifact store.
    with tempfile.TemporaryDirectory(prefix="tuner-artifacts-") as tmp:
        for name, content in artifacts.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(content)
        if artifact_uri is None or tracking_uri.startswith("databricks"):
            client.log_artifacts(run_id, tmp)
            return
        # The client would read the whole run back (its metrics, parameters, tags) to learn where its files
        # go, which create_run already said: 9 ms per trial on PostgreSQL.
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(artifact_uri, tracking_uri=tracking_uri).log_artifacts(tmp)


class MlflowTracker:
    """Records a study in MLflow: parent run per study, nested child run per trial.

    Args:
        tracking_uri: ``sqlite:///mlruns/mlflow.db``, ``http://host:5000``, ...
        experiment: Experiment name; created when missing.
        artifact_location: Where a new experiment stores artifacts (a path or URI); ignored for an existing one,
            and a local path is ignored for an http(s) tracking server, whose own artifact store serves workers.
        writes: How the writes after a run's creation go out: in a writer process, on a background thread or in
            line; ``auto``: as :func:`writes_for` says for the store.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None = None,
        *,
        writes: Writes | Literal["auto"] = "auto",
    ) -> None:
        # MLflow prints two lines to stdout per run it closes on a tracking server; one per trial drowns the
        # study's own output. A user who wants them sets the variable to false.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow  # noqa: F401  (imported here so that importing tuner stays fast)
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self._buffers: dict[str, list[Any]] = {}  # each open trial run's epoch metrics, by key
        self.parent_run_id: str | None = None
        self.failed_writes = 0
        self._count_lock = threading.Lock()  # the writer's threads count failures too
        self.writes: Writes = writes_for(tracking_uri, writes)
        # Queued, every close goes out in order from one writer; in line the callers' threads would write to the
        # store at once (a local SQLite file takes one writer at a time).
        self.closes_from_threads = self.writes != "inline"
        sqlite_dir = _local_sqlite_dir(tracking_uri)
        _check_store(tracking_uri)
        # Where a new experiment keeps its artifacts. A local path means nothing to a tracking server that workers
        # on other machines share: there the server's own artifact store (mlflow-artifacts:/) is used.
        location = None
        remote = tracking_uri.startswith(("http://", "https://"))
        if artifact_location and "://" not in artifact_location and not remote:
            location = Path(artifact_location).resolve().as_uri()
        elif artifact_location and "://" in artifact_location:
            location = artifact_location
        if sqlite_dir is not None and not Path(tracking_uri[len("sqlite:///") :]).exists():
            # A new store holds a new experiment: refused before the store's file is made, nothing is left.
            _check_artifact_dir(location, "tracking.artifact_location")
        try:
            if sqlite_dir is not None:
                sqlite_dir.mkdir(parents=True, exist_ok=True)
                _write_ahead_log(Path(tracking_uri[len("sqlite:///") :]))
            self.client = mlflow_client(tracking_uri, checked=True)  # checked above, before any folder was made
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                _check_artifact_dir(location, "tracking.artifact_location")
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                if found.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"tracking.experiment: experiment {experiment!r} (id {found.experiment_id}) is deleted in "
                        f"{mask_password(tracking_uri)}, and a deleted experiment takes no runs; restore it "
                        f"(MLFLOW_TRACKING_URI={mask_password(tracking_uri)} mlflow experiments restore "
                        f"--experiment-id {found.experiment_id}), or name another experiment in tracking.experiment"
                    )
                _check_artifact_dir(found.artifact_location, f"the artifact location of experiment {experiment!r}")
                self.experiment_id = found.experiment_id
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"tracking.uri: cannot use MLflow store {mask_password(tracking_uri)}: {exc}") from None
        self._writer: BackgroundWriter | _Lane
        if self.writes == "process":
            self._writer = ProcessWriter.shared().lane(tracking_uri, self.client, self._warn)
        else:
            self._writer = BackgroundWriter(self.client, WRITE_QUEUE_LIMIT, self._warn, inline=self.writes == "inline")

    def _warn(self, what: str, exc: Exception | str) -> None:
        # A tracking hiccup must not kill hours of tuning, but it must not pass unseen either.
        with self._count_lock:
            self.failed_writes += 1
        log.warning("MLflow %s failed (%s): %s", what, mask_password(self.tracking_uri), exc)

    def start_study(
        self, study_name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None
    ) -> str | None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        try:
            if run_id is not None:
                try:
                    self.client.update_run(run_id, status="RUNNING")
                    self.parent_run_id = run_id
                except MlflowException:
                    log.warning(
                        "parent run %s of study %r not found in %s; starting a new one",
                        run_id,
                        study_name,
                        mask_password(self.tracking_uri),
                    )
                    run_id = None
            param_items = []
            if run_id is None:
                run = self.client.create_run(self.experiment_id, run_name=study_name, tags={"tuner.kind": "study"})
                self.parent_run_id = run.info.run_id
                param_items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        except MlflowException as exc:
            raise TrackingError(f"tracking.uri: cannot write to {mask_password(self.tracking_uri)}: {exc}") from None
        parent = self.parent_run_id
        assert parent is not None
        tag_items = [RunTag(k, str(v)) for k, v in tags.items()]
        describe = functools.partial(describe_run, parent, param_items, tag_items)
        self._writer.submit(f"parameters and tags of study run {parent}", describe)
        return parent

    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        from mlflow.entities import Param

        # Created where the other writes go: each creation costs 5-15 ms of CPU (MLflow reads the experiment and
        # the new run back), and in line that comes before every trial, and before every pack, once per member.
        key = uuid.uuid4().hex
        all_tags = {"mlflow.parentRunId": self.parent_run_id or "", "tuner.kind": "trial", **tags}
        items = [Param(k, str(v)) for k, v in params.items()]
        self._buffers[key] = []
        name = f"trial-{number:04d}"
        self._writer.submit(
            f"start of trial {number}",
            functools.partial(open_run, key, self.experiment_id, name, all_tags, items),
            first=True,
        )
        return key

    def run_id(self, run_key: str | None) -> str | None:
        if run_key is None:
            return None
        created = RUNS.wait(run_key)
        return created.run_id if created is not None else None

    def log_epoch(self, run_key: str | None, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if run_key is None:
            return
        now = int(time.time() * 1000)
        buffer = self._buffers.setdefault(run_key, [])
        buffer.extend(Metric(k, float(v), now, epoch) for k, v in metrics.items())

    def end_trial(
        self,
        run_key: str | None,
        state: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, str | bytes],
        build_artifacts: Callable[[], dict[str, str | bytes]] | None = None,
    ) -> None:
        from mlflow.entities import Metric, RunTag

        if run_key is None:
            return
        epochs = self._buffers.pop(run_key, [])
        # A run's table shows each metric at its last step: the final figures go at the last epoch's step, stamped
        # after it, so that val_objective there is the trial's (its best epoch's), not its last epoch's.
        last_step = max((m.step for m in epochs), default=0)
        stamp = max([int(time.time() * 1000), *(m.timestamp + 1 for m in epochs)])
        items = epochs + [Metric(k, float(v), stamp, last_step) for k, v in metrics.items()]
        run = RUNS.take(run_key) or CreatedRun(run_key, None, None)
        run_tags = [RunTag(k, str(v)) for k, v in tags.items()]
        status = RUN_STATUS.get(state, "FAILED")
        close = functools.partial(
            close_run, self.tracking_uri, run, items, run_tags, status, artifacts, build_artifacts
        )
        self._writer.submit(f"end of run {run.run_id or run_key}", close)

    def drain(self, timeout: float | None = None) -> int:
        left = self._writer.drain(timeout)
        if left:
            log.warning(
                "%d MLflow write(s) to %s not sent after %s s, their runs incomplete: %s",
                len(left),
                mask_password(self.tracking_uri),
                timeout,
                "; ".join(left),
            )
        return len(left)

    def close_lost_run(self, run_id: str | None, reason: str, study_name: str, trial_number: int) -> None:
        from mlflow.exceptions import MlflowException

        try:
            if run_id is None:
                found = self.client.search_runs(
                    [self.experiment_id],
                    f"tags.`optuna.trial_number` = '{trial_number}' and attributes.status = 'RUNNING'",
                )
                # The study's name is compared here: a filter would need it quoted.
                ids = [r.info.run_id for r in found if r.data.tags.get("optuna.study_name") == study_name]
            else:
                ids = [run_id]
            for lost in ids:
                self.client.set_tag(lost, "stop_reason", reason)
                self.client.set_terminated(lost, status="KILLED")
        except MlflowException as exc:
            self._warn(f"closing the lost run of trial {trial_number}", exc)

    def open_trial_runs(self, study_name: str) -> dict[int, str]:
        found = self._trial_runs(study_name, " and attributes.status = 'RUNNING'", "looking for trial runs left open")
        return {number: run_id for number, (run_id, whole) in (found or {}).items() if whole}

    def trial_runs(self, study_name: str) -> dict[int, tuple[str, bool]] | None:
        return self._trial_runs(study_name, "", "looking for the study's trial runs")

    def _trial_runs(self, study_name: str, condition: str, what: str) -> dict[int, tuple[str, bool]] | None:
        """The trial runs under the study's parent run that meet ``condition`` (a search filter's ``and ...``),
        by trial number: each one's id and whether it is whole; None when the store could not be searched."""
        from mlflow.exceptions import MlflowException

        if self.parent_run_id is None:
            return None
        found: dict[int, tuple[str, bool]] = {}
        token = None
        try:
            while True:
                # Under this study's parent run only: a study of the same name made again has runs of its own.
                page = self.client.search_runs(
                    [self.experiment_id],
                    f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`tuner.kind` = 'trial'{condition}",
                    max_results=1000,
                    page_token=token,
                )
                for run in page:
                    tags = run.data.tags
                    # The study's name is compared here: a filter would need it quoted.
                    if tags.get("optuna.study_name") == study_name and tags.get("optuna.trial_number", "").isdigit():
                        number, whole = int(tags["optuna.trial_number"]), REBUILDING not in tags
                        if whole or number not in found:
                            found[number] = (run.info.run_id, whole)
                token = page.token
                if not token:
                    return found
        except (MlflowException, OSError) as exc:
            self._warn(what, exc)
            return None

    def close_run_left_open(self, run_id: str, state: str, metrics: dict[str, float], reason: str) -> bool:
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(
                run_id,
                metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
                tags=[RunTag("tracking_incomplete", reason)],
            )
            self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))
        except (MlflowException, OSError) as exc:
            self._warn(f"closing run {run_id}, left open", exc)
            return False
        return True

    def epoch_metrics(self, run_key: str | None) -> dict[str, dict[int, float]]:
        curves: dict[str, dict[int, float]] = {}
        for metric in self._buffers.get(run_key or "", []):
            curves.setdefault(metric.key, {})[metric.step] = metric.value
        return curves

    def create_run_left_out(self, number: int, run: RunRecord) -> str | None:
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        tags = {"mlflow.parentRunId": self.parent_run_id or "", "tuner.kind": "trial", **run.tags, REBUILDING: "1"}
        # Stamped in the trial's own time, so that the run's duration and curves read as the trial's.
        items = [
            Metric(key, value, run.ended_ms, step)
            for key, by_step in run.curves.items()
            for step, value in by_step.items()
        ]
        items += [Metric(key, value, run.ended_ms + 1, run.last_step) for key, value in run.metrics.items()]
        try:
            created = self.client.create_run(
                self.experiment_id, start_time=run.started_ms, tags=tags, run_name=f"trial-{number:04d}"
            )
            run_id = created.info.run_id
            describe_run(run_id, [Param(k, str(v)) for k, v in run.params.items()], [], self.client)
            _send(self.client, run_id, items, [])
            _log_files(self.client, self.tracking_uri, run_id, run.artifacts, created.info.artifact_uri)
            self.client.set_terminated(run_id, status=RUN_STATUS.get(run.state, "FAILED"), end_time=run.ended_ms)
            # Whole only now: a run cut short keeps the tag, and the next repair makes it again.
            self.client.delete_tag(run_id, REBUILDING)
        except (MlflowException, OSError) as exc:
            self._warn(f"creating the run of trial {number}, left out", exc)
            return None
        return str(run_id)

    def discard_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_run(run_id)
        except (MlflowException, OSError) as exc:
            self._warn(f"deleting run {run_id}, left half made", exc)
            return False
        return True

    def end_study(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        if self.parent_run_id is None:
            return
        now = int(time.time() * 1000)
        try:
            if metrics:
                self.client.log_batch(
                    self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
                )
        except MlflowException as exc:
            self._warn("logging the study summary", exc)
        try:
            self.client.set_terminated(self.parent_run_id, status=status)
        except MlflowException as exc:
            self._warn("closing the study run", exc)

    def ui_hint(self) -> str:
        uri = mask_password(self.tracking_uri)
        if uri.startswith(("http://", "https://")):
            return f"open {uri} and choose experiment {self.experiment_name!r}"
        store = "" if uri == "sqlite:///mlruns/mlflow.db" else f" --tracking-uri {uri}"
        return f"tuner ui{store}   then open http://127.0.0.1:5000 (experiment {self.experiment_name!r})"


# --------------------------------------------------------------------------------------------------------------
# Exported models: artifact downloads and uploads, the model registry and its aliases (used by tuner.export).
# Each call names its store explicitly: MLflow's own `models:/` resolution reads the process-global tracking
# URI (and creates ./mlflow.db when none is set), which is the global state this module exists to avoid.


def _check_store_to_read(tracking_uri: str) -> None:
    """Refuse a local SQLite store that does not exist where only reading: opening it would create an empty one."""
    if _local_sqlite_dir(tracking_uri) is not None and not Path(tracking_uri[len("sqlite:///") :]).is_file():
        raise TrackingError(
            f"tracking.uri: no MLflow store at {tracking_uri[len('sqlite:///') :]} (from {tracking_uri}); "
            "run the study with tracking first, or pass --tracking-uri"
        )


def _export_client(tracking_uri: str, *, reading: bool = False) -> Any:
    if reading:
        _check_store_to_read(tracking_uri)
    # The registry lives in the tracking store (SQLite, PostgreSQL or a tracking server): one URI for both.
    return mlflow_client(tracking_uri, registry=True)


def download_run_artifact(tracking_uri: str, run_id: str, path: str, dst_dir: str | Path) -> Path | None:
    """Download one file of a run's artifacts.

    Args:
        tracking_uri: The tracking store.
        run_id: The run.
        path: The artifact's path inside the run, e.g. ``model/state_dict.pt``.
        dst_dir: Local folder to download into (created when missing).

    Returns:
        The local file, or None when the run holds no artifact at ``path``.

    Raises:
        TrackingError: The store or the run cannot be read.
    """
    from mlflow.exceptions import MlflowException

    client = _export_client(tracking_uri, reading=True)
    parent = path.rsplit("/", 1)[0] if "/" in path else None
    try:
        listed = {info.path for info in client.list_artifacts(run_id, parent)}
        if path not in listed:
            return None
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return Path(client.download_artifacts(run_id, path, str(dst_dir)))
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"tracking.uri: cannot read artifact {path!r} of run {run_id} in {mask_password(tracking_uri)}: {exc}"
        ) from None


def log_model_dir(tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
    """Upload a saved model directory into a run's artifacts.

    Args:
        tracking_uri: The tracking store.
        run_id: The run that receives the files.
        local_dir: The model directory.
        artifact_path: Where inside the run, e.g. ``exports/trial-0003-20260101T120000Z``.

    Returns:
        The artifact store URI of the uploaded directory (what a registered model version points at).

    Raises:
        TrackingError: The upload failed.
    """
    from mlflow.exceptions import MlflowException

    client = _export_client(tracking_uri)
    try:
        client.log_artifacts(run_id, str(local_dir), artifact_path)
        root = client.get_run(run_id).info.artifact_uri
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"tracking.uri: cannot log the model to run {run_id} in {mask_password(tracking_uri)}: {exc}"
        ) from None
    return f"{root.rstrip('/')}/{artifact_path}"


def register_model_version(
    tracking_uri: str,
    name: str,
    source: str,
    run_id: str,
    *,
    alias: str,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> str:
    """Register a model directory as a new version of ``name`` and point ``alias`` at it.

    The alias moves: re-registering makes the new version the one ``models:/NAME@ALIAS`` loads, and earlier
    versions stay in the registry unchanged.

    Args:
        tracking_uri: The tracking store, which also holds the registry.
        name: The registered model's name (created when missing).
        source: Artifact URI of the model directory (from :func:`log_model_dir`).
        run_id: The run the files were logged to.
        alias: e.g. ``champion``.
        tags: Tags of the new version.
        description: Description of the new version.

    Returns:
        The new version number, as MLflow writes it.

    Raises:
        TrackingError: The registry refused (bad name, unreachable store).
    """
    from mlflow.exceptions import MlflowException

    client = _export_client(tracking_uri)
    try:
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(name)
        version = client.create_model_version(
            name, source, run_id=run_id, tags=dict(tags or {}), description=description
        )
        client.set_registered_model_alias(name, alias, str(version.version))
    except MlflowException as exc:
        raise TrackingError(
            f"tracking.uri: cannot register model {name!r} in {mask_password(tracking_uri)}: {exc}"
        ) from None
    return str(version.version)


def download_model(uri: str, tracking_uri: str, dst_dir: str | Path) -> Path:
    """Download a model directory named by ``runs:/RUN_ID/PATH``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Args:
        uri: The model URI.
        tracking_uri: The tracking store that holds the run or the registry.
        dst_dir: Local folder to download into.

    Returns:
        The local model directory.

    Raises:
        TrackingError: The URI is malformed or names nothing in the store.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client = _export_client(tracking_uri, reading=True)
    where = mask_password(tracking_uri)
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    try:
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/") :].strip("/").partition("/")
            if not run_id or not path:
                raise TrackingError(f"MODEL: {uri!r} must look like runs:/RUN_ID/PATH")
            return Path(client.download_artifacts(run_id, path, str(dst_dir)))
        if not uri.startswith("models:/"):
            raise TrackingError(f"MODEL: {uri!r} is not a runs:/ or models:/ URI")
        ref = uri[len("models:/") :].strip("/")
        name, at, alias = ref.partition("@")
        if at:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            name, slash, version = ref.rpartition("/")
            if not slash or not name or not version.isdigit():
                raise TrackingError(f"MODEL: {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
        source = client.get_model_version_download_uri(name, version)
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst_dir), tracking_uri=tracking_uri)
        )
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"MODEL: cannot load {uri!r} from {where}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# Reading a study back (reports, the UI)


class MlflowRuns:
    """Reads back what a study logged (metric histories, artifacts) and attaches files to its runs.

    Args:
        tracking_uri: The study's MLflow store.

    Raises:
        TrackingError: A local SQLite store that does not exist (opening it would create an empty one), or a
            store that cannot be reached.
    """

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        _check_store_to_read(tracking_uri)
        try:
            self.client = mlflow_client(tracking_uri)
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"tracking.uri: cannot use MLflow store {mask_password(tracking_uri)}: {exc}") from None

    def _fail(self, what: str, exc: Exception) -> TrackingError:
        return TrackingError(f"{what} in {mask_password(self.tracking_uri)}: {exc}")

    def experiment_id(self, name: str) -> str | None:
        """The id of the experiment called ``name``, or None."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_experiment_by_name(name)
        except MlflowException as exc:
            raise self._fail(f"cannot look up experiment {name!r}", exc) from None
        return None if found is None else str(found.experiment_id)

    def experiment_names(self) -> list[str]:
        """Names of the store's experiments."""
        from mlflow.exceptions import MlflowException

        try:
            return [e.name for e in self.client.search_experiments()]
        except MlflowException as exc:
            raise self._fail("cannot list experiments", exc) from None

    def epoch_history(self, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
        """Per-epoch metrics of a run as one mapping per epoch (step), for the given keys.

        A key logged more than once at a step keeps its first value: final metrics are logged at the last epoch's
        step too, after it.
        """
        from mlflow.exceptions import MlflowException

        by_step: dict[int, dict[str, float]] = {}
        try:
            for key in keys:
                for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
                    by_step.setdefault(int(m.step), {}).setdefault(key, float(m.value))
        except MlflowException as exc:
            raise self._fail(f"cannot read the metrics of run {run_id}", exc) from None
        return [by_step.get(step, {}) for step in range(max(by_step) + 1)] if by_step else []

    def download(self, run_id: str, artifact_path: str, dest: Path) -> Path:
        """Download one artifact of a run into ``dest``; return its local path."""
        import os

        from mlflow.exceptions import MlflowException

        dest.mkdir(parents=True, exist_ok=True)
        # MLflow draws a progress bar per download; a report fetches several small files. Quiet for this call.
        key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
        saved = os.environ.get(key)
        os.environ[key] = "false"
        try:
            return Path(self.client.download_artifacts(run_id, artifact_path, str(dest)))
        except (MlflowException, OSError) as exc:
            raise self._fail(f"run {run_id} has no artifact {artifact_path}", exc) from None
        finally:
            if saved is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = saved

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Attach ``text`` to a run as ``artifact_file`` (the run may be finished)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_text(run_id, text, artifact_file)
        except (MlflowException, OSError) as exc:
            raise self._fail(f"cannot log {artifact_file} to run {run_id}", exc) from None


def mlflow_ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The command line that serves the MLflow UI on a tracking store (this interpreter's MLflow).

    One worker: MLflow's default four take half a minute to start on a two-core machine, for one reader.
    """
    import sys

    options = ["--backend-store-uri", tracking_uri, "--host", host, "--port", str(port), "--workers", "1"]
    return [sys.executable, "-m", "mlflow", "ui", *options]
