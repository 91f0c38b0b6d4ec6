"""Reproducibility: every trial's manifest, and `tuner replay` retraining one trial alone to its recorded value."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from mlflow import MlflowClient
from tiny import TINY_DATA, TINY_SPACE, stored_in

from tuner import study as study_mod
from tuner.cli import main
from tuner.config import spec_from_dict
from tuner.data.dataset import build_dataset
from tuner.study import MANIFEST_ARTIFACT, REPLAY_TOLERANCE, replay_trial, run_study
from tuner.tracking import NullTracker

TINY = {
    "data": TINY_DATA,
    "search_space": {**TINY_SPACE, "max_grad_norm": {"low": 0.5, "high": 5.0, "log": True}},
    "train": {"max_epochs": 4, "patience": 2},
    "study": {"name": "tiny-replay", "n_trials": 2, "seed": 11, "pruner": "none"},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A finished two-trial study, tracked into a temporary MLflow store."""
    root = tmp_path_factory.mktemp("replay")
    spec = spec_from_dict(stored_in(TINY, root, plots=False))
    dataset = build_dataset(spec)
    study = run_study(spec, dataset=dataset).study
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    return {"root": root, "spec": spec, "study": study, "dataset": dataset}


def test_replaying_a_trial_reproduces_its_validation_objective(tiny):
    trial = tiny["study"].trials[1]
    replay = replay_trial(tiny["study"], tiny["spec"], 1)
    assert replay.recorded == trial.value
    assert replay.replayed is not None and abs(replay.replayed - trial.value) <= 1e-6
    assert replay.matches and replay.seed == 11 + 1
    assert replay.replayed_health == replay.recorded_health == trial.user_attrs["gradient_health"]
    assert replay.notes == ()  # same environment, nothing to explain
    # The drawn clipping threshold is part of what is replayed.
    assert 0.5 <= trial.params["max_grad_norm"] <= 5.0


def test_cli_replay_prints_both_values_and_exits_0(tiny, capsys):
    trial = tiny["study"].trials[1]
    code = main(["replay", "tiny-replay", "1", "--storage", tiny["spec"].study.storage])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"recorded validation objective  {trial.value:.12g}" in out
    assert "replayed validation objective  " in out and "difference  " in out
    assert f"reproduced: the replay matches the recorded validation objective within {REPLAY_TOLERANCE:g}" in out


def test_cli_replay_exits_1_and_says_so_when_the_value_differs(tiny, capsys, monkeypatch):
    real = study_mod.evaluate

    def shifted(*args, **kwargs):
        ev = real(*args, **kwargs)
        return study_mod.Evaluation(**{**ev.__dict__, "objective": ev.objective - 1e-3})

    monkeypatch.setattr(study_mod, "evaluate", shifted)
    assert main(["replay", "tiny-replay", "0", "--storage", tiny["spec"].study.storage]) == 1
    out = capsys.readouterr().out
    assert "NOT reproduced: they differ by 0.001, more than the tolerance 1e-06 (exit code 1)" in out


def test_cli_replay_of_a_missing_trial_is_a_mistake_to_fix(tiny, capsys):
    assert main(["replay", "tiny-replay", "9", "--storage", tiny["spec"].study.storage]) == 2
    captured = capsys.readouterr()
    assert "TRIAL: study 'tiny-replay' has no trial 9; its trials are numbered 0 to 1" in captured.err
    assert "replaying" not in captured.out  # nothing is announced that does not happen


def test_every_trial_run_holds_its_manifest_and_gradient_health(tiny, tmp_path):
    spec, dataset = tiny["spec"], tiny["dataset"]
    client = MlflowClient(spec.tracking.uri)
    for trial in tiny["study"].trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert MANIFEST_ARTIFACT in {a.path for a in client.list_artifacts(run_id)}
        manifest = json.loads(
            (tmp_path / client.download_artifacts(run_id, MANIFEST_ARTIFACT, str(tmp_path))).read_text()
        )
        assert manifest == trial.user_attrs["manifest"]
        assert manifest["data"]["hash"] == dataset.catalogue.data_hash
        assert manifest["seed"] == manifest["seeds"]["trial"] == trial.user_attrs["seed"] == 11 + trial.number
        assert manifest["seeds"]["data"] == 3
        assert manifest["params"]["max_grad_norm"] == trial.params["max_grad_norm"]
        assert manifest["packages"]["torch"] == torch.__version__
        assert manifest["torch"]["num_threads"] == torch.get_num_threads()
        assert manifest["device"] == "cpu"
        run = client.get_run(run_id)
        assert run.data.tags["gradient_health"] == trial.user_attrs["gradient_health"]
        # Per-layer curves, one point per epoch, through the per-epoch metrics.
        for key in ("grad_norm_l0", "update_ratio_l0", f"grad_norm_l{trial.params['n_layers']}"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(trial.user_attrs["epochs"])), key


def test_a_failed_trial_replays_to_the_same_failure():
    raw = {
        **TINY,
        "search_space": {**TINY["search_space"], "lr": {"low": 1e-3, "high": 1e3, "log": True}, "max_grad_norm": None},
        "study": {**TINY["study"], "n_trials": 1, "enqueue": [{"lr": 1e3, "optimizer": "nesterov"}]},
    }
    spec = spec_from_dict(raw)
    dataset = build_dataset(spec)
    study = run_study(spec, dataset=dataset, tracker=NullTracker(), storage=optuna.storages.InMemoryStorage()).study
    trial = study.trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["gradient_health"] == "exploding"
    replay = replay_trial(study, spec, 0, dataset=dataset)
    assert replay.matches
    assert replay.replayed_reason == trial.user_attrs["fail_reason"]
    assert replay.summary()[-1] == "reproduced: the replay matches the recorded failure (exit code 0)"
