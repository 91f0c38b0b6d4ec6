"""k-fold cross-validation (validation.kind kfold): folds, objective, holdout, pruning, config, replay, export."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from tiny import TINY_DATA, TINY_SPACE, stored_in

from tuner import metrics
from tuner import study as study_mod
from tuner.cli import main
from tuner.config import load_spec, spec_from_dict
from tuner.data.catalogue import simulate_catalogue
from tuner.data.dataset import build_dataset
from tuner.data.preprocess import Preprocessor
from tuner.errors import ConfigError, DataError
from tuner.export import export_trial, predict_frame
from tuner.report import build_report, trial_evidence
from tuner.space import suggest
from tuner.study import FINGERPRINTED, Objective, evaluate_folds, masked_spec, replay_trial, run_study
from tuner.tracking import MlflowRuns, NullTracker
from tuner.train import predict_logits, probabilities

KFOLD: dict[str, Any] = {
    "data": TINY_DATA,
    "search_space": TINY_SPACE,
    "train": {"max_epochs": 4, "patience": 2},
    "validation": {"kind": "kfold", "k": 5},
    "study": {"name": "tiny-kfold", "n_trials": 2, "seed": 11},
}
SPLIT: dict[str, Any] = {key: value for key, value in KFOLD.items() if key != "validation"}
SPLIT["study"] = {**KFOLD["study"], "pruner": "none"}
OLD_FINGERPRINTED = ("data", "task", "search_space", "train", "objective")


@pytest.fixture(scope="module")
def kfold(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished two-trial 5-fold study, tracked into a temporary MLflow store."""
    root = tmp_path_factory.mktemp("kfold")
    # No pruning here: these trials must complete (pruning has its own test).
    spec = spec_from_dict(stored_in({**KFOLD, "study": {**KFOLD["study"], "pruner": "none"}}, root))
    dataset = build_dataset(spec)
    study = run_study(spec, dataset=dataset).study
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    return {"root": root, "spec": spec, "dataset": dataset, "study": study}


def test_the_objective_is_the_mean_of_the_five_recorded_fold_scores(kfold):
    client = MlflowClient(kfold["spec"].tracking.uri)
    for trial in kfold["study"].trials:
        folds = trial.user_attrs["fold_objectives"]
        assert len(folds) == 5
        assert trial.value == float(np.mean(folds))
        # Reported to Optuna with step = fold, and logged to MLflow the same way.
        assert trial.intermediate_values == dict(enumerate(folds))
        run_id = trial.user_attrs["mlflow_run_id"]
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "fold_objective"))
        assert logged == list(enumerate(folds))
        run = client.get_run(run_id)
        assert run.data.metrics["cv_objective_mean"] == pytest.approx(trial.value)
        assert run.data.metrics["cv_objective_std"] == pytest.approx(np.std(folds, ddof=1))
        assert run.data.metrics["val_objective"] == pytest.approx(trial.value)
        # Per-epoch curves of each fold model under their own keys.
        for i, epochs in enumerate(trial.user_attrs["fold_epochs"]):
            steps = sorted(m.step for m in client.get_metric_history(run_id, f"fold{i}_val_loss"))
            assert steps == list(range(epochs))
        model = {a.path for a in client.list_artifacts(run_id, "model")}
        assert model == {"model/model.json", *(f"model/fold_{i}" for i in range(5))}
        plots = {a.path for a in client.list_artifacts(run_id, "plots")}
        assert plots == {"plots/learning_curves.html", "plots/roc.html", "plots/completeness_efficiency.html"}


def test_tuner_best_names_each_folds_best_epoch(kfold, capsys):
    spec, best = kfold["spec"], kfold["study"].best_trial
    assert main(["best", spec.study.name, "--storage", spec.study.storage]) == 0
    out = " ".join(capsys.readouterr().out.split())
    folds = ", ".join(map(str, best.user_attrs["fold_best_epochs"]))
    assert f"epochs {best.user_attrs['epochs']} (5 folds, best epochs {folds});" in out


