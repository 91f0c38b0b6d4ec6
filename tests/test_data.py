"""Tests of reading, checking, splitting and scaling the catalogue (tuner.data.*)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from tuner.config import DataSpec, SplitSpec, spec_from_dict
from tuner.data.dataset import Dataset, build_dataset
from tuner.data.load import Catalogue, catalogue_from_frame, read_table
from tuner.data.preprocess import Preprocessor
from tuner.data.split import stratified_split
from tuner.errors import DataError

SDSS_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sdss_dr14_10k.csv.gz"
BANDS = ["u", "g", "r", "i", "z"]


def make_frame(n_star: int = 90, n_qso: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_star + n_qso
    frame = pd.DataFrame({b: rng.normal(18.0 + k, 1.0, n) for k, b in enumerate(BANDS)})
    frame["class"] = ["STAR"] * n_star + ["QSO"] * n_qso
    frame["objid"] = np.arange(n)
    return frame


def data_spec(**changes: Any) -> DataSpec:
    return spec_from_dict({"data": changes}).data


def load(frame: pd.DataFrame, task: str = "binary", **changes: Any) -> Catalogue:
    return catalogue_from_frame(frame, data_spec(**changes), task=task, source="test")


def data_error(frame: pd.DataFrame, **changes: Any) -> str:
    with pytest.raises(DataError) as info:
        load(frame, **changes)
    return str(info.value)


# --- reading files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cat.csv", "cat.csv.gz", "cat.parquet", "cat.tsv"])
def test_read_table_formats(tmp_path: Path, name: str) -> None:
    frame = make_frame()
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
    back = read_table(path)
    pd.testing.assert_frame_equal(back, frame, check_exact=False, rtol=1e-12)
    catalogue = load(back)
    assert catalogue.n_rows == 100
    assert catalogue.labels.sum() == 10
    assert catalogue.class_names == ("rest", "QSO")


def test_read_table_gz_is_compressed(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv.gz"
    make_frame().to_csv(path, index=False)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic: read_table must decompress it
    assert read_table(path).shape == (100, 7)


def test_read_table_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_table(tmp_path / "missing.csv")
    message = str(info.value)
    assert message.startswith("data.source:") and "not found" in message and "missing.csv" in message


def test_read_table_header_only_says_there_are_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "cat.csv"
    path.write_text("u,g,class\n")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"data.source: {path} holds no rows (columns: u, g, class)"


def test_read_table_a_directory_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_table(tmp_path)
    assert str(info.value) == f"data.source: {tmp_path} is a directory; name a catalogue file in it"


def test_read_table_unknown_type(tmp_path: Path) -> None:
    path = tmp_path / "cat.xlsx"
    path.write_text("whatever")
    with pytest.raises(DataError) as info:
        read_table(path)
    message = str(info.value)
    assert message.startswith("data.source:")
    assert "unknown file type '.xlsx'" in message and ".parquet" in message


def test_read_table_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "cat.parquet"
    path.write_text("not parquet at all")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert "cannot read" in str(info.value)


# --- columns ------------------------------------------------------------------------------------------------


def test_derived_colours_are_magnitude_differences() -> None:
    frame = make_frame()
    catalogue = load(frame, features=["u-g", "g-r", "r", "objid"])
    expected = np.column_stack([frame.u - frame.g, frame.g - frame.r, frame.r, frame.objid])
    expected = expected.astype(np.float32)
    np.testing.assert_array_equal(catalogue.features, expected)
    assert catalogue.features.dtype == np.float32
    assert catalogue.feature_names == ("u-g", "g-r", "r", "objid")


def test_existing_column_wins_over_derivation() -> None:
    frame = make_frame()
    frame["u-g"] = 42.0
    assert np.all(load(frame, features=["u-g"]).features == 42.0)


@pytest.mark.parametrize(
    ("feature", "suggestion"),
    [("rr", "did you mean 'r'?"), ("u-gg", "did you mean 'u-g'?"), ("uu-g", "did you mean 'u-g'?")],
)
def test_missing_feature_with_suggestion(feature: str, suggestion: str) -> None:
    message = data_error(make_frame(), features=["u-g", feature])
    assert message.startswith("data.features:")
    assert repr(feature) in message and "not in the catalogue" in message
    assert suggestion in message


def test_missing_feature_without_close_match_lists_columns() -> None:
    message = data_error(make_frame(), features=["redshift_xyz"])
    assert "'redshift_xyz'" in message and "did you mean" not in message
    assert "columns: u, g, r, i, z, class, objid" in message


def test_missing_target_and_id_columns() -> None:
    message = data_error(make_frame(), target="clas")
    assert message.startswith("data.target:") and "'clas'" in message and "did you mean 'class'" in message
    message = data_error(make_frame(), id_columns=["objd"])
    assert message.startswith("data.id_columns:") and "did you mean 'objid'" in message


def test_non_numeric_feature() -> None:
    frame = make_frame()
    frame["flag"] = ["ok"] * 99 + ["1.5"]
    message = data_error(frame, features=["u-g", "flag"])
    assert message.startswith("data.features:")
    assert "'flag'" in message and "must be numeric" in message and "'ok'" in message


def test_non_numeric_magnitude_in_derived_colour() -> None:
    frame = make_frame()
    frame["g"] = frame["g"].astype(str)
    frame.loc[7, "g"] = "n/a"
    message = data_error(frame, features=["u-g"])
    assert "'g'" in message and "must be numeric" in message and "'n/a'" in message and "row 7" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_feature(bad: float) -> None:
    frame = make_frame()
    frame.loc[[3, 11, 50], "r"] = bad
    message = data_error(frame, features=["u-g", "g-r", "r-i"])
    # g-r is the first feature that uses r
    assert message.startswith("data.features:")
    assert "'g-r'" in message and "3 non-finite" in message and "[3, 11, 50]" in message


def test_missing_labels() -> None:
    frame = make_frame()
    frame.loc[[4, 8], "class"] = None
    message = data_error(frame)
    assert message.startswith("data.target:") and "2 missing labels" in message and "[4, 8]" in message


def test_single_class() -> None:
    message = data_error(make_frame(n_star=0, n_qso=50))
    assert message.startswith("data.target:") and "single class" in message and "'class'" in message


def test_positive_class_absent_with_suggestion() -> None:
    message = data_error(make_frame(), positive="QS0")
    assert message.startswith("data.positive:")
    assert "'QS0'" in message and "did you mean 'QSO'" in message and "'class'" in message


@pytest.mark.parametrize("n_qso", [1, 2])
def test_too_few_positives_for_any_split(n_qso: int) -> None:
    message = data_error(make_frame(n_qso=n_qso))
    assert message.startswith("data.target:") and "'QSO'" in message and f"{n_qso} row(s)" in message


@pytest.mark.parametrize("n_qso", [3, 4])
def test_too_few_positives_to_stratify(n_qso: int) -> None:
    catalogue = load(make_frame(n_qso=n_qso))
    with pytest.raises(DataError) as info:
        stratified_split(catalogue.labels, SplitSpec(), 0, catalogue.class_names)
    message = str(info.value)
    assert message.startswith("data.split:") and "'QSO'" in message and f"{n_qso} rows" in message
    assert "needs at least 5" in message


def test_multiclass_labels() -> None:
    frame = make_frame()
    frame.loc[:29, "class"] = "GALAXY"
    catalogue = load(frame, task="multiclass")
    assert catalogue.class_names == ("GALAXY", "QSO", "STAR")
    assert np.bincount(catalogue.labels).tolist() == [30, 10, 60]


def test_data_hash_depends_on_values_and_features() -> None:
    frame = make_frame()
    a = load(frame)
    assert load(frame.copy()).data_hash == a.data_hash
    other = frame.copy()
    other.loc[0, "u"] += 0.5
    assert load(other).data_hash != a.data_hash
    assert load(frame, features=["u-g", "g-r"]).data_hash != a.data_hash


# --- split --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.permutation(np.repeat([0, 1, 2], [1700, 250, 53]))


CLASSES3 = ("a", "b", "c")


def test_split_partition_sizes_and_strata(labels: np.ndarray) -> None:
    split = stratified_split(labels, SplitSpec(), 0, CLASSES3)
    parts = {"train": split.train, "validation": split.validation, "holdout": split.holdout}
    n = len(labels)
    union = np.concatenate(list(parts.values()))
    assert len(union) == n and len(np.unique(union)) == n  # disjoint, every row once
    np.testing.assert_array_equal(np.sort(union), np.arange(n))
    expected = {"train": 0.6, "validation": 0.2, "holdout": 0.2}
    assert split.sizes() == {k: len(v) for k, v in parts.items()}
    total = np.bincount(labels)
    for name, idx in parts.items():
        assert abs(len(idx) - expected[name] * n) <= 2, (name, len(idx))
        counts = np.bincount(labels[idx], minlength=3)
        for c in range(3):
            assert abs(counts[c] - expected[name] * total[c]) <= 1.0 + 1e-9, (name, c, counts[c])


def test_split_custom_fractions(labels: np.ndarray) -> None:
    split = stratified_split(labels, SplitSpec(validation=0.1, holdout=0.3), 0, CLASSES3)
    n = len(labels)
    assert abs(len(split.validation) - 0.1 * n) <= 2
    assert abs(len(split.holdout) - 0.3 * n) <= 2
    assert abs(len(split.train) - 0.6 * n) <= 2


def test_split_seeded(labels: np.ndarray) -> None:
    a = stratified_split(labels, SplitSpec(), 7, CLASSES3)
    b = stratified_split(labels, SplitSpec(), 7, CLASSES3)
    c = stratified_split(labels, SplitSpec(), 8, CLASSES3)
    for part in ("train", "validation", "holdout"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.holdout, c.holdout)
    assert not np.array_equal(a.validation, c.validation)


# --- preprocessing fitted on train only ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_spec() -> Any:
    return spec_from_dict({"data": {"simulated": {"n_star": 2000, "n_quasar": 200}}})


@pytest.fixture(scope="module")
def dataset(small_spec: Any) -> Dataset:
    return build_dataset(small_spec)


def test_dataset_parts(dataset: Dataset) -> None:
    cat, split = dataset.catalogue, dataset.split
    assert cat.n_rows == 2200 and int(cat.labels.sum()) == 200
    assert (len(dataset.train), len(dataset.validation), len(dataset.holdout)) == (1320, 440, 440)
    assert dataset.n_features == 4 and dataset.n_classes == 2 and dataset.positive_index == 1
    for part, idx in ((dataset.train, split.train), (dataset.validation, split.validation)):
        np.testing.assert_array_equal(part.y.numpy(), cat.labels[idx])
        np.testing.assert_array_equal(part.y_numpy, cat.labels[idx])
        assert part.x.dtype.is_floating_point and part.x.device.type == "cpu"
    facts = dataset.facts()
    assert facts["data.rows"] == "2200"
    assert facts["data.class_counts"] == "rest=2000, QSO=200"
    assert facts["data.split_sizes"] == "train=1320, validation=440, holdout=440"


def test_preprocessor_fitted_on_train_only(dataset: Dataset) -> None:
    raw = dataset.catalogue.features.astype(np.float64)
    train_raw = raw[dataset.split.train]
    np.testing.assert_allclose(dataset.preprocessor.shift, train_raw.mean(axis=0), rtol=1e-10, atol=1e-10)
    assert not np.allclose(dataset.preprocessor.shift, raw.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.diag(dataset.preprocessor.matrix), 1.0 / train_raw.std(axis=0), rtol=1e-9)

    x_train = dataset.train.x.numpy().astype(np.float64)
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0, atol=1e-5)
    for part in (dataset.validation, dataset.holdout):
        x = part.x.numpy().astype(np.float64)
        assert np.abs(x.mean(axis=0)).max() > 1e-3
        assert np.abs(x.std(axis=0) - 1.0).max() > 1e-3


def test_standardize_matches_sklearn(dataset: Dataset) -> None:
    raw = dataset.catalogue.features
    scaler = StandardScaler().fit(raw[dataset.split.train].astype(np.float64))
    for part, idx in ((dataset.train, dataset.split.train), (dataset.holdout, dataset.split.holdout)):
        np.testing.assert_allclose(part.x.numpy(), scaler.transform(raw[idx].astype(np.float64)), atol=1e-5)


def test_pca_whitening_identity_covariance_on_train(dataset: Dataset) -> None:
    raw = dataset.catalogue.features
    train = raw[dataset.split.train]
    pre = Preprocessor.fit("pca_whiten", train)
    assert pre.matrix.shape == (4, 4)
    z = pre.transform(train).astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(4), atol=1e-4)
    # the raw colours are correlated, so whitening is more than per-feature scaling
    assert np.abs(np.corrcoef(train, rowvar=False) - np.eye(4)).max() > 0.1
    held = pre.transform(raw[dataset.split.holdout]).astype(np.float64)
    assert np.abs(np.cov(held, rowvar=False) - np.eye(4)).max() > 1e-3


def test_pca_whiten_through_build_dataset(small_spec: Any) -> None:
    ds = build_dataset(small_spec.with_overrides({"data.preprocess": "pca_whiten"}))
    assert ds.preprocessor.kind == "pca_whiten"
    cov = np.cov(ds.train.x.numpy().astype(np.float64), rowvar=False)
    np.testing.assert_allclose(cov, np.eye(4), atol=1e-4)


def test_preprocess_none_is_identity(dataset: Dataset) -> None:
    raw = dataset.catalogue.features
    pre = Preprocessor.fit("none", raw)
    np.testing.assert_array_equal(pre.transform(raw), raw)


def test_preprocessor_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown preprocessing 'zscore'"):
        Preprocessor.fit("zscore", np.ones((5, 2)))


@pytest.mark.parametrize("kind", ["standardize", "pca_whiten", "none"])
def test_preprocessor_dict_round_trip(dataset: Dataset, kind: str) -> None:
    import json

    raw = dataset.catalogue.features
    pre = Preprocessor.fit(kind, raw[dataset.split.train])
    back = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back.kind == kind
    np.testing.assert_array_equal(back.shift, pre.shift)
    np.testing.assert_array_equal(back.matrix, pre.matrix)
    np.testing.assert_array_equal(back.transform(raw), pre.transform(raw))


def test_constant_feature_does_not_blow_up() -> None:
    x = np.column_stack([np.random.default_rng(0).normal(size=50), np.full(50, 3.0)])
    for kind in ("standardize", "pca_whiten"):
        assert np.all(np.isfinite(Preprocessor.fit(kind, x).transform(x)))


def test_build_dataset_from_file(tmp_path: Path) -> None:
    frame = make_frame(n_star=450, n_qso=50)
    frame.to_parquet(tmp_path / "cat.parquet")
    study = tmp_path / "s.yaml"
    study.write_text("data:\n  source: cat.parquet\n  features: [u-g, g-r]\n")
    from tuner.config import load_spec

    ds = build_dataset(load_spec(study))
    assert ds.catalogue.n_rows == 500 and ds.n_features == 2
    assert ds.catalogue.source == str(tmp_path.resolve() / "cat.parquet")


# --- the real SDSS sample -----------------------------------------------------------------------------------


@pytest.mark.skipif(not SDSS_CSV.is_file(), reason=f"SDSS sample not present at {SDSS_CSV}")
def test_sdss_sample() -> None:
    frame = read_table(SDSS_CSV)
    catalogue = load(frame, features=["u-g", "g-r", "r-i", "i-z"], target="class", positive="QSO")
    assert catalogue.n_rows == 10_000
    assert int(catalogue.labels.sum()) == 850
    np.testing.assert_allclose(catalogue.features[:, 0], (frame.u - frame.g).to_numpy(), rtol=1e-6, atol=1e-5)
    split = stratified_split(catalogue.labels, SplitSpec(), 0, catalogue.class_names)
    assert [int(catalogue.labels[idx].sum()) for idx in (split.train, split.validation, split.holdout)] == [
        510,
        170,
        170,
    ]


# --- features that look made from the label -----------------------------------------------------------------


def test_a_feature_that_alone_tells_the_class_is_named_as_a_possible_leak(caplog: pytest.LogCaptureFixture) -> None:
    frame = make_frame(n_star=900, n_qso=100)
    rng = np.random.default_rng(1)
    # A "redshift" measured from the spectrum that defines the class: quasars far, stars near, a little overlap.
    frame["redshift"] = np.where(
        frame["class"] == "QSO", rng.normal(2.0, 0.5, len(frame)), rng.normal(0, 0.2, len(frame))
    )
    spec = spec_from_dict({"data": {"features": ["u-g", "g-r", "redshift"]}})
    catalogue = catalogue_from_frame(frame, spec.data, task="binary", source="test")
    with caplog.at_level("WARNING", logger="tuner.data.dataset"):
        build_dataset(spec, catalogue=catalogue)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert re.match(
        r"data\.features: redshift alone tells QSO from the rest \(ROC AUC (0\.99\d|1\.000) on the ", warning
    )
    assert "leaks the label" in warning


def test_the_default_colours_are_not_taken_for_a_leak(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="tuner.data.dataset"):
        build_dataset(spec_from_dict({"data": {"simulated": {"n_star": 20000, "n_quasar": 1000}}}))
    assert caplog.records == []


def test_every_missing_column_is_named_at_once() -> None:
    features = ["u-g", "i-y", "redshfit", "R"]
    message = data_error(make_frame(), target="clas", features=features, id_columns=["objid"])
    assert message.splitlines() == [
        "4 problems with the catalogue's columns:",
        "  - data.target: column 'clas' not in the catalogue (did you mean 'class'?)",
        "  - data.features: column 'i-y' not in the catalogue, nor magnitude 'y' to derive it",
        "  - data.features: column 'redshfit' not in the catalogue",
        "  - data.features: column 'R' not in the catalogue (did you mean 'r'?)",
        "  the catalogue's columns: u, g, r, i, z, class, objid",
    ]


# --- values beyond what float32 holds -----------------------------------------------------------------------
# A value finite as read (float64) but beyond float32's ±3.4e+38 became inf in the float32 feature matrix: the
# trial failed with a NaN loss (or a regression's figures drowned in it) and predict wrote a NaN score.

BEYOND = "beyond what float32 holds (±3.4e+38; the network computes in float32)"


def squash(text: str) -> str:
    return " ".join(text.split())


def narrow(frame: pd.DataFrame) -> pd.DataFrame:
    """The magnitudes drawn closer to their means (sd 0.2), so that 3e+38 scales to beyond 3.4e+38."""
    mean = frame[BANDS].mean()
    return frame.assign(**{b: mean[b] + 0.2 * (frame[b] - mean[b]) for b in BANDS})


def test_a_feature_beyond_float32_names_the_column_row_value_and_magnitudes() -> None:
    frame = make_frame()
    frame.loc[5, "u"] = 1e39
    message = data_error(frame, features=["g-r", "u-g"])
    assert message == (
        f"data.features: column 'u-g' row 5 holds 1e+39 (u - g = 1e+39 - {frame.loc[5, 'g']:.6g}), {BEYOND}; "
        "clean or drop those rows before tuning"
    )


def test_a_colour_beyond_float32_is_refused_though_its_magnitudes_fit() -> None:
    frame = make_frame()
    frame.loc[[7, 40], "u"] = 3e38
    frame.loc[[7, 40], "g"] = -3e38
    message = data_error(frame, features=["u-g"])
    assert "column 'u-g' row 7 holds 6e+38 (u - g = 3e+38 - -3e+38)" in message
    assert "2 rows do, first at rows [7, 40]" in message


def test_a_column_beyond_float32_either_way_is_refused_and_its_limit_is_not() -> None:
    frame = make_frame()
    frame["flux"] = 1.0
    frame.loc[12, "flux"] = -1e300
    assert data_error(frame, features=["flux"]).startswith(
        f"data.features: column 'flux' row 12 holds -1e+300, {BEYOND}"
    )
    frame.loc[12, "flux"] = float(np.finfo(np.float32).max)
    assert np.isfinite(load(frame, features=["flux"]).features).all()


def test_a_regression_target_beyond_float32_is_refused() -> None:
    frame = make_frame()
    frame.loc[5, "u"] = 1e39
    message = data_error(frame, task="regression", target="u", features=["g-r", "r-i"])
    assert message == f"data.target: column 'u' row 5 holds 1e+39, {BEYOND}; clean or drop those rows before tuning"


def _validation_row(frame: pd.DataFrame, **changes: Any) -> tuple[int, Any]:
    """A validation row of the study's split (which depends on the labels only), and the study."""
    spec = spec_from_dict({"data": changes})
    catalogue = catalogue_from_frame(frame, spec.data, task="binary", source="test")
    split = stratified_split(catalogue.labels, spec.data.split, spec.data.seed, catalogue.class_names)
    return int(split.validation[0]), spec


