"""Tests of the simulated default catalogue (tuner.data.catalogue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tuner.data.catalogue import (
    CLASSES,
    DIMENSIONS,
    _simulate_from_params,
    load_catalogue_params,
    simulate_catalogue,
)
from tuner.errors import DataError

SDSS_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sdss_dr14_10k.csv.gz"
BANDS = ["u", "g", "r", "i", "z"]


def features(frame: pd.DataFrame) -> pd.DataFrame:
    """Return (r, u-g, g-r, r-i, i-z), the space the mixtures were fitted in."""
    return pd.DataFrame(
        {
            "r": frame["r"],
            "u-g": frame["u"] - frame["g"],
            "g-r": frame["g"] - frame["r"],
            "r-i": frame["r"] - frame["i"],
            "i-z": frame["i"] - frame["z"],
        }
    )


def mixture_moments(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of a class's mixture, computed analytically from the JSON."""
    mix = load_catalogue_params()["classes"][name]
    w = np.asarray(mix["weights"]) / np.sum(mix["weights"])
    mu = np.asarray(mix["means"])
    cov = np.asarray(mix["covariances"])
    mean = w @ mu
    # Law of total variance: E[cov_k] + Var[mu_k].
    second = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu))
    return mean, np.sqrt(np.diag(second - np.outer(mean, mean)))


@pytest.fixture(scope="module")
def big() -> pd.DataFrame:
    """50k rows per class: enough that a 5-sigma tolerance on the moments is tight."""
    return simulate_catalogue(n_star=50_000, n_quasar=50_000, n_galaxy=50_000, seed=123)


def test_same_seed_gives_same_frame() -> None:
    a = simulate_catalogue(2_000, 300, 500, seed=7)
    b = simulate_catalogue(2_000, 300, 500, seed=7)
    pd.testing.assert_frame_equal(a, b)


def test_different_seed_gives_different_frame() -> None:
    a = simulate_catalogue(2_000, 300, 500, seed=7)
    b = simulate_catalogue(2_000, 300, 500, seed=8)
    assert not np.allclose(a[BANDS].to_numpy(), b[BANDS].to_numpy())


def test_class_counts_are_exact() -> None:
    frame = simulate_catalogue(n_star=1_234, n_quasar=56, n_galaxy=789, seed=1)
    assert frame["class"].value_counts().to_dict() == {"STAR": 1_234, "QSO": 56, "GALAXY": 789}
    assert len(frame) == 1_234 + 56 + 789


def test_zero_count_class_is_absent() -> None:
    frame = simulate_catalogue(n_star=100, n_quasar=10, n_galaxy=0)
    assert set(frame["class"]) == {"STAR", "QSO"}


def test_defaults() -> None:
    frame = simulate_catalogue()
    assert frame["class"].value_counts().to_dict() == {"STAR": 100_000, "QSO": 1_000}


def test_columns_dtypes_and_index() -> None:
    frame = simulate_catalogue(500, 100, 100, seed=2)
    assert list(frame.columns) == [*BANDS, "class"]
    for band in BANDS:
        assert frame[band].dtype == np.float64
    assert pd.api.types.is_string_dtype(frame["class"])
    assert set(frame["class"]) <= set(CLASSES)
    assert frame.index.equals(pd.RangeIndex(len(frame)))


def test_rows_are_shuffled() -> None:
    frame = simulate_catalogue(5_000, 5_000, 0, seed=3)
    # Unshuffled, the first half would be all STAR; shuffled, close to half of it is.
    assert 0.4 < (frame["class"].iloc[:5_000] == "STAR").mean() < 0.6


def test_values_finite_and_plausible(big: pd.DataFrame) -> None:
    mags = big[BANDS].to_numpy()
    assert np.isfinite(mags).all()
    # SDSS-like magnitudes; a broken reconstruction (e.g. sign error in a colour) would leave this range.
    assert mags.min() > 5 and mags.max() < 30


@pytest.mark.parametrize("name", CLASSES)
def test_moments_match_stored_mixture(big: pd.DataFrame, name: str) -> None:
    x = features(big.loc[big["class"] == name]).to_numpy()
    mean, std = mixture_moments(name)
    n = len(x)
    # 5 standard errors of the mean: ~0.01 mag for colours, far below any real mismatch.
    np.testing.assert_array_less(np.abs(x.mean(axis=0) - mean), 5 * std / np.sqrt(n))
    np.testing.assert_allclose(x.std(axis=0), std, rtol=0.03)


