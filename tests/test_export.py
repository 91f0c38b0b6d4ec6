"""Export of a trial as an MLflow pyfunc model, and scoring with it: weights, figures, registry, CLI, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow.pyfunc
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from tuner import metrics
from tuner import study as study_mod
from tuner.cli import main
from tuner.config import StudySpec, spec_from_dict
from tuner.data.catalogue import simulate_catalogue
from tuner.data.dataset import Dataset, build_dataset
from tuner.errors import DataError, ExportError
from tuner.export import ExportResult, check_input, export_trial
from tuner.study import run_study

# Trial 0 is enqueued with a high learning rate and no early stopping: its validation loss bounces, so the
# restored (best) epoch is not the last one. The fixture exports it by number; the CLI tests export the best.
HIGH_LR = {
    "n_layers": 2,
    "widths": [32, 16],
    "lr": 0.1,
    "momentum": 0.9,
    "dropout": 0.0,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "optimizer": "adam",
    "activation": "relu",
    "init": "he",
    "batch_norm": False,
}
STUDY = {
    "data": {"simulated": {"n_star": 1500, "n_quasar": 150}, "seed": 3},
    "search_space": {
        "n_layers": {"low": 1, "high": 2},
        "width": {"low": 8, "high": 32, "log": True},
        "lr": {"low": 1e-3, "high": 0.3, "log": True},
        "batch_size": {"low": 64, "high": 256, "log": True, "powers_of_two": True},
        "optimizer": {"choices": ["adam", "nesterov"]},
    },
    "train": {"max_epochs": 5, "patience": 10},
    "study": {"name": "tiny-export", "n_trials": 3, "seed": 11, "pruner": "none", "enqueue": [HIGH_LR]},
}
NAME = STUDY["study"]["name"]


@dataclass
class Env:
    root: Path
    spec: StudySpec
    study: optuna.Study
    dataset: Dataset
    frame: pd.DataFrame  # the raw catalogue, rows in the dataset's order
    exported: ExportResult

    @property
    def tracking_uri(self) -> str:
        return self.spec.tracking.uri

    @property
    def storage(self) -> str:
        return self.spec.study.storage

    def rows(self, part: str) -> pd.DataFrame:
        return self.frame.iloc[getattr(self.dataset.split, part)]

    def labels(self, part: str) -> np.ndarray:
        return self.rows(part)["class"].to_numpy() == "QSO"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("export")
    tracking = {"uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_location": str(root / "art"), "plots": False}
    raw = {**STUDY, "study": {**STUDY["study"], "storage": f"sqlite:///{root}/optuna.db"}, "tracking": tracking}
    spec = spec_from_dict(raw)
    dataset = build_dataset(spec)
    study = run_study(spec, dataset=dataset).study
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    frame = simulate_catalogue(n_star=1500, n_quasar=150, seed=3)
    exported = export_trial(study, spec, trial_number=0, out=root / "model")
    return Env(root, spec, study, dataset, frame, exported)


def run_weights_file(env: Env, trial: optuna.trial.FrozenTrial) -> Path:
    """The trial's model/state_dict.pt in the local artifact store."""
    run = MlflowClient(env.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"])
    return Path(unquote(urlparse(run.info.artifact_uri).path)) / "model" / "state_dict.pt"


def weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "artifacts" / "state_dict.pt", weights_only=True)


def test_export_writes_a_pyfunc_model_with_card_and_no_pickle(env):
    path, card = env.exported.path, env.exported.card
    assert env.exported.trial_number == 0
    for name in ("MLmodel", "model_card.md", "model_card.json", "completeness_efficiency.html", "input_example.json"):
        assert (path / name).is_file(), name
    assert not [p for p in path.rglob("*") if p.suffix in (".pkl", ".pickle")]
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    signature = mlflow.models.Model.load(str(path)).signature
    assert signature.inputs.input_names() == ["u", "g", "r", "i", "z"]
    assert signature.outputs.input_names() == ["p_QSO", "predicted_QSO"]
    assert list(json.loads((path / "input_example.json").read_text())["columns"]) == ["u", "g", "r", "i", "z"]
    requirements = (path / "requirements.txt").read_text().split()
    for dist in ("torch", "numpy", "pandas", "mlflow"):
        assert f"{dist}=={version(dist).split('+')[0]}" in requirements
    # The card: data, space, both trials' figures with intervals, the curve, and the verdict on the lead.
    assert json.loads((path / "model_card.json").read_text()) == card
    assert card["data"]["hash"] == env.dataset.catalogue.data_hash
    assert card["data"]["split_sizes"] == env.dataset.split.sizes()
    assert card["data"]["input_columns"] == ["u", "g", "r", "i", "z"]
    assert card["search_space"]["lr"]["high"] == 0.3
    assert card["trial"]["params"] == HIGH_LR
    runner = max(env.study.trials[1:], key=lambda t: (t.value, -t.number))  # the best other trial
    assert card["runner_up"]["number"] == env.exported.runner_up == runner.number
    for entry in (card["trial"], card["runner_up"]):
        holdout = entry["figures"]["holdout"]
        low, high = holdout["completeness_95ci"]
        assert low <= holdout["completeness"] <= high
        assert len(entry["figures"]["holdout_curve"]) >= 5
    assert card["comparison"]["reading"]
    assert card["verification"]["passed"] and card["verification"]["max_abs_difference"] == 0.0
    text = (path / "model_card.md").read_text()
    assert "runner-up" in text and "95%" in text and card["data"]["hash"] in text


