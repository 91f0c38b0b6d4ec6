"""Export and scoring of multilabel, regression and unit_regression trials: outputs, thresholds, figures, CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow.pyfunc
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from tiny import stored_in

from tuner import metrics
from tuner.cli import main
from tuner.config import StudySpec, spec_from_dict
from tuner.data.catalogue import simulate_catalogue
from tuner.data.dataset import Dataset, build_dataset
from tuner.data.load import keep_rows
from tuner.errors import ExportError
from tuner.evaluation import label_key
from tuner.export import ExportResult, _task_config, export_trial, predict_file
from tuner.model import build_mlp
from tuner.regression import regression_figures
from tuner.space import suggest
from tuner.study import run_study
from tuner.train import predict_logits, probabilities

SPACE: dict[str, Any] = {
    "n_layers": {"value": 1},
    "width": {"low": 8, "high": 24, "log": True},
    "lr": {"low": 3e-3, "high": 3e-2, "log": True},
    "dropout": {"value": 0.0},
    "batch_size": {"value": 64},
    "optimizer": {"value": "adam"},
    "activation": {"value": "relu"},
    "init": {"value": "he"},
    "batch_norm": False,
}
# Conditions with ==, != and >: their output columns must come out as safe names.
LABELS = ["class==QSO", "class!=STAR", "distance>520"]


@dataclass
class Env:
    spec: StudySpec
    study: optuna.Study
    dataset: Dataset
    frame: pd.DataFrame  # the catalogue rows the study kept (data.where), in the dataset's order
    exported: ExportResult

    @property
    def trial(self) -> optuna.trial.FrozenTrial:
        return self.study.trials[self.exported.trial_number]

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.exported.path / "artifacts" / "tuner_model.json").read_text())

    def rows(self, part: str) -> pd.DataFrame:
        return self.frame.iloc[getattr(self.dataset.split, part)]

    def scored(self, part: str) -> pd.DataFrame:
        """The exported model's output for a part's raw rows, loaded through MLflow as a user would."""
        return mlflow.pyfunc.load_model(str(self.exported.path)).predict(self.rows(part))

    def network_outputs(self, part: str) -> np.ndarray:
        """What the trial's own logged network gives in-process for a part: tuner.train.probabilities' columns."""
        run = MlflowClient(self.spec.tracking.uri).get_run(self.trial.user_attrs["mlflow_run_id"])
        weights = Path(unquote(urlparse(run.info.artifact_uri).path)) / "model" / "state_dict.pt"
        net = build_mlp(self.dataset.n_features, suggest(self.trial, self.spec.search_space), self.dataset.n_out)
        net.load_state_dict(torch.load(weights, weights_only=True))
        logits = predict_logits(net.eval(), getattr(self.dataset, part).x)
        return probabilities(logits, self.spec.task).numpy().astype(np.float64)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Simulated colours with a value far from unit scale, a value in (0, 1), classes, and an id column."""
    frame = simulate_catalogue(n_star=500, n_quasar=200, n_galaxy=300, seed=4)
    rng = np.random.default_rng(0)
    ug, gr = (frame["u"] - frame["g"]).to_numpy(), (frame["g"] - frame["r"]).to_numpy()
    frame.insert(0, "objid", np.arange(len(frame)) + 1000)
    frame["distance"] = 500.0 + 60.0 * gr + 30.0 * ug + 3.0 * rng.normal(size=len(frame))
    frame["fraction"] = 1.0 / (1.0 + np.exp(-3.0 * (gr - np.median(gr))))
    path = tmp_path_factory.mktemp("catalogue") / "catalogue.csv"
    frame.to_csv(path, index=False)
    return path


