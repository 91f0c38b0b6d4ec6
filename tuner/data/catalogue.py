"""The embedded default catalogue: simulated ugriz photometry of stars, quasars and galaxies.

Each class is a Gaussian mixture in (r, u-g, g-r, r-i, i-z) fitted to real SDSS DR14 photometry by
``scripts/fit_catalogue.py``; only the fitted numbers ship (``catalogue_params.json``), never the data. The
simulation works offline and at any size, so tuner has a realistic default catalogue without a download.
"""

from __future__ import annotations

import copy
import functools
import json
import numbers
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from tuner.errors import DataError

__all__ = ["BANDS", "CLASSES", "DIMENSIONS", "load_catalogue_params", "simulate_catalogue"]

PARAMS_FILE = "catalogue_params.json"
BANDS = ("u", "g", "r", "i", "z")
DIMENSIONS = ("r", "u-g", "g-r", "r-i", "i-z")
CLASSES = ("STAR", "QSO", "GALAXY")


def _check_params(params: dict[str, Any], origin: str) -> None:
    """Raise DataError unless params has the expected dimensions and, per class, consistent mixture shapes.

    The number of components k may differ between classes; within a class, weights (k), means (k x 5) and
    covariances (k x 5 x 5) must agree.
    """
    dims = params.get("metadata", {}).get("dimensions")
    if dims != list(DIMENSIONS):
        raise DataError(f"{origin}: metadata.dimensions is {dims!r}, expected {list(DIMENSIONS)!r}")
    for name in CLASSES:
        mix = params.get("classes", {}).get(name)
        if mix is None:
            raise DataError(f"{origin}: class {name!r} is missing")
        k = len(mix["weights"])
        if k < 1 or np.shape(mix["means"]) != (k, 5) or np.shape(mix["covariances"]) != (k, 5, 5):
            raise DataError(f"{origin}: class {name!r} has inconsistent mixture shapes")


@functools.cache
def _read_params() -> dict[str, Any]:
    """Read and check the packaged JSON once; callers get copies so the cache cannot be mutated."""
    try:
        text = resources.files("tuner.data").joinpath(PARAMS_FILE).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise DataError(f"catalogue parameters {PARAMS_FILE!r} are missing from package tuner.data") from exc
    params: dict[str, Any] = json.loads(text)
    _check_params(params, PARAMS_FILE)
    return params


def load_catalogue_params() -> dict[str, Any]:
    """Return the fitted per-class mixtures and their provenance.

    Returns:
        A dict with ``metadata`` (source file, its sha256, rows per class, dimension names, sklearn version,
        date) and ``classes``, mapping "STAR", "QSO" and "GALAXY" to ``weights`` (k), ``means`` (k x 5) and
        ``covariances`` (k x 5 x 5) in the dimensions (r, u-g, g-r, r-i, i-z). The file is read once; each
        call returns a fresh copy.

    Raises:
        DataError: the packaged JSON is missing or malformed.
    """
    return copy.deepcopy(_read_params())


Mixture = tuple[np.ndarray, np.ndarray, np.ndarray]


def _factor(mix: dict[str, Any]) -> Mixture:
    """Return (weights, means, Cholesky factors) of one class's mixture, as arrays ready for sampling."""
    weights = np.asarray(mix["weights"], dtype=np.float64)
    # The JSON is rounded to 6 digits, so the weights may miss 1 by ~1e-6: renormalise for multinomial.
    weights = weights / weights.sum()
    means = np.asarray(mix["means"], dtype=np.float64)
    chol = np.linalg.cholesky(np.asarray(mix["covariances"], dtype=np.float64))
    return weights, means, chol


@functools.cache
def _mixture(name: str) -> Mixture:
    """Return the factored mixture of a class from the packaged parameters (cached)."""
    return _factor(_read_params()["classes"][name])