def test_folds_are_stratified_and_cover_the_modelling_set_once():
    spec = spec_from_dict(KFOLD)
    dataset = build_dataset(spec)
    split, folds, labels = dataset.split, dataset.folds, dataset.catalogue.labels
    modelling = np.sort(np.concatenate([split.train, split.validation]))
    held = np.concatenate([f.validation_rows for f in folds])
    assert len(folds) == 5
    assert np.array_equal(np.sort(held), modelling)  # every modelling row in exactly one fold
    assert not np.intersect1d(held, split.holdout).size
    per_fold = np.array([np.bincount(labels[f.validation_rows], minlength=2) for f in folds])
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all()  # each class spread evenly
    for fold in folds:
        assert np.array_equal(fold.train_rows, np.setdiff1d(modelling, fold.validation_rows))
        # Scaling fitted on the fold's training rows only; the holdout through the same scaling.
        fitted = Preprocessor.fit("standardize", dataset.catalogue.features[fold.train_rows])
        np.testing.assert_array_equal(fold.preprocessor.shift, fitted.shift)
        expected = fitted.transform(dataset.catalogue.features[split.holdout])
        np.testing.assert_array_equal(fold.holdout.x.numpy(), expected)
    again = build_dataset(spec)
    assert all(np.array_equal(a.validation_rows, b.validation_rows) for a, b in zip(folds, again.folds, strict=True))
    assert "5 stratified folds" in dataset.facts()["data.folds"]


class _Watched:
    """A part of the data whose every read is written to a log."""

    def __init__(self, part: Any, name: str, log: list[str]) -> None:
        self._part, self._name, self._log = part, name, log

    def _read(self, attr: str) -> Any:
        self._log.append(self._name)
        return getattr(self._part, attr)

    x = property(lambda self: self._read("x"))
    y = property(lambda self: self._read("y"))
    y_numpy = property(lambda self: self._read("y_numpy"))

    def __len__(self) -> int:
        return len(self._part)


class _LoggingPruner(optuna.pruners.BasePruner):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.log.append("pruner")
        return False


def test_the_holdout_is_read_only_after_every_fit_and_pruning_decision(monkeypatch):
    spec = spec_from_dict(KFOLD)
    dataset = build_dataset(spec)
    log: list[str] = []
    watched = dataclasses.replace(
        dataset,
        holdout=_Watched(dataset.holdout, "holdout", log),
        folds=tuple(dataclasses.replace(f, holdout=_Watched(f.holdout, "holdout", log)) for f in dataset.folds),
    )
    real_fit = study_mod.fit

    def logged_fit(*args: Any, **kwargs: Any) -> Any:
        log.append("fit")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(study_mod, "fit", logged_fit)
    storage = optuna.storages.InMemoryStorage()
    trial = run_study(
        spec, dataset=watched, tracker=NullTracker(), storage=storage, pruner=_LoggingPruner(log), n_trials=1
    ).study.trials[0]
    assert trial.state.name == "COMPLETE"
    assert log.count("fit") == 5 and log.count("pruner") == 4  # no pruning decision after the last fold
    first = log.index("holdout")
    assert "fit" not in log[first:] and "pruner" not in log[first:]
    assert 0.0 <= trial.user_attrs["holdout_completeness"] <= 1.0


def test_the_threshold_is_chosen_on_out_of_fold_scores_and_the_holdout_scored_by_the_fold_mean(kfold):
    spec, dataset = kfold["spec"], kfold["dataset"]
    trial = kfold["study"].trials[0]
    fits = Objective(spec, dataset, NullTracker()).cross_validate(suggest(trial, spec.search_space), 11)
    assert not fits.failure and [f.objective for f in fits.folds] == trial.user_attrs["fold_objectives"]
    cv = evaluate_folds(fits.folds, dataset, spec)
    rows = np.concatenate([dataset.folds[f.index].validation_rows for f in fits.folds])
    y = dataset.catalogue.labels[rows] == dataset.positive_index
    assert np.array_equal(cv.oof_labels, y)
    target = spec.objective.target_contamination
    # Each row scored by the one fold model that did not train on it.
    for outcome in fits.folds:
        fold = dataset.folds[outcome.index]
        assert not np.intersect1d(fold.train_rows, fold.validation_rows).size
        own = probabilities(predict_logits(outcome.model, fold.validation.x), spec.task)[:, 1].numpy()
        np.testing.assert_array_equal(outcome.val_scores, own.astype(np.float64))
    assert cv.evaluation.val_point == metrics.choose_operating_point(y, cv.evaluation.val_scores, target)
    assert cv.evaluation.val_point.threshold == trial.user_attrs["threshold"]
    hold = np.mean(
        [
            probabilities(predict_logits(f.model, dataset.folds[f.index].holdout.x), spec.task)[:, 1].numpy()
            for f in fits.folds
        ],
        axis=0,
        dtype=np.float64,
    )
    np.testing.assert_allclose(cv.evaluation.holdout_scores, hold, rtol=0, atol=1e-12)
    y_hold = dataset.holdout.y_numpy == dataset.positive_index
    measured = metrics.apply_operating_point(y_hold, cv.evaluation.holdout_scores, cv.evaluation.val_point)
    assert cv.evaluation.holdout.counts == measured.counts
    assert cv.evaluation.holdout.completeness == trial.user_attrs["holdout_completeness"]