def _exported(root: Path, catalogue: Path, task: str, target: Any, **sections: Any) -> Env:
    raw = {
        "task": task,
        "data": {
            "source": str(catalogue),
            "target": target,
            "id_columns": ["objid"],
            "seed": 0,
            **sections.pop("data", {}),
        },
        "search_space": {**SPACE, **sections.pop("search_space", {})},
        "train": {"max_epochs": 4, "patience": 10},
        "study": {"name": f"{task}-export", "n_trials": 2, "seed": 5, "pruner": "none"},
        **sections,
    }
    spec = spec_from_dict(stored_in(raw, root, plots=False))
    dataset = build_dataset(spec)
    study = run_study(spec, dataset=dataset).study
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    exported = export_trial(study, spec, out=root / "model", log_to_mlflow=False)
    frame = keep_rows(pd.read_csv(catalogue), spec.data.where)
    return Env(spec, study, dataset, frame, exported)


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory, catalogue: Path) -> Env:
    # The objective is the validation loss with Huber's loss: re-measuring it with the default MSE would not
    # reproduce the recorded value.
    return _exported(
        tmp_path_factory.mktemp("regression"),
        catalogue,
        "regression",
        "distance",
        search_space={"loss": {"value": "huber"}, "huber_delta": {"value": 0.3}},
        objective={"metric": "val_loss"},
    )


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory, catalogue: Path) -> Env:
    # data.where drops the quasars: the exported model must be checked against the kept rows, renumbered.
    return _exported(
        tmp_path_factory.mktemp("unit"),
        catalogue,
        "unit_regression",
        "fraction",
        data={"where": {"class": ["STAR", "GALAXY"]}},
        objective={"metric": "mae"},
    )


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory: pytest.TempPathFactory, catalogue: Path) -> Env:
    return _exported(
        tmp_path_factory.mktemp("multilabel"),
        catalogue,
        "multilabel",
        LABELS,
        objective={"metric": "completeness_at_contamination", "target_contamination": 0.2},
    )


def test_regression_predicts_in_the_target_unit_exactly_as_the_network(regression):
    env, config = regression, regression.config
    signature = mlflow.models.Model.load(str(env.exported.path)).signature
    assert signature.outputs.input_names() == ["distance_predicted"]
    mean, std = env.dataset.target_scaling
    assert config["target_scaling"] == {"mean": mean, "std": std}
    for part in ("validation", "holdout"):
        predicted = env.scored(part)["distance_predicted"].to_numpy()
        standardised = env.network_outputs(part)[:, 0]
        np.testing.assert_allclose(predicted, standardised * std + mean, rtol=0, atol=1e-6)
        # In the target's unit (around 500), not the network's standardised one (around 0).
        truth = env.rows(part)["distance"].to_numpy()
        assert abs(predicted.mean() - truth.mean()) < 0.5 * truth.std()
        assert abs(standardised.mean()) < 5


def test_regression_holdout_figures_and_loss_objective_are_reproduced(regression):
    env, attrs = regression, regression.trial.user_attrs
    predicted = env.scored("holdout")["distance_predicted"].to_numpy()
    figures = regression_figures(env.rows("holdout")["distance"].to_numpy(), predicted, intervals=True)
    card = env.exported.card
    for name in ("mae", "rmse", "r2"):
        ci = getattr(figures, f"{name}_ci")
        assert getattr(figures, name) == pytest.approx(attrs[f"holdout_{name}"], abs=1e-6)
        assert (ci.low, ci.high) == pytest.approx(
            (attrs[f"holdout_{name}_low"], attrs[f"holdout_{name}_high"]), abs=1e-6
        )
        assert card["trial"]["figures"]["holdout"][name] == attrs[f"holdout_{name}"]
        assert card["trial"]["figures"]["holdout"][f"{name}_95ci"] == [
            attrs[f"holdout_{name}_low"],
            attrs[f"holdout_{name}_high"],
        ]
        assert card["trial"]["figures"]["validation"][name] == attrs[f"val_{name}"]
    # The recorded validation loss is Huber's (delta 0.3): the export measured it with the trial's loss.
    verification = card["verification"]
    assert verification["passed"], verification
    assert {"val_objective", "holdout_rmse_low", "holdout_r2_high"} <= set(verification["recorded"])
    assert verification["max_abs_difference"] <= 1e-6
    assert card["trial"]["figures"]["val_loss"] == pytest.approx(env.trial.value, abs=1e-6)
    # The runner-up is re-measured from its weights and compared on the holdout RMSE (the objective is val_loss).
    runner = card["runner_up"]["figures"]["holdout"]
    assert runner["rmse"] == env.study.trials[card["runner_up"]["number"]].user_attrs["holdout_rmse"]
    assert card["comparison"]["compared"] == "holdout_rmse"
    text = (env.exported.path / "model_card.md").read_text()
    assert f"| holdout RMSE (95% CI) | {attrs['holdout_rmse']:.4g} [{attrs['holdout_rmse_low']:.4g}, " in text
    assert "completeness" not in text
    assert (env.exported.path / "predicted_vs_true.html").is_file()


