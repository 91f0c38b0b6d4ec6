"""The whole loop on a tiny catalogue: Optuna trials, MLflow run tree and statuses, resume, failures."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from faults import restart_error
from mlflow import MlflowClient
from tiny import TINY_DATA, TINY_SPACE, stored_in

from tuner import study as study_mod
from tuner import tracking as tracking_mod
from tuner.cli import shown_attrs
from tuner.config import StudySpec, spec_from_dict
from tuner.data.dataset import build_dataset
from tuner.errors import ConfigError, StorageError
from tuner.study import run_study
from tuner.tracking import BackgroundWriter, MlflowTracker, NullTracker

TINY = {
    "data": TINY_DATA,
    "search_space": TINY_SPACE,
    "train": {"max_epochs": 4, "patience": 2},
    "study": {"name": "tiny", "n_trials": 3, "seed": 11, "pruner": "none"},
}


def tiny_spec(tmp_path: Path, **overrides) -> StudySpec:
    spec = spec_from_dict(stored_in(TINY, tmp_path))
    return spec.with_overrides(overrides) if overrides else spec


@pytest.fixture(scope="module")
def tiny_dataset():
    return build_dataset(spec_from_dict(TINY))


def runs_of(spec: StudySpec):
    client = MlflowClient(spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.study.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("tuner.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("tuner.kind") == "trial"]
    return client, parents, children


def test_study_writes_one_parent_and_one_child_per_trial(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path)
    result = run_study(spec, dataset=tiny_dataset)
    trials = result.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    client, parents, children = runs_of(spec)
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tuner.study_name"] == "tiny"
    assert parent.data.tags["tuner.data.hash"] == tiny_dataset.catalogue.data_hash
    assert parent.data.params["search_space.lr.high"] == "0.03"
    assert parent.data.metrics["n_complete"] == 3
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for trial in trials:
        run = by_number[trial.number]
        # Each finds the other.
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"trial-{trial.number:04d}"
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == list(range(trial.user_attrs["epochs"]))
        for key in (
            "holdout_completeness",
            "holdout_contamination",
            "holdout_completeness_low",
            "holdout_contamination_high",
            "threshold",
            "val_auc",
            "epochs",
        ):
            assert key in run.data.metrics, key
        assert run.data.metrics["val_objective"] == pytest.approx(trial.value)
        assert run.data.tags["stop_reason"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert artifacts == {"plots/learning_curves.html", "plots/roc.html", "plots/completeness_efficiency.html"}
        model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert model_files == {"model/state_dict.pt", "model/model.json"}
    # Same param keys on every child, so the compare view lines up.
    assert len({frozenset(r.data.params) for r in children}) == 1


def test_holdout_figures_are_measured_at_the_validation_threshold(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path)
    trial = run_study(spec, dataset=tiny_dataset, tracker=NullTracker(), n_trials=1).study.trials[0]
    attrs = trial.user_attrs
    assert trial.value == attrs["val_completeness"]
    assert attrs["val_contamination"] <= spec.objective.target_contamination
    low, high = attrs["holdout_completeness_low"], attrs["holdout_completeness_high"]
    assert low <= attrs["holdout_completeness"] <= high


class PruneAfterFirst(optuna.pruners.BasePruner):
    """Prunes every trial but the first at its second report."""

    def prune(self, study, trial):
        return trial.number > 0 and len(trial.intermediate_values) >= 2


def test_pruned_trials_are_killed_runs(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path)
    result = run_study(spec, dataset=tiny_dataset, pruner=PruneAfterFirst())
    states = [t.state.name for t in result.study.trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED"]
    _, _, children = runs_of(spec)
    status = {int(r.data.tags["optuna.trial_number"]): r.info.status for r in children}
    assert status == {0: "FINISHED", 1: "KILLED", 2: "KILLED"}
    pruned = result.study.trials[1]
    assert pruned.user_attrs["stop_reason"].startswith("pruned at epoch 1")


def test_non_finite_loss_fails_the_trial_and_the_study_goes_on(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path, **{"study.enqueue": [{"lr": 1e30}]})
    wide = spec.with_overrides({"search_space.lr": {"low": 1e-3, "high": 1e31, "log": True}})
    result = run_study(wide, dataset=tiny_dataset, n_trials=2)
    first, second = result.study.trials
    assert first.state.name == "FAIL"
    assert "non-finite" in first.user_attrs["fail_reason"]
    assert second.state.name in ("COMPLETE", "FAIL")
    _, _, children = runs_of(wide)
    failed = next(r for r in children if r.data.tags["optuna.trial_number"] == "0")
    assert failed.info.status == "FAILED"
    assert "non-finite" in failed.data.tags["stop_reason"]


def test_non_finite_objective_is_fail_never_complete(tmp_path, tiny_dataset, monkeypatch):
    real = study_mod.evaluate

    def infinite(*args, **kwargs):
        ev = real(*args, **kwargs)
        return study_mod.Evaluation(**{**ev.__dict__, "objective": math.inf})

    monkeypatch.setattr(study_mod, "evaluate", infinite)
    result = run_study(tiny_spec(tmp_path), dataset=tiny_dataset, tracker=NullTracker(), n_trials=1)
    trial = result.study.trials[0]
    assert trial.state.name == "FAIL"
    assert "non-finite objective" in trial.user_attrs["fail_reason"]


def test_resume_continues_to_the_total_and_reuses_the_parent_run(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path)
    run_study(spec, dataset=tiny_dataset, n_trials=2)
    again = run_study(spec, dataset=tiny_dataset, n_trials=4)
    assert again.n_run == 2
    assert [t.number for t in again.study.trials] == [0, 1, 2, 3]
    nothing = run_study(spec, dataset=tiny_dataset, n_trials=4)
    assert nothing.n_run == 0
    _, parents, children = runs_of(spec)
    assert len(parents) == 1 and len(children) == 4


def test_creating_a_study_that_exists_leaves_its_parent_run_open_only_while_trials_remain(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path)
    run_study(spec, dataset=tiny_dataset, n_trials=2)
    run_study(spec, dataset=tiny_dataset, n_trials=2, mode="create")
    _, parents, _ = runs_of(spec)
    assert [p.info.status for p in parents] == ["FINISHED"]
    run_study(spec, dataset=tiny_dataset, n_trials=3, mode="create")
    _, parents, _ = runs_of(spec)
    assert [p.info.status for p in parents] == ["RUNNING"]  # a worker has a trial to run and closes it


def test_runs_a_tracking_outage_left_open_are_closed_when_the_study_starts_again(tmp_path, tiny_dataset, monkeypatch):
    spec = tiny_spec(tmp_path, **{"tracking.writes": "inline"})
    real_close = tracking_mod.close_run
    closes: list[int] = []

    def store_gone_for_the_second(*args, **kwargs):
        closes.append(1)
        return [] if len(closes) == 2 else real_close(*args, **kwargs)

    # The store was unreachable as trial 1 ended: its run never got its metrics, tags, files or end.
    monkeypatch.setattr(tracking_mod, "close_run", store_gone_for_the_second)
    first = run_study(spec, dataset=tiny_dataset, n_trials=2)
    monkeypatch.setattr(tracking_mod, "close_run", real_close)
    client, _, children = runs_of(spec)
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert by_number[1].info.status == "RUNNING" and "val_objective" not in by_number[1].data.metrics
    study = first.study
    # A trial that ended moments ago may have its end still on the way (a writer process): left alone.
    tracker = MlflowTracker(spec.tracking.uri, spec.study.name, None, writes="inline")
    tracker.start_study(spec.study.name, {}, {}, study.user_attrs["tuner.mlflow_parent_run_id"])
    assert study_mod.close_runs_left_open(study, tracker, settled_for=study_mod.LEFT_OPEN_S) == 0
    tracker.end_study()
    monkeypatch.setattr(study_mod, "LEFT_OPEN_S", 0.0)  # as if the study started again ten minutes later
    run_study(spec, dataset=tiny_dataset, n_trials=2)
    repaired = client.get_run(by_number[1].info.run_id)
    assert repaired.info.status == "FINISHED"
    assert "run's end was never recorded" in repaired.data.tags["tracking_incomplete"]
    assert repaired.data.metrics["val_objective"] == study.trials[1].value
    assert "tracking_incomplete" not in client.get_run(by_number[0].info.run_id).data.tags


def test_runs_a_tracking_outage_left_out_are_created_when_the_study_starts_again(tmp_path, tiny_dataset, monkeypatch):
    spec = tiny_spec(tmp_path, **{"tracking.writes": "inline"})
    real_open = tracking_mod.open_run
    opens: list[int] = []

    def store_gone_for_the_second(key, *args, **kwargs):
        opens.append(1)
        if len(opens) == 2:
            tracking_mod.RUNS.record(tracking_mod.CreatedRun(key, None, None))
            return [("start of trial-0001", "connection refused")]
        return real_open(key, *args, **kwargs)

    # The store was unreachable as trial 1 started: its run was never created.
    monkeypatch.setattr(tracking_mod, "open_run", store_gone_for_the_second)
    first = run_study(spec, dataset=tiny_dataset, n_trials=3)
    monkeypatch.setattr(tracking_mod, "open_run", real_open)
    client, _, children = runs_of(spec)
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "2"]
    left_out = first.study.trials[1]
    assert "mlflow_run_id" not in left_out.user_attrs and study_mod.RUN_LEFT_OUT in left_out.user_attrs
    assert study_mod.RUN_LEFT_OUT not in shown_attrs(left_out)  # `tuner best --json` leaves the record out

    run_study(spec, dataset=tiny_dataset, n_trials=3)
    run_study(spec, dataset=tiny_dataset, n_trials=3)  # made once, not again
    client, _, children = runs_of(spec)
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == [0, 1, 2] and len(children) == 3
    made, whole = by_number[1], by_number[0]
    assert made.info.status == "FINISHED"
    assert "unreachable as the trial started" in made.data.tags["tracking_incomplete"]
    assert made.data.tags["mlflow.parentRunId"] == whole.data.tags["mlflow.parentRunId"]
    assert made.data.tags["stop_reason"] == left_out.user_attrs["stop_reason"]
    assert made.data.params.keys() == whole.data.params.keys()
    assert made.data.params["lr"] == str(left_out.params["lr"])
    assert made.data.metrics["val_objective"] == left_out.value
    per_trial = {key for key in whole.data.metrics if not key[-1].isdigit()}  # not per layer: depths differ
    assert {key for key in made.data.metrics if not key[-1].isdigit()} == per_trial
    for key in ("train_loss", "val_objective"):
        curve = client.get_metric_history(made.info.run_id, key)
        by_step = {m.step: m.value for m in curve if m.timestamp == made.info.end_time}
        assert len(by_step) == left_out.user_attrs["epochs"]
    assert by_step == left_out.intermediate_values  # val_objective: what the trial reported each epoch
    assert made.info.start_time == int(left_out.datetime_start.timestamp() * 1000)
    assert made.info.end_time == int(left_out.datetime_complete.timestamp() * 1000)
    assert [f.path for f in client.list_artifacts(made.info.run_id)] == [study_mod.MANIFEST_ARTIFACT]
    # The trial now names its run, which reports link; an export retrains it and says why its weights are missing.
    repaired = optuna.load_study(study_name=spec.study.name, storage=spec.study.storage).trials[1]
    assert (
        repaired.user_attrs["mlflow_run_id"] == made.info.run_id and study_mod.RUN_LEFT_OUT not in repaired.user_attrs
    )
    assert "could not be created as it trained" in study_mod.no_run_reason(repaired)


def test_a_run_left_half_made_by_a_repair_is_made_again_whole(tmp_path, tiny_dataset, monkeypatch):
    spec = tiny_spec(tmp_path, **{"tracking.writes": "inline"})
    real_open, real_send = tracking_mod.open_run, tracking_mod._send

    def store_gone_for_trials_1_and_2(key, experiment_id, run_name, *args):
        if run_name not in ("trial-0001", "trial-0002"):
            return real_open(key, experiment_id, run_name, *args)
        tracking_mod.RUNS.record(tracking_mod.CreatedRun(key, None, None))
        return [(f"start of {run_name}", "connection refused")]

    monkeypatch.setattr(tracking_mod, "open_run", store_gone_for_trials_1_and_2)
    run_study(spec, dataset=tiny_dataset, n_trials=3)
    monkeypatch.setattr(tracking_mod, "open_run", real_open)
    sends: list[int] = []

    def store_gone_again(*args):
        sends.append(1)
        raise OSError("connection refused")

    # The store goes away again while the repair writes trial 1's metrics: trial 2 waits for the next start.
    monkeypatch.setattr(tracking_mod, "_send", store_gone_again)
    run_study(spec, dataset=tiny_dataset, n_trials=3)
    monkeypatch.setattr(tracking_mod, "_send", real_send)
    assert len(sends) == 1
    _, _, children = runs_of(spec)
    half = [r for r in children if tracking_mod.REBUILDING in r.data.tags]
    assert [r.data.tags["optuna.trial_number"] for r in half] == ["1"] and half[0].info.status == "RUNNING"

    run_study(spec, dataset=tiny_dataset, n_trials=3)
    client, _, children = runs_of(spec)  # deleted runs are not listed
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1", "2"]
    assert all(tracking_mod.REBUILDING not in r.data.tags and r.info.status != "RUNNING" for r in children)
    assert client.get_run(half[0].info.run_id).info.lifecycle_stage == "deleted"


def test_a_run_left_out_keeps_its_record_within_what_a_database_column_holds():
    def curves(epochs: int, layers: int) -> dict[str, dict[int, float]]:
        keys = ["train_loss", "val_loss", "val_objective", *(f"grad_norm_l{i}" for i in range(layers))]
        return {key: {epoch: 0.123456789 for epoch in range(epochs)} for key in keys}

    figures = {"val_objective": 0.9, "holdout_completeness": 0.8}
    objectives = {"val_objective": 0.9, "val_objective_0": 0.9, "val_objective_1": 0.1}
    many_labels = {f"holdout_completeness_label{i}": 0.8 for i in range(2000)} | objectives
    cases = {
        "all": (figures, curves(60, 4)),
        "core": (figures, curves(400, 8)),  # the per-layer curves would not fit
        "none": (figures, curves(4000, 8)),
        "objective": (many_labels, curves(10, 1)),  # the final figures alone would not fit
    }
    kept = {name: study_mod.left_out_record(metrics, {"stop_reason": "x"}, c) for name, (metrics, c) in cases.items()}
    assert len(kept["all"]["curves"]) == 7 and kept["all"]["last_step"] == 59
    assert sorted(kept["core"]["curves"]) == sorted(study_mod.LEFT_OUT_CORE)
    assert len(kept["core"]["curves"]["val_objective"]) == 400
    assert kept["none"]["curves"] == {} and kept["none"]["metrics"] == figures and kept["none"]["last_step"] == 3999
    assert kept["objective"]["metrics"] == objectives
    assert all(len(json.dumps(record)) <= study_mod.LEFT_OUT_LIMIT for record in kept.values())


def test_the_worker_command_tuner_create_prints_joins_the_study_it_made(tmp_path, monkeypatch, capsys):
    import shlex

    import yaml

    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump({**TINY, "study": {**TINY["study"], "n_trials": 2}}))
    storage, tracking = f"sqlite:///{tmp_path}/s.db", f"sqlite:///{tmp_path}/m.db"
    flags = ["--storage", storage, "--study-name", "joined", "--n-trials", "1", "--tracking-uri", tracking]
    assert main(["create", str(study_file), *flags]) == 0
    (hint,) = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("tuner worker")]
    command = shlex.split(hint)
    assert command[:3] == ["tuner", "worker", str(study_file)] and sorted(command[3:]) == sorted(flags)
    assert main([*command[1:], "--quiet"]) == 0
    assert len(optuna.load_study(study_name="joined", storage=storage).trials) == 1


def test_a_trial_left_running_by_a_dead_process_is_closed_with_what_happened_and_run_again(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path)
    run_study(spec, dataset=tiny_dataset, tracker=NullTracker(), n_trials=1)
    # The process that ran trial 1 was killed mid-trial: its trial stays RUNNING in the study's SQLite file.
    left = optuna.load_study(study_name="tiny", storage=spec.study.storage).ask()
    closed: list[tuple[int, str]] = []

    class Recording(NullTracker):
        def close_lost_run(self, run_id, reason, study_name, trial_number):
            closed.append((trial_number, reason))

    result = run_study(spec, dataset=tiny_dataset, tracker=Recording(), n_trials=2)
    assert closed == [
        (
            left.number,
            "worker lost: the process running it died; found RUNNING when the study started again; "
            "retried with the same params",
        )
    ]
    states = {t.number: t.state for t in result.study.trials}
    assert states[left.number] == optuna.trial.TrialState.FAIL
    assert list(states.values()).count(optuna.trial.TrialState.COMPLETE) == 2


def test_a_study_opened_while_its_database_restarts_still_opens_whole(tmp_path, tiny_dataset, monkeypatch):
    # A worker that starts as the database restarts: its first read and first write of the study's attributes fail.

    failed: list[str] = []

    def failing_once(name: str):
        real = getattr(optuna.storages.RDBStorage, name)

        def call(self, *args, **kwargs):
            if name not in failed:
                failed.append(name)
                raise restart_error()
            return real(self, *args, **kwargs)

        return call

    for name in ("get_study_user_attrs", "set_study_user_attr"):
        monkeypatch.setattr(optuna.storages.RDBStorage, name, failing_once(name))
    spec = tiny_spec(tmp_path)
    result = run_study(spec, dataset=tiny_dataset, n_trials=2)
    assert failed == ["get_study_user_attrs", "set_study_user_attr"]
    assert result.n_run == 2
    stored = result.study.user_attrs
    assert {"tuner.spec", "tuner.data", "tuner.fingerprints", "tuner.mlflow_parent_run_id"} <= stored.keys()
    _, parents, _ = runs_of(spec)
    assert [p.info.run_id for p in parents] == [stored["tuner.mlflow_parent_run_id"]]


def test_a_changed_search_space_is_refused_before_anything_is_written(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path)
    run_study(spec, dataset=tiny_dataset, tracker=NullTracker(), n_trials=1)
    changed = spec.with_overrides({"search_space.lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    with pytest.raises(ConfigError, match=r"different search_space.*--study-name"):
        run_study(changed, dataset=tiny_dataset, n_trials=2)
    assert len(optuna.load_study(study_name="tiny", storage=spec.study.storage).trials) == 1
    assert not (tmp_path / "mlruns").exists()
    renamed = changed.with_overrides({"study.name": "tiny-wider"})
    assert run_study(renamed, dataset=tiny_dataset, tracker=NullTracker(), n_trials=1).n_run == 1


def test_enqueued_parameters_run_first(tmp_path, tiny_dataset):
    entry = {"n_layers": 2, "widths": [16, 8], "lr": 0.01, "batch_size": 128, "optimizer": "adam"}
    spec = tiny_spec(tmp_path, **{"study.enqueue": [entry]})
    result = run_study(spec, dataset=tiny_dataset, tracker=NullTracker(), n_trials=1)
    params = result.study.trials[0].params
    assert params["n_layers"] == 2 and params["n_units_l0"] == 16 and params["n_units_l1"] == 8
    assert params["lr"] == 0.01 and params["log2_batch_size"] == 7 and params["optimizer"] == "adam"


def test_a_warm_start_entry_is_queued_once_however_often_the_study_is_run(tmp_path):
    from tuner.study import enqueue_new

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/warm.db")
    ran = study.ask()
    ran.suggest_float("lr", 1e-3, 1.0, log=True)
    ran.suggest_categorical("optimizer", ["adam", "sgd"])
    study.tell(ran, 0.5)
    entries = [
        {"lr": 0.1, "optimizer": "adam"},
        {"lr": 0.1, "optimizer": "adam"},  # the same entry twice
        {"lr": ran.params["lr"], "optimizer": ran.params["optimizer"]},  # a trial that ran holds these
        {"lr": 0.1, "optimizer": "sgd"},
        {"lr": 0.1},  # other names: another trial
    ]
    assert enqueue_new(study, entries) == 3
    # Run again (a restarted study): nothing new.
    assert enqueue_new(optuna.load_study(study_name=study.study_name, storage=study._storage), entries) == 0
    queued = [t.system_attrs["fixed_params"] for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    assert queued == [entries[0], entries[3], entries[4]]


def test_bad_enqueue_entry_is_a_config_error(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path, **{"study.enqueue": [{"lr": 5.0, "wdith": 3}]})
    with pytest.raises(ConfigError) as info:
        run_study(spec, dataset=tiny_dataset)
    text = str(info.value)
    assert "study.enqueue[0].lr: 5.0 is outside search_space.lr" in text
    assert "did you mean 'width'" in text
    assert not Path(spec.study.storage[len("sqlite:///") :]).exists()


def test_seeded_study_is_reproducible(tiny_dataset):
    spec = spec_from_dict(TINY)

    def values():
        storage = optuna.storages.InMemoryStorage()
        study = run_study(spec, dataset=tiny_dataset, tracker=NullTracker(), storage=storage).study
        return [(t.params, t.value) for t in study.trials]

    assert values() == values()


@pytest.mark.parametrize("sampler", ["random", "qmc", "cmaes", "gp", "nsga2", "tpe"])
def test_every_sampler_by_name_runs(sampler, tiny_dataset):
    spec = spec_from_dict({**TINY, "study": {**TINY["study"], "sampler": sampler}, "train": {"max_epochs": 1}})
    study = run_study(
        spec, dataset=tiny_dataset, tracker=NullTracker(), storage=optuna.storages.InMemoryStorage(), n_trials=2
    ).study
    assert len(study.trials) == 2


@pytest.mark.parametrize("pruner", ["median", "percentile", "successive_halving", "hyperband", "none"])
def test_every_pruner_by_name_builds(pruner):
    assert isinstance(study_mod.make_pruner(pruner), optuna.pruners.BasePruner)


@pytest.mark.parametrize("kind, name", [("sampler", "qmc"), ("pruner", "wilcoxon")])
def test_a_strategy_optuna_marks_experimental_builds_without_its_warning(kind, name):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        built = study_mod.make_sampler(name, 0) if kind == "sampler" else study_mod.make_pruner(name)
    assert type(built).__name__.lower().startswith(name)


def test_bad_sampler_options_are_reported(tmp_path):
    spec = tiny_spec(tmp_path, **{"study.sampler_options": {"n_startup_trails": 3}})
    with pytest.raises(ConfigError, match=r"study\.sampler_options: not accepted by the tpe sampler"):
        study_mod.check_spec(spec)


def test_sampler_and_pruner_options_of_the_wrong_type_are_refused_before_the_study(tmp_path):
    # Optuna's constructors keep such values unchecked: they would fail mid-study, with a trial written.
    spec = tiny_spec(
        tmp_path,
        **{
            "study.sampler_options": {"n_startup_trials": "x", "consider_prior": 1, "prior_weight": 2},
            "study.pruner": "median",
            "study.pruner_options": {"n_warmup_steps": 1.5, "n_startup_trials": 2},
        },
    )
    with pytest.raises(ConfigError) as info:
        study_mod.check_spec(spec)
    assert info.value.problems == [
        "study.sampler_options.n_startup_trials: 'x' must be an integer (the tpe sampler)",
        "study.sampler_options.consider_prior: 1 must be true or false or null (the tpe sampler)",
        "study.pruner_options.n_warmup_steps: 1.5 must be an integer (the median pruner)",
    ]


def test_a_cuda_device_past_the_last_one_is_a_config_error(monkeypatch):
    monkeypatch.setattr(study_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(study_mod.torch.cuda, "device_count", lambda: 2)
    assert study_mod.resolve_device("cuda:1") == study_mod.torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"--device: 'cuda:2' asked for, but only 2 CUDA device\(s\) are visible"):
        study_mod.resolve_device("cuda:2")


def test_unreachable_storage_is_a_storage_error_with_the_password_masked(tiny_dataset):
    spec = spec_from_dict(TINY).with_overrides(
        {"study.storage": "postgresql+psycopg://user:secret@127.0.0.1:1/none?connect_timeout=2"}
    )
    with pytest.raises(StorageError) as info:
        run_study(spec, dataset=tiny_dataset, tracker=NullTracker())
    assert "study.storage: cannot open postgresql+psycopg://user:***@127.0.0.1:1/none" in str(info.value)
    assert "secret" not in str(info.value)


def test_tracker_closes_a_run_even_when_interrupted(tmp_path, tiny_dataset, monkeypatch):
    spec = tiny_spec(tmp_path)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_mod, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, dataset=tiny_dataset, n_trials=2)
    _, parents, children = runs_of(spec)
    assert [r.info.status for r in children] == ["FAILED"]
    assert children[0].data.tags["stop_reason"] == "interrupted (Ctrl-C or SIGTERM)"
    assert parents[0].info.status == "KILLED"
    trial = optuna.load_study(study_name="tiny", storage=spec.study.storage).trials[0]
    assert trial.state.name == "FAIL"


def test_tracking_batches_epoch_metrics(tmp_path, monkeypatch):
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/m.db", "batched", str(tmp_path / "a"), writes="inline")
    calls = []
    real = tracker.client.log_batch

    def counting(run_id, metrics=(), params=(), tags=(), synchronous=None):
        calls.append(len(metrics))
        return real(run_id, metrics=metrics, params=params, tags=tags)

    tracker.start_study("s", {}, {}, None)
    key = tracker.start_trial(0, {"lr": 0.1}, {})
    assert tracker.drain() == 0  # the run was created, its parameters went out
    run_id = tracker.run_id(key)
    assert run_id is not None
    monkeypatch.setattr(tracker.client, "log_batch", counting)
    for epoch in range(50):
        tracker.log_epoch(key, epoch, {"train_loss": 1.0 / (epoch + 1), "val_loss": 2.0})
    assert calls == []  # nothing sent per epoch
    tracker.end_trial(key, "COMPLETE", {"val_objective": 0.5}, {"stop_reason": "x"}, {})
    assert tracker.drain() == 0
    assert sum(calls) == 101 and len([c for c in calls if c]) == 1
    assert len(tracker.client.get_metric_history(run_id, "train_loss")) == 50


def test_a_multiclass_study_runs_and_measures_the_positive_class(tmp_path):
    spec = spec_from_dict(
        {
            **TINY,
            "task": "multiclass",
            "data": {"simulated": {"n_star": 900, "n_quasar": 150, "n_galaxy": 600}, "seed": 3},
            "study": {**TINY["study"], "n_trials": 2},
        }
    )
    result = run_study(spec, tracker=NullTracker(), storage=optuna.storages.InMemoryStorage())
    assert result.dataset.catalogue.class_names == ("GALAXY", "QSO", "STAR")
    assert result.dataset.positive_index == 1
    for trial in result.study.trials:
        assert trial.state.name == "COMPLETE"
        assert 0.0 <= trial.user_attrs["holdout_completeness"] <= 1.0
        assert trial.value == trial.user_attrs["val_completeness"]


def test_passwords_are_not_stored_with_the_study(tmp_path, tiny_dataset):
    spec = tiny_spec(tmp_path, **{"tracking.uri": f"sqlite:///{tmp_path}/m.db"})
    storage = optuna.storages.InMemoryStorage()
    secret = spec.with_overrides({"study.storage": "postgresql+psycopg://user:hunter2@db/optuna"})
    study = run_study(secret, dataset=tiny_dataset, tracker=NullTracker(), storage=storage, n_trials=1).study
    assert "hunter2" not in json.dumps(study.user_attrs)


def test_best_and_status_read_a_study_not_made_by_tuner(tmp_path, capsys):
    from tuner.cli import main

    url = f"sqlite:///{tmp_path}/plain.db"
    plain = optuna.create_study(study_name="plain", storage=url, direction="maximize")
    plain.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert main(["best", "plain", "--storage", url]) == 0
    assert f"{plain.best_params['x']:.4g}" in capsys.readouterr().out
    assert main(["status", "plain", "--storage", url]) == 0
    assert "COMPLETE" in capsys.readouterr().out


def test_a_trials_closing_writes_go_out_in_the_background_and_a_drain_waits_for_them(tmp_path, monkeypatch, caplog):
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/m.db", "background", str(tmp_path / "a"), writes="background")
    tracker.start_study("s", {}, {}, None)
    key = tracker.start_trial(0, {"lr": 0.1}, {})
    assert tracker.drain() == 0  # its run was created, its parameters went out
    run_id = tracker.run_id(key)
    release = threading.Event()
    real = tracker.client.set_terminated

    def held(run, status=None, end_time=None):
        release.wait()
        return real(run, status=status, end_time=end_time)

    monkeypatch.setattr(tracker.client, "set_terminated", held)
    tracker.log_epoch(key, 0, {"val_loss": 1.0})
    tracker.end_trial(key, "COMPLETE", {"val_objective": 0.5}, {}, {"notes.txt": "x"})  # returns, run still open
    with caplog.at_level(logging.WARNING, logger="tuner.tracking"):
        assert tracker.drain(timeout=0.05) == 1
    assert f"not sent after 0.05 s, their runs incomplete: end of run {run_id}" in caplog.text
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    release.set()
    assert tracker.drain() == 0
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val_objective"] == 0.5
    assert [a.path for a in tracker.client.list_artifacts(run_id)] == ["notes.txt"]


def test_a_trials_run_is_created_off_the_line_and_its_id_known_once_it_exists(tmp_path, monkeypatch):
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/m.db", "deferred", str(tmp_path / "a"), writes="background")
    tracker.start_study("s", {}, {}, None)
    assert tracker.drain() == 0
    release = threading.Event()
    real = tracker.client.create_run

    def held(*args, **kwargs):
        assert release.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "create_run", held)
    key = tracker.start_trial(0, {"lr": 0.1}, {"optuna.trial_number": "0"})  # returns while the store waits
    tracker.log_epoch(key, 0, {"val_loss": 1.0})
    assert tracker.drain(timeout=0.05) == 1  # the creation is still waiting
    found: list[str | None] = []
    waiting = threading.Thread(target=lambda: found.append(tracker.run_id(key)))
    waiting.start()
    waiting.join(timeout=0.05)
    assert waiting.is_alive() and found == []  # the id is asked for before the run exists: it waits
    release.set()
    waiting.join()
    [run_id] = found
    assert run_id is not None
    tracker.end_trial(key, "COMPLETE", {"val_objective": 0.5}, {}, {})
    assert tracker.drain() == 0
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert run.data.tags["optuna.trial_number"] == "0" and run.data.metrics["val_objective"] == 0.5
    assert [m.value for m in tracker.client.get_metric_history(run_id, "val_loss")] == [1.0]


def test_a_trial_runs_table_figure_is_its_objective_not_its_last_epochs(tmp_path):
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/m.db", "final", str(tmp_path / "a"), writes="inline")
    tracker.start_study("s", {}, {}, None)
    key = tracker.start_trial(0, {}, {"optuna.trial_number": "0"})
    run_id = tracker.run_id(key)
    for epoch, value in enumerate([0.5, 0.9, 0.7]):  # early stopping restores epoch 1's weights
        tracker.log_epoch(key, epoch, {"val_objective": value, "val_loss": 1.0 - value})
    tracker.end_trial(key, "COMPLETE", {"val_objective": 0.9, "best_epoch": 1}, {}, {})
    assert tracker.drain() == 0
    run = tracker.client.get_run(run_id)
    assert run.data.metrics["val_objective"] == 0.9 and run.data.metrics["best_epoch"] == 1
    reader = tracking_mod.MlflowRuns(f"sqlite:///{tmp_path}/m.db")
    curve = reader.epoch_history(run.info.run_id, ("val_objective", "val_loss"))
    assert [epoch["val_objective"] for epoch in curve] == [0.5, 0.9, 0.7]


def test_a_trial_run_the_store_refuses_is_one_warning_and_no_id(tmp_path, monkeypatch, caplog):
    from mlflow.exceptions import MlflowException

    tracker = MlflowTracker(f"sqlite:///{tmp_path}/m.db", "refused", str(tmp_path / "a"), writes="background")
    tracker.start_study("s", {}, {}, None)

    def refuse(*args, **kwargs):
        raise MlflowException("store is read-only")

    monkeypatch.setattr(tracker.client, "create_run", refuse)
    with caplog.at_level(logging.WARNING, logger="tuner.tracking"):
        key = tracker.start_trial(3, {"lr": 0.1}, {})
        found: list[str | None] = []
        asking = threading.Thread(target=lambda: found.append(tracker.run_id(key)), daemon=True)
        asking.start()
        asking.join(timeout=30)
        assert found == [None]  # the refusal answers the wait for the id
        tracker.log_epoch(key, 0, {"val_loss": 1.0})
        tracker.end_trial(key, "COMPLETE", {"val_objective": 0.5}, {}, {"notes.txt": "x"})
        assert tracker.drain() == 0
    assert tracker.failed_writes == 1  # the refused creation; its run's end has nothing to close
    assert "start of trial-0003 failed" in caplog.text and "store is read-only" in caplog.text


def test_a_lost_trials_run_without_a_recorded_id_is_found_by_its_tags_and_killed(tmp_path):
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/m.db", "lost", str(tmp_path / "a"), writes="inline")
    tracker.start_study("s", {}, {}, None)
    keys = {
        (name, number): tracker.start_trial(number, {}, {"optuna.study_name": name, "optuna.trial_number": str(number)})
        for name, number in [("s", 4), ("s", 5), ("other", 4)]
    }
    ids = {where: tracker.run_id(key) for where, key in keys.items()}
    tracker.close_lost_run(None, "worker lost: no heartbeat", "s", 4)
    assert tracker.drain() == 0 and tracker.failed_writes == 0
    status = {where: tracker.client.get_run(run_id).info.status for where, run_id in ids.items()}
    assert status == {("s", 4): "KILLED", ("s", 5): "RUNNING", ("other", 4): "RUNNING"}
    assert tracker.client.get_run(ids[("s", 4)]).data.tags["stop_reason"] == "worker lost: no heartbeat"


def test_the_background_writer_keeps_order_counts_failures_and_bounds_its_queue():
    errors: list[str] = []
    client = object()
    writer = BackgroundWriter(client, 2, lambda what, exc: errors.append(f"{what}: {exc}"))
    done: list[int] = []
    gate = threading.Event()

    def broken(given: object) -> list[tuple[str, str]]:
        raise RuntimeError("store gone")

    def append(value: int) -> Callable[[object], list[tuple[str, str]]]:
        def job(given: object) -> list[tuple[str, str]]:
            assert given is client
            done.append(value)
            return [("a part of it", "refused")] if value == 2 else []

        return job

    writer.submit("held", lambda given: (gate.wait(), [])[1])
    writer.submit("broken", broken)
    writer.submit("first", append(1))
    assert len(writer.drain(timeout=0)) == 3  # "held" running, two queued: the queue is full
    entered = threading.Event()
    blocked = threading.Thread(target=lambda: (entered.set(), writer.submit("second", append(2))))
    blocked.start()
    entered.wait()
    assert len(writer.drain(timeout=0)) == 3  # "second" waits in submit for room
    assert writer.drain(timeout=0.01) == ["held", "broken", "first"]  # what has not run, the running one first
    gate.set()
    blocked.join()
    assert writer.drain() == []
    assert done == [1, 2] and errors == ["broken: store gone", "a part of it: refused"]


def test_run_creations_go_ahead_of_queued_writes_and_keep_their_own_order():
    writer = BackgroundWriter(object(), 10, lambda what, exc: None)
    running, gate = threading.Event(), threading.Event()
    done: list[str] = []
    writer.submit("held", lambda client: (running.set(), gate.wait(), [])[2])
    running.wait()
    for name, first in [("close a", False), ("create b", True), ("close c", False), ("create d", True)]:
        writer.submit(name, lambda client, name=name: (done.append(name), [])[1], first)
    assert writer.drain(timeout=0) == ["held", "create b", "create d", "close a", "close c"]
    gate.set()
    assert writer.drain() == []
    assert done == ["create b", "create d", "close a", "close c"]


def test_a_study_drains_its_writes_before_it_returns(tmp_path, tiny_dataset, monkeypatch):
    # The last trial's closing writes wait until the study drains: a study that returned without draining would
    # leave that run RUNNING. (Only the last: a trial's end waits for its run's creation, which waits for the
    # writer to finish the job it is running.)
    drained = threading.Event()
    real_drain = BackgroundWriter.drain
    real_submit = BackgroundWriter.submit
    closes = iter(range(100))

    def drain(self, timeout=None):
        drained.set()
        return real_drain(self, timeout)

    def submit(self, what, job, first=False):
        if not what.startswith("end of run") or next(closes) < 1:
            return real_submit(self, what, job, first)
        return real_submit(self, what, lambda client: (drained.wait(), job(client))[1], first)

    monkeypatch.setattr(BackgroundWriter, "drain", drain)
    monkeypatch.setattr(BackgroundWriter, "submit", submit)
    # A local SQLite store, written from the background as a tracking server's would be.
    spec = tiny_spec(tmp_path, **{"study.n_trials": 2, "tracking.writes": "background"})
    result = run_study(spec, dataset=tiny_dataset)
    assert result.tracking_warnings == 0
    _, parents, children = runs_of(spec)
    assert [r.info.status for r in children] == ["FINISHED", "FINISHED"]
    assert all("val_objective" in r.data.metrics and r.data.params for r in children)
    assert parents[0].info.status == "FINISHED"


@pytest.mark.parametrize(
    ("uri", "writes"),
    [
        ("http://mlflow:5000", "background"),
        ("https://mlflow.example.org", "background"),
        ("postgresql+psycopg://u@db/mlflow", "background"),
        ("sqlite:///mlruns/mlflow.db", "process"),
        ("file:///tmp/mlruns", "process"),
        ("mlruns", "process"),
    ],
)
def test_writes_go_to_a_thread_across_the_network_and_to_a_process_for_a_local_store(uri, writes, monkeypatch):
    monkeypatch.setattr(tracking_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    assert tracking_mod.writes_for(uri) == writes
    monkeypatch.setattr(tracking_mod.os, "sched_getaffinity", lambda pid: {0})
    assert tracking_mod.writes_for(uri) == ("background" if writes == "background" else "inline")


def test_a_database_restart_during_an_epochs_report_is_ridden_out_not_the_trials_end(monkeypatch):
    # The per-epoch report is the storage call a trial makes most: failing the trial (in a pack, every member)
    # for one lost connection would throw away its epochs.
    from tuner import worker

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    real_report = optuna.Trial.report
    attempts: list[int] = []

    def report_once_lost(self, value, step):
        attempts.append(step)
        if len(attempts) == 1:
            raise restart_error("INSERT", "server closed the connection unexpectedly")
        return real_report(self, value, step)

    monkeypatch.setattr(optuna.Trial, "report", report_once_lost)
    monkeypatch.setattr(worker.time, "sleep", lambda seconds: None)  # the retry's backoff only
    callback = study_mod.PruningCallback(trial)
    callback.on_epoch_end(0, {"val_objective": 0.75, "val_loss": 0.3})
    assert attempts == [0, 0]
    assert study.get_trials()[0].intermediate_values == {0: 0.75}


def test_without_a_pruner_each_trials_reports_are_stored_with_its_end(tmp_path, tiny_dataset, monkeypatch):
    # Nothing reads them before the trial ends: one transaction at its end instead of one per epoch.
    reports: list[int] = []
    real_report = optuna.Trial.report
    monkeypatch.setattr(optuna.Trial, "report", lambda self, v, s: reports.append(s) or real_report(self, v, s))
    study = run_study(tiny_spec(tmp_path), dataset=tiny_dataset).study
    assert reports == []
    for trial in study.trials:
        assert trial.state.name == "COMPLETE"
        assert sorted(trial.intermediate_values) == list(range(trial.user_attrs["epochs"]))
    # With a pruner they are reported as each epoch ends, for the pruner to judge.
    pruned = run_study(tiny_spec(tmp_path / "pruned"), dataset=tiny_dataset, pruner=PruneAfterFirst()).study
    assert reports and all(t.intermediate_values for t in pruned.trials)


def _store_cases() -> list[tuple[list[str], dict[str, str], str]]:
    """(run flags with {tmp} for the folder, tracking keys of the study file, what the one error must say)."""
    import importlib.util

    cases = [
        (["--tracking-uri", "sqlite:///{tmp}/folder"], {}, "{tmp}/folder is a folder, not an SQLite file"),
        (["--tracking-uri", "sqlite:///{tmp}/a.csv"], {}, "{tmp}/a.csv is not an SQLite database"),
        (["--tracking-uri", "sqlite:///{tmp}/a.csv/m.db"], {}, "{tmp}/a.csv is a file, not a directory"),
        (["--storage", "sqlite:///{tmp}/folder"], {}, "study.storage: sqlite:///{tmp}/folder cannot hold the study"),
        (["--storage", "sqlite:///{tmp}/a.csv"], {}, "{tmp}/a.csv is not an SQLite database"),
        (["--storage", "sqlite:///{tmp}/a.csv/s.db"], {}, "{tmp}/a.csv is a file, not a directory"),
        (["--device", "meta"], {}, "--device: 'meta' is not a device tuner trains on; use auto, cpu, cuda or cuda:N"),
        (
            ["--tracking-uri", "postgresql+psycopg://u@127.0.0.1:1/x"],
            {},
            "no server accepts connections at 127.0.0.1:1 (Connection refused); check that the database server runs",
        ),
        ([], {"artifact_location": "foo://bar"}, "MLflow cannot write artifacts to foo://bar"),
        (["--storage", "sqlite:///{tmp}/mlflow-store.db"], {}, "{tmp}/mlflow-store.db is an MLflow tracking store"),
        (["--tracking-uri", "sqlite:///{tmp}/optuna-store.db"], {}, "{tmp}/optuna-store.db holds Optuna studies"),
        (  # the folders made for the study's file go again with it
            ["--storage", "sqlite:///{tmp}/new/dir/s.db", "--tracking-uri", "http://127.0.0.1:1"],
            {},
            "no server accepts connections at 127.0.0.1:1",
        ),
        (
            ["--storage", "sqlite:///{tmp}/same.db", "--tracking-uri", "sqlite:///{tmp}/same.db"],
            {},
            "tracking.uri: sqlite:///{tmp}/same.db is the study's storage too",
        ),
    ]
    if importlib.util.find_spec("boto3") is None:
        cases.append(([], {"artifact_location": "s3://bucket/x"}, "needs the Python package 'boto3'"))
    return cases


@pytest.mark.parametrize(("flags", "tracking", "needle"), _store_cases())
def test_a_store_or_device_tuner_cannot_use_exits_2_at_once_and_leaves_nothing(
    flags: list[str], tracking: dict[str, str], needle: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a.csv").write_text("a,b\n1,2\n")
    if "mlflow-store.db" in " ".join(flags):  # the two stores swapped: each file holds the other program's tables
        MlflowClient(f"sqlite:///{tmp_path}/mlflow-store.db").search_experiments()
    if "optuna-store.db" in " ".join(flags):
        optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna-store.db")
    spec = {**TINY, "tracking": {"uri": f"sqlite:///{tmp_path}/m.db", **tracking}, "study": {"n_trials": 1}}
    (tmp_path / "s.yaml").write_text(json.dumps(spec))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["run", "s.yaml", *(f.format(tmp=tmp_path) for f in flags)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert needle.format(tmp=tmp_path) in err, err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no study file, lock, MLflow store or artifacts


def test_a_deleted_mlflow_experiment_is_refused_before_the_study_is_made(tmp_path: Path, monkeypatch, capsys) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    spec = {**TINY, "tracking": {"uri": uri}, "study": {"name": "gone", "n_trials": 1}}
    (tmp_path / "s.yaml").write_text(json.dumps(spec))
    assert main(["run", "s.yaml", "--storage", f"sqlite:///{tmp_path}/s.db"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "tracking.experiment: experiment 'gone' (id 1) is deleted in" in err, err
    assert "mlflow experiments restore --experiment-id 1" in err
    assert not (tmp_path / "s.db").exists()


def test_every_mlflow_client_gets_bounded_http_retries_and_an_unreachable_server_fails_at_once(monkeypatch):
    # export, report and predict make their own clients: MLflow's defaults would hold them for minutes.
    for name in tracking_mod.MLFLOW_HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(tracking_mod.TrackingError, match=r"no server accepts connections at 127\.0\.0\.1:1"):
        tracking_mod.mlflow_client("http://127.0.0.1:1", registry=True)
    for name, value in tracking_mod.MLFLOW_HTTP_DEFAULTS.items():
        assert os.environ[name] == value


def test_predict_from_a_local_store_that_does_not_exist_refuses_and_makes_no_store(tmp_path: Path, monkeypatch, capsys):
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("u,g\n1,2\n")
    assert main(["predict", "models:/nosuch@champion", "--data", "d.csv", "--out", "p.csv"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "tracking.uri: no MLflow store at mlruns/mlflow.db (from sqlite:///mlruns/mlflow.db)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]  # no mlruns/mlflow.db made by looking
