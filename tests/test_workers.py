"""Many worker processes on one study: exact totals, lost workers, signals, database restarts, MLflow over HTTP.

These tests start real `tuner` processes against the local PostgreSQL at 127.0.0.1:5432. They run in CI; on a
machine without PostgreSQL they skip with the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
import pytest
import yaml
from faults import restart_error

from tuner import worker as tuner_worker
from tuner.errors import StorageError
from tuner.worker import LOST, RETRY_OF, SURPLUS, sqlite_single_process, sqlite_study_names

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def _pg_reason() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_DSN):
            return None
    except Exception as exc:
        return f"PostgreSQL not reachable at 127.0.0.1:5432 ({type(exc).__name__}: {exc})"


_PG_DOWN = _pg_reason()
if _PG_DOWN and os.environ.get("CI"):
    raise RuntimeError(f"CI needs PostgreSQL for the worker tests: {_PG_DOWN}")

postgres = pytest.mark.postgres
needs_pg = pytest.mark.skipif(_PG_DOWN is not None, reason=_PG_DOWN or "")


@pytest.fixture
def pg_database() -> Iterator[Callable[[], str]]:
    """Makes fresh databases (one per call) and drops them afterwards; returns their SQLAlchemy URLs."""
    import psycopg

    made: list[str] = []

    def make() -> str:
        name = f"tuner_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    yield make
    for name in made:
        storage = _STORAGES.pop(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", None)
        if storage is not None:
            storage.engine.dispose()
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_study(
    tmp_path: Path,
    *,
    n_trials: int,
    big: bool = False,
    epochs: int | None = None,
    tracking: str | None = None,
    writes: str = "auto",
    **study,
) -> Path:
    # "big" trials last seconds (1-2 s on a 2-core AMD EPYC): long enough to be interrupted mid-trial, not between
    # two trials, on a fast machine too.
    data = {"simulated": {"n_star": 40000 if big else 1200, "n_quasar": 400 if big else 120}}
    raw = {
        "data": data,
        "search_space": {
            "n_layers": {"low": 1, "high": 2},
            "width": {"low": 8, "high": 32, "log": True},
            "batch_size": {"value": 32} if big else {"low": 128, "high": 256, "log": True, "powers_of_two": True},
            "optimizer": {"choices": ["adam", "nesterov"]},
        },
        "train": {"max_epochs": epochs or (20 if big else 2), "patience": epochs or (20 if big else 2)},
        "study": {
            "name": "workers",
            "n_trials": n_trials,
            "pruner": "none",
            "heartbeat_interval": 1,
            "grace_period": 4,
            **study,
        },
        "tracking": {
            "enabled": tracking is not None,
            "uri": tracking or "sqlite:///unused.db",
            "artifact_location": str(tmp_path / "artifacts"),
            "writes": writes,
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_shape(study: Path) -> None:
    """One shape for every trial of the study file, so the packs fill: widths, learning rates, optimizers vary."""
    raw = yaml.safe_load(study.read_text())
    raw["search_space"].update({"n_layers": {"value": 2}, "batch_size": {"value": 128}})
    raw["search_space"]["optimizer"] = {"choices": ["adam", "adamw"]}
    study.write_text(yaml.safe_dump(raw))


_LOGS: dict[int, Path] = {}


def tuner(*args: str, cwd: Path) -> subprocess.Popen[str]:
    # Output goes to a file, not a pipe: a pipe nobody reads until the end blocks the process once it fills.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = cwd / f"tuner-{uuid.uuid4().hex[:8]}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuner.cli", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    _LOGS[proc.pid] = log
    return proc


def output(proc: subprocess.Popen[str]) -> str:
    return _LOGS[proc.pid].read_text()


def finish(proc: subprocess.Popen[str], timeout: float = 300, storage: str | None = None) -> tuple[int, str]:
    """The exit code and output; a process still running after ``timeout`` is killed and its output shown."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        states = [(t.number, t.state.name) for t in trials_of(storage)] if storage else "not looked at"
        raise AssertionError(f"still running after {timeout} s; trials {states}:\n{output(proc)[-3000:]}") from None
    return proc.returncode, output(proc)


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str] | None = None
) -> None:
    """Poll an observable condition (a trial's state in the database), failing after ``timeout``.

    With ``proc``, fail as soon as that process has exited, and show what it printed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n{output(proc)[-3000:]}")
        time.sleep(0.2)
    printed = f"; it printed:\n{output(proc)[-3000:]}" if proc is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{printed}")


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}


def trials_of(url: str) -> list[optuna.trial.FrozenTrial]:
    # One storage (one small connection pool) per database: polling must not open a pool per look.
    if url not in _STORAGES:
        from sqlalchemy.pool import NullPool

        kwargs = {"poolclass": NullPool} if url.startswith("postgresql") else {}
        _STORAGES[url] = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=True)
    return optuna.load_study(study_name="workers", storage=_STORAGES[url]).get_trials(deepcopy=False)


def _sqlite_study_exists(url: str) -> bool:
    """Read-only: opening an Optuna storage on a file whose tables are still being made would write the schema
    version too, racing the process that makes them."""
    return "workers" in sqlite_study_names(Path(url[len("sqlite:///") :]))


def has_running_tracked_trial(url: str, tracking: str, started_within: float | None = None) -> bool:
    """A trial is RUNNING and its MLflow run is open; False while the study is still being created.

    With ``started_within`` (seconds), only a trial that started that recently counts: one with most of its
    training ahead, so that a signal sent now finds it running, not finished.
    """
    from sqlalchemy.exc import SQLAlchemyError

    if url.startswith("sqlite:///") and not _sqlite_study_exists(url):
        return False
    try:
        trials = trials_of(url)
    except (KeyError, SQLAlchemyError):  # the tuner process is still creating the tables or the study
        _STORAGES.pop(url, None)
        return False
    now = datetime.datetime.now()  # Optuna stores start times in local time, naive
    running = {
        str(t.number)
        for t in trials
        if t.state.name == "RUNNING"
        and (started_within is None or (now - t.datetime_start).total_seconds() <= started_within)
    }
    # Asked only once a trial runs: by then tuner has made the MLflow store's tables and experiment.
    return bool(running) and any(
        r.info.status == "RUNNING" and r.data.tags.get("optuna.trial_number") in running
        for r in trial_runs(mlflow_runs(tracking))
    )


def assert_exact(trials: list[optuna.trial.FrozenTrial], n_trials: int) -> None:
    """Finished trials, retried failures aside, number exactly n_trials; numbers are contiguous, none RUNNING."""
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    replaced = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    surplus = [t for t in trials if SURPLUS in t.user_attrs]
    # A trial created beyond the budget during an outage holds no slot: failed, never run, not counted.
    assert all(t.state.name == "FAIL" and not t.params for t in surplus)
    counted = [t for t in trials if t.number not in replaced and t not in surplus]
    assert len(counted) == n_trials
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in counted)


def mlflow_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("workers")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def trial_runs(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("tuner.kind") == "trial"]


STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def assert_one_run_per_trial(trials, runs) -> None:
    children = trial_runs(runs)
    per_trial = Counter(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert per_trial == Counter({t.number: 1 for t in trials})
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for t in trials:
        run = by_number[t.number]
        lost = "worker lost" in run.data.tags.get("stop_reason", "")
        # A trial records its run's id when it ends: a lost trial's run is known by its tags.
        assert run.info.run_id == t.user_attrs["mlflow_run_id"] or (lost and "mlflow_run_id" not in t.user_attrs)
        expected = "KILLED" if lost else STATUS[t.state.name]
        assert run.info.status == expected, (t.number, t.state.name, run.info.status)
    parents = [r for r in runs if r.data.tags.get("tuner.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


@postgres
@needs_pg
def test_three_workers_share_one_study_with_exact_totals(tmp_path, pg_database):
    storage, tracking = pg_database(), pg_database()
    study = write_study(tmp_path, n_trials=30, tracking=tracking)
    code, out = finish(tuner("create", str(study), "--storage", storage, cwd=tmp_path))
    assert code == 0, out
    workers = [tuner("worker", str(study), "--storage", storage, "--quiet", cwd=tmp_path) for _ in range(3)]
    results = [finish(w) for w in workers]
    assert all(code == 0 for code, _ in results), [out for _, out in results]
    trials = trials_of(storage)
    assert len(trials) == 30
    assert_exact(trials, 30)
    # Every worker took part.
    assert all("this process ran" in out for _, out in results)
    assert_one_run_per_trial(trials, mlflow_runs(tracking))


@postgres
@needs_pg
def test_packed_workers_take_several_trials_at_a_time_and_keep_the_total_exact(tmp_path, pg_database):
    storage, tracking = pg_database(), pg_database()
    study = write_study(tmp_path, n_trials=11, tracking=tracking, pack=4)
    one_shape(study)
    assert finish(tuner("create", str(study), "--storage", storage, cwd=tmp_path))[0] == 0
    workers = [tuner("worker", str(study), "--storage", storage, "--quiet", cwd=tmp_path) for _ in range(2)]
    results = [finish(w) for w in workers]
    assert all(code == 0 for code, _ in results), [out for _, out in results]
    trials = trials_of(storage)
    assert len(trials) == 11
    assert_exact(trials, 11)
    assert {t.user_attrs["engine"] for t in trials} == {"packed"}
    assert_one_run_per_trial(trials, mlflow_runs(tracking))


@postgres
@needs_pg
def test_a_killed_worker_trial_fails_and_is_retried_with_the_same_params(tmp_path, pg_database):
    storage, tracking = pg_database(), pg_database()
    study = write_study(tmp_path, n_trials=3, big=True, tracking=tracking)
    assert finish(tuner("create", str(study), "--storage", storage, cwd=tmp_path))[0] == 0
    victim = tuner("worker", str(study), "--storage", storage, "--quiet", cwd=tmp_path)
    wait_until(
        lambda: has_running_tracked_trial(storage, tracking),
        timeout=120,
        what="the first worker's trial to start",
    )
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    killed = next(t for t in trials_of(storage) if t.state.name == "RUNNING")
    started = time.monotonic()
    survivor = tuner("worker", str(study), "--storage", storage, "--quiet", cwd=tmp_path)
    wait_until(
        lambda: next(t for t in trials_of(storage) if t.number == killed.number).state.name == "FAIL",
        timeout=60,
        what="the killed trial to be failed",
    )
    # Failed by the survivor once the heartbeat was older than the grace period (4 s), plus its start-up.
    assert time.monotonic() - started < 60
    code, out = finish(survivor, timeout=600)
    assert code == 0, out
    trials = trials_of(storage)
    retry = next(t for t in trials if t.user_attrs.get(RETRY_OF) == killed.number)
    assert retry.params == killed.params and retry.state.name == "COMPLETE"
    assert_exact(trials, 3)
    runs = {r.info.run_id: r for r in mlflow_runs(tracking)}
    # Its worker died before the trial's end recorded the run's id: the survivor found the run by its tags.
    assert "mlflow_run_id" not in killed.user_attrs
    [lost] = [r for r in trial_runs(list(runs.values())) if r.data.tags["optuna.trial_number"] == str(killed.number)]
    assert lost.info.status == "KILLED"
    assert "worker lost" in lost.data.tags["stop_reason"]
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


def _pg_cluster() -> tuple[str, str] | None:
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir() or os.geteuid() != 0:
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    return (versions[-1], "main") if versions else None


def _restart_mid_study(
    tmp_path: Path, storage: str, n_trials: int, restart_after: Sequence[int], pack: int | None = None
) -> None:
    """Two workers on one study; PostgreSQL restarted once each listed number of trials has completed."""
    study = write_study(tmp_path, n_trials=n_trials, **({"pack": pack} if pack else {}))
    if pack:
        one_shape(study)
    assert finish(tuner("create", str(study), "--storage", storage, cwd=tmp_path))[0] == 0
    workers = [tuner("worker", str(study), "--storage", storage, "--quiet", cwd=tmp_path) for _ in range(2)]
    version, cluster = _pg_cluster()  # type: ignore[misc]

    def completed(n: int) -> Callable[[], bool]:
        return lambda: len([t for t in trials_of(storage) if t.state.name == "COMPLETE"]) >= n

    for complete in restart_after:
        wait_until(completed(complete), 180, f"{complete} trials")
        restart = ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"]
        subprocess.run(restart, check=True, timeout=120)
    results = [finish(w, timeout=600, storage=storage) for w in workers]
    assert all(code == 0 for code, _ in results), [out[-3000:] for _, out in results]
    assert_exact(trials_of(storage), n_trials)


@postgres
@needs_pg
@pytest.mark.skipif(_pg_cluster() is None, reason="needs root and pg_ctlcluster to restart the local PostgreSQL")
def test_a_database_restart_mid_study_loses_and_doubles_nothing(tmp_path, pg_database):
    # Three restarts, each after a few more trials: each meets the workers somewhere else in their loop.
    _restart_mid_study(tmp_path, pg_database(), 16, restart_after=(3, 6, 9))


@pytest.mark.slow
@postgres
@needs_pg
@pytest.mark.skipif(_pg_cluster() is None, reason="needs root and pg_ctlcluster to restart the local PostgreSQL")
def test_many_database_restarts_lose_double_and_strand_nothing(tmp_path, pg_database):
    # Twelve restarts over 300 short trials: enough that some meet a worker mid-ask, whose trial nobody runs.
    _restart_mid_study(tmp_path, pg_database(), 300, restart_after=range(20, 260, 20))


@pytest.mark.slow
@postgres
@needs_pg
@pytest.mark.skipif(_pg_cluster() is None, reason="needs root and pg_ctlcluster to restart the local PostgreSQL")
def test_many_database_restarts_with_packing_workers_lose_double_and_strand_nothing(tmp_path, pg_database):
    # Packs are taken, beaten and settled several trials at once: restarts meet those writes too.
    _restart_mid_study(tmp_path, pg_database(), 200, restart_after=range(20, 180, 20), pack=4)


@postgres
@needs_pg
def test_workers_log_to_an_mlflow_server_over_http(tmp_path, pg_database):
    storage, backend = pg_database(), pg_database()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(tmp_path / "served"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import urllib.request

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    return reply.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout=120, what="the MLflow server")
        uri = f"http://127.0.0.1:{port}"
        study = write_study(tmp_path, n_trials=8, tracking=uri)
        assert finish(tuner("create", str(study), "--storage", storage, cwd=tmp_path))[0] == 0
        workers = [tuner("worker", str(study), "--storage", storage, "--quiet", cwd=tmp_path) for _ in range(2)]
        results = [finish(w) for w in workers]
        assert all(code == 0 for code, _ in results), [out for _, out in results]
        trials = trials_of(storage)
        assert_exact(trials, 8)
        assert_one_run_per_trial(trials, mlflow_runs(uri))
        assert (tmp_path / "served").is_dir()  # artifacts went through the server
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_stop_as_a_finished_trials_heartbeat_ends_records_the_trial_complete(monkeypatch):
    # The trial's run is closed FINISHED by then: failing the trial and running it again would contradict it.
    from tuner import worker

    def stopped_at_exit(self, *exc):
        raise worker.Terminated("signal 15")

    monkeypatch.setattr(worker.Heartbeat, "__exit__", stopped_at_exit)
    study = optuna.create_study(study_name="workers")
    trial = study.ask()
    worker.CUT_SHORT.clear()
    finished: list = []
    with pytest.raises(worker.Terminated):
        worker._run_one(study, trial, lambda t: 0.75, max_retries=3, total=5, finished=finished)
    (told,) = study.get_trials()
    assert (told.state.name, told.value) == ("COMPLETE", 0.75)
    assert [t.number for t in finished] == [0]  # reported: it has its progress line
    assert worker.CUT_SHORT == [] and worker.interrupted_summary() == "no trial was cut short"


class SettlesThenStops:
    """A pack objective: its first trial leaves the pack with 0.75, then a stop cuts the rest short."""

    def __call__(self, trial):
        raise AssertionError("runs trials as a pack")

    def run_pack(self, trials, on_settled=None):
        on_settled(0, 0.75)
        raise tuner_worker.Terminated("signal 15")


@pytest.mark.parametrize("stop", ["after-telling", "sigterm-while-telling", "ctrl-c-before-telling"])
def test_a_stop_in_a_pack_keeps_the_trials_it_finished_and_queues_the_rest_again(monkeypatch, stop):
    worker = tuner_worker
    study = optuna.create_study(study_name="workers")
    trials = [study.ask() for _ in range(3)]
    real_tell = worker._tell_outcome
    calls: list[int] = []

    def stopped_while_telling(study, trial, outcome):
        calls.append(trial.number)
        if stop == "sigterm-while-telling":
            os.kill(os.getpid(), signal.SIGTERM)  # lands in this (main) thread, mid-tell: held until it is told
        elif len(calls) == 1:
            raise KeyboardInterrupt  # the trial's run is closed, its telling cut short: told after all
        return real_tell(study, trial, outcome)

    if stop != "after-telling":
        monkeypatch.setattr(worker, "_tell_outcome", stopped_while_telling)
    worker.CUT_SHORT.clear()
    finished: list = []
    raised = KeyboardInterrupt if stop == "ctrl-c-before-telling" else worker.Terminated
    with worker.terminate_on_sigterm(), pytest.raises(raised):
        worker._run_pack(study, trials, SettlesThenStops(), 3, 5, finished)
    states = [(t.number, t.state.name, t.value) for t in study.get_trials()]
    assert states[:3] == [(0, "COMPLETE", 0.75), (1, "FAIL", None), (2, "FAIL", None)]
    assert [t.number for t in finished] == [0]  # reported: it has its progress line
    # A SIGTERM while the trial is told waits for it; a Ctrl-C cuts the telling short, and it is told again.
    assert calls == {"after-telling": [], "sigterm-while-telling": [0], "ctrl-c-before-telling": [0, 0]}[stop]
    assert worker.CUT_SHORT == [(1, True), (2, True)]
    assert [t.state.name for t in study.get_trials()[3:]] == ["WAITING", "WAITING"]  # queued again


def test_a_command_that_fails_before_the_study_file_exists_leaves_no_lock(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    with pytest.raises(RuntimeError), sqlite_single_process(url):
        assert (tmp_path / "optuna.db.lock").exists()
        raise RuntimeError("refused before the study was made")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_database_is_named_as_such(tmp_path):
    path = tmp_path / "optuna.db"
    path.write_text("garbage")
    with pytest.raises(StorageError, match=r"study\.storage: .*optuna\.db is not an SQLite database"):
        sqlite_study_names(path)


def test_a_second_process_on_an_sqlite_study_is_refused(tmp_path):
    study = write_study(tmp_path, n_trials=1)
    url = f"sqlite:///{tmp_path}/optuna.db"
    with sqlite_single_process(url):
        code, out = finish(tuner("run", str(study), "--storage", url, cwd=tmp_path))
    assert code == 2
    assert "is in use by another tuner process" in out and "PostgreSQL" in out
    # Once the holder is gone the study runs.
    code, out = finish(tuner("run", str(study), "--storage", url, cwd=tmp_path))
    assert code == 0, out


@pytest.mark.parametrize("writes", ["inline", "background", "process"])
def test_sigterm_fails_the_running_trial_closes_its_run_and_queues_it_again(tmp_path, writes):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    study = write_study(tmp_path, n_trials=3, big=True, epochs=80, tracking=tracking, writes=writes)
    url = f"sqlite:///{tmp_path}/optuna.db"
    proc = tuner("run", str(study), "--storage", url, "--quiet", cwd=tmp_path)
    wait_until(
        # 80 epochs take seconds: a trial that started within the last second is mid-training when the signal
        # lands. Past its last epoch, a SIGTERM that Python lost in a finaliser is raised again only once the
        # finished trial is recorded, and then no trial is cut short.
        lambda: (tmp_path / "optuna.db").exists() and has_running_tracked_trial(url, tracking, started_within=1.0),
        timeout=120,
        what="a trial that has just started",
        proc=proc,
    )
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=60)
    assert code == 143, out
    assert time.monotonic() - sent < 30, "the worker must exit promptly"
    trials = trials_of(url)
    assert [t.state.name for t in trials].count("FAIL") == 1, ([(t.number, t.state.name) for t in trials], out)
    failed = next(t for t in trials if t.state.name == "FAIL")
    queued = next(t for t in trials if t.state.name == "WAITING")
    assert queued.user_attrs[RETRY_OF] == failed.number
    assert queued.user_attrs[tuner_worker.RETRY_COUNT] == 0  # a stop is no fault of the trial: no retry used up
    assert queued.system_attrs["fixed_params"] == failed.params  # a queued trial holds its params there
    assert failed.user_attrs[LOST] == "interrupted (Ctrl-C or SIGTERM)"
    assert f"terminated: trial(s) {failed.number} recorded FAIL and queued again" in " ".join(out.split())
    runs = {r.info.run_id: r for r in mlflow_runs(tracking)}
    assert runs[failed.user_attrs["mlflow_run_id"]].info.status == "FAILED"
    assert runs[failed.user_attrs["mlflow_run_id"]].data.tags["stop_reason"] == "interrupted (Ctrl-C or SIGTERM)"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


@postgres
@needs_pg
def test_the_budget_check_holds_a_postgres_advisory_lock(pg_database):
    import psycopg

    from tuner.worker import budget_lock

    url = pg_database()
    study = optuna.create_study(study_name="workers", storage=url)
    dbname = url.rsplit("/", 1)[1]

    def advisory_locks() -> int:
        with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={dbname}") as conn:
            return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]

    assert advisory_locks() == 0
    with budget_lock(study):
        # Without it two workers could both take the last slot and overshoot n_trials.
        assert advisory_locks() == 1
    assert advisory_locks() == 0
    study._storage._backend.engine.dispose()  # type: ignore[attr-defined]


@postgres
@needs_pg
def test_on_postgres_the_worker_holding_the_repair_lock_repairs_the_runs_a_tracking_outage_left(
    tmp_path, pg_database, monkeypatch
):
    import psycopg
    from mlflow import MlflowClient
    from tiny import TINY_DATA, TINY_SPACE

    from tuner import tracking as tracking_mod
    from tuner.config import spec_from_dict
    from tuner.data.dataset import build_dataset
    from tuner.study import run_study
    from tuner.worker import repair_lock

    url = pg_database()
    spec = spec_from_dict(
        {
            "data": TINY_DATA,
            "search_space": TINY_SPACE,
            "train": {"max_epochs": 3, "patience": 2},
            "study": {"name": "repairs", "n_trials": 2, "seed": 3, "pruner": "none", "storage": url},
            "tracking": {
                "uri": f"sqlite:///{tmp_path}/mlflow.db",
                "artifact_location": str(tmp_path / "art"),
                "writes": "inline",  # open_run and close_run, patched here, run in this process
            },
        }
    )
    dataset = build_dataset(spec)
    real_open, real_close = tracking_mod.open_run, tracking_mod.close_run
    closes: list[int] = []

    def store_gone_as_trial_1_starts(key, experiment_id, run_name, *args):
        if run_name != "trial-0001":
            return real_open(key, experiment_id, run_name, *args)
        tracking_mod.RUNS.record(tracking_mod.CreatedRun(key, None, None))
        return [(f"start of {run_name}", "connection refused")]

    def store_gone_as_trial_0_ends(*args):
        closes.append(1)
        return [] if len(closes) == 1 else real_close(*args)

    def trial_runs() -> dict[str, str]:
        client = MlflowClient(spec.tracking.uri)
        runs = client.search_runs([client.get_experiment_by_name("repairs").experiment_id])
        return {r.data.tags["optuna.trial_number"]: r.info.status for r in runs if r.data.tags["tuner.kind"] == "trial"}

    monkeypatch.setattr(tracking_mod, "open_run", store_gone_as_trial_1_starts)
    monkeypatch.setattr(tracking_mod, "close_run", store_gone_as_trial_0_ends)
    run_study(spec, dataset=dataset)
    monkeypatch.setattr(tracking_mod, "open_run", real_open)
    monkeypatch.setattr(tracking_mod, "close_run", real_close)
    assert trial_runs() == {"0": "RUNNING"}
    other = optuna.load_study(study_name="repairs", storage=url)
    with repair_lock(other) as held:
        assert held  # another worker, repairing: this one leaves the runs to it
        run_study(spec, dataset=dataset)
        assert trial_runs() == {"0": "RUNNING"}
    run_study(spec, dataset=dataset)
    run_study(spec, dataset=dataset)
    # Trial 1's run made once; trial 0's left open, its end perhaps still on the way from a live worker.
    assert trial_runs() == {"0": "RUNNING", "1": "FINISHED"}
    with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={url.rsplit('/', 1)[1]}") as conn:
        # Ten minutes on, by the database server's clock, whatever the workers' clocks say.
        conn.execute("UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '11 minutes'")
    run_study(spec, dataset=dataset)
    assert trial_runs() == {"0": "FINISHED", "1": "FINISHED"}
    other._storage._backend.engine.dispose()  # type: ignore[attr-defined]


@postgres
@needs_pg
def test_a_worker_gone_while_it_holds_the_budget_lock_frees_it_after_the_grace_period(tmp_path, pg_database):
    # A process that takes the lock and then does nothing stands for a machine that vanished mid-take: its
    # connection stays open, so without a limit the server would keep the lock for hours.
    import threading

    from tuner.worker import budget_lock, make_storage

    url = pg_database()
    optuna.create_study(study_name="workers", storage=make_storage(url, heartbeat_interval=1, grace_period=2))
    holder_script = (
        "import sys, time, optuna\n"
        "from tuner.worker import budget_lock, make_storage\n"
        "storage = make_storage(sys.argv[1], heartbeat_interval=1, grace_period=2)\n"
        "study = optuna.load_study(study_name='workers', storage=storage)\n"
        "with budget_lock(study):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_script, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        study = optuna.load_study(study_name="workers", storage=make_storage(url, heartbeat_interval=1, grace_period=2))
        taken = threading.Event()

        def take() -> None:
            with budget_lock(study):
                taken.set()

        threading.Thread(target=take, daemon=True).start()
        assert taken.wait(timeout=60), "the lock of a silent holder was never freed"
    finally:
        holder.kill()
        holder.wait()


def test_looking_at_an_sqlite_study_being_made_writes_nothing(tmp_path):
    """`tuner status` on a file whose tables another process is still making: no study yet, and no schema row
    written that would make that process fail."""
    import sqlite3

    from tuner.worker import find_study, load_existing

    path = tmp_path / "optuna.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE studies (study_id INTEGER PRIMARY KEY, study_name VARCHAR(512))")
        conn.commit()
    before = path.read_bytes()
    url = f"sqlite:///{path}"
    assert find_study("workers", url) is None
    with pytest.raises(StorageError, match=r"study 'workers' not found .* studies there: none"):
        load_existing("workers", url)
    assert path.read_bytes() == before  # no alembic_version or version_info rows, no new tables
    assert sqlite_study_names(tmp_path / "missing.db") == [] and not (tmp_path / "missing.db").exists()


def test_opening_a_study_rides_out_a_database_restart(tmp_path, monkeypatch):
    # A worker that starts while the database restarts must wait for it, not exit.
    from tuner import worker

    url = f"sqlite:///{tmp_path}/restart.db"
    optuna.create_study(study_name="restart", storage=url)
    real = optuna.get_all_study_names
    calls: list[str] = []

    def restarting(storage):
        calls.append("look")
        if len(calls) == 1:
            raise restart_error("SELECT 1")
        return real(storage)

    monkeypatch.setattr(optuna, "get_all_study_names", restarting)
    monkeypatch.setattr(worker.time, "sleep", lambda seconds: None)  # the backoff, not synchronisation
    study = worker.find_study("restart", url)
    assert study is not None and study.study_name == "restart"
    assert calls == ["look", "look"]


def test_a_trial_taken_as_the_database_went_away_is_failed_and_run_again(tmp_path, monkeypatch):
    # The database commits a new trial, then the connection drops before the worker hears back: the worker asks
    # again, and the first trial stays RUNNING with no heartbeat. Optuna never counts such a trial stale, so every
    # worker would wait for it forever; it must be failed once a grace period has passed and its slot run again.
    from tuner import worker
    from tuner.tracking import NullTracker

    url = f"sqlite:///{tmp_path}/orphan.db"
    on_stale = worker.stale_trial_handler(NullTracker(), max_retries=3, lost="no heartbeat for 2 s")
    storage = worker.make_storage(url, heartbeat_interval=1, grace_period=2, on_stale=on_stale)
    study = optuna.create_study(study_name="orphan", storage=storage)
    real_ask = worker._ask
    asked: list[int] = []

    def ask_and_lose_the_reply(study):
        trial = real_ask(study)
        asked.append(trial.number)
        if len(asked) == 1:
            raise restart_error("COMMIT", "server closed the connection unexpectedly")
        return trial

    monkeypatch.setattr(worker, "_ask", ask_and_lose_the_reply)
    monkeypatch.setattr(worker.time, "sleep", lambda seconds: None)  # the retry's backoff only
    result = worker.work(study, lambda trial: trial.suggest_float("x", 0, 1), total=3, timeout=30, poll_interval=0.05)
    trials = study.get_trials(deepcopy=False)
    assert result.finished_study, [(t.number, t.state.name) for t in trials]
    lost = trials[0]
    assert lost.state.name == "FAIL"
    retries = [t for t in trials if t.user_attrs.get(RETRY_OF) == lost.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert_exact(trials, 3)


def test_a_retry_queued_again_after_a_lost_reply_is_queued_once(tmp_path):
    from tuner.worker import enqueue_retry

    study = optuna.create_study(study_name="retry", storage=f"sqlite:///{tmp_path}/retry.db")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    lost = study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert enqueue_retry(study, lost, max_retries=3)
    assert enqueue_retry(study, lost, max_retries=3)  # the same call again, as a retried one would be
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    queued = [(t.system_attrs.get("fixed_params"), t.user_attrs[RETRY_OF]) for t in waiting]
    assert queued == [(lost.params, lost.number)]


def test_a_trial_stopped_by_a_signal_is_queued_again_without_using_up_its_retries(tmp_path):
    from tuner.worker import RETRY_COUNT, enqueue_retry

    study = optuna.create_study(study_name="stops", storage=f"sqlite:///{tmp_path}/stops.db")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr(RETRY_COUNT, 3)  # its third retry, the last one max_retries 3 allows
    spent = study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert not enqueue_retry(study, spent, max_retries=3)  # failing again: not retried
    assert enqueue_retry(study, spent, max_retries=3, counted=False)  # stopped by Ctrl-C or SIGTERM: retried
    (queued,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert queued.user_attrs[RETRY_OF] == spent.number and queued.user_attrs[RETRY_COUNT] == 3


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_a_lost_trial_queued_again_by_two_callers_at_once_is_queued_once(tmp_path, pg_database, backend, monkeypatch):
    # Its own worker (a storage error) and another worker's stale check may queue one lost trial at the same moment.
    from tuner import worker

    url = _study_url(backend, tmp_path, pg_database)
    first = optuna.create_study(study_name="race", storage=url)
    trial = first.ask()
    trial.suggest_float("x", 0, 1)
    lost = first.tell(trial, state=optuna.trial.TrialState.FAIL)
    if backend == "postgresql":
        # Two processes share only the database's lock: two engines in one process stand for them here.
        monkeypatch.setattr(worker, "_retry_lock", contextlib.nullcontext())
    callers = [first, optuna.load_study(study_name="race", storage=url)]
    both_looked = threading.Barrier(2, timeout=1.0)
    enqueue = optuna.Study.enqueue_trial

    def enqueue_once_both_looked(self: optuna.Study, *args, **kwargs):
        # Unserialised, both callers get here having found no retry, and pass the barrier together; serialised, the
        # second waits for the first's lock, so the barrier breaks at its timeout and the first goes on alone.
        with contextlib.suppress(threading.BrokenBarrierError):
            both_looked.wait()
        return enqueue(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue_once_both_looked)
    answers: list[bool] = []
    threads = [threading.Thread(target=lambda s=s: answers.append(worker.enqueue_retry(s, lost, 3))) for s in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == [True, True]
    trials = optuna.load_study(study_name="race", storage=url).get_trials()
    assert [t.user_attrs.get(RETRY_OF) for t in trials if t.state.name == "WAITING"] == [lost.number]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_a_lost_trial_that_held_no_slot_is_marked_surplus_not_retried(tmp_path, pg_database, backend):
    # A restart can leave a trial created after the other workers filled the budget: its retry would strand.
    from tuner.worker import budget, budget_of_trials, enqueue_retry

    url = _study_url(backend, tmp_path, pg_database)
    study = optuna.create_study(study_name="surplus", storage=url)
    for _ in range(2):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    # Created, never started, after the two trials filled a budget of 2.
    surplus = study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    assert budget(study, 2).used == 3  # failed, not yet replaced: it counts
    assert not enqueue_retry(study, surplus, max_retries=3, total=2)
    # Read afresh, as another process would: this one's cache keeps a finished trial as it was when it finished.
    trials = optuna.load_study(study_name="surplus", storage=url).get_trials()
    assert SURPLUS in trials[surplus.number].user_attrs
    assert not [t for t in trials if t.state.name == "WAITING"]
    assert budget(study, 2).used == 2 and budget(study, 2).done
    assert budget_of_trials(trials, 2) == budget(study, 2)
    # With a budget of 3, a trial lost the same way held the third slot: it is retried.
    lost = study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    assert enqueue_retry(study, lost, max_retries=3, total=3)
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs[RETRY_OF] for t in queued] == [lost.number]
    assert SURPLUS not in optuna.load_study(study_name="surplus", storage=url).trials[lost.number].user_attrs


def test_lost_trials_failed_as_the_database_restarts_are_each_queued_again(tmp_path, monkeypatch):
    # Optuna's stale check failed every lost trial, then read each back for its callback: a restart in between
    # left them failed with no retry, since the retried check found none RUNNING any more.
    import datetime

    from optuna.storages._rdb.models import TrialHeartbeatModel

    from tuner import worker

    retried: list[int] = []

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retried.append(trial.number)
        worker.enqueue_retry(study, trial, max_retries=3)

    storage = worker.make_storage(
        f"sqlite:///{tmp_path}/lost.db", heartbeat_interval=1, grace_period=2, on_stale=on_stale
    )
    study = optuna.create_study(study_name="lost", storage=storage)
    with worker._quiet_optuna():  # ask warns that heartbeats are meant for optimize; workers ask, as here
        lost = [study.ask() for _ in range(2)]
    for trial in lost:
        trial.suggest_float("x", 0, 1)
    worker.record_heartbeats(storage, [trial._trial_id for trial in lost])
    with storage.engine.begin() as conn:  # their worker died long ago
        conn.execute(TrialHeartbeatModel.__table__.update().values(heartbeat=datetime.datetime(2000, 1, 1)))
    real_get_trial = optuna.storages.RDBStorage.get_trial
    restarted: list[int] = []

    def get_trial_across_a_restart(self, trial_id: int):
        if not restarted:
            restarted.append(trial_id)
            raise restart_error()
        return real_get_trial(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "get_trial", get_trial_across_a_restart)
    worker.retrying(lambda: worker.fail_stale_trials(study), what="check for lost trials", first_wait=0.01)
    assert restarted and sorted(retried) == [trial.number for trial in lost]
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.user_attrs[RETRY_OF] for t in queued) == [trial.number for trial in lost]
    assert [t.system_attrs["fixed_params"] for t in queued] == [trial.params for trial in lost]
    # Each was marked lost before it was failed: had its retry not been queued, retry_lost_trials would find it.
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [t.user_attrs[LOST] for t in failed] == ["lost its heartbeat (its worker is gone)"] * 2


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_a_lost_trial_whose_worker_died_before_queueing_its_retry_is_queued_by_the_next_worker(
    tmp_path, pg_database, backend
):
    # A lost trial is failed, then queued again: a worker killed in between left it failed with no retry, and the
    # study one good trial short. Trials failed for their own sake, or out of retries, are not queued again.
    from tuner import worker

    url = _study_url(backend, tmp_path, pg_database)
    assert url is not None
    storage = worker.make_storage(url, heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(study_name="unretried", storage=storage)
    for x in (0.25, 0.5, 0.75):
        study.enqueue_trial({"x": x})
    with worker._quiet_optuna():
        killed, failing, spent = (study.ask() for _ in range(3))
    for trial in (killed, failing, spent):
        trial.suggest_float("x", 0, 1, step=0.25)
    worker.record_trial(spent, {worker.RETRY_COUNT: 2})
    for trial in (killed, spent):
        assert worker._mark_lost_once(storage, trial._trial_id, worker.LOST_TO_STORAGE)()
    for trial in (killed, failing, spent):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1, step=0.25)

    result = worker.work(study, objective, total=4, max_retries=2)
    trials = study.get_trials()
    retries = [t for t in trials if RETRY_OF in t.user_attrs]
    assert [(t.user_attrs[RETRY_OF], t.params, t.state.name) for t in retries] == [(0, {"x": 0.25}, "COMPLETE")]
    # One new trial for the free slot, then the retry, which replaces the killed one in the budget.
    assert result.ran == 2 and result.finished_study and len(trials) == 5
    assert worker.budget(study, 4).used == 4
    assert worker.retry_lost_trials(study, max_retries=2, total=4) == []
    assert worker.losses(study) == worker.Losses(lost=2, queued_again=1, surplus=0)


def test_status_tells_trials_lost_by_the_machinery_from_trials_failed_in_training(tmp_path, capsys):
    from tuner.cli import main
    from tuner.worker import LOST, RETRY_OF, SURPLUS, Losses, losses

    url = f"sqlite:///{tmp_path}/status.db"
    study = optuna.create_study(study_name="losses", storage=url)
    FAIL = optuna.trial.TrialState.FAIL
    # Lost and queued again before lost trials were marked: told by its retry alone.
    old_lost = study.tell(study.ask(), state=FAIL)
    study.enqueue_trial({}, user_attrs={RETRY_OF: old_lost.number})
    study.tell(study.ask(), 1.0)
    study.tell(study.ask(), state=FAIL)  # failed in training
    surplus = study.ask()
    surplus.set_user_attr(LOST, "lost to a storage error")
    surplus.set_user_attr(SURPLUS, "created beyond n_trials=3 during a database outage")
    study.tell(surplus, state=FAIL)
    assert losses(study) == Losses(lost=2, queued_again=1, surplus=1)
    assert main(["status", "losses", "--storage", url]) == 0
    out = " ".join(capsys.readouterr().out.split())
    lost = "2 lost (worker died or stopped, or the database went away), 1 of them queued again, 1 surplus"
    assert f"failed: 1 in training; {lost}" in out
    # Failed in training only: said so, not left to be guessed.
    only = optuna.create_study(study_name="trained", storage=url)
    only.tell(only.ask(), state=FAIL)
    assert main(["status", "trained", "--storage", url]) == 0
    assert "failed: 1 in training; none lost" in " ".join(capsys.readouterr().out.split())


def test_a_trial_callback_that_meets_a_database_restart_is_retried(tmp_path, monkeypatch):
    # The command line's progress line reads the best value after each trial: a restart then must not end the worker.
    from tuner import worker

    storage = worker.make_storage(f"sqlite:///{tmp_path}/callback.db", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="callback", storage=storage)
    reported: list[int] = []

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reported.append(trial.number)
        if len(reported) == 1:
            raise restart_error()

    monkeypatch.setattr(worker.time, "sleep", lambda seconds: None)  # the retry's backoff only
    result = worker.work(study, lambda trial: trial.suggest_float("x", 0, 1), total=2, callbacks=[report])
    assert result.finished_study and result.ran == 2
    assert reported == [0, 0, 1]


def test_a_queued_trial_lost_before_it_drew_its_parameters_is_retried_with_them(tmp_path):
    from tuner.worker import enqueue_retry

    study = optuna.create_study(study_name="queued", storage=f"sqlite:///{tmp_path}/queued.db")
    study.enqueue_trial({"x": 0.25})
    lost = study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # taken from the queue, never run
    assert lost.params == {}
    assert enqueue_retry(study, lost, max_retries=3)
    retry = study.ask()
    assert retry.suggest_float("x", 0, 1) == 0.25 and retry.user_attrs[RETRY_OF] == lost.number


def _study_url(backend: str, tmp_path: Path, pg_database: Callable[[], str]) -> str | None:
    """A fresh study storage of the kind named: None (in memory), an SQLite file or a PostgreSQL database."""
    if backend == "memory":
        return None
    return f"sqlite:///{tmp_path}/study.db" if backend == "sqlite" else pg_database()


@pytest.mark.parametrize("backend", ["memory", "sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_a_trial_recorded_at_once_reads_back_as_if_written_one_by_one(tmp_path, pg_database, backend):
    from tuner.worker import record_trial

    url = _study_url(backend, tmp_path, pg_database)
    study = optuna.create_study(study_name="attrs", storage=url)
    trial = study.ask()
    trial.set_user_attr("epochs", 1)
    attrs = {"epochs": 5, "stop_reason": "patience", "fold_epochs": [3, 4], "manifest": {"seed": 7, "x": None}}
    steps = {0: 0.5, 1: 0.75, 2: float("nan"), 3: float("inf")}
    record_trial(trial, attrs, steps)
    # The trial object sees them at once, the earlier value replaced.
    assert trial.user_attrs == attrs and trial._cached_frozen_trial.intermediate_values.keys() == steps.keys()
    study.tell(trial, 0.5)
    again = optuna.load_study(study_name="attrs", storage=url) if url else study
    stored = again.trials[0]
    assert stored.user_attrs == attrs
    assert stored.intermediate_values.keys() == steps.keys() and stored.intermediate_values[1] == 0.75
    assert math.isnan(stored.intermediate_values[2]) and stored.intermediate_values[3] == float("inf")
    # A finished trial is not changed, as with Optuna's own calls, and nothing of the refused batch is stored.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        record_trial(trial, {"epochs": 6, "late": True}, {4: 1.0})
    reread = optuna.load_study(study_name="attrs", storage=url) if url else study
    assert reread.trials[0].user_attrs == attrs and 4 not in reread.trials[0].intermediate_values
    backend_storage = getattr(study._storage, "_backend", None)
    if backend_storage is not None:
        backend_storage.engine.dispose()


@pytest.mark.parametrize("backend", ["memory", "sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_a_pack_is_taken_at_once_within_the_budget_each_trial_with_its_heartbeat(tmp_path, pg_database, backend):
    from tuner.worker import _ask, _take_trials, make_storage, record_heartbeats

    url = _study_url(backend, tmp_path, pg_database)
    storage = make_storage(url, heartbeat_interval=60, grace_period=120) if url else None
    study = optuna.create_study(study_name="take", storage=storage)
    study.tell(_ask(study), 1.0)  # one slot of the five already spent
    for x in (0.1, 0.2, 0.3):
        study.enqueue_trial({"x": x})
    taken = _take_trials(study, total=5, most=8)
    # Four slots left: four taken, the three queued first (in order), then a fresh one.
    assert [t.number for t in taken] == [1, 2, 3, 4]
    assert [t.suggest_float("x", 0, 1) for t in taken[:3]] == [0.1, 0.2, 0.3]
    assert _take_trials(study, total=5, most=8) == []
    if url is None:
        return
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from sqlalchemy import select

    backend_storage = study._storage._backend
    beats = select(TrialHeartbeatModel.trial_id, TrialHeartbeatModel.heartbeat)
    with backend_storage.engine.connect() as conn:
        first = dict(conn.execute(beats).all())
    assert sorted(first) == [t._trial_id for t in taken]
    # None of them is stale for Optuna's own check: the beats carry the database's clock, as its own do.
    assert backend_storage._get_stale_trial_ids(study._study_id) == []
    # Beating again updates the rows (the first trial's too), as Optuna's record_heartbeat does.
    record_heartbeats(study._storage, [taken[0]._trial_id, taken[1]._trial_id])
    with backend_storage.engine.connect() as conn:
        again = dict(conn.execute(beats).all())
    assert again.keys() == first.keys() and again[taken[0]._trial_id] >= first[taken[0]._trial_id]
    backend_storage.engine.dispose()


def worker_study_of(url: str, name: str) -> optuna.Study:
    """The study as a worker opens it: tuner's storage, with heartbeats."""
    from tuner.worker import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(url, heartbeat_interval=60, grace_period=120))