def test_wilcoxon_prunes_a_clearly_worse_trial_before_its_last_fold():
    good = {"n_layers": 1, "widths": [16], "lr": 0.02, "batch_size": 128, "optimizer": "adam"}
    # A learning rate that leaves the network at its initial weights: worse on every fold.
    bad = {**good, "lr": 1e-7, "optimizer": "nesterov"}
    raw = {
        **KFOLD,
        "search_space": {**TINY_SPACE, "lr": {"low": 1e-7, "high": 3e-2, "log": True}},
        "train": {"max_epochs": 6, "patience": 6},
        "objective": {"metric": "val_loss"},
        "study": {**KFOLD["study"], "enqueue": [good, bad]},
    }
    spec = spec_from_dict(raw)
    assert spec.study.pruner == "wilcoxon"  # the default of a k-fold study
    storage = optuna.storages.InMemoryStorage()
    first, second = run_study(spec, tracker=NullTracker(), storage=storage).study.trials
    assert first.state.name == "COMPLETE" and sorted(first.intermediate_values) == [0, 1, 2, 3, 4]
    assert second.state.name == "PRUNED"
    # Worse on every fold: the one-sided signed-rank test reaches p = 1/16 < 0.1 at the fourth fold, before the last.
    assert sorted(second.intermediate_values) == [0, 1, 2, 3]
    assert all(second.intermediate_values[s] > first.intermediate_values[s] for s in range(4))
    assert second.user_attrs["stop_reason"].startswith("pruned after 4 of 5 folds")


def test_pack_auto_trains_a_kfold_study_one_trial_at_a_time(monkeypatch):
    # On a GPU, study.pack auto packs 8 trials; a k-fold study trains its folds eagerly instead.
    monkeypatch.setattr(study_mod, "pack_size", lambda pack, device: 8)
    spec = spec_from_dict({**KFOLD, "train": {"max_epochs": 1}, "study": {**KFOLD["study"], "pruner": "none"}})
    assert spec.study.pack == "auto"
    storage = optuna.storages.InMemoryStorage()
    trials = run_study(spec, tracker=NullTracker(), storage=storage).study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.user_attrs["engine"] == "eager" and len(t.user_attrs["fold_objectives"]) == 5 for t in trials)


def test_the_wilcoxon_pruner_builds_by_name_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner = study_mod.make_pruner("wilcoxon", {"p_threshold": 0.05})
    assert isinstance(pruner, optuna.pruners.WilcoxonPruner)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"validation": {"kind": "kfold", "k": 1}},
            "validation.k: k must be a whole number of folds from 2 to 50, got 1",
        ),
        (
            {"validation": {"kind": "kfold", "k": 51}},
            "validation.k: k must be a whole number of folds from 2 to 50, got 51",
        ),
        (
            {"validation": {"kind": "kfold", "k": True}},
            "validation.k: k must be a whole number of folds from 2 to 50, got True",
        ),
        ({"validation": {"k": 10}}, "validation.k: k is used by kind kfold only, got k=10 with kind split"),
        ({"validation": {"kind": "kfolds"}}, "validation.kind: Input should be 'split' or 'kfold', got 'kfolds'"),
        (
            {"validation": {"kind": "kfold"}, "study": {"pruner": "median"}},
            "study.pruner: with validation.kind kfold a trial reports once per fold, so only wilcoxon or none can "
            "prune it, got median",
        ),
        (
            {"study": {"pruner": "wilcoxon"}},
            "study.pruner: wilcoxon compares trials fold by fold and needs validation.kind kfold",
        ),
        (
            {"validation": {"kind": "kfold"}, "study": {"pruner": "none", "pack": 4}},
            "study.pack: packing is not available with validation.kind kfold; use pack 1 (or auto), got pack=4",
        ),
    ],
)
def test_config_mistakes_name_the_key_the_value_and_the_rule(change, message):
    with pytest.raises(ConfigError) as info:
        spec_from_dict(change)
    assert message in str(info.value)