def _check_count(arg: str, value: object) -> int:
    """Return value as int if it is a non-negative integer (bool excluded), else raise DataError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{arg} must be a non-negative integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise DataError(f"{arg} must be a non-negative integer, got {value!r}")
    return int(value)


def _sample(mixture: Mixture, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n points of one class's mixture in (r, u-g, g-r, r-i, i-z) space."""
    weights, means, chol = mixture
    # Exact per-component counts from one multinomial draw, then one block of normals per component:
    # vectorised, and the stream of draws depends only on the seed and n.
    counts = rng.multinomial(n, weights)
    blocks = [means[j] + rng.standard_normal((c, means.shape[1])) @ chol[j].T for j, c in enumerate(counts) if c]
    return np.concatenate(blocks) if blocks else np.empty((0, len(DIMENSIONS)))


def simulate_catalogue(n_star: int = 100_000, n_quasar: int = 1_000, n_galaxy: int = 0, seed: int = 0) -> pd.DataFrame:
    """Simulate a photometric catalogue with SDSS-like colours.

    The default (100k stars, 1k quasars) mimics the quasar-selection problem: a rare class to find in a
    large stellar population. Magnitudes are rebuilt from r and the colours, so colours are exactly those
    sampled from the fitted mixtures.

    Args:
        n_star: number of STAR rows.
        n_quasar: number of QSO rows.
        n_galaxy: number of GALAXY rows.
        seed: seed of ``numpy.random.default_rng``; the same seed and counts give the same frame.

    Returns:
        A frame with float64 columns ``u, g, r, i, z`` and string column ``class`` ("STAR", "QSO",
        "GALAXY"), rows shuffled, index 0..n-1.

    Raises:
        DataError: a count or the seed is not a non-negative integer, or fewer than two classes have rows.
    """
    counts = {
        "STAR": _check_count("n_star", n_star),
        "QSO": _check_count("n_quasar", n_quasar),
        "GALAXY": _check_count("n_galaxy", n_galaxy),
    }
    seed = _check_count("seed", seed)
    if sum(1 for c in counts.values() if c > 0) < 2:
        # One class alone is no classification problem; refuse instead of letting training fail later.
        raise DataError(
            "at least two of n_star, n_quasar, n_galaxy must be > 0, "
            f"got n_star={n_star}, n_quasar={n_quasar}, n_galaxy={n_galaxy}"
        )

    mixtures = {name: _mixture(name) for name in CLASSES if counts[name]}
    return _simulate(mixtures, counts, seed)


def _simulate(mixtures: dict[str, Mixture], counts: dict[str, int], seed: int) -> pd.DataFrame:
    """Build the shuffled catalogue frame from factored mixtures and (already checked) class counts."""
    rng = np.random.default_rng(seed)
    # Classes are drawn in a fixed order so each class's rows depend only on the seed and earlier counts.
    present = [name for name in CLASSES if counts[name]]
    x = np.concatenate([_sample(mixtures[name], counts[name], rng) for name in present])
    labels = np.repeat(present, [counts[name] for name in present])

    r, ug, gr, ri, iz = x.T
    g = r + gr
    u = g + ug
    i = r - ri
    z = i - iz
    order = rng.permutation(len(x))
    frame = pd.DataFrame({"u": u, "g": g, "r": r, "i": i, "z": z}).iloc[order].reset_index(drop=True)
    frame["class"] = pd.Series(labels[order], dtype="str")
    return frame


def _simulate_from_params(
    params: dict[str, Any], n_star: int, n_quasar: int, n_galaxy: int, seed: int = 0
) -> pd.DataFrame:
    """Simulate like :func:`simulate_catalogue` from a given parameter document instead of the packaged one.

    Lets ``scripts/check_catalogue.py`` compare candidate fits before one is installed; not public API.
    """
    _check_params(params, "params")
    counts = {
        "STAR": _check_count("n_star", n_star),
        "QSO": _check_count("n_quasar", n_quasar),
        "GALAXY": _check_count("n_galaxy", n_galaxy),
    }
    mixtures = {name: _factor(params["classes"][name]) for name in CLASSES if counts[name]}
    return _simulate(mixtures, counts, _check_count("seed", seed))