def test_unit_regression_predictions_lie_in_0_1_and_equal_the_networks(unit, catalogue):
    env = unit
    assert len(env.frame) == 800 and env.config["target_scaling"] is None  # the quasars are not in the study
    assert env.exported.card["verification"]["passed"]
    for part in ("validation", "holdout"):
        predicted = env.scored(part)["fraction_predicted"].to_numpy()
        np.testing.assert_allclose(predicted, env.network_outputs(part)[:, 0], rtol=0, atol=1e-6)
        assert env.rows(part)["class"].isin(["STAR", "GALAXY"]).all()
    # Every row of any catalogue, those data.where left out included, gets a value in [0, 1].
    everything = mlflow.pyfunc.load_model(str(env.exported.path)).predict(pd.read_csv(catalogue))
    assert len(everything) == 1000
    assert everything["fraction_predicted"].between(0.0, 1.0).all()
    attrs = env.trial.user_attrs
    predicted = env.scored("holdout")["fraction_predicted"].to_numpy()
    mae = float(np.mean(np.abs(predicted - env.rows("holdout")["fraction"].to_numpy())))
    assert mae == pytest.approx(attrs["holdout_mae"], abs=1e-6)


def test_multilabel_selects_each_label_at_its_own_validation_threshold(multilabel):
    env, attrs = multilabel, multilabel.trial.user_attrs
    keys = [label_key(n) for n in LABELS]
    assert keys == ["class_eq_QSO", "class_ne_STAR", "distance_gt_520"]
    signature = mlflow.models.Model.load(str(env.exported.path)).signature
    assert signature.outputs.input_names() == [c for k in keys for c in (f"p_{k}", f"predicted_{k}")]
    thresholds = [attrs[f"threshold_{k}"] for k in keys]
    assert env.config["thresholds"] == thresholds
    assert len(set(thresholds)) == len(thresholds)  # distinct, so a shared threshold would show
    scored = env.scored("holdout")
    probs = env.network_outputs("holdout")
    np.testing.assert_allclose(scored[[f"p_{k}" for k in keys]].to_numpy(), probs, rtol=0, atol=1e-6)
    differs = False
    for j, key in enumerate(keys):
        assert scored[f"predicted_{key}"].dtype == bool
        np.testing.assert_array_equal(scored[f"predicted_{key}"], scored[f"p_{key}"] >= thresholds[j])
        differs |= any(bool(((probs[:, j] >= t) != (probs[:, j] >= thresholds[j])).any()) for t in thresholds)
    assert differs  # another label's threshold would select other rows