def test_quasars_are_bluer_than_stars_in_u_minus_g(big: pd.DataFrame) -> None:
    # Real SDSS DR14 sample: mean u-g is 0.26 for QSO, 1.20 for STAR; the UV excess is how quasars are found.
    ug = big["u"] - big["g"]
    qso, star = ug[big["class"] == "QSO"], ug[big["class"] == "STAR"]
    assert qso.mean() + 0.5 < star.mean()
    # Real data: 93% of QSO and 5% of STAR have u-g < 0.6.
    assert (qso < 0.6).mean() > 0.85
    assert (star < 0.6).mean() < 0.10


def test_params_metadata() -> None:
    meta = load_catalogue_params()["metadata"]
    assert meta["dimensions"] == list(DIMENSIONS)
    assert meta["source_file"] == "sdss_dr14_10k.csv.gz"
    assert len(meta["source_sha256"]) == 64
    assert set(meta["rows_per_class"]) == set(CLASSES)
    assert {"sklearn_version", "date"} <= set(meta)


def test_load_params_returns_independent_copies() -> None:
    first = load_catalogue_params()
    first["classes"]["STAR"]["weights"][0] = -1.0
    assert load_catalogue_params()["classes"]["STAR"]["weights"][0] > 0


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"n_star": -1}, "n_star"),
        ({"n_quasar": 1.5}, "n_quasar"),
        ({"n_galaxy": "10"}, "n_galaxy"),
        ({"n_star": True}, "n_star"),
        ({"seed": -3}, "seed"),
        ({"seed": 0.5}, "seed"),
    ],
)
def test_bad_argument_raises_data_error(kwargs: dict[str, object], arg: str) -> None:
    with pytest.raises(DataError, match="non-negative integer") as info:
        simulate_catalogue(**kwargs)  # type: ignore[arg-type]
    assert arg in str(info.value)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


@pytest.mark.parametrize(
    "counts", [(10, 0, 0), (0, 10, 0), (0, 0, 10), (0, 0, 0)], ids=["star", "qso", "galaxy", "none"]
)
def test_fewer_than_two_classes_raises(counts: tuple[int, int, int]) -> None:
    with pytest.raises(DataError, match="at least two") as info:
        simulate_catalogue(*counts)
    assert f"n_star={counts[0]}" in str(info.value)


def test_numpy_integers_are_accepted() -> None:
    frame = simulate_catalogue(np.int64(20), np.int32(5), 0, seed=np.int64(1))  # type: ignore[arg-type]
    assert len(frame) == 25


@pytest.mark.skipif(not SDSS_CSV.is_file(), reason=f"real SDSS sample not found at {SDSS_CSV}")
def test_median_colours_match_real_sdss() -> None:
    real = pd.read_csv(SDSS_CSV, usecols=[*BANDS, "class"])
    sim = simulate_catalogue(n_star=8_000, n_quasar=4_000, n_galaxy=8_000, seed=11)
    real_med = features(real).groupby(real["class"]).median()
    sim_med = features(sim).groupby(sim["class"]).median()
    # 0.1 mag on colours (classes differ by 0.3-1 mag in u-g, g-r); 0.25 mag on r, which spans several mag.
    tol = pd.Series({"r": 0.25, "u-g": 0.1, "g-r": 0.1, "r-i": 0.1, "i-z": 0.1})
    diff = (sim_med - real_med.loc[sim_med.index]).abs()
    assert (diff <= tol).all().all(), f"median differences sim - real:\n{diff}"


def test_component_counts_match_metadata() -> None:
    # Classes may have different numbers of components; the metadata records how many each was fitted with.
    params = load_catalogue_params()
    recorded = params["metadata"]["n_components"]
    assert set(recorded) == set(CLASSES)
    for name in CLASSES:
        assert len(params["classes"][name]["weights"]) == recorded[name]


def test_simulate_from_params_matches_packaged() -> None:
    # scripts/check_catalogue.py evaluates candidate fits through this path: it must equal the public one.
    a = _simulate_from_params(load_catalogue_params(), 300, 50, 200, seed=5)
    pd.testing.assert_frame_equal(a, simulate_catalogue(300, 50, 200, seed=5))


def test_inconsistent_mixture_shapes_are_rejected() -> None:
    params = load_catalogue_params()
    params["classes"]["QSO"]["weights"].append(0.1)
    with pytest.raises(DataError, match="inconsistent mixture shapes"):
        _simulate_from_params(params, 10, 10, 0)
