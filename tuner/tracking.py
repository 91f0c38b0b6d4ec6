"""Experiment tracking. The one module that imports mlflow.

One parent run per study and one child run per trial, through ``MlflowClient`` with explicit run ids (the fluent
``mlflow.start_run`` is process-global state that breaks with threads and worker processes). Per-epoch metrics
are buffered and sent with ``log_batch``: one call per trial instead of one per value. With a store across the
network (a tracking server, a database server) a trial's closing writes (its parameters, metrics, tags, plots,
files and end) go out on a background thread while the next trial trains: they wait on the network, not on the
CPU. :meth:`MlflowTracker.drain` waits for them, and a study calls it before it ends. With a local SQLite store
they are written in line: there they cost CPU, and a second thread, contending for the interpreter lock, gained
nothing consistent (bench/README.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from tuner.errors import TrackingError

log = logging.getLogger(__name__)

#: Optuna trial state -> MLflow run status.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}

# log_batch accepts at most 1000 metrics per call.
_BATCH_LIMIT = 1000

#: Closing writes that may wait for the background writer before a trial's end waits for room: a bound on the
#: memory they hold (their files) and on what a stalled tracking server leaves unsent.
WRITE_QUEUE_LIMIT = 16


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
        """Open a child run for a trial; return its id."""
        ...

    def log_epoch(self, run_id: str | None, epoch: int, metrics: dict[str, float]) -> None:
        """Buffer one epoch's metrics."""
        ...

    def end_trial(
        self,
        run_id: str | None,
        state: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, str | bytes],
        build_artifacts: Callable[[], dict[str, str | bytes]] | None = None,
    ) -> None:
        """Flush the buffer, log final metrics, tags and artifacts (path -> text or bytes), close with the status.

        ``build_artifacts`` makes more artifacts (the trial's plots); a tracker may call it later, on another
        thread, so it must only read what no longer changes."""
        ...

    def close_lost_run(self, run_id: str | None, reason: str) -> None:
        """Close the run of a trial whose worker died: KILLED, with the reason as ``stop_reason``."""
        ...

    def drain(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the writes still being sent; return how
        many are left unsent."""
        ...

    def end_study(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        """Log the study's summary metrics and close the parent run (after :meth:`drain`, which it does not do:
        the caller bounds that wait)."""
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

    def log_epoch(self, run_id: str | None, epoch: int, metrics: dict[str, float]) -> None:
        return None

    def end_trial(
        self,
        run_id: str | None,
        state: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, str | bytes],
        build_artifacts: Callable[[], dict[str, str | bytes]] | None = None,
    ) -> None:
        return None

    def close_lost_run(self, run_id: str | None, reason: str) -> None:
        return None

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


def writes_in_background(tracking_uri: str) -> bool:
    """Whether a store's writes go out on a background thread: yes across the network, not for local files."""
    return "://" in tracking_uri and not tracking_uri.startswith(("sqlite:", "file:"))


