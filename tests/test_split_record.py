"""The split and the scalings a study records when it is made, which every later process uses (a resumed run, a
worker, an export): the same rows and numbers whatever its scikit-learn and numpy, and no scikit-learn to import."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from tiny import TINY_DATA, TINY_SPACE

from tuner.config import StudySpec, spec_from_dict
from tuner.data import dataset as dataset_mod
from tuner.data.dataset import LAYOUT_ATTR, MAX_LAYOUT_CHARS, MAX_LAYOUT_CHARS_MYSQL, Dataset, build_dataset
from tuner.data.split import SplitIndices
from tuner.errors import DataError
from tuner.study import _attribute_limit, run_study

TINY = {
    "data": TINY_DATA,
    "search_space": TINY_SPACE,
    "train": {"max_epochs": 2, "patience": 2},
    "study": {"name": "recorded", "n_trials": 1, "seed": 5, "pruner": "none"},
    "tracking": {"enabled": False},
}


def tiny_spec(tmp_path: Path | None = None, **sections: Any) -> StudySpec:
    raw: dict[str, Any] = {**TINY, **sections}
    if tmp_path is not None:
        raw["study"] = {**raw["study"], "storage": f"sqlite:///{tmp_path / 'optuna.db'}"}
    return spec_from_dict(raw)


def as_stored(layout: dict[str, Any]) -> dict[str, Any]:
    """The record as the study's storage gives it back (JSON)."""
    return json.loads(json.dumps(layout))


def assert_same(made: Dataset, rebuilt: Dataset) -> None:
    for name in ("train", "validation", "holdout"):
        assert np.array_equal(getattr(made.split, name), getattr(rebuilt.split, name))
        assert getattr(made.split, name).dtype == getattr(rebuilt.split, name).dtype
        for field in ("x", "y"):
            assert torch.equal(getattr(getattr(made, name), field), getattr(getattr(rebuilt, name), field))
    assert np.array_equal(made.preprocessor.shift, rebuilt.preprocessor.shift)
    assert np.array_equal(made.preprocessor.matrix, rebuilt.preprocessor.matrix)
    assert len(made.folds) == len(rebuilt.folds)
    for a, b in zip(made.folds, rebuilt.folds, strict=True):
        assert np.array_equal(a.validation_rows, b.validation_rows)
        assert np.array_equal(a.train_rows, b.train_rows)
        assert torch.equal(a.train.x, b.train.x) and torch.equal(a.holdout.x, b.holdout.x)
        assert np.array_equal(a.preprocessor.matrix, b.preprocessor.matrix)
    assert made.target_scaling == rebuilt.target_scaling


def never(*_: Any, **__: Any) -> Any:
    raise AssertionError("split or fitted again")


def forbid_making(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dataset_mod, "stratified_split", never)
    monkeypatch.setattr(dataset_mod, "stratified_folds", never)
    monkeypatch.setattr(dataset_mod.Preprocessor, "fit", never)


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"data": {**TINY_DATA, "preprocess": "pca_whiten"}},
        {"validation": {"kind": "kfold", "k": 3}},
    ],
    ids=["standardize", "pca_whiten", "kfold"],
)
def test_a_dataset_rebuilt_from_its_record_is_the_same_without_splitting_or_fitting(
    monkeypatch: pytest.MonkeyPatch, sections: dict[str, Any]
) -> None:
    spec = tiny_spec(**sections)
    made = build_dataset(spec)
    layout = as_stored(made.layout(spec))
    assert {"parts", "scaling", "digest"} <= set(layout)
    assert ("folds" in layout) == bool(made.folds)
    forbid_making(monkeypatch)
    assert_same(made, build_dataset(spec, recorded=layout))


def test_a_record_of_another_study_file_is_not_used() -> None:
    spec = tiny_spec()
    layout = as_stored(build_dataset(spec).layout(spec))
    other = tiny_spec(data={**TINY_DATA, "split": {"validation": 0.3, "holdout": 0.2}})
    fresh = build_dataset(other)
    assert len(fresh.split.validation) != len(build_dataset(spec).split.validation)
    # Same rows, another split asked for: made anew (the study's own check then says the study file changed).
    assert_same(fresh, build_dataset(other, recorded=layout))