def test_multilabel_holdout_figures_are_reproduced_per_label(multilabel):
    env, attrs = multilabel, multilabel.trial.user_attrs
    scored = env.scored("holdout")
    holdout = env.rows("holdout")
    truth = {
        "class==QSO": holdout["class"].to_numpy() == "QSO",
        "class!=STAR": holdout["class"].to_numpy() != "STAR",
        "distance>520": holdout["distance"].to_numpy() > 520,
    }
    card_labels = {e["name"]: e for e in env.exported.card["trial"]["figures"]["labels"]}
    for name in LABELS:
        key = label_key(name)
        counts = metrics.confusion_counts(truth[name], scored[f"p_{key}"].to_numpy(), attrs[f"threshold_{key}"])
        assert counts.n_pred_pos == int(scored[f"predicted_{key}"].sum())
        completeness, contamination = metrics.completeness(counts), metrics.contamination(counts)
        interval = metrics.wilson_interval(counts.tp, counts.n_pos)
        low, high = interval.low, interval.high
        assert completeness == attrs[f"holdout_completeness_{key}"]
        assert contamination == attrs[f"holdout_contamination_{key}"]
        assert (low, high) == (attrs[f"holdout_completeness_{key}_low"], attrs[f"holdout_completeness_{key}_high"])
        entry = card_labels[name]
        assert entry["threshold"] == attrs[f"threshold_{key}"]
        assert entry["holdout"]["completeness_95ci"] == [low, high]
        assert entry["holdout"]["counts"]["tp"] == counts.tp
    figures = env.exported.card["trial"]["figures"]
    assert figures["holdout"]["completeness"] == attrs["holdout_completeness"]  # the macro average
    verification = env.exported.card["verification"]
    assert verification["passed"] and "threshold_distance_gt_520" in verification["recorded"]
    text = (env.exported.path / "model_card.md").read_text()
    assert "| distance>520 | " in text and "| macro average |" in text and "`predicted_class_ne_STAR`" in text


def test_predict_scores_catalogues_without_the_target_columns(regression, multilabel, tmp_path, capsys):
    fresh = simulate_catalogue(n_star=60, n_quasar=20, n_galaxy=20, seed=9).drop(columns=["class"])
    fresh.insert(0, "objid", np.arange(len(fresh)))
    fresh.to_csv(tmp_path / "fresh.csv", index=False)
    data = ["--data", str(tmp_path / "fresh.csv")]

    assert main(["predict", str(regression.exported.path), *data, "--out", str(tmp_path / "z.parquet")]) == 0
    scored = pd.read_parquet(tmp_path / "z.parquet")
    assert list(scored.columns) == ["objid", "distance_predicted"]
    expected = mlflow.pyfunc.load_model(str(regression.exported.path)).predict(fresh)
    np.testing.assert_array_equal(scored["distance_predicted"], expected["distance_predicted"])

    result = predict_file(str(multilabel.exported.path), tmp_path / "fresh.csv", tmp_path / "labels.csv")
    scored = pd.read_csv(tmp_path / "labels.csv")
    assert list(scored.columns)[:3] == ["objid", "p_class_eq_QSO", "predicted_class_eq_QSO"]
    assert result.selected is None and result.thresholds == dict(
        zip(LABELS, multilabel.config["thresholds"], strict=True)
    )
    assert result.selected_per_label == {name: int(scored[f"predicted_{label_key(name)}"].sum()) for name in LABELS}

    fresh.drop(columns=["g"]).to_csv(tmp_path / "no_g.csv", index=False)
    out = tmp_path / "never.csv"
    assert (
        main(["predict", str(multilabel.exported.path), "--data", str(tmp_path / "no_g.csv"), "--out", str(out)]) == 2
    )
    assert "missing column(s) 'g'" in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_labels_whose_output_names_collide_are_refused():
    dataset = SimpleNamespace(catalogue=SimpleNamespace(target_names=("a>1", "a_gt_1")), target_scaling=None)
    ev = SimpleNamespace()
    with pytest.raises(ExportError, match=r"labels 'a>1' and 'a_gt_1' would both be output as p_a_gt_1"):
        _task_config(SimpleNamespace(), dataset, ev)  # type: ignore[arg-type]
