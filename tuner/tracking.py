"""Experiment tracking. The one module that imports mlflow.

One parent run per study and one child run per trial, through ``MlflowClient`` with explicit run ids (the fluent
``mlflow.start_run`` is process-global state that breaks with threads and worker processes). Per-epoch metrics
are buffered and sent with ``log_batch``: one call per trial instead of one per value.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from tuner.errors import TrackingError

log = logging.getLogger(__name__)

#: Optuna trial state -> MLflow run status.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}

# log_batch accepts at most 1000 metrics per call.
_BATCH_LIMIT = 1000


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
    ) -> None:
        """Flush the buffer, log final metrics, tags and artifacts (path -> text or bytes), close with the status."""
        ...

    def end_study(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        """Log the study's summary metrics and close the parent run."""
        ...

    def ui_hint(self) -> str:
        """How a person opens the result."""
        ...


class NullTracker:
    """Tracks nothing; for tests and ``tracking.enabled: false``."""

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
    ) -> None:
        return None

    def end_study(self, status: str = "FINISHED", metrics: dict[str, float] | None = None) -> None:
        return None

    def ui_hint(self) -> str:
        return "tracking is disabled (tracking.enabled: false)"


def _local_sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    return None


class MlflowTracker:
    """Records a study in MLflow: parent run per study, nested child run per trial.

    Args:
        tracking_uri: ``sqlite:///mlruns/mlflow.db``, ``http://host:5000``, ...
        experiment: Experiment name; created when missing.
        artifact_location: Where a new experiment stores artifacts (a path or URI); ignored for an existing one.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None) -> None:
        import mlflow  # noqa: F401  (imported here so that importing tuner stays fast)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self._buffers: dict[str, list[Any]] = {}
        self.parent_run_id: str | None = None
        self.failed_writes = 0
        sqlite_dir = _local_sqlite_dir(tracking_uri)
        if sqlite_dir is not None:
            sqlite_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = None
                if artifact_location and "://" not in artifact_location:
                    location = Path(artifact_location).resolve().as_uri()
                elif artifact_location:
                    location = artifact_location
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"tracking.uri: cannot use MLflow store {mask_password(tracking_uri)}: {exc}") from None

    def _warn(self, what: str, exc: Exception) -> None:
        # A tracking hiccup must not kill hours of tuning, but it must not pass unseen either.
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
            if run_id is None:
                run = self.client.create_run(self.experiment_id, run_name=study_name, tags={"tuner.kind": "study"})
                self.parent_run_id = run.info.run_id
                param_items = [Param(k, str(v)[:6000]) for k, v in params.items()]
                for i in range(0, len(param_items), 100):
                    self.client.log_batch(self.parent_run_id, params=param_items[i : i + 100])
            assert self.parent_run_id is not None
            self.client.log_batch(self.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except MlflowException as exc:
            raise TrackingError(f"tracking.uri: cannot write to {mask_password(self.tracking_uri)}: {exc}") from None
        return self.parent_run_id

    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        all_tags = {"mlflow.parentRunId": self.parent_run_id or "", "tuner.kind": "trial", **tags}
        try:
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{number:04d}", tags=all_tags)
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        except MlflowException as exc:
            self._warn(f"start of trial {number}", exc)
            return None
        self._buffers[run_id] = []
        return run_id

    def log_epoch(self, run_id: str | None, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if run_id is None:
            return
        now = int(time.time() * 1000)
        buffer = self._buffers.setdefault(run_id, [])
        buffer.extend(Metric(k, float(v), now, epoch) for k, v in metrics.items())

    def _flush(self, run_id: str, extra: list[Any]) -> None:
        items = self._buffers.pop(run_id, []) + extra
        for i in range(0, len(items), _BATCH_LIMIT):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH_LIMIT])

    def end_trial(
        self,
        run_id: str | None,
        state: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        artifacts: dict[str, str | bytes],
    ) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return
        now = int(time.time() * 1000)
        try:
            self._flush(run_id, [Metric(k, float(v), now, 0) for k, v in metrics.items()])
            if tags:
                self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            self._log_files(run_id, artifacts)
        except (MlflowException, OSError) as exc:
            self._warn(f"logging of run {run_id}", exc)
        finally:
            # Always close the run, even when logging failed: a run left RUNNING misleads the UI.
            try:
                self.client.set_terminated(run_id, status=RUN_STATUS.get(state, "FAILED"))
            except MlflowException as exc:
                self._warn(f"closing run {run_id}", exc)

    def _log_files(self, run_id: str, artifacts: dict[str, str | bytes]) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="tuner-artifacts-") as tmp:
            for name, content in artifacts.items():
                if isinstance(content, str):
                    self.client.log_text(run_id, content, name)
                    continue
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                self.client.log_artifact(run_id, str(path), str(Path(name).parent) if "/" in name else None)

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
        return (
            f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000 "
            f"(experiment {self.experiment_name!r})"
        )
