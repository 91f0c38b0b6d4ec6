"""MLflow writes in a writer process: the same records as in line, in order, failures answered, nothing lost when
the process stops."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from tiny import TINY_DATA, TINY_SPACE, stored_in

from tuner import tracking as tracking_mod
from tuner.config import spec_from_dict
from tuner.data.dataset import build_dataset
from tuner.errors import TrackingError
from tuner.study import run_study
from tuner.tracking import ProcessWriter

TINY = {
    "data": TINY_DATA,
    "search_space": TINY_SPACE,
    "train": {"max_epochs": 4, "patience": 2},
    "study": {"name": "tiny", "n_trials": 3, "seed": 0, "sampler": "random", "pruner": "none", "pack": 1},
}

# Jobs for the writer process: module-level, so they travel by name (this folder is put on its PYTHONPATH).


def note(path: str, text: str, client: Any) -> list[tuple[str, str]]:
    with open(path, "a", encoding="utf-8") as out:
        out.write(f"{text} {os.getpid()}\n")
    return []


def refuse(path: str, text: str, client: Any) -> list[tuple[str, str]]:
    note(path, text, client)
    return [(f"a part of {text}", "refused")]


def broken(text: str, client: Any) -> list[tuple[str, str]]:
    raise RuntimeError(f"{text}: store gone")


def held(fifo: str, path: str, text: str, client: Any) -> list[tuple[str, str]]:
    with open(fifo, encoding="utf-8") as gate:  # blocks until the test opens the other end
        gate.read()
    return note(path, text, client)


def die_unless_in(pid: int, path: str, text: str, client: Any) -> list[tuple[str, str]]:
    if os.getpid() != pid:
        os._exit(3)
    return note(path, text, client)


@pytest.fixture
def writer(monkeypatch):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    )
    made = ProcessWriter(limit=2)
    assert made.wait_ready(timeout=60), "the writer process did not start"
    yield made
    made.close()


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_the_writer_process_runs_jobs_in_order_and_answers_their_failures(writer, tmp_path):
    errors: list[str] = []
    lane = writer.lane(
        "sqlite:///unused.db", client=None, on_error=lambda what, error: errors.append(f"{what}: {error}")
    )
    out = tmp_path / "notes.txt"
    lane.submit("first", functools.partial(note, str(out), "first"))
    lane.submit("second", functools.partial(refuse, str(out), "second"))
    lane.submit("third", functools.partial(broken, "third"))
    lane.submit("fourth", functools.partial(note, str(out), "fourth"))
    assert lane.drain() == []
    child = str(writer.pid)
    assert child != str(os.getpid())
    assert lines(out) == [f"first {child}", f"second {child}", f"fourth {child}"]
    assert errors == ["a part of second: refused", "third: third: store gone"]
    assert (writer.sent, writer.done_here) == (4, 0)


def test_a_drain_waits_for_the_writer_process_and_submit_for_room(writer, tmp_path):
    lane = writer.lane("sqlite:///unused.db", client=None, on_error=lambda what, error: None)
    fifo, out = tmp_path / "gate", tmp_path / "notes.txt"
    os.mkfifo(fifo)
    lane.submit("held", functools.partial(held, str(fifo), str(out), "held"))
    lane.submit("queued", functools.partial(note, str(out), "queued"))
    assert lane.drain(timeout=0.05) == ["held", "queued"]  # the limit of 2 unanswered jobs is reached
    entered = threading.Event()
    blocked = threading.Thread(
        target=lambda: (entered.set(), lane.submit("third", functools.partial(note, str(out), "third")))
    )
    blocked.start()
    entered.wait()
    assert writer.drain(timeout=0.05) == ["held", "queued"]  # "third" waits in submit for room
    with open(fifo, "w", encoding="utf-8") as gate:
        gate.write("go")
    blocked.join()
    assert lane.drain() == []
    assert [line.split()[0] for line in lines(out)] == ["held", "queued", "third"]


def test_jobs_a_stopped_writer_process_held_are_done_again_here_in_order(writer, tmp_path, caplog):
    lane = writer.lane("sqlite:///unused.db", client=None, on_error=lambda what, error: None)
    out, here = tmp_path / "notes.txt", os.getpid()
    with caplog.at_level(logging.WARNING, logger="tuner.tracking"):
        lane.submit("first", functools.partial(die_unless_in, here, str(out), "first"))  # the child exits on it
        lane.submit("second", functools.partial(note, str(out), "second"))
        assert lane.drain() == []
        lane.submit("third", functools.partial(note, str(out), "third"))
    assert lines(out) == [f"first {here}", f"second {here}", f"third {here}"]
    assert "the MLflow writer process stopped (exit code 3)" in caplog.text
    assert "done again here" in caplog.text
    assert writer.done_here >= 2 and writer.wait_ready(timeout=0) is False


def test_a_job_that_cannot_travel_runs_here(writer):
    done: list[int] = []
    lane = writer.lane("sqlite:///unused.db", client=None, on_error=lambda what, error: None)
    lane.submit("a lambda", lambda client: (done.append(os.getpid()), [])[1])
    assert done == [os.getpid()] and (writer.sent, writer.done_here) == (0, 1)


def recorded(uri: str, name: str) -> list[dict[str, Any]]:
    """Each trial run of experiment ``name`` as what can be compared between two studies: its name, status,
    parameters, tags (not ids or times), metric histories (values by step, as text: NaN equals NaN) and file paths."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("tuner.kind") == "trial"]
    varying = {"mlflow.parentRunId", "mlflow.runName"}

    def files(run_id: str, path: str | None = None) -> list[str]:
        found = []
        for entry in client.list_artifacts(run_id, path):
            found += files(run_id, entry.path) if entry.is_dir else [entry.path]
        return found

    return sorted(
        (
            {
                "name": r.info.run_name,
                "status": r.info.status,
                "params": r.data.params,
                "tags": {k: v for k, v in r.data.tags.items() if k not in varying},
                "metrics": {
                    key: [
                        (m.step, repr(m.value))
                        for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
                    ]
                    for key in r.data.metrics
                },
                "files": sorted(files(r.info.run_id)),
            }
            for r in runs
        ),
        key=lambda run: run["name"],
    )