def test_a_row_that_the_training_scaling_takes_beyond_float32_is_refused() -> None:
    # u-g of 3e+38 fits float32, but the training rows' standardisation (sd about 0.28) takes it past the limit.
    frame = narrow(make_frame(n_star=450, n_qso=50))
    row, spec = _validation_row(frame, features=["u-g", "g-r"])
    frame.loc[row, "u"] = 3e38
    catalogue = catalogue_from_frame(frame, spec.data, task="binary", source="test")
    with pytest.raises(DataError) as info:
        build_dataset(spec, catalogue=catalogue)
    message = str(info.value)
    assert re.match(
        rf"data\.features: column 'u-g' row {row} holds 3e\+38, which the scaling fitted on the training rows "
        r"\(standardize: mean -?[\d.]+, standard deviation [\d.]+\) takes to [\d.]+e\+39, ",
        message,
    ), message
    assert message.endswith(f"{BEYOND}; clean or drop those rows before tuning")


def test_a_row_that_pca_whitening_takes_beyond_float32_is_refused() -> None:
    frame = narrow(make_frame(n_star=450, n_qso=50))
    row, spec = _validation_row(frame, features=["u-g", "g-r"], preprocess="pca_whiten")
    frame.loc[row, "u"] = 3e38
    catalogue = catalogue_from_frame(frame, spec.data, task="binary", source="test")
    with pytest.raises(DataError, match=rf"^data\.features: row {row} \(u-g = 3e\+38, g-r = [-\d.]+\) is taken by"):
        build_dataset(spec, catalogue=catalogue)