def test_a_process_that_splits_otherwise_than_the_study_recorded_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_spec()
    made = build_dataset(spec)
    layout = as_stored(made.layout(spec, max_chars=10))
    # Too long to store: only what identifies the split is kept, and the split is made again and checked.
    assert "parts" not in layout and "scaling" not in layout and "digest" in layout
    assert_same(made, build_dataset(spec, recorded=layout))

    real = dataset_mod.stratified_split

    def another_version(*args: Any, **kwargs: Any) -> SplitIndices:
        split = real(*args, **kwargs)
        train, validation = split.train.copy(), split.validation.copy()
        train[0], validation[0] = validation[0], train[0]
        return SplitIndices(np.sort(train), np.sort(validation), split.holdout)

    monkeypatch.setattr(dataset_mod, "stratified_split", another_version)
    with pytest.raises(DataError, match=r"^data\.split: this process splits the catalogue's rows otherwise") as info:
        build_dataset(spec, recorded={**layout, "made_with": "scikit-learn 0.1, numpy 0.1"})
    assert "'recorded'" in str(info.value) and str(info.value).endswith(
        "run it with scikit-learn 0.1, numpy 0.1, as the study was made with"
    )
    # With the same versions, only a changed record explains it.
    with pytest.raises(DataError, match=r"the versions are the same, so the study's record \(tuner\.split\) was"):
        build_dataset(spec, recorded=layout)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r.update(parts=r["parts"][:-8]), r"^data\.split: the split study 'recorded' recorded cannot be"),
        (lambda r: r.update(digest="0" * 16), r"^data\.split: the split study 'recorded' recorded does not match"),
        (lambda r: r.update(parts=123), r"^data\.split: the split study 'recorded' recorded cannot be read: packed"),
        (lambda r: r.pop("digest"), r"^data\.split: the split study 'recorded' recorded cannot be read: it has no"),
        (
            lambda r: r["scaling"].update(shift=[0.0]),
            r"^data\.preprocess: the scaling study 'recorded' recorded is not",
        ),
        (lambda r: r["scaling"]["shift"].__setitem__(0, math.nan), r"is not a finite standardize scaling of its 4"),
        (lambda r: r["scaling"].update(kind="none"), r"is not a finite standardize scaling of its 4 features"),
        (lambda r: r.pop("fold_scaling"), r"^data\.preprocess: the scaling study 'recorded' recorded cannot be read"),
    ],
    ids=["parts", "digest", "parts-not-text", "no-digest", "scaling-shape", "scaling-nan", "scaling-kind", "no-folds"],
)
def test_a_damaged_record_is_refused(damage: Any, message: str) -> None:
    spec = tiny_spec()
    layout = as_stored(build_dataset(spec).layout(spec))
    damage(layout)
    with pytest.raises(DataError, match=message):
        build_dataset(spec, recorded=layout)


@pytest.mark.parametrize("kind", ["split", "kfold"])
def test_the_default_catalogue_is_recorded_whole_except_with_folds_on_mysql(kind: str) -> None:
    spec = spec_from_dict({"validation": {"kind": kind}})
    made = build_dataset(spec)
    assert made.catalogue.n_rows == 101_000
    layout = made.layout(spec)
    assert "parts" in layout and len(json.dumps(layout)) <= MAX_LAYOUT_CHARS
    on_mysql = made.layout(spec, _attribute_limit("mysql+pymysql://u@h/db"))
    assert ("parts" in on_mysql) == (kind == "split")
    assert len(json.dumps(on_mysql)) <= MAX_LAYOUT_CHARS_MYSQL


def test_each_storage_is_given_the_records_it_can_hold(tmp_path: Path) -> None:
    import optuna

    assert _attribute_limit("mysql+pymysql://u@h/db") == _attribute_limit("mariadb://u@h/db") == 60_000
    assert _attribute_limit("postgresql+psycopg://u@h/db") == _attribute_limit(f"sqlite:///{tmp_path}/a.db")
    assert _attribute_limit(optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/a.db")) == MAX_LAYOUT_CHARS
    assert _attribute_limit(optuna.storages.InMemoryStorage()) == MAX_LAYOUT_CHARS == 2_000_000


def stored_layout(spec: StudySpec) -> Any:
    import optuna

    return optuna.load_study(study_name=spec.study.name, storage=spec.study.storage).user_attrs.get(LAYOUT_ATTR)


def test_a_resumed_study_uses_the_split_it_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_spec(tmp_path)
    run_study(spec, device="cpu")
    layout = stored_layout(spec)
    assert layout == as_stored(build_dataset(spec).layout(spec))
    forbid_making(monkeypatch)
    result = run_study(spec, device="cpu", n_trials=2)
    assert [t.state.name for t in result.study.trials] == ["COMPLETE", "COMPLETE"]


def test_a_study_made_before_splits_were_recorded_records_one_when_resumed(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    run_study(spec, device="cpu")
    expected = stored_layout(spec)
    with sqlite3.connect(tmp_path / "optuna.db") as db:
        db.execute("DELETE FROM study_user_attributes WHERE key = ?", (LAYOUT_ATTR,))
    assert stored_layout(spec) is None
    run_study(spec, device="cpu", n_trials=2)
    assert stored_layout(spec) == expected


# Runs `tuner run` in a fresh interpreter and says whether scikit-learn or scipy.stats got imported.
SCRIPT = """
import json, sys
from tuner.cli import main
code = main(["run", sys.argv[1], "--n-trials", "2", "--device", "cpu"])
print(json.dumps({"code": code, "imported": sorted({"sklearn", "scipy.stats"} & set(sys.modules))}))
"""


def test_a_process_joining_a_recorded_study_imports_no_scikit_learn(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    run_study(spec, device="cpu")
    path = tmp_path / "recorded.yaml"
    path.write_text(yaml.safe_dump({**TINY, "study": {**TINY["study"], "storage": spec.study.storage}}))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"code": 0, "imported": []}


def test_export_report_and_replay_use_the_split_the_study_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuner.export import _load_data
    from tuner.report import study_dataset
    from tuner.study import replay_trial

    spec = tiny_spec(tmp_path)
    study = run_study(spec, device="cpu").study
    made = build_dataset(spec)
    forbid_making(monkeypatch)
    assert_same(made, _load_data(study, spec)[1])
    assert_same(made, study_dataset(study, spec))
    assert replay_trial(study, spec, 0).matches
