"""The study report and the trial table of the tasks without one positive class: regressions, multilabel, and the
per-class figures of a multiclass task."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import create_trial
from tiny import TASK_SPACE, TINY_DATA, stored_in, write_task_table

from tuner import metrics
from tuner.config import spec_from_dict
from tuner.data.dataset import build_dataset
from tuner.evaluation import label_key
from tuner.regression import rmse
from tuner.report import (
    MULTICLASS_METRICS,
    REGRESSION_METRICS,
    build_report,
    ranked_trials,
    trial_evidence,
    trials_frame,
    trials_table,
)
from tuner.study import run_study
from tuner.tracking import MlflowRuns

LABELS = ["bright", "kind==X"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A small learnable catalogue: a value far from unit scale, a value in [0, 1], two labels."""
    return write_task_table(tmp_path_factory.mktemp("table") / "table.csv", n=900, seed=1)


def finished(root: Path, task: str, data: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A finished two-trial study of ``task`` tracked in MLflow, with its spec."""
    raw: dict[str, Any] = {
        "task": task,
        "data": {"seed": 0, **data},
        "search_space": {**TASK_SPACE, **sections.pop("search_space", {})},
        "train": {"max_epochs": 3, "patience": 2},
        "study": {"name": f"{task}-report", "n_trials": 2, "seed": 0, "pruner": "none"},
        **sections,
    }
    spec = spec_from_dict(stored_in(raw, root, plots=False))
    study = run_study(spec, device="cpu").study
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    return {"spec": spec, "study": study}


def report_of(study: optuna.Study, spec: Any) -> tuple[str, list[str]]:
    """The report's page and what it told the person while it was made."""
    said: list[str] = []
    return build_report(study, spec, say=said.append).html, said


def figure_ids(page: str) -> list[str]:
    return re.findall(r'<div id="(fig-[^"]+)" class="plotly-graph-div"', page)


def interval(a: dict[str, Any], key: str) -> str:
    """A recorded figure and its interval as the report writes them."""
    return f"{a[key]:.4g} [{a[key + '_low']:.4g}, {a[key + '_high']:.4g}]"


def evidence(run: dict[str, Any], trial: Any, tmp_path: Path) -> Any:
    spec = run["spec"]
    dataset = build_dataset(spec, "cpu")
    return trial_evidence(trial, spec, dataset, MlflowRuns(spec.tracking.uri), replay=False, workdir=tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Regression


@pytest.fixture(scope="module")
def regression(table, tmp_path_factory):
    return finished(
        tmp_path_factory.mktemp("regression"),
        "regression",
        {"source": str(table), "features": ["a", "b", "c", "d"], "target": "value"},
        search_space={"loss": {"choices": ["mse", "mae"]}},
    )


def test_a_regression_report_loads_the_logged_model_and_plots_predicted_against_true(regression):
    study, spec = regression["study"], regression["spec"]
    page, said = report_of(study, spec)
    assert not any("replaying" in s for s in said), said
    best, runner_up = ranked_trials(study)[:2]
    for role, trial in (("best", best), ("runner-up", runner_up)):
        assert f"model from MLflow run {trial.user_attrs['mlflow_run_id']}" in page
        assert f"fig-{role}-{trial.number}-predicted" in figure_ids(page)
        # The recorded holdout errors, each with its bootstrap interval.
        for key in ("holdout_mae", "holdout_rmse", "holdout_r2"):
            assert interval(trial.user_attrs, key) in page, key
    # No positive class, no ROC, no threshold: the facts name the task and its target.
    assert not any(d.endswith(("-roc", "-ce")) for d in figure_ids(page))
    assert "positive class" not in page and "threshold (frozen" not in page
    assert "regression of value" in page and "data.target" not in page and "value: mean " in page
    assert "MAE, RMSE and R² with 95% bootstrap intervals" in page


def test_a_regression_trial_s_logged_model_gives_its_recorded_holdout_error(regression, tmp_path):
    best = ranked_trials(regression["study"])[0]
    ev = evidence(regression, best, tmp_path)
    assert ev.source.startswith("model from MLflow run") and not ev.curves
    y, predicted = ev.predictions["holdout"]
    # Back in the target's unit (it trained on the standardised value): the error the trial recorded.
    assert rmse(y, predicted) == pytest.approx(best.user_attrs["holdout_rmse"], rel=1e-5)
    assert float(np.mean(y)) > 100


def test_a_regression_trial_without_a_logged_model_is_replayed(regression):
    study, spec = regression["study"], regression["spec"]
    best = ranked_trials(study)[0]
    orphan = create_trial(
        value=best.value,
        params=best.params,
        distributions=best.distributions,
        user_attrs={k: v for k, v in best.user_attrs.items() if k != "mlflow_run_id"},
    )
    copy = optuna.create_study(direction="minimize", study_name="copy")
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    copy.add_trial(orphan)
    page, said = report_of(copy, spec)
    assert any(s.startswith("replaying trial 0") for s in said)
    assert "fig-best-0-predicted" in figure_ids(page)
    assert interval(best.user_attrs, "holdout_rmse") in page


def test_the_trials_of_a_regression_carry_its_errors_and_loss(regression, capsys):
    study, spec = regression["study"], regression["spec"]
    frame = trials_frame(study, spec)
    assert set(REGRESSION_METRICS) <= set(frame.columns)
    assert "holdout_completeness" not in frame.columns and "threshold" not in frame.columns
    # The search space draws the loss; Huber's delta and L1 are not in it.
    assert frame["loss"].isin(["mse", "mae"]).all()
    assert "huber_delta" not in frame.columns and "l1" not in frame.columns
    for trial in study.trials:
        row = frame.iloc[trial.number]
        for key in REGRESSION_METRICS:
            assert row[key] == pytest.approx(trial.user_attrs[key]), key
        assert row["holdout_rmse_low"] <= row["holdout_rmse"] <= row["holdout_rmse_high"]
    from rich.console import Console

    console = Console(width=220, record=True)
    console.print(trials_table(frame, "t"))
    text = console.export_text()
    assert "holdout RMSE" in text and "holdout compl." not in text
    assert f"{frame['holdout_rmse'][0]:.4g}" in text


# --------------------------------------------------------------------------------------------------------------
# Regression in [0, 1]


def test_a_unit_regression_report_loads_the_logged_model(table, tmp_path_factory, tmp_path):
    run = finished(
        tmp_path_factory.mktemp("unit"),
        "unit_regression",
        {"source": str(table), "features": ["a", "b", "c", "d"], "target": "fraction"},
    )
    study, spec = run["study"], run["spec"]
    page, said = report_of(study, spec)
    assert not any("replaying" in s for s in said), said
    best = ranked_trials(study)[0]
    assert f"fig-best-{best.number}-predicted" in figure_ids(page)
    assert "unit_regression of fraction" in page and interval(best.user_attrs, "holdout_mae") in page
    y, predicted = evidence(run, best, tmp_path).predictions["holdout"]
    assert predicted.min() >= 0.0 and predicted.max() <= 1.0  # the sigmoid's output, not rescaled
    assert rmse(y, predicted) == pytest.approx(best.user_attrs["holdout_rmse"], rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Multilabel


@pytest.fixture(scope="module")
def multilabel(table, tmp_path_factory):
    return finished(
        tmp_path_factory.mktemp("multilabel"),
        "multilabel",
        {"source": str(table), "features": ["a", "b", "c", "d"], "target": LABELS},
    )


def test_a_multilabel_report_shows_each_label_s_curves_and_holdout_figures(multilabel):
    study, spec = multilabel["study"], multilabel["spec"]
    page, said = report_of(study, spec)
    assert not any("replaying" in s for s in said), said
    best, runner_up = ranked_trials(study)[:2]
    ids = figure_ids(page)
    for role, trial in (("best", best), ("runner-up", runner_up)):
        a = trial.user_attrs
        assert f"model from MLflow run {a['mlflow_run_id']}" in page
        assert f"fig-{role}-{trial.number}-roc" in ids and f"fig-{role}-{trial.number}-ce" in ids
        for name in LABELS:
            key = label_key(name)
            assert interval(a, f"holdout_completeness_{key}") in page, name
            assert interval(a, f"holdout_contamination_{key}") in page, name
            assert f"{a[f'threshold_{key}']:.4g}" in page
        assert f"{a['holdout_completeness']:.4g}" in page  # the macro average
    # One curve per label and part on the ROC, each named.
    for name in LABELS:
        assert f"{name}, holdout (AUC" in page and f"{name}, validation (AUC" in page
    assert "positive class" not in page and "positive = " not in page
    assert "multilabel, 2 labels: bright, kind==X" in page and "label counts" in page
    assert "Validation picks each label" in page


def test_a_multilabel_trial_s_logged_model_gives_its_recorded_label_figures(multilabel, tmp_path):
    best = ranked_trials(multilabel["study"])[0]
    ev = evidence(multilabel, best, tmp_path)
    assert list(ev.labels) == LABELS and not ev.curves
    for name in LABELS:
        key = label_key(name)
        counts = ev.label_counts[name]
        assert metrics.completeness(counts["holdout"]) == pytest.approx(best.user_attrs[f"holdout_completeness_{key}"])
        assert metrics.contamination(counts["validation"]) == pytest.approx(best.user_attrs[f"val_contamination_{key}"])


def test_the_trials_of_a_multilabel_study_carry_each_label(multilabel):
    study, spec = multilabel["study"], multilabel["spec"]
    frame = trials_frame(study, spec)
    assert "threshold" not in frame.columns and "holdout_completeness_low" not in frame.columns
    for trial in study.trials:
        row = frame.iloc[trial.number]
        assert row["holdout_completeness"] == pytest.approx(trial.user_attrs["holdout_completeness"])
        for name in LABELS:
            key = label_key(name)
            for col in (f"threshold_{key}", f"holdout_completeness_{key}_low", f"holdout_contamination_{key}_high"):
                assert row[col] == pytest.approx(trial.user_attrs[col]), col


# --------------------------------------------------------------------------------------------------------------
# Multiclass: each class's figures beside the positive class's


def test_a_multiclass_report_and_table_show_each_class(tmp_path_factory):
    data = {"simulated": {**TINY_DATA["simulated"], "n_galaxy": 400}, "seed": 3, "positive": "QSO"}
    run = finished(tmp_path_factory.mktemp("multiclass"), "multiclass", data)
    study, spec = run["study"], run["spec"]
    page, _ = report_of(study, spec)
    best = ranked_trials(study)[0]
    a = best.user_attrs
    assert "Each class, every row given to its most probable class" in page
    for name in ("STAR", "QSO", "GALAXY"):
        assert interval(a, f"holdout_completeness_{name}") in page, name
        assert interval(a, f"holdout_contamination_{name}") in page, name
    assert f"{a['holdout_macro_completeness']:.4g}" in page and f"{a['holdout_accuracy']:.4g}" in page
    assert "positive class QSO" in page and "positive = QSO" in page
    frame = trials_frame(study, spec)
    assert set(MULTICLASS_METRICS) <= set(frame.columns)
    row = frame.iloc[best.number]
    assert row["holdout_completeness_GALAXY_low"] == pytest.approx(a["holdout_completeness_GALAXY_low"])
    assert row["holdout_completeness"] == pytest.approx(a["holdout_completeness"])  # the positive class's
    assert not math.isnan(row["threshold"])