def test_the_scaling_never_hands_the_network_inf() -> None:
    x = np.random.default_rng(0).normal(scale=0.2, size=(50, 2))
    far = np.array([[0.0, 3e38]])
    for kind in ("standardize", "pca_whiten"):
        scaling = Preprocessor.fit(kind, x)
        assert scaling.problem(x, ["a", "b"]) is None
        assert "row 7" in str(scaling.problem(far, ["a", "b"], rows=np.array([7])))
        with pytest.raises(DataError, match=r"beyond what float32 holds"):
            scaling.transform(far)


def test_run_with_a_value_beyond_float32_exits_2_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli import main

    monkeypatch.chdir(tmp_path)
    frame = make_frame(n_star=450, n_qso=50)
    frame.loc[5, "u"] = 1e39
    frame.to_csv(tmp_path / "cat.csv", index=False)
    for task, target in (("binary", "class"), ("regression", "u")):
        study = tmp_path / f"{task}.yaml"
        features = "[u-g, g-r]" if task == "binary" else "[g-r, r-i]"
        study.write_text(
            f"data: {{source: cat.csv, features: {features}, target: {target}}}\ntask: {task}\n"
            "study: {n_trials: 1, storage: 'sqlite:///optuna.db'}\ntracking: {uri: 'sqlite:///mlflow.db'}\n"
        )
        assert main(["run", str(study)]) == 2
        captured = capsys.readouterr()
        column = "'u-g'" if task == "binary" else "'u'"
        assert f"column {column} row 5 holds 1e+39" in squash(captured.err)
        assert BEYOND in squash(captured.err)
        assert captured.err.count("error:") == 1
    # no study, no lock beside it, no MLflow store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.yaml", "cat.csv", "regression.yaml"]


