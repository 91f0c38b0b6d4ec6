"""Every task of the lecture's table: its last layer and loss, its data, its metrics, and a study of each."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from tiny import TASK_SPACE, stored_in, trial_params, write_task_table
from torch import nn

from tuner.config import spec_from_dict
from tuner.data.dataset import build_dataset
from tuner.errors import ConfigError, DataError
from tuner.evaluation import label_key
from tuner.model import build_mlp
from tuner.packed import PackMember, fit_pack
from tuner.regression import bootstrap_interval, mae, r2, regression_figures, rmse
from tuner.space import TrialParams
from tuner.study import Objective, evaluate, fit_config, replay_trial, run_study, validation_scorer
from tuner.tasks import huber, outputs, row_losses
from tuner.tracking import NullTracker
from tuner.train import FitConfig, fit, l1_norm


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """A learnable catalogue with a value, a value in [0, 1], two labels and three classes."""
    return write_task_table(tmp_path_factory.mktemp("table") / "table.csv", n=1200, seed=0)


def spec_for(table: Path, task: str, root: Path | None = None, **sections: Any) -> Any:
    default_target = {"regression": "value", "unit_regression": "fraction", "multilabel": ["bright", "kind==X"]}
    data = {
        "source": str(table),
        "features": ["a", "b", "c", "d"],
        "seed": 0,
        "target": default_target.get(task, "kind"),
        **sections.pop("data", {}),
    }
    raw: dict[str, Any] = {
        "task": task,
        "data": data,
        "search_space": {**TASK_SPACE, **sections.pop("search_space", {})},
        "train": {"max_epochs": 6, "patience": 3, **sections.pop("train", {})},
        "study": {"name": f"{task}-study", "n_trials": 3, "seed": 0, **sections.pop("study", {})},
        **sections,
    }
    if root is not None:
        raw = stored_in(raw, root, plots=False)
    else:
        raw["tracking"] = {"enabled": False}
    return spec_from_dict(raw)


def params(**changes: Any) -> TrialParams:
    return trial_params(**{"n_layers": 1, "widths": (16,), "batch_size": 64, **changes})


# ----------------------------------------------------------------------------------------------------------------
# Last layer and loss


def test_each_loss_is_the_textbook_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 1, generator=g)
    y = torch.randn(50, generator=g)
    assert torch.allclose(row_losses(logits, y, "regression", loss="mse").mean(), F.mse_loss(logits[:, 0], y))
    assert torch.allclose(row_losses(logits, y, "regression", loss="mae").mean(), F.l1_loss(logits[:, 0], y))
    for delta in (0.3, 1.0, 2.5):
        expected = nn.HuberLoss(delta=delta)(logits[:, 0], y)
        assert torch.allclose(row_losses(logits, y, "regression", loss="huber", delta=delta).mean(), expected)
    unit = torch.rand(50, generator=g)
    assert torch.allclose(
        row_losses(logits, unit, "unit_regression", loss="mse").mean(), F.mse_loss(torch.sigmoid(logits[:, 0]), unit)
    )
    assert torch.allclose(
        row_losses(logits, unit, "unit_regression", loss="bce").mean(),
        F.binary_cross_entropy(torch.sigmoid(logits[:, 0]), unit),
        atol=1e-6,
    )
    labels = torch.randint(0, 2, (50, 3), generator=g).float()
    three = torch.randn(50, 3, generator=g)
    assert torch.allclose(
        row_losses(three, labels, "multilabel").mean(), F.binary_cross_entropy_with_logits(three, labels)
    )


def test_huber_takes_one_delta_per_trial_of_a_pack():
    diff = torch.tensor([[0.5, 3.0], [0.5, 3.0]])
    out = huber(diff, torch.tensor([[1.0], [0.25]]))
    assert torch.allclose(out[0], torch.tensor([0.125, 2.5]))  # delta 1: quadratic, then linear
    assert torch.allclose(out[1], torch.tensor([0.25 * (0.5 - 0.125), 0.25 * (3.0 - 0.125)]))


def test_the_outputs_mean_what_the_task_says():
    logits = torch.tensor([[-20.0, 0.0, 20.0]])
    assert torch.allclose(outputs(logits, "multilabel"), torch.sigmoid(logits))
    assert torch.allclose(outputs(logits, "multiclass").sum(dim=-1), torch.ones(1))
    assert torch.equal(outputs(logits[:, :1], "regression"), logits[:, :1])  # linear: any value
    unit = outputs(torch.tensor([[-50.0], [50.0]]), "unit_regression")
    assert float(unit.min()) >= 0.0 and float(unit.max()) <= 1.0


def _regression_parts(seed: int = 0) -> tuple[Any, Any]:
    from tiny import Part

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, 4, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(500, generator=g)
    return Part(x[:400], y[:400]), Part(x[400:], y[400:])


def test_the_l1_penalty_adds_l1_times_the_sign_of_each_weight_to_its_gradient():
    train, validation = _regression_parts()
    # One full-batch SGD step without momentum: the step's difference is exactly lr * l1 * sign(w).
    config = FitConfig(task="regression", max_epochs=1, patience=1, health=False)
    models = {}
    for l1 in (None, 0.01):
        p = params(l1=l1, loss="mse", optimizer="sgd", momentum=0.0, lr=0.1, batch_size=400)
        models[l1] = build_mlp(4, p, 1, generator=torch.Generator().manual_seed(1))
        start = [m.weight.detach().clone() for m in models[l1] if isinstance(m, nn.Linear)]
        fit(models[l1], train, validation, p, config, seed=1)
    for before, plain, penalised in zip(
        start,
        [m for m in models[None] if isinstance(m, nn.Linear)],
        [m for m in models[0.01] if isinstance(m, nn.Linear)],
        strict=True,
    ):
        assert torch.allclose(plain.weight - penalised.weight, 0.1 * 0.01 * torch.sign(before), atol=1e-6)
        assert torch.equal(plain.bias, penalised.bias)  # biases are not penalised


def test_the_l1_penalty_shrinks_the_weights_and_stays_out_of_the_reported_loss():
    train, validation = _regression_parts()
    config = FitConfig(task="regression", max_epochs=15, patience=15, health=False)
    norms, losses = {}, {}
    for l1 in (None, 0.03):
        p = params(l1=l1, loss="mse")
        model = build_mlp(4, p, 1, generator=torch.Generator().manual_seed(1))
        result = fit(model, train, validation, p, config, seed=1)
        norms[l1] = float(l1_norm(model).detach())
        losses[l1] = result.history[-1]["train_loss"]
    assert norms[0.03] < 0.8 * norms[None]
    # The reported loss is the data loss: the penalty (0.03 * |w|, about 1) would dwarf it.
    assert losses[0.03] < 0.03 * norms[0.03]


@pytest.mark.parametrize(
    ("task", "changes"),
    [
        ("regression", {"loss": "huber", "huber_delta": 0.5, "l1": 1e-3}),
        ("regression", {"loss": "mae", "optimizer": "adamw", "weight_decay": 1e-3}),
        ("unit_regression", {"loss": "bce", "l1": 1e-4}),
        ("unit_regression", {"loss": "mse", "optimizer": "nesterov"}),
    ],
)
def test_a_packed_regression_trial_equals_its_solo_run(task, changes):
    train, validation = _regression_parts()
    if task == "unit_regression":
        train.y, validation.y = torch.sigmoid(train.y), torch.sigmoid(validation.y)
    config = FitConfig(task=task, max_epochs=8, patience=8, health=False)
    member = params(**changes)
    others = [params(**{**changes, "lr": 0.003, "widths": (24,)}), params(**{**changes, "widths": (8,)})]
    if "huber_delta" in changes:
        others[0] = params(**{**changes, "huber_delta": 2.0, "widths": (24,)})
    (solo,) = fit_pack([PackMember(member, 5, [])], train, validation, config, n_out=1)
    packed = fit_pack(
        [PackMember(member, 5, []), *(PackMember(o, 6 + i, []) for i, o in enumerate(others))],
        train,
        validation,
        config,
        n_out=1,
    )
    a, b = solo.result.history, packed[0].result.history
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        assert math.isclose(ea["val_loss"], eb["val_loss"], rel_tol=1e-5, abs_tol=1e-6)
    for (name, wa), (_, wb) in zip(solo.model.state_dict().items(), packed[0].model.state_dict().items(), strict=True):
        assert torch.allclose(wa, wb, atol=1e-5), name


# ----------------------------------------------------------------------------------------------------------------
# Regression metrics


def test_regression_metrics_agree_with_scikit_learn_and_the_bootstrap_is_reproducible():
    rng = np.random.default_rng(3)
    y = rng.normal(size=400)
    p = y + rng.normal(scale=0.4, size=400)
    assert math.isclose(mae(y, p), mean_absolute_error(y, p))
    assert math.isclose(rmse(y, p), math.sqrt(mean_squared_error(y, p)))
    assert math.isclose(r2(y, p), r2_score(y, p))
    figures = regression_figures(y, p, intervals=True)
    for name in ("mae", "rmse", "r2"):
        ci = getattr(figures, f"{name}_ci")
        assert ci.low < getattr(figures, name) < ci.high
    assert bootstrap_interval("rmse", y, p) == bootstrap_interval("rmse", y, p)
    wide, narrow = bootstrap_interval("mae", y[:50], p[:50]), bootstrap_interval("mae", y, p)
    assert narrow.high - narrow.low < wide.high - wide.low
    assert math.isnan(r2([1.0, 1.0], [1.0, 2.0]))


# ----------------------------------------------------------------------------------------------------------------
# Data


def test_a_regression_target_is_standardised_on_the_training_rows_and_measured_in_its_unit(table):
    dataset = build_dataset(spec_for(table, "regression"))
    mean, std = dataset.target_scaling  # type: ignore[misc]
    train_values = dataset.train.y_numpy
    assert math.isclose(mean, float(train_values.mean())) and math.isclose(std, float(train_values.std()))
    assert abs(float(dataset.train.y.mean())) < 1e-4 and abs(float(dataset.train.y.std()) - 1) < 1e-2
    assert float(np.abs(dataset.holdout.y_numpy).mean()) > 100  # the holdout keeps the unit for metrics
    assert np.allclose(dataset.unscale(dataset.validation.y.numpy()), dataset.validation.y_numpy, atol=1e-3)
    # Stratified by value: every part spans the range.
    for part in (dataset.train, dataset.validation, dataset.holdout):
        assert part.y_numpy.min() < np.quantile(train_values, 0.1) and part.y_numpy.max() > np.quantile(
            train_values, 0.9
        )


def test_labels_come_from_columns_or_conditions_and_rows_from_where(table):
    spec = spec_for(
        table,
        "multilabel",
        data={"target": ["bright", "kind==X", "value>300"], "where": {"d": {"min": -2.0, "max": 2.0}}},
    )
    dataset = build_dataset(spec)
    frame = pd.read_csv(table)
    kept = frame[(frame.d >= -2) & (frame.d <= 2)].reset_index(drop=True)
    assert dataset.catalogue.n_rows == len(kept) < len(frame)
    targets = dataset.catalogue.targets
    assert targets is not None and targets.shape == (len(kept), 3)
    assert np.array_equal(targets[:, 0], kept.bright.to_numpy())
    assert np.array_equal(targets[:, 1], (kept.kind == "X").to_numpy())
    assert np.array_equal(targets[:, 2], (kept.value > 300).to_numpy())
    assert dataset.n_out == 3 and dataset.train.y.shape[1] == 3


@pytest.mark.parametrize(
    ("task", "data", "message"),
    [
        ("unit_regression", {"target": "value"}, "task unit_regression needs values in [0, 1]"),
        ("regression", {"target": "kind"}, "needs a numeric target column, got column 'kind'"),
        ("multilabel", {"target": ["bright", "kind"]}, "label column 'kind' must hold 0/1 or true/false"),
        ("multilabel", {"target": ["bright", "kind>1"]}, "needs a numeric column for >"),
        ("multilabel", {"target": ["bright", "value>100000"]}, "label 'value>100000' holds 0 positive"),
        ("multilabel", {"target": ["bright", "nope==1"]}, "column 'nope' not in the catalogue"),
        ("regression", {"target": "value", "where": {"kind": "W"}}, "data.where: no row has kind='W'"),
    ],
)
def test_bad_targets_are_named(table, task, data, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        build_dataset(spec_for(table, task, data=data))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"task": "regression", "data": {"positive": "QSO"}}, "data.positive: a regression task has no positive"),
        ({"task": "binary", "search_space": {"loss": "mse"}}, "search_space.loss: the loss of a binary task is fixed"),
        ({"task": "regression", "search_space": {"loss": "bce"}}, "a regression task trains with mse or mae or huber"),
        ({"task": "unit_regression", "search_space": {"loss": "huber"}}, "trains with mse or bce, got huber"),
        ({"task": "regression", "search_space": {"huber_delta": 1.0}}, "huber_delta: Huber's delta is used with"),
        ({"task": "regression", "search_space": {"l1": -1.0}}, "search_space.l1: l1 must be >= 0"),
        ({"task": "multilabel", "data": {"target": "class"}}, "needs a list of 2 or more label columns"),
        ({"task": "binary", "data": {"target": ["a", "b"]}}, "a list of label columns is for task multilabel"),
        ({"task": "regression", "objective": {"metric": "roc_auc"}}, "roc_auc does not apply to a regression"),
        ({"task": "binary", "objective": {"metric": "rmse"}}, "rmse does not apply to a binary task"),
        ({"task": "regression", "train": {"monitor": "val_auc"}}, "train.monitor: val_auc needs classes"),
        ({"task": "regression", "train": {"pos_weight": 2.0}}, "train.pos_weight: weights positive rows"),
        ({"task": "regression", "validation": {"kind": "kfold"}}, "k-fold cross-validation is available for binary"),
        ({"data": {"where": {"r": {"min": 2, "max": 1}}}}, "data.where: where.r: min must be <= max"),
        ({"task": "clustering"}, "task: Input should be"),
    ],
)
def test_task_mistakes_are_named(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        spec_from_dict(raw)


def test_a_regression_objective_defaults_to_rmse_and_a_loss_space_validates():
    spec = spec_from_dict(
        {
            "task": "regression",
            "search_space": {"loss": {"choices": ["mse", "huber"]}, "huber_delta": {"low": 0.1, "high": 2.0}},
        }
    )
    assert spec.objective.metric == "rmse" and spec.objective.direction == "minimize"
    assert spec.positive_class is None
    assert spec_from_dict({"task": "unit_regression", "objective": {"metric": "r2"}}).objective.direction == "maximize"
    # Unused keys stay out of a binary study's stored spec, so its fingerprint is unchanged.
    dumped = spec_from_dict({}).model_dump(mode="json")
    assert not {"loss", "huber_delta", "l1"} & set(dumped["search_space"]) and "where" not in dumped["data"]


# ----------------------------------------------------------------------------------------------------------------
# Studies of every task


@pytest.mark.parametrize("engine", ["packed", "eager"])
def test_a_regression_study_reports_holdout_mae_rmse_r2_with_intervals_and_replays(table, tmp_path, engine):
    spec = spec_for(
        table,
        "regression",
        tmp_path,
        data={"target": "value"},
        search_space={"loss": {"choices": ["mse", "huber"]}, "huber_delta": {"low": 0.2, "high": 2.0}, "l1": 1e-5},
        study={"engine": engine, "n_trials": 4},
    )
    study = run_study(spec, device="cpu").study
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for trial in done:
        attrs = trial.user_attrs
        assert math.isclose(trial.value, attrs["val_rmse"])
        for name in ("mae", "rmse", "r2"):
            assert attrs[f"holdout_{name}_low"] <= attrs[f"holdout_{name}"] <= attrs[f"holdout_{name}_high"]
        assert attrs["holdout_r2"] > 0.5  # learnt, in the target's unit (RMSE of a unit-scale fit would be ~100x off)
        assert attrs["holdout_rmse"] < 0.7 * 100 * 1.6
        assert ("huber_delta" in trial.params) == (trial.params["loss"] == "huber")
    best = min(done, key=lambda t: t.value)
    replay = replay_trial(study, spec, best.number)
    assert replay.matches


def test_a_unit_regression_predicts_within_0_and_1(table):
    spec = spec_for(table, "unit_regression", data={"target": "fraction"}, search_space={"loss": "bce"})
    dataset = build_dataset(spec)
    objective = Objective(spec, dataset, NullTracker(), engine="packed")
    model, result = objective.train_trial(params(loss="bce", widths=(16,)), seed=0, callbacks=[])
    ev = evaluate(model, dataset, spec, result)
    predictions = ev.holdout_predictions  # type: ignore[union-attr]
    assert predictions.min() >= 0.0 and predictions.max() <= 1.0
    assert ev.final_metrics()["holdout_r2"] > 0.8


def test_a_multilabel_study_chooses_each_labels_threshold_on_validation(table, tmp_path):
    names = ["bright", "kind==X", "value>300"]
    spec = spec_for(table, "multilabel", tmp_path, data={"target": names}, objective={"target_contamination": 0.15})
    study = run_study(spec, device="cpu").study
    best = study.best_trial
    attrs = best.user_attrs
    keys = [label_key(n) for n in names]
    assert keys == ["bright", "kind_eq_X", "value_gt_300"]
    per_label = [attrs[f"val_completeness_{k}"] for k in keys]
    assert math.isclose(best.value, float(np.mean(per_label)))
    assert math.isclose(
        attrs["holdout_completeness"], float(np.mean([attrs[f"holdout_completeness_{k}"] for k in keys]))
    )
    for k in keys:
        assert attrs[f"val_contamination_{k}"] <= 0.15 + 1e-9  # chosen on validation for the target
        assert (
            attrs[f"holdout_completeness_{k}_low"]
            <= attrs[f"holdout_completeness_{k}"]
            <= attrs[f"holdout_completeness_{k}_high"]
        )
    # The thresholds differ per label: each is chosen for its own scores.
    assert len({round(attrs[f"threshold_{k}"], 6) for k in keys}) == 3


def test_multiclass_reports_every_classes_completeness_and_contamination(tmp_path):
    raw = {
        "task": "multiclass",
        "data": {"simulated": {"n_star": 900, "n_quasar": 150, "n_galaxy": 300}, "seed": 3, "positive": "QSO"},
        "search_space": TASK_SPACE,
        "train": {"max_epochs": 5},
        "study": {"name": "mc", "n_trials": 1, "seed": 0},
        "tracking": {"enabled": False},
    }
    spec = spec_from_dict(stored_in(raw, tmp_path, enabled=False))
    attrs = run_study(spec, device="cpu").study.best_trial.user_attrs
    classes = ("GALAXY", "QSO", "STAR")
    for part in ("val", "holdout"):
        values = [attrs[f"{part}_completeness_{c}"] for c in classes]
        assert math.isclose(attrs[f"{part}_macro_completeness"], float(np.mean(values)))
        assert 0.0 <= attrs[f"{part}_accuracy"] <= 1.0
    for c in classes:
        assert (
            attrs[f"holdout_completeness_{c}_low"]
            <= attrs[f"holdout_completeness_{c}"]
            <= attrs[f"holdout_completeness_{c}_high"]
        )
    assert "holdout_completeness" in attrs  # the positive class's operating point is still there


def test_validation_scoring_for_pruning_is_in_the_targets_unit(table):
    spec = spec_for(table, "regression", data={"target": "value"}, objective={"metric": "mae"})
    dataset = build_dataset(spec)
    score = validation_scorer(spec, dataset)
    standardised = dataset.validation.y.numpy()[:, None]
    assert score(standardised)["val_objective"] < 1e-3  # a perfect prediction, once unscaled
    assert fit_config(spec, dataset).task == "regression"


def test_a_warm_start_entry_may_say_null_for_parameters_the_space_leaves_out():
    from tuner.config import SearchSpace
    from tuner.space import enqueue_params

    _, problems = enqueue_params(SearchSpace(), {"lr": 0.01, "l1": None, "loss": None, "huber_delta": None}, "e")
    assert problems == []
    _, problems = enqueue_params(SearchSpace(), {"l1": 0.1}, "e")
    assert problems == ["e.l1: search_space.l1 is off (null), got 0.1"]


def test_a_regression_pareto_front_shows_holdout_errors_with_bootstrap_intervals(table, tmp_path, capsys):
    from tuner.cli import main

    spec = spec_for(
        table,
        "regression",
        tmp_path,
        objective={"metric": ["mae", "r2"], "guard": "rmse"},
        study={"sampler": "nsga2", "n_trials": 4, "name": "reg-front"},
    )
    study = run_study(spec, device="cpu").study
    assert main(["best", spec.study.name, "--storage", spec.study.storage]) == 0
    out = capsys.readouterr().out
    assert "H RMSE" in out and "95% bootstrap intervals" in out and "Wilson" not in out
    for trial in study.best_trials:
        low, high = trial.user_attrs["holdout_rmse_low"], trial.user_attrs["holdout_rmse_high"]
        # Rich may wrap a cell between its numbers, never inside one.
        assert f"{low:.3f}" in out and f"{high:.3f}" in out