def test_exported_weights_are_the_best_epoch_not_the_last(env):
    trial = env.study.trials[0]
    assert trial.user_attrs["best_epoch"] < trial.user_attrs["epochs"] - 1  # the precondition that makes it a test
    exported = weights_of(env.exported.path)
    logged = torch.load(run_weights_file(env, trial), weights_only=True)
    assert exported.keys() == logged.keys()
    assert all(torch.equal(exported[k], logged[k]) for k in logged)
    # Recomputed from raw columns through MLflow: the validation objective the trial recorded.
    model = mlflow.pyfunc.load_model(str(env.exported.path))
    p_val = model.predict(env.rows("validation"))["p_QSO"].to_numpy()
    target = env.spec.objective.target_contamination
    assert metrics.choose_operating_point(env.labels("validation"), p_val, target).completeness == trial.value


def test_holdout_figures_recomputed_from_the_export_equal_the_logged_ones(env):
    trial = env.study.trials[0]
    config = json.loads((env.exported.path / "artifacts" / "tuner_model.json").read_text())
    assert config["threshold"] == trial.user_attrs["threshold"]
    scored = mlflow.pyfunc.load_model(str(env.exported.path)).predict(env.rows("holdout"))
    counts = metrics.confusion_counts(env.labels("holdout"), scored["p_QSO"].to_numpy(), config["threshold"])
    assert metrics.completeness(counts) == trial.user_attrs["holdout_completeness"]
    assert metrics.contamination(counts) == trial.user_attrs["holdout_contamination"]
    interval = metrics.wilson_interval(counts.tp, counts.n_pos)
    assert interval.low == trial.user_attrs["holdout_completeness_low"]
    assert interval.high == trial.user_attrs["holdout_completeness_high"]
    np.testing.assert_array_equal(scored["predicted_QSO"], scored["p_QSO"] >= config["threshold"])


def test_predict_cli_equals_pyfunc_for_csv_parquet_and_runs_uri(env, tmp_path):
    fresh = simulate_catalogue(n_star=300, n_quasar=30, seed=99)
    fresh.insert(0, "objid", np.arange(len(fresh)) + 1000)
    fresh.to_csv(tmp_path / "fresh.csv", index=False)
    expected = mlflow.pyfunc.load_model(str(env.exported.path)).predict(fresh)
    args = ["predict", str(env.exported.path), "--data", str(tmp_path / "fresh.csv"), "--id-columns", "objid"]
    assert main([*args, "--out", str(tmp_path / "scored.csv")]) == 0
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert list(scored.columns) == ["objid", "p_QSO", "predicted_QSO"]
    np.testing.assert_array_equal(scored["objid"], fresh["objid"])
    np.testing.assert_array_equal(scored["p_QSO"], expected["p_QSO"])
    np.testing.assert_array_equal(scored["predicted_QSO"], expected["predicted_QSO"])
    # The copy logged to the study's parent run scores the same, through a runs:/ URI.
    assert env.exported.logged_uri and env.exported.logged_uri.startswith("runs:/")
    runs_args = ["predict", env.exported.logged_uri, "--data", str(tmp_path / "fresh.csv")]
    out = tmp_path / "scored.parquet"
    assert main([*runs_args, "--out", str(out), "--tracking-uri", env.tracking_uri]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), expected.reset_index(drop=True))