def _fake_export(path: Path, preprocess: str = "standardize", folds: int = 0) -> Path:
    """A model directory as far as predict reads it before the network: the description of its inputs."""
    import json

    x = narrow(make_frame()).assign(**{"u-g": lambda f: f.u - f.g})[["u-g", "r"]].to_numpy()
    config: dict[str, Any] = {
        "format": 1,
        "task": "binary",
        "derivations": [{"feature": "u-g", "colour": ["u", "g"]}, {"feature": "r", "column": "r"}],
        "input_columns": ["u", "g", "r"],
        "id_columns": [],
        "class_names": ["rest", "QSO"],
        "positive_class": "QSO",
        "positive_index": 1,
        "threshold": 0.5,
    }
    scaling = Preprocessor.fit(preprocess, x).to_dict()
    if folds:
        config["ensemble"] = {"members": [{"fold": i, "preprocessor": scaling} for i in range(folds)]}
    else:
        config["preprocessor"] = scaling
    (path / "artifacts").mkdir(parents=True)
    (path / "MLmodel").write_text("")
    (path / "artifacts" / "tuner_model.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("u", "needle"),
    [
        (1e39, "column 'u-g' row 5 holds 1e+39 (u - g = 1e+39 - "),
        (3e38, "column 'u-g' row 5 holds 3e+38, which the scaling fitted on the training rows (standardize: mean "),
    ],
)
def test_predict_refuses_a_row_beyond_float32_with_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], u: float, needle: str
) -> None:
    from tuner.cli import main

    model = _fake_export(tmp_path / "model")
    frame = narrow(make_frame())
    frame.loc[5, "u"] = u
    frame.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "scored.csv"
    assert main(["predict", str(model), "--data", str(tmp_path / "new.csv"), "--out", str(out)]) == 2
    err = squash(capsys.readouterr().err)
    assert f"error: model input: {needle}" in err, err
    assert err.endswith(f"{BEYOND}; clean or drop those rows before scoring")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model", "new.csv"]


