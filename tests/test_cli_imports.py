"""``tuner status`` and ``tuner best`` only read a study: they must not import the training and tracking stack.

Importing torch, MLflow, pandas, plotly or scikit-learn took 3.8 s of the 7 s these commands took on a study of
10,000 trials (bench/bench_status.py). Each check runs in a fresh interpreter, so that what this test process
has imported already does not hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

HEAVY = ("torch", "mlflow", "pandas", "plotly", "sklearn")

# Runs the commands in-process, then reports their exit codes and which heavy top-level packages got imported.
SCRIPT = """
import json, sys
from tuner.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))}))
"""


def _run(commands: list[list[str]], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(commands), *HEAVY],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stdout": done.stdout}


@pytest.fixture()
def stored(tmp_path: Path) -> tuple[str, Path]:
    """A small study with finished trials in SQLite, and a study file that names it."""
    storage = f"sqlite:///{tmp_path / 'imports.db'}"
    study = optuna.create_study(study_name="imports", storage=storage, direction="maximize")
    distributions = {"n_layers": IntDistribution(1, 3), "lr": FloatDistribution(1e-4, 1e-1, log=True)}
    attrs = {
        "epochs": 4,
        "best_epoch": 2,
        "stop_reason": "max_epochs",
        "threshold": 0.5,
        "val_completeness": 0.9,
        "val_contamination": 0.1,
        "holdout_completeness": 0.88,
        "holdout_completeness_low": 0.8,
        "holdout_completeness_high": 0.93,
        "holdout_contamination": 0.12,
        "holdout_contamination_low": 0.07,
        "holdout_contamination_high": 0.2,
    }
    study.add_trials(
        [
            create_trial(
                state=TrialState.COMPLETE if i % 2 else TrialState.PRUNED,
                value=i / 10 if i % 2 else None,
                params={"n_layers": 1 + i % 3, "lr": 10 ** (-3 + i / 10)},
                distributions=distributions,
                user_attrs=attrs,
            )
            for i in range(6)
        ]
    )
    study_file = tmp_path / "imports.yaml"
    study_file.write_text(yaml.safe_dump({"study": {"name": "imports", "storage": storage}}))
    _tuner_made(storage)
    return storage, study_file


def _tuner_made(storage: str) -> None:
    """A study as tuner stores one (its spec in the study's attributes, parameters drawn by tuner.space), untrained."""
    from tuner.config import StudySpec
    from tuner.space import suggest
    from tuner.study import masked_spec

    spec = StudySpec().with_overrides({"study.name": "made", "study.storage": storage})
    study = optuna.create_study(study_name="made", storage=storage, direction="maximize")
    study.set_user_attr("tuner.spec", masked_spec(spec))
    for value in (0.3, 0.7):
        trial = study.ask()
        suggest(trial, spec.search_space)
        trial.set_user_attr("epochs", 3)
        study.tell(trial, value)


def test_importing_the_cli_stays_light(tmp_path: Path) -> None:
    result = _run([], tmp_path)
    assert result["heavy"] == []


def test_status_and_best_do_not_import_torch_or_mlflow(stored: tuple[str, Path], tmp_path: Path) -> None:
    storage, study_file = stored
    commands = [
        ["status", "imports", "--storage", storage],
        ["status", str(study_file)],
        ["best", "imports", "--storage", storage],
        ["best", "imports", "--storage", storage, "--json"],
        ["best", str(study_file)],
        ["status", "made", "--storage", storage],
        ["best", "made", "--storage", storage, "--json"],
    ]
    result = _run(commands, tmp_path)
    assert result["codes"] == [0] * len(commands)
    assert "torch" not in result["heavy"]
    assert "mlflow" not in result["heavy"]
    assert result["heavy"] == []
    # The tuner-made study's parameters come back as the model used them (widths per layer).
    assert '"widths"' in result["stdout"]


def test_status_of_a_missing_study_names_the_ones_there(stored: tuple[str, Path], tmp_path: Path) -> None:
    storage, _ = stored
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "status", "nosuch", "--storage", storage],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    assert "study 'nosuch' not found" in done.stderr
    assert "studies there: imports" in done.stderr


def test_status_of_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    done = subprocess.run(
        [sys.executable, "-m", "tuner.cli", "best", "nosuch", "--storage", f"sqlite:///{missing}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    assert "studies there: none" in done.stderr
    assert not missing.exists()