@postgres
@needs_pg
def test_workers_that_wait_for_the_budget_lock_together_share_the_free_slots(pg_database):
    # Two packing workers arrive while a third holds the lock: the first served leaves the other its share,
    # instead of taking every free slot while it stands idle.
    import threading

    from tuner.worker import _take_trials, budget_lock, workers_waiting

    url = pg_database()
    optuna.create_study(study_name="share", storage=url)

    def worker_study() -> optuna.Study:
        return worker_study_of(url, "share")

    holder, watcher = worker_study(), worker_study()
    taken: dict[str, int] = {}
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with budget_lock(holder):
            held.set()
            release.wait(timeout=60)

    def take(name: str) -> None:
        taken[name] = len(_take_trials(worker_study(), total=8, most=8))

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    assert held.wait(timeout=60)
    threads += [threading.Thread(target=take, args=(name,)) for name in ("a", "b")]
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 60
    while workers_waiting(watcher) < 2:  # both queued behind the holder (the database's lock table says so)
        assert time.monotonic() < deadline, "the two workers never queued for the lock"
    release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(taken.values()) == [4, 4]
    assert workers_waiting(watcher) == 0


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_two_workers_asking_at_once_never_take_the_same_queued_trial(tmp_path, pg_database, backend):
    from tuner.worker import _ask

    url = _study_url(backend, tmp_path, pg_database)
    first = optuna.create_study(study_name="queue", storage=url)
    for x in (0.1, 0.2):
        first.enqueue_trial({"x": x})
    second = optuna.load_study(study_name="queue", storage=url)
    claim = second._storage.set_trial_state_values
    taken_meanwhile: list[optuna.Trial] = []

    def first_worker_wins(trial_id, state, values=None):
        # The second worker has read the queue; the first takes its head before the second claims it.
        if not taken_meanwhile:
            taken_meanwhile.append(_ask(first))
        return claim(trial_id, state=state, values=values)

    second._storage.set_trial_state_values = first_worker_wins
    late = _ask(second)
    (early,) = taken_meanwhile
    assert (early.number, late.number) == (0, 1)
    assert (early.suggest_float("x", 0, 1), late.suggest_float("x", 0, 1)) == (0.1, 0.2)
    # The queue is empty: a new trial.
    assert _ask(first).number == 2
    for study in (first, second):
        study._storage._backend.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_the_budget_counted_in_the_database_equals_the_one_counted_from_the_trials(tmp_path, pg_database, backend):
    from tuner.worker import budget, budget_of_trials, enqueue_retry

    url = _study_url(backend, tmp_path, pg_database)
    study = optuna.create_study(study_name="budget", storage=url)

    def run(state: optuna.trial.TrialState | None) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        if state is None:
            return study._storage.get_trial(trial._trial_id)
        return study.tell(trial, 0.5 if state == optuna.trial.TrialState.COMPLETE else None, state=state)

    states = optuna.trial.TrialState
    seen = []
    for state in (states.COMPLETE, states.PRUNED, states.FAIL, states.FAIL):
        seen.append(run(state))
    enqueue_retry(study, seen[2], max_retries=3)  # a failed trial retried: the retry counts, it no longer does
    retry = study.ask()  # the retry taken, and failed again: retried once more
    retry = study.tell(retry, state=states.FAIL)
    enqueue_retry(study, retry, max_retries=3)
    run(None)  # the second retry taken: running
    study.enqueue_trial({"x": 0.25})  # one queued by hand
    for total in (3, 20):
        counted = budget(study, total)
        assert counted == budget_of_trials(study.get_trials(deepcopy=False), total)
    # 4 finished + 1 failed retry, less the 2 failures that were retried; 1 running; 1 queued.
    assert (counted.used, counted.running, counted.waiting) == (3, 1, 1)
    backend_storage = getattr(study._storage, "_backend", None)
    if backend_storage is not None:
        backend_storage.engine.dispose()