def test_a_class_rarer_than_k_in_the_modelling_set_is_a_data_error_at_build_time(tmp_path, capsys):
    raw = {"data": {"simulated": {"n_star": 200, "n_quasar": 10}}, "validation": {"kind": "kfold", "k": 10}}
    with pytest.raises(DataError) as info:
        build_dataset(spec_from_dict(raw))
    text = str(info.value)
    assert "validation.k: class 'QSO' has 8 rows in the modelling set" in text
    assert "rest=160, QSO=8" in text and "fewer than k=10 folds" in text and "at most 8" in text
    path = tmp_path / "rare.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    assert "class 'QSO' has 8 rows" in capsys.readouterr().err


def test_a_split_study_keeps_its_fingerprint_and_stored_spec():
    plain = spec_from_dict(SPLIT)
    explicit = spec_from_dict({**SPLIT, "validation": {"kind": "split"}})
    for spec in (plain, explicit):
        assert spec.fingerprint(*FINGERPRINTED) == plain.fingerprint(*OLD_FINGERPRINTED)
        assert "validation" not in masked_spec(spec)
    kfold = spec_from_dict({**SPLIT, "validation": {"kind": "kfold", "k": 5}})
    assert kfold.fingerprint(*FINGERPRINTED) != plain.fingerprint(*OLD_FINGERPRINTED)
    assert masked_spec(kfold)["validation"] == {"kind": "kfold", "k": 5}
    assert spec_from_dict(masked_spec(kfold)).model_dump() == kfold.model_dump()


def test_a_study_made_before_the_validation_section_refuses_to_continue_as_kfold():
    split, kfold = spec_from_dict(SPLIT), spec_from_dict({**SPLIT, "validation": {"kind": "kfold"}})
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name=split.study.name, storage=storage, direction="maximize")
    study.set_user_attr("tuner.fingerprints", {s: split.fingerprint(s) for s in OLD_FINGERPRINTED})
    assert study_mod._changed_sections(study, split) == []
    assert study_mod._changed_sections(study, kfold) == ["validation"]
    with pytest.raises(ConfigError, match=r"with a different validation; its trials would not be comparable"):
        run_study(kfold, storage=storage, tracker=NullTracker(), dataset=build_dataset(kfold))
    assert len(study.trials) == 0


def test_replaying_a_kfold_trial_retrains_its_folds_and_reproduces_the_mean(kfold):
    trial = kfold["study"].trials[1]
    replay = replay_trial(kfold["study"], kfold["spec"], 1, dataset=kfold["dataset"])
    assert replay.matches and replay.recorded == trial.value == replay.replayed
    assert replay.seed == 12
    assert any("its 5 fold models are retrained" in note for note in replay.notes)


def test_a_failing_fold_fails_the_trial_naming_the_fold_and_replays_to_the_same_failure():
    raw = {
        **KFOLD,
        "search_space": {**TINY_SPACE, "lr": {"low": 1e-3, "high": 1e31, "log": True}},
        "train": {"max_epochs": 2, "patience": 2},
        "study": {**KFOLD["study"], "n_trials": 1, "pruner": "none", "enqueue": [{"lr": 1e30}]},
    }
    spec = spec_from_dict(raw)
    dataset = build_dataset(spec)
    storage = optuna.storages.InMemoryStorage()
    study = run_study(spec, dataset=dataset, tracker=NullTracker(), storage=storage).study
    trial = study.trials[0]
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["fail_reason"].startswith("fold 0: ")
    assert trial.intermediate_values == {}  # nothing reported for a fold that failed
    replay = replay_trial(study, spec, 0, dataset=dataset)
    assert replay.matches and replay.replayed_reason == trial.user_attrs["fail_reason"]