def test_a_study_written_by_the_writer_process_records_what_one_written_in_line_does(tmp_path):
    shared = ProcessWriter.shared()
    assert shared.wait_ready(timeout=60), "the writer process did not start"
    dataset = build_dataset(spec_from_dict(TINY))
    records = {}
    for writes in ("inline", "process"):
        spec = spec_from_dict(stored_in({**TINY, "tracking": {"writes": writes}}, tmp_path / writes))
        sent = shared.sent
        result = run_study(spec, dataset=dataset)
        assert result.tracking_warnings == 0
        if writes == "process":
            # The study run's description and each trial's run (created with its parameters) and end went to the
            # writer process.
            assert shared.sent - sent == 1 + 2 * len(result.study.trials)
        records[writes] = recorded(spec.tracking.uri, spec.study.name)
    inline, process = records["inline"], records["process"]
    assert [r["status"] for r in process] == ["FINISHED"] * 3
    assert any(path.startswith("plots/") for path in process[0]["files"])
    assert process == inline


def test_auto_sends_a_local_stores_writes_to_the_writer_process_on_two_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    tracker = tracking_mod.MlflowTracker(f"sqlite:///{tmp_path}/m.db", "auto")
    assert tracker.writes == "process" and tracker.closes_from_threads


def test_a_process_that_exits_before_its_writer_process_is_ready_leaves_no_error_behind():
    # The writer process holds the same stderr, so run() returns once both have exited.
    done = subprocess.run(
        [sys.executable, "-c", "from tuner.tracking import ProcessWriter; ProcessWriter.shared()"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_mlflows_http_retries_are_bounded_unless_the_user_set_them(tmp_path, monkeypatch):
    # MLflow's defaults hold each request some 4 minutes once a tracking server is gone.
    for name in tracking_mod.MLFLOW_HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "90")
    tracking_mod.MlflowTracker(f"sqlite:///{tmp_path}/m.db", "bounded", str(tmp_path / "a"), writes="inline")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "90"  # the user's own value stays


def test_an_artifact_folder_that_cannot_be_made_stops_the_study_before_it_starts(tmp_path):
    (tmp_path / "a-file").write_text("")
    uri = f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(TrackingError) as info:
        tracking_mod.MlflowTracker(uri, "lost-artifacts", str(tmp_path / "a-file" / "art"), writes="inline")
    assert str(info.value) == (
        f"tracking.artifact_location: artifacts cannot be written under {tmp_path / 'a-file' / 'art'}: "
        f"{tmp_path / 'a-file'} is a file, not a directory"
    )
    assert MlflowClient(uri).get_experiment_by_name("lost-artifacts") is None  # nothing made before the refusal
