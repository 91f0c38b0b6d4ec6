"""Multi-objective studies: the Pareto front, guard pruning, the front in `tuner best`, export by rule, packing."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState
from tiny import TINY_DATA, TINY_SPACE, stored_in

from tuner import pareto
from tuner.cli import main
from tuner.config import spec_from_dict
from tuner.errors import ConfigError, ExportError
from tuner.export import _pick_trials, export_trial
from tuner.study import GUARD_HISTORY, guard_median_rule, run_study

MO = {"metric": ["completeness", "contamination"], "threshold": 0.5, "guard": "val_loss"}
MO_STUDY = {
    "data": TINY_DATA,
    "search_space": TINY_SPACE,
    # Balanced class weights put the scores of both classes around 0.5, so the fixed threshold separates trials.
    "train": {"max_epochs": 4, "patience": 3, "pos_weight": "balanced"},
    "objective": MO,
    "study": {
        "name": "tiny-mo",
        "n_trials": 12,
        "seed": 2,
        "sampler": "nsga2",
        "pruner": "median",
        "pruner_options": {"n_startup_trials": 6, "n_warmup_steps": 2},
    },
}


@pytest.fixture(scope="module")
def mo_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("mo")
    spec = spec_from_dict(stored_in(MO_STUDY, root, plots=False))
    result = run_study(spec, device="cpu")
    return {"root": root, "spec": spec, "study": result.study}


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def test_a_multi_objective_study_yields_a_non_dominated_front(mo_study):
    study = mo_study["study"]
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert study.metric_names == ["completeness", "contamination"]
    done = complete(study)
    assert len(done) >= 3
    front = study.best_trials
    assert len(front) >= 2  # a trade-off, not one trial better than all
    for trial in front:
        # Dominance computed here, not by Optuna: no complete trial is at least as good everywhere and better once.
        for other in done:
            (c1, x1), (c2, x2) = trial.values, other.values
            assert not (c2 >= c1 and x2 <= x1 and (c2 > c1 or x2 < x1)), (trial.number, other.number)
    # Every complete trial off the front is dominated by one on it.
    on_front = {t.number for t in front}
    for other in done:
        if other.number not in on_front:
            assert any(pareto.dominates(t.values, other.values, study.directions) for t in front)


def test_values_are_the_validation_figures_at_the_fixed_threshold_and_the_holdout_is_still_measured(mo_study):
    for trial in complete(mo_study["study"]):
        a = trial.user_attrs
        assert len(trial.values) == 2
        assert trial.values == [a["val_completeness_at_threshold"], a["val_contamination_at_threshold"]]
        assert a["fixed_threshold"] == 0.5
        assert 0.0 <= a["holdout_completeness_at_threshold_low"] <= a["holdout_completeness_at_threshold"]
        assert a["holdout_completeness_at_threshold"] <= a["holdout_completeness_at_threshold_high"] <= 1.0
        # The honest operating point (threshold chosen on validation for the target contamination) is kept too.
        assert a["holdout_completeness_low"] <= a["holdout_completeness"] <= a["holdout_completeness_high"]
        assert a["val_contamination"] <= 0.1 + 1e-12


def test_guard_values_are_recorded_per_epoch_and_pruned_trials_break_the_median_rule(mo_study):
    study = mo_study["study"]
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    for trial in finished:
        history = trial.user_attrs[GUARD_HISTORY]
        assert len(history) == trial.user_attrs["epochs"]
        assert all(v is None or v > 0 for v in history)  # val_loss
    pruned = [t for t in finished if t.state == TrialState.PRUNED]
    assert pruned
    for trial in pruned:
        history = trial.user_attrs[GUARD_HISTORY]
        step = len(history) - 1
        assert step >= 2  # n_warmup_steps
        assert "guard val_loss" in trial.user_attrs["stop_reason"]


def test_the_median_rule_on_the_guard():
    others = [[0.5, 0.4, 0.3], [0.6, 0.5, 0.4], [0.7, 0.6, 0.5]]
    assert guard_median_rule(0.45, 2, others, maximize=False, n_startup_trials=3, n_warmup_steps=1) == (True, 0.4)
    assert guard_median_rule(0.35, 2, others, maximize=False, n_startup_trials=3, n_warmup_steps=1) == (False, 0.4)
    # A larger-is-better guard turns the comparison round.
    assert guard_median_rule(0.35, 2, others, maximize=True, n_startup_trials=3, n_warmup_steps=1) == (True, 0.4)
    # Not before the warm-up epochs, nor before enough complete trials, nor where no other trial reached the epoch.
    assert guard_median_rule(9.0, 0, others, maximize=False, n_startup_trials=3, n_warmup_steps=1) == (False, None)
    assert guard_median_rule(9.0, 2, others, maximize=False, n_startup_trials=4, n_warmup_steps=1) == (False, None)
    assert guard_median_rule(9.0, 5, others, maximize=False, n_startup_trials=3, n_warmup_steps=1) == (False, None)
    # Epochs without a finite guard do not count.
    assert guard_median_rule(0.45, 1, [[1, None], [1, 0.5]], maximize=False, n_startup_trials=2, n_warmup_steps=0)[
        1
    ] == pytest.approx(0.5)


def test_guard_pruning_stops_a_clearly_worse_trial(tmp_path):
    raw = {
        **MO_STUDY,
        "search_space": {**TINY_SPACE, "lr": {"low": 1e-7, "high": 3e-2, "log": True}, "optimizer": "adam"},
        "train": {"max_epochs": 5, "patience": 5},
        "study": {
            **MO_STUDY["study"],
            "name": "tiny-mo-guard",
            "n_trials": 4,
            "sampler": "random",
            "pruner_options": {"n_startup_trials": 3, "n_warmup_steps": 1},
            # Three good trials (distinct: identical entries are queued once), then one that cannot learn.
            "enqueue": [{"n_layers": 2, "widths": [32, 32], "lr": lr, "batch_size": 128} for lr in (0.02, 0.01, 0.015)]
            + [{"n_layers": 1, "widths": [8], "lr": 1e-7, "batch_size": 256}],
        },
        "tracking": {"enabled": False},
    }
    study = run_study(spec_from_dict({**raw, "study": {**raw["study"], "storage": f"sqlite:///{tmp_path}/o.db"}})).study
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert study.trials[3].user_attrs["stop_reason"].startswith("pruned at epoch 1 (guard val_loss=")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"study": {"sampler": "cmaes"}}, "study.sampler: cmaes cannot optimise several objectives"),
        ({"objective": {"metric": ["completeness", "contamination"]}}, "objective.guard: Optuna cannot prune"),
        ({"objective": {**MO, "guard": "contamination"}}, "objective.guard: the guard is one scalar metric"),
        ({"validation": {"kind": "kfold"}}, "validation.kind: a multi-objective study"),
        ({"train": {"monitor": "val_objective"}}, "train.monitor: val_objective is ambiguous"),
        ({"study": {"pruner": "hyperband"}}, "study.pruner: a multi-objective study prunes with the median rule"),
        ({"objective": {"metric": ["completeness"]}}, "objective.metric: a metric list holds 2 or 3 metrics"),
        ({"objective": {"metric": "contamination"}}, "objective.metric: contamination is measured at a fixed"),
        ({"objective": {"metric": "roc_auc", "guard": "val_loss"}}, "guard prunes a multi-objective study"),
    ],
)
def test_multi_objective_mistakes_are_named(change, message):
    raw = {"objective": MO, "study": {"sampler": "nsga2"}}
    for section, value in change.items():
        raw[section] = value if section == "objective" else {**raw.get(section, {}), **value}
    with pytest.raises(ConfigError) as info:
        spec_from_dict(raw)
    assert message in str(info.value)


def test_the_short_form_and_the_samplers_that_take_several_objectives():
    spec = spec_from_dict({"objective": ["roc_auc", "contamination"], "study": {"pruner": "none", "sampler": "gp"}})
    assert spec.objective.metrics == ("roc_auc", "contamination")
    assert spec.objective.directions == ("maximize", "minimize") and spec.objective.multi
    # A single-objective study's objective section serialises as before (its stored fingerprint is unchanged).
    assert "threshold" not in spec_from_dict({}).model_dump()["objective"]


def test_tuner_best_prints_the_front(mo_study, capsys):
    study, spec = mo_study["study"], mo_study["spec"]
    numbers = sorted(t.number for t in study.best_trials)
    assert main(["best", spec.study.name, "--storage", spec.study.storage, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["number"] for r in records] == numbers
    assert all(list(r["values"]) == ["completeness", "contamination"] for r in records)
    assert main(["best", spec.study.name, "--storage", spec.study.storage]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of study tiny-mo" in out and f"{len(numbers)} trial(s) on the front" in out
    assert main(["status", spec.study.name, "--storage", spec.study.storage]) == 0
    assert f"{len(numbers)} trial(s)" in capsys.readouterr().out


def test_export_by_rule_picks_the_most_complete_front_trial_under_the_contamination_bound(mo_study, tmp_path):
    study, spec = mo_study["study"], mo_study["spec"]
    front = study.best_trials
    bound = sorted(t.values[1] for t in front)[len(front) // 2]
    feasible = [t for t in front if t.values[1] <= bound]
    expected = max(feasible, key=lambda t: (t.values[0], -t.number))
    chosen, _ = _pick_trials(study, spec, None, f"contamination<={bound!r}")
    assert chosen.number == expected.number
    result = export_trial(study, spec, rule=f"contamination <= {bound!r}", out=tmp_path / "m", log_to_mlflow=False)
    assert result.trial_number == expected.number
    assert result.card["objective"]["values"] == expected.values
    assert any("chosen from the Pareto front" in n for n in result.notes)
    # The card says which figures are at the objectives' fixed threshold and which at the frozen one.
    card = " ".join((tmp_path / "m" / "model_card.md").read_text().split())
    assert f"measured at the fixed score threshold {spec.objective.threshold}, not at the frozen one" in card


def test_export_of_a_front_needs_a_choice_and_a_sound_rule(mo_study, capsys):
    study, spec = mo_study["study"], mo_study["spec"]
    first = min(t.number for t in study.best_trials)
    with pytest.raises(ExportError, match=rf"no single best trial.*\n  trial {first}: completeness="):
        _pick_trials(study, spec, None, None)
    with pytest.raises(ExportError, match=r"--rule: expected OBJECTIVE OP NUMBER"):
        _pick_trials(study, spec, None, "contamination=0.1")
    with pytest.raises(ExportError, match=r"--rule: 'purity' is not an objective of this study"):
        _pick_trials(study, spec, None, "purity<=0.1")
    with pytest.raises(ExportError, match=r"--rule: no trial on the Pareto front has contamination<-1"):
        _pick_trials(study, spec, None, "contamination<-1")
    with pytest.raises(ExportError, match=r"--rule: '1e999' is not a finite number"):
        _pick_trials(study, spec, None, "contamination<=1e999")
    storage = ["--storage", spec.study.storage]
    assert main(["export", spec.study.name, *storage, "--rule", "completeness>>1"]) == 2
    assert "--rule: expected OBJECTIVE OP NUMBER" in capsys.readouterr().err


def test_a_packed_multi_objective_study_completes(tmp_path):
    raw = {
        **MO_STUDY,
        "search_space": {**TINY_SPACE, "n_layers": 2, "batch_size": 128, "optimizer": {"choices": ["adam", "adamw"]}},
        "study": {**MO_STUDY["study"], "name": "tiny-mo-packed", "n_trials": 6, "pack": 2},
    }
    study = run_study(spec_from_dict(stored_in(raw, tmp_path, plots=False)), device="cpu").study
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 6 and {t.user_attrs["engine"] for t in trials} == {"packed"}
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert all(len(t.values) == 2 for t in trials if t.state == TrialState.COMPLETE)
    assert all(len(t.user_attrs[GUARD_HISTORY]) == t.user_attrs["epochs"] for t in trials)
    assert study.best_trials


def test_a_single_objective_study_is_not_continued_as_a_multi_objective_one(mo_study, tmp_path):
    single = spec_from_dict(stored_in({**MO_STUDY, "objective": {"metric": "roc_auc"}}, Path(mo_study["root"])))
    with pytest.raises(ConfigError, match=r"objective|direction"):
        run_study(single, device="cpu")
