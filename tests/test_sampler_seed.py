"""The sampler's seed per process: a study run in one go is reproducible, a resumed run or a worker draws anew."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import optuna
import pytest
from tiny import TINY_DATA, TINY_SPACE

from tuner import study as study_mod
from tuner.config import StudySpec, spec_from_dict
from tuner.data.dataset import build_dataset
from tuner.study import process_sampler, process_sampler_seed, run_study
from tuner.tracking import NullTracker

SEED = 11
RAW: dict[str, Any] = {
    "data": TINY_DATA,
    "search_space": TINY_SPACE,
    "train": {"max_epochs": 1},
    "study": {"name": "seeds", "n_trials": 2, "seed": SEED, "pruner": "none"},
    "tracking": {"enabled": False},
}


def make_spec(**study: Any) -> StudySpec:
    return spec_from_dict({**RAW, "study": {**RAW["study"], **study}})


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(make_spec())


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def run(spec: StudySpec, storage: Any, dataset, n_trials: int, **kwargs: Any) -> optuna.Study:
    return run_study(spec, storage=storage, dataset=dataset, tracker=NullTracker(), n_trials=n_trials, **kwargs).study


def copy_db(source: Path, target: Path) -> None:
    """A copy of an SQLite study (the backup API: the WAL's pages too)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def params(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.params for t in sorted(study.trials, key=lambda t: t.number)]


def test_a_resumed_study_draws_new_parameters_reproducibly(tmp_path, dataset):
    spec = make_spec()
    first = tmp_path / "first.db"
    early = params(run(spec, url(first), dataset, 2))
    copy = tmp_path / "copy.db"
    copy_db(first, copy)
    resumed = params(run(spec, url(first), dataset, 4))
    assert resumed[:2] == early
    # TPE's first 10 trials are random draws: seeded as the first run was, trials 2 and 3 replayed trials 0 and 1.
    assert not any(p in early for p in resumed[2:]), (early, resumed)
    # The same resumption point gives the same stream.
    assert params(run(spec, url(copy), dataset, 4)) == resumed


def test_a_study_run_in_one_go_keeps_the_study_seed(dataset):
    spec = make_spec(n_trials=3)
    once = params(run(spec, optuna.storages.InMemoryStorage(), dataset, 3))
    assert params(run(spec, optuna.storages.InMemoryStorage(), dataset, 3)) == once
    direct = optuna.samplers.TPESampler(seed=SEED)
    assert params(run(spec, optuna.storages.InMemoryStorage(), dataset, 3, sampler=direct)) == once
    assert len({str(p) for p in once}) == 3


def test_queued_warm_start_entries_do_not_count_as_trials_held(tmp_path, dataset):
    entry = {"n_layers": 1, "widths": [16], "lr": 0.01, "batch_size": 128, "optimizer": "adam"}
    spec = make_spec(n_trials=3, enqueue=[entry])
    in_one_go = params(run(spec, url(tmp_path / "a.db"), dataset, 3))
    run(spec, url(tmp_path / "b.db"), dataset, 3, mode="create")
    assert params(run(spec, url(tmp_path / "b.db"), dataset, 3)) == in_one_go


def test_a_process_seed_depends_on_the_trials_held_and_the_worker(monkeypatch):
    spec = make_spec()
    monkeypatch.delenv("TUNER_WORKER_INDEX", raising=False)
    assert process_sampler_seed(spec, 0, "run") == SEED
    assert process_sampler_seed(spec, 0, "create") == SEED
    resumed = {process_sampler_seed(spec, n, "run") for n in (1, 2, 3)}
    assert len(resumed) == 3 and SEED not in resumed
    assert process_sampler_seed(spec, 2, "run") == process_sampler_seed(spec, 2, "run")
    assert process_sampler_seed(make_spec(seed=12), 2, "run") != process_sampler_seed(spec, 2, "run")
    monkeypatch.setenv("TUNER_WORKER_INDEX", "0")
    worker_0 = process_sampler_seed(spec, 0, "worker")
    monkeypatch.setenv("TUNER_WORKER_INDEX", "1")
    worker_1 = process_sampler_seed(spec, 0, "worker")
    assert len({SEED, worker_0, worker_1}) == 3
    monkeypatch.setattr(study_mod.socket, "gethostname", lambda: "another-machine")
    assert process_sampler_seed(spec, 0, "worker") != worker_1
    monkeypatch.delenv("TUNER_WORKER_INDEX")
    by_pid = process_sampler_seed(spec, 0, "worker")
    monkeypatch.setattr(study_mod.os, "getpid", lambda: 4242)
    assert process_sampler_seed(spec, 0, "worker") != by_pid
    seeds = [process_sampler_seed(make_spec(seed=s), n, "run") for s in (0, 2**32 - 1) for n in range(1, 50)]
    assert all(0 <= s <= 2**32 - 1 for s in seeds)


def test_workers_joining_a_fresh_study_draw_different_parameters(tmp_path, dataset, monkeypatch):
    spec = make_spec()
    run(spec, url(tmp_path / "a.db"), dataset, 2, mode="create")
    copy_db(tmp_path / "a.db", tmp_path / "b.db")  # the same fresh study, as each worker finds it
    drawn = []
    for index, db in (("0", "a.db"), ("1", "b.db")):
        monkeypatch.setenv("TUNER_WORKER_INDEX", index)
        drawn.append(params(run(spec, url(tmp_path / db), dataset, 1, mode="worker"))[0])
    assert drawn[0] != drawn[1]


def test_qmc_keeps_the_study_seed_in_every_process(tmp_path, dataset, monkeypatch):
    monkeypatch.setenv("TUNER_WORKER_INDEX", "3")
    spec = make_spec(sampler="qmc")
    for n_existing, mode in ((0, "run"), (5, "run"), (0, "worker"), (5, "worker")):
        sampler = process_sampler(spec, n_existing, mode)
        assert isinstance(sampler, optuna.samplers.QMCSampler)
        assert sampler._seed == SEED
    # Its random fallback (the first trials, before one completes) is the process's own.
    fallback = process_sampler(spec, 0, "worker")._independent_sampler
    assert isinstance(fallback, optuna.samplers.RandomSampler)
    assert fallback._rng.rng.rand() != optuna.samplers.RandomSampler(seed=SEED)._rng.rng.rand()
    # A resumed QMC study continues the sequence a run in one go draws (a fixed space: no conditional parameters).
    space = {**TINY_SPACE, "n_layers": {"value": 1}}
    fixed = spec_from_dict({**RAW, "search_space": space, "study": {**RAW["study"], "sampler": "qmc", "n_trials": 4}})
    in_one_go = params(run(fixed, optuna.storages.InMemoryStorage(), dataset, 4))
    run(fixed, url(tmp_path / "q.db"), dataset, 2)
    assert params(run(fixed, url(tmp_path / "q.db"), dataset, 4)) == in_one_go