@pytest.mark.parametrize("backend", ["memory", "sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_parameters_stored_at_once_are_what_optuna_stores_one_by_one(tmp_path, pg_database, backend):
    from tuner.worker import params_stored_at_once

    url = _study_url(backend, tmp_path, pg_database)
    study = optuna.create_study(study_name="params", storage=url, sampler=optuna.samplers.RandomSampler(seed=3))

    def draw(trial: optuna.Trial) -> None:
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_int("width", 8, 256, log=True)
        trial.suggest_categorical("optimizer", ["sgd", "adam"])
        trial.suggest_float("dropout", 0.0, 0.5, step=0.1)

    one_by_one = study.ask()
    draw(one_by_one)
    at_once = study.ask()
    with params_stored_at_once(at_once):
        draw(at_once)
        if backend != "memory":  # held back until the block ends
            assert study._storage.get_trial(at_once._trial_id).params == {}
    assert at_once.params.keys() == one_by_one.params.keys()
    for trial in (one_by_one, at_once):
        study.tell(trial, 0.5)
    reread = optuna.load_study(study_name="params", storage=url) if url else study
    first, second = reread.trials
    assert second.params == at_once.params and second.distributions == first.distributions
    # A distribution that does not fit the study's earlier one is refused, as Optuna refuses it; stored at
    # once, the block's other parameters are refused with it.
    bad = study.ask()
    with pytest.raises(ValueError), params_stored_at_once(bad):
        bad.suggest_float("momentum", 0.0, 0.99)
        bad.suggest_categorical("width", ["narrow", "wide"])
    stored = study._storage.get_trial(bad._trial_id).params
    assert set(stored) == ({"momentum"} if backend == "memory" else set())
    study.tell(bad, state=optuna.trial.TrialState.FAIL)
    # A block that fails for another reason keeps what it drew, as one-by-one storing would have.
    broken = study.ask()
    with pytest.raises(RuntimeError), params_stored_at_once(broken):
        broken.suggest_float("momentum", 0.0, 0.99)
        raise RuntimeError("the search space could not be read")
    assert set(study._storage.get_trial(broken._trial_id).params) == {"momentum"}
    # A finished trial is not changed.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError), params_stored_at_once(bad):
        bad.suggest_float("late", 0.0, 1.0)
    backend_storage = getattr(study._storage, "_backend", None)
    if backend_storage is not None:
        backend_storage.engine.dispose()
    if url is not None:
        # The study deleted and made again (its id may be reused): what the old one stored binds nothing.
        optuna.delete_study(study_name="params", storage=url)
        remade = optuna.create_study(study_name="params", storage=url)
        trial = remade.ask()
        with params_stored_at_once(trial):
            trial.suggest_categorical("width", ["narrow", "wide"])
        assert remade._storage.get_trial(trial._trial_id).params == {"width": trial.params["width"]}
        remade._storage._backend.engine.dispose()


@pytest.mark.parametrize("backend", ["memory", "sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_a_told_trial_is_returned_as_the_storage_holds_it(tmp_path, pg_database, backend):
    from tuner.worker import _tell, record_trial

    url = _study_url(backend, tmp_path, pg_database)
    study = optuna.create_study(study_name="tell", storage=url)
    study.enqueue_trial({"x": 0.25}, user_attrs={RETRY_OF: 0})
    told = []
    for state, values in ((None, 0.5), (optuna.trial.TrialState.PRUNED, None), (optuna.trial.TrialState.FAIL, None)):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.report(0.75, 0)
        record_trial(trial, {"epochs": 1}, {1: 0.8})
        told.append(_tell(study, trial, state=state, values=values))
        # Told again, as after a lost reply: nothing changes.
        assert _tell(study, trial, state=state, values=values).state == told[-1].state
    stored = study.get_trials(deepcopy=False)
    fields = ("number", "state", "values", "params", "distributions", "user_attrs", "intermediate_values")
    for mine, theirs in zip(told, stored, strict=True):
        assert {f: getattr(mine, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
        assert mine.system_attrs == theirs.system_attrs
    assert [t.state.name for t in told] == ["COMPLETE", "PRUNED", "FAIL"] and told[1].values == [0.8]
    backend_storage = getattr(study._storage, "_backend", None)
    if backend_storage is not None:
        backend_storage.engine.dispose()


@postgres
@needs_pg
def test_a_study_counts_only_its_own_workers_waiting_for_its_budget_lock(pg_database):
    # Two studies whose names share their first eight bytes: a worker queued on one's lock is not the other's.
    import threading

    from tuner.worker import budget_lock, workers_waiting

    url = pg_database()

    def worker_study(name: str) -> optuna.Study:
        return worker_study_of(url, name)

    for name in ("sdss-qso-a", "sdss-qso-b"):
        optuna.create_study(study_name=name, storage=url)
    release, held = threading.Event(), threading.Event()

    def hold() -> None:
        with budget_lock(worker_study("sdss-qso-a")):
            held.set()
            release.wait(timeout=60)

    def wait_in_line() -> None:
        with budget_lock(worker_study("sdss-qso-a")):
            pass

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(timeout=60)
    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    threads = [holder, waiter]
    deadline = time.monotonic() + 60
    try:
        while workers_waiting(worker_study("sdss-qso-a")) < 1:
            assert time.monotonic() < deadline, "the second worker never queued for the lock"
        assert workers_waiting(worker_study("sdss-qso-b")) == 0
        # Nor does the other study wait for this one's lock to take its trials.
        got_other = threading.Event()

        def take_other() -> None:
            with budget_lock(worker_study("sdss-qso-b")):
                got_other.set()

        threads.append(threading.Thread(target=take_other))
        threads[-1].start()
        assert got_other.wait(timeout=30), "study sdss-qso-b waited for sdss-qso-a's lock"
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=60)


def test_a_stopped_worker_still_reports_the_trials_it_finished():
    study = optuna.create_study(study_name="workers")
    reported: list[tuple[int, str]] = []
    tuner_worker.CUT_SHORT.clear()
    with pytest.raises(tuner_worker.Terminated):
        tuner_worker.work(
            study,
            SettlesThenStops(),
            total=3,
            pack=3,
            callbacks=[lambda study, trial: reported.append((trial.number, trial.state.name))],
        )
    assert reported == [(0, "COMPLETE")]  # its progress line; the trials cut short are in the CLI's last line
    assert tuner_worker.interrupted_summary() == "trial(s) 1, 2 recorded FAIL and queued again"


def test_each_retry_of_a_storage_call_is_one_line(caplog, monkeypatch):
    monkeypatch.setattr(tuner_worker.time, "sleep", lambda seconds: None)
    calls: list[int] = []

    def refused_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise restart_error("SELECT 1\nFROM studies", "connection refused\n\tIs the server running?")
        return "opened"

    with caplog.at_level(logging.WARNING, logger="tuner.worker"):
        assert tuner_worker.retrying(refused_twice, what="open the study") == "opened"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert lines[0].startswith("storage error (attempt 1/8, retrying in 0.5s): OperationalError: ")
    assert "connection refused" in lines[0]


class SettlesAtTheEnd:
    """A pack objective that hands back every trial's outcome only once the pack is done."""

    def __call__(self, trial):
        raise AssertionError("runs trials as a pack")

    def run_pack(self, trials, on_settled=None):
        return [0.25, 0.5, 0.75]


def test_a_sigterm_while_a_pack_that_ended_is_told_still_records_every_outcome(monkeypatch):
    study = optuna.create_study(study_name="workers")
    trials = [study.ask() for _ in range(3)]
    real_tell = tuner_worker._tell_outcome

    def signalled_at_the_first(study, trial, outcome):
        if trial.number == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_tell(study, trial, outcome)

    monkeypatch.setattr(tuner_worker, "_tell_outcome", signalled_at_the_first)
    tuner_worker.CUT_SHORT.clear()
    finished: list = []
    with tuner_worker.terminate_on_sigterm(), pytest.raises(tuner_worker.Terminated):
        tuner_worker._run_pack(study, trials, SettlesAtTheEnd(), 3, 5, finished)
    assert [(t.state.name, t.value) for t in study.get_trials()] == [
        ("COMPLETE", 0.25),
        ("COMPLETE", 0.5),
        ("COMPLETE", 0.75),
    ]
    assert sorted(t.number for t in finished) == [0, 1, 2] and tuner_worker.CUT_SHORT == []


@postgres
@needs_pg
def test_looking_for_a_study_in_an_empty_postgres_database_makes_no_tables(pg_database, capsys):
    from tuner.cli import main

    url = pg_database()
    assert main(["status", "nosuch", "--storage", url]) == 2
    assert "study 'nosuch' not found" in " ".join(capsys.readouterr().err.split())
    assert tuner_worker.find_study("nosuch", url) is None
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        tables = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert tables.fetchone() == (0,)


@postgres
@needs_pg
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+psycopg://postgres@127.0.0.1:5432/tuner_no_such_db", 'database "tuner_no_such_db" does not exist'),
        ("postgresql+psycopg://tuner_no_such_role@127.0.0.1:5432/postgres", 'role "tuner_no_such_role" does not exist'),
    ],
)
def test_a_database_or_user_that_does_not_exist_is_one_message_at_once_not_retried(url, says, caplog):
    with caplog.at_level(logging.WARNING, logger="tuner.worker"), pytest.raises(StorageError) as info:
        tuner_worker.find_study("s", url)
    assert says in str(info.value)
    assert "\n" not in str(info.value)  # the driver's first line, not its SQL and link
    assert not [r for r in caplog.records if "storage error (attempt" in r.getMessage()]  # no retries


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=[postgres, needs_pg])])
def test_the_started_trials_are_counted_in_the_database_without_the_queued_ones(tmp_path, pg_database, backend):
    url = f"sqlite:///{tmp_path}/count.db" if backend == "sqlite" else pg_database()
    study = optuna.create_study(study_name="count", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.enqueue_trial({"x": 0.5})
    assert tuner_worker.started_trial_count(study) == 3
    assert tuner_worker.started_trial_count(optuna.load_study(study_name="count", storage=url)) == 3
    study._storage._backend.engine.dispose()  # type: ignore[attr-defined]


@postgres
@needs_pg
def test_a_tracking_database_that_refuses_the_urls_database_is_one_message_at_once(tmp_path):
    from tuner import tracking as tracking_mod

    url = "postgresql+psycopg://postgres@127.0.0.1:5432/tuner_no_such_tracking_db"
    with pytest.raises(tracking_mod.TrackingError) as info:
        tracking_mod.MlflowTracker(url, "e", str(tmp_path / "a"), writes="inline")
    assert 'database "tuner_no_such_tracking_db" does not exist' in str(info.value)
    assert "\n" not in str(info.value)


def test_a_database_reached_through_a_socket_file_is_not_refused_for_its_urls_host_and_port():
    from tuner import tracking as tracking_mod

    # The driver connects through the socket: the URL's host and port (nothing listens on port 1) are not used.
    tracking_mod._check_server_reachable("mysql+pymysql://root@localhost:1/x?unix_socket=/run/mysqld/mysqld.sock")
    tracking_mod._check_server_reachable("postgresql+psycopg://postgres@localhost:1/x?host=/var/run/postgresql")
    with pytest.raises(OSError, match="no server accepts connections at localhost:1"):
        tracking_mod._check_server_reachable("postgresql+psycopg://postgres@localhost:1/x")