def test_missing_columns_and_non_finite_values_are_clear_errors(env, tmp_path, capsys):
    fresh = simulate_catalogue(n_star=100, n_quasar=10, seed=5)
    fresh.drop(columns=["g"]).to_csv(tmp_path / "no_g.csv", index=False)
    bad = fresh.copy()
    bad.loc[[3, 17], "r"] = np.nan
    bad.loc[8, "z"] = np.inf
    bad.to_csv(tmp_path / "nan.csv", index=False)
    model = str(env.exported.path)

    assert main(["predict", model, "--data", str(tmp_path / "no_g.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "missing column(s) 'g'" in err and "g-r = g - r" in err
    assert main(["predict", model, "--data", str(tmp_path / "nan.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "column 'r' has 2 non-finite value(s) (NaN or inf), first at rows [3, 17]" in err
    assert "column 'z' has 1 non-finite value(s)" in err
    assert not (tmp_path / "o.csv").exists()  # nothing written, never NaN scores
    # The same errors from the Python API.
    loaded = mlflow.pyfunc.load_model(model)
    with pytest.raises(DataError, match=r"column 'r' has 2 non-finite"):
        loaded.predict(pd.read_csv(tmp_path / "nan.csv"))
    config = json.loads((env.exported.path / "artifacts" / "tuner_model.json").read_text())
    with pytest.raises(DataError, match=r"column 'u' must be numeric, got dtype"):
        check_input(fresh.assign(u="bright"), config)


def test_export_refuses_bad_trials_and_occupied_directories(env, capsys):
    base = ["export", NAME, "--storage", env.storage]
    assert main([*base, "--trial", "99"]) == 2
    assert "--trial: study 'tiny-export' has no trial 99" in " ".join(capsys.readouterr().err.split())
    assert main([*base, "--out", str(env.exported.path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "exists and is not empty; choose another directory or pass --force" in err
    (env.root / "notes").mkdir()
    (env.root / "notes" / "keep.txt").write_text("mine")
    assert main([*base, "--out", str(env.root / "notes"), "--force"]) == 2
    assert "is not a previous export" in " ".join(capsys.readouterr().err.split())
    assert (env.root / "notes" / "keep.txt").read_text() == "mine"
    # A folder that cannot be made is refused before the trial is rebuilt.
    (env.root / "a-file").write_text("")
    assert main([*base, "--out", str(env.root / "a-file" / "model")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--out: {env.root / 'a-file' / 'model'} cannot be made: {env.root / 'a-file'} is a file" in err


def test_predictions_that_cannot_be_written_are_one_error_and_no_file(env, tmp_path, capsys, monkeypatch):
    simulate_catalogue(n_star=50, n_quasar=5, seed=6).to_csv(tmp_path / "in.csv", index=False)
    args = ["predict", str(env.exported.path), "--data", str(tmp_path / "in.csv")]
    (tmp_path / "a-file").write_text("")
    assert main([*args, "--out", str(tmp_path / "a-file" / "o.csv")]) == 2
    assert "cannot be made" in " ".join(capsys.readouterr().err.split())

    def disk_full(self, path, *a, **k):
        Path(path).write_text("p_QSO,predicted_QSO\n0.1,")  # a first part written, then the disk fills
        raise OSError(28, "No space left on device")

    (tmp_path / "earlier.csv").write_text("the scores of an earlier run\n")
    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    for name in ("o.csv", "earlier.csv"):
        assert main([*args, "--out", str(tmp_path / name)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--out: cannot write {tmp_path / name}: No space left on device" in err
    # No half-written file, and the earlier file as it was.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "earlier.csv", "in.csv"]
    assert (tmp_path / "earlier.csv").read_text() == "the scores of an earlier run\n"


def test_register_twice_moves_champion_and_a_fresh_process_loads_it(env, tmp_path):
    client = MlflowClient(env.tracking_uri, registry_uri=env.tracking_uri)
    out = str(tmp_path / "registered")
    base = ["export", NAME, "--storage", env.storage, "--register", "--out", out]
    assert main(base) == 0
    first = client.get_model_version_by_alias(NAME, "champion").version
    assert main([*base, "--force"]) == 0
    second = client.get_model_version_by_alias(NAME, "champion")
    assert int(second.version) == int(first) + 1
    assert second.tags["tuner.trial_number"] == str(env.study.best_trial.number)  # the best, by default
    assert client.get_model_version(NAME, first).aliases == []

    rows = env.rows("holdout").iloc[:20]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    code = (
        "import sys, mlflow.pyfunc, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "m.predict(pd.read_csv(sys.argv[1])).to_parquet(sys.argv[2])\n"
    )
    # A bare process that knows only the store; pickles refused, so the model must load without any.
    process_env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": env.tracking_uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "rows.csv"), str(tmp_path / "theirs.parquet")],
        capture_output=True,
        text=True,
        env=process_env,
        cwd=tmp_path,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = pd.read_parquet(tmp_path / "theirs.parquet")
    pd.testing.assert_frame_equal(theirs, mlflow.pyfunc.load_model(out).predict(rows).reset_index(drop=True))
    assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to MLflow's default store


def test_missing_weights_are_retrained_checked_and_refused_when_they_differ(env, tmp_path, monkeypatch):
    trial = env.study.trials[0]
    weights = run_weights_file(env, trial)
    original = torch.load(weights, weights_only=True)
    backup = tmp_path / "state_dict.pt"
    shutil.move(weights, backup)
    try:
        result = export_trial(env.study, env.spec, trial_number=0, out=tmp_path / "retrained", log_to_mlflow=False)
        assert result.retrained and result.card["model"]["retrained"]
        assert any("weights artifact model/state_dict.pt is missing" in n for n in result.notes)
        retrained = weights_of(result.path)
        assert all(torch.allclose(retrained[k], original[k], atol=1e-6) for k in original)
        assert result.card["trial"]["figures"]["val_objective"] == pytest.approx(trial.value, abs=1e-6)

        real = study_mod.evaluate

        def off_by_a_bit(*args, **kwargs):
            ev = real(*args, **kwargs)
            return study_mod.Evaluation(**{**ev.__dict__, "objective": ev.objective + 0.01})

        monkeypatch.setattr(study_mod, "evaluate", off_by_a_bit)
        with pytest.raises(ExportError, match=r"retraining gave validation objective .* not exported"):
            export_trial(env.study, env.spec, trial_number=0, out=tmp_path / "refused", log_to_mlflow=False)
        assert not (tmp_path / "refused").exists()
    finally:
        shutil.move(backup, weights)