class BackgroundWriter:
    """Runs jobs one at a time, in the order given, on one daemon thread (or at once, in line, with ``inline``).

    A job reports its own failures (a job that raises is logged and counted by ``on_error``). ``submit`` waits
    while ``limit`` jobs are queued, so a slow store slows the study down instead of filling the memory.
    """

    def __init__(self, limit: int, on_error: Callable[[str, Exception], None], *, inline: bool = False) -> None:
        self._jobs: deque[tuple[str, Callable[[], None]]] = deque()
        self._busy = False
        self._limit = limit
        self._on_error = on_error
        self._inline = inline
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = ""

    def submit(self, what: str, job: Callable[[], None]) -> None:
        if self._inline:
            self._guarded(what, job)
            return
        with self._changed:
            self._changed.wait_for(lambda: len(self._jobs) < self._limit)
            self._jobs.append((what, job))
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
                what, job = self._jobs.popleft()
                self._busy, self._running = True, what
                self._changed.notify_all()
            try:
                self._guarded(what, job)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _guarded(self, what: str, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:  # a defect in one job must not stop the writes after it
            self._on_error(what, exc)


class MlflowTracker:
    """Records a study in MLflow: parent run per study, nested child run per trial.

    Args:
        tracking_uri: ``sqlite:///mlruns/mlflow.db``, ``http://host:5000``, ...
        experiment: Experiment name; created when missing.
        artifact_location: Where a new experiment stores artifacts (a path or URI); ignored for an existing one,
            and a local path is ignored for an http(s) tracking server, whose own artifact store serves workers.
        background: Send trials' closing writes on a background thread; None: for stores across the network.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None = None,
        *,
        background: bool | None = None,
    ) -> None:
        # MLflow prints two lines to stdout per run it closes on a tracking server; one per trial drowns the
        # study's own output. A user who wants them sets the variable to false.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow  # noqa: F401  (imported here so that importing tuner stays fast)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self._buffers: dict[str, list[Any]] = {}
        self._artifact_uris: dict[str, str] = {}  # each open trial run's, as create_run answered
        self.parent_run_id: str | None = None
        self.failed_writes = 0
        self._count_lock = threading.Lock()  # the writer thread counts failures too
        in_background = writes_in_background(tracking_uri) if background is None else background
        self._writer = BackgroundWriter(WRITE_QUEUE_LIMIT, self._warn, inline=not in_background)
        # In the background every close is queued to the one writer thread; in line the callers' threads would
        # write to the store at once (a local SQLite file takes one writer at a time).
        self.closes_from_threads = in_background
        sqlite_dir = _local_sqlite_dir(tracking_uri)
        if sqlite_dir is not None:
            sqlite_dir.mkdir(parents=True, exist_ok=True)
            _write_ahead_log(Path(tracking_uri[len("sqlite:///") :]))
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = None
                remote = tracking_uri.startswith(("http://", "https://"))
                if artifact_location and "://" not in artifact_location and not remote:
                    location = Path(artifact_location).resolve().as_uri()
                elif artifact_location and "://" in artifact_location:
                    location = artifact_location
                # A local path means nothing to a tracking server that workers on other machines share:
                # there the server's own artifact store (mlflow-artifacts:/) is used.
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"tracking.uri: cannot use MLflow store {mask_password(tracking_uri)}: {exc}") from None

    def _warn(self, what: str, exc: Exception) -> None:
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
        self._writer.submit(
            f"parameters and tags of study run {parent}", lambda: self._describe(parent, param_items, tag_items)
        )
        return parent

    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        all_tags = {"mlflow.parentRunId": self.parent_run_id or "", "tuner.kind": "trial", **tags}
        try:
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:04d}", tags=all_tags)
        except MlflowException as exc:
            self._warn(f"start of trial {number}", exc)
            return None
        run_id: str = run.info.run_id
        self._artifact_uris[run_id] = run.info.artifact_uri
        items = [Param(k, str(v)) for k, v in params.items()]
        self._writer.submit(f"parameters of run {run_id}", lambda: self._describe(run_id, items, []))
        self._buffers[run_id] = []
        return run_id

    def _describe(self, run_id: str, params: list[Any], tags: list[Any]) -> None:
        """Log a run's parameters (100 per call) and tags; the writer reports a failure (``_warn``)."""
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i : i + 100])
        if tags:
            self.client.log_batch(run_id, tags=tags)

    def log_epoch(self, run_id: str | None, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if run_id is None:
            return
        now = int(time.time() * 1000)
        buffer = self._buffers.setdefault(run_id, [])
        buffer.extend(Metric(k, float(v), now, epoch) for k, v in metrics.items())

    def _send(self, run_id: str, items: list[Any], tags: list[Any]) -> None:
        """Send ``items`` (metrics) in batches; ``tags`` ride along with the first batch."""
        for i in range(0, max(len(items), 1 if tags else 0), _BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH_LIMIT], tags=(tags or []) if i == 0 else [])

    def end_trial(
        self,
        run_id: str | None,
        state: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, str | bytes],
        build_artifacts: Callable[[], dict[str, str | bytes]] | None = None,
    ) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return
        now = int(time.time() * 1000)
        artifact_uri = self._artifact_uris.pop(run_id, None)
        items = self._buffers.pop(run_id, []) + [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        run_tags = [RunTag(k, str(v)) for k, v in tags.items()]
        status = RUN_STATUS.get(state, "FAILED")

        def close() -> None:
            try:
                self._send(run_id, items, run_tags)
                files = dict(artifacts)
                if build_artifacts is not None:
                    try:
                        files.update(build_artifacts())
                    except Exception as exc:  # a figure that cannot be drawn must not lose the other files
                        self._warn(f"drawing the plots of run {run_id}", exc)
                self._log_files(run_id, files, artifact_uri)
            except (MlflowException, OSError) as exc:
                self._warn(f"logging of run {run_id}", exc)
            finally:
                # Always close the run, even when logging failed: a run left RUNNING misleads the UI.
                try:
                    self.client.set_terminated(run_id, status=status)
                except MlflowException as exc:
                    self._warn(f"closing run {run_id}", exc)

        self._writer.submit(f"end of run {run_id}", close)

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

    def close_lost_run(self, run_id: str | None, reason: str) -> None:
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return
        try:
            self.client.set_tag(run_id, "stop_reason", reason)
            self.client.set_terminated(run_id, status="KILLED")
        except MlflowException as exc:
            self._warn(f"closing lost run {run_id}", exc)

    def _log_files(self, run_id: str, artifacts: dict[str, str | bytes], artifact_uri: str | None = None) -> None:
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
            if artifact_uri is None or self.tracking_uri.startswith("databricks"):
                self.client.log_artifacts(run_id, tmp)
                return
            # The client would read the whole run back (its metrics, parameters, tags) to learn where its files
            # go, which create_run already said: 9 ms per trial on PostgreSQL.
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri).log_artifacts(tmp)

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


def _export_client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    # The registry lives in the tracking store (SQLite, PostgreSQL or a tracking server): one URI for both.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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

    client = _export_client(tracking_uri)
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

    client = _export_client(tracking_uri)
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
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        sqlite_dir = _local_sqlite_dir(tracking_uri)
        if sqlite_dir is not None and not Path(tracking_uri[len("sqlite:///") :]).is_file():
            raise TrackingError(
                f"tracking.uri: no MLflow store at {tracking_uri[len('sqlite:///') :]} (from {tracking_uri}); "
                "run the study with tracking first, or pass --tracking-uri"
            )
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
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

        A key logged more than once at a step keeps its first value: final metrics are logged at step 0 too.
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