def test_exporting_a_kfold_trial_gives_the_fold_mean_at_the_out_of_fold_threshold(kfold):
    spec, study, dataset = kfold["spec"], kfold["study"], kfold["dataset"]
    result = export_trial(study, spec, out=kfold["root"] / "model", log_to_mlflow=False)
    trial = study.best_trial
    card = result.card
    assert card["verification"]["passed"], card["verification"]
    assert (
        card["validation"]["kind"] == "kfold"
        and card["validation"]["fold_objectives"] == trial.user_attrs["fold_objectives"]
    )
    config = json.loads((result.path / "artifacts" / "tuner_model.json").read_text())
    assert config["format"] == 2 and "preprocessor" not in config
    assert [m["fold"] for m in config["ensemble"]["members"]] == [0, 1, 2, 3, 4]
    assert config["threshold"] == trial.user_attrs["threshold"]
    weights = torch.load(result.path / "artifacts" / "state_dict.pt", weights_only=True)
    assert {key.split(".")[0] for key in weights} == {"0", "1", "2", "3", "4"}
    frame = simulate_catalogue(n_star=1500, n_quasar=150, seed=3)
    scored = predict_frame(result.path, frame.iloc[dataset.split.holdout])
    counts = card["trial"]["figures"]["holdout"]["counts"]
    assert int(scored["predicted_QSO"].sum()) == counts["tp"] + counts["fp"]
    assert "Cross-validated (5 folds" in (result.path / "model_card.md").read_text()


def test_the_report_shows_kfold_trials_by_their_fold_models_from_mlflow(kfold, tmp_path):
    spec, dataset = kfold["spec"], kfold["dataset"]
    for trial in kfold["study"].trials:
        ev = trial_evidence(trial, spec, dataset, MlflowRuns(spec.tracking.uri), replay=False, workdir=tmp_path)
        assert ev.source.startswith("its 5 fold models from MLflow run")
        a = trial.user_attrs
        # The stored fold models give the recorded figures: out-of-fold for validation, their mean on the holdout.
        assert metrics.completeness(ev.counts["out-of-fold"]) == a["val_completeness"]
        assert metrics.completeness(ev.counts["holdout"]) == a["holdout_completeness"]
        assert len(ev.history) == a["fold_epochs"][0]
    report = build_report(kfold["study"], spec, dataset=dataset)
    assert report.warnings == []
    assert "Validation objective per fold" in report.html


def test_the_kfold_study_file_is_valid():
    spec = load_spec(Path(__file__).parents[1] / "studies" / "kfold.yaml")
    assert spec.validation.kind == "kfold" and spec.validation.k == 5
    assert spec.study.pruner == "wilcoxon"


def test_a_cross_validated_multiclass_trial_records_every_classes_figures(tmp_path):
    raw = {
        **KFOLD,
        "task": "multiclass",
        "data": {"simulated": {"n_star": 600, "n_quasar": 120, "n_galaxy": 200}, "seed": 3, "positive": "QSO"},
        "validation": {"kind": "kfold", "k": 3},
        "study": {"name": "kfold-mc", "n_trials": 1, "seed": 0, "pruner": "none"},
    }
    spec = spec_from_dict(stored_in(raw, tmp_path, enabled=False))
    dataset = build_dataset(spec)
    attrs = run_study(spec, dataset=dataset).study.best_trial.user_attrs
    classes = dataset.catalogue.class_names
    assert set(classes) == {"GALAXY", "QSO", "STAR"}
    for part in ("val", "holdout"):
        assert np.isclose(
            attrs[f"{part}_macro_completeness"], np.mean([attrs[f"{part}_completeness_{c}"] for c in classes])
        )
    # Out-of-fold accuracy counts every modelling row (train + validation) once, each by the model that did not
    # train on it.
    correct = attrs["val_accuracy"] * sum(len(f.validation_rows) for f in dataset.folds)
    assert abs(correct - round(correct)) < 1e-6
    for c in classes:
        assert (
            attrs[f"holdout_completeness_{c}_low"]
            <= attrs[f"holdout_completeness_{c}"]
            <= attrs[f"holdout_completeness_{c}_high"]
        )