@pytest.mark.parametrize(("preprocess", "folds"), [("pca_whiten", 0), ("standardize", 3)])
def test_check_input_refuses_rows_that_any_scaling_of_the_model_takes_beyond_float32(
    tmp_path: Path, preprocess: str, folds: int
) -> None:
    import json

    from tuner.export import check_input

    model = _fake_export(tmp_path / "model", preprocess, folds)
    config = json.loads((model / "artifacts" / "tuner_model.json").read_text())
    frame = narrow(make_frame())
    check_input(frame, config)
    frame.loc[[9, 30], "r"] = 3e38
    with pytest.raises(DataError, match=r"^model input: .*row 9.*2 rows are, first at rows \[9, 30\]"):
        check_input(frame, config)


def test_predict_never_writes_a_nan_score(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows whose scaled features fit float32 can still overflow the network's float32 arithmetic (inf - inf).
    import tuner.export
    from tuner.cli import main

    def overflowing(model_dir: Any, frame: pd.DataFrame) -> pd.DataFrame:
        p = np.where(np.arange(len(frame)) == 4, np.nan, 0.2)
        return pd.DataFrame({"p_QSO": p, "predicted_QSO": p >= 0.5}, index=frame.index)

    monkeypatch.setattr(tuner.export, "predict_frame", overflowing)
    model = _fake_export(tmp_path / "model")
    make_frame().to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "scored.csv"
    assert main(["predict", str(model), "--data", str(tmp_path / "new.csv"), "--out", str(out)]) == 2
    err = squash(capsys.readouterr().err)
    assert "error: model input: row 4 (u-g = " in err and "scores it NaN (1 row(s), first at rows [4])" in err
    assert not out.exists()


def test_a_split_part_too_small_to_stratify_is_named_with_its_own_size_not_rounded_to_zero() -> None:
    labels = np.array([0] * 500 + [1] * 500)
    spec = SplitSpec(train=0.9985, validation=0.0005, holdout=0.001)
    with pytest.raises(DataError) as info:
        stratified_split(labels, spec, 0, ("rest", "QSO"))
    assert "too few to stratify a split with a 0.05% part (needs at least 2000)" in str(info.value)
