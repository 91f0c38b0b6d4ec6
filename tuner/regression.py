"""Regression metrics: MAE, RMSE and R², with bootstrap confidence intervals for the holdout.

Pure functions of numpy arrays in the target's own unit. An interval comes from scipy's paired bootstrap
(percentile method) with a fixed random state, so the same predictions always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tuner.metrics import Interval

#: Resamples of the bootstrap; 1000 puts the percentile interval's own Monte Carlo error near 0.01 of its width.
N_RESAMPLES = 1000
#: Random state of the bootstrap: intervals are reproducible.
BOOTSTRAP_SEED = 0

Statistic = Callable[[NDArray[np.float64], NDArray[np.float64], int], NDArray[np.float64]]


def _mae(y: NDArray[np.float64], p: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    return np.mean(np.abs(y - p), axis=axis)


def _rmse(y: NDArray[np.float64], p: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    return np.sqrt(np.mean((y - p) ** 2, axis=axis))


def _r2(y: NDArray[np.float64], p: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    residual = np.sum((y - p) ** 2, axis=axis)
    total = np.sum((y - np.mean(y, axis=axis, keepdims=True)) ** 2, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - residual / total


#: Each metric's statistic, vectorised over a resample axis.
STATISTICS: dict[str, Statistic] = {"mae": _mae, "rmse": _rmse, "r2": _r2}


def _arrays(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y.shape[0]} and {p.shape[0]}")
    return y, p


def mae(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean absolute error; NaN for no rows."""
    y, p = _arrays(y_true, y_pred)
    return float(_mae(y, p)) if y.size else math.nan


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Root mean squared error; NaN for no rows."""
    y, p = _arrays(y_true, y_pred)
    return float(_rmse(y, p)) if y.size else math.nan


def r2(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Coefficient of determination 1 - SSE / SST; NaN when the targets do not vary (or there are none)."""
    y, p = _arrays(y_true, y_pred)
    if y.size < 2 or float(np.var(y)) == 0.0:
        return math.nan
    return float(_r2(y, p))


def metric(name: str, y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """One metric by name: ``mae``, ``rmse`` or ``r2``."""
    return {"mae": mae, "rmse": rmse, "r2": r2}[name](y_true, y_pred)


def bootstrap_interval(
    name: str,
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """A percentile bootstrap interval for one metric, resampling rows (target and prediction together).

    Args:
        name: ``mae``, ``rmse`` or ``r2``.
        y_true: Targets.
        y_pred: Predictions, in the same unit.
        confidence: Confidence level in (0, 1).
        n_resamples: Bootstrap resamples.
        seed: Random state, so the interval is reproducible.

    Returns:
        The interval; NaN at both ends with fewer than 2 rows.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    y, p = _arrays(y_true, y_pred)
    if y.size < 2:
        return Interval(math.nan, math.nan)
    statistic = STATISTICS[name]
    # scipy.stats takes about 0.4 s to import; only a regression's holdout needs it.
    from scipy.stats import bootstrap

    result = bootstrap(
        (y, p),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(float(ci.low), float(ci.high))


@dataclass(frozen=True)
class RegressionFigures:
    """MAE, RMSE and R² of one set of rows; intervals when they were asked for (the holdout)."""

    mae: float
    rmse: float
    r2: float
    n: int
    mae_ci: Interval | None = None
    rmse_ci: Interval | None = None
    r2_ci: Interval | None = None

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics ``{prefix}_mae`` ... and, with intervals, ``{prefix}_mae_low`` / ``_high``."""
        out: dict[str, float] = {}
        for name in STATISTICS:
            out[f"{prefix}_{name}"] = getattr(self, name)
            ci = getattr(self, f"{name}_ci")
            if ci is not None:
                out[f"{prefix}_{name}_low"], out[f"{prefix}_{name}_high"] = ci.low, ci.high
        return out


def regression_figures(y_true: ArrayLike, y_pred: ArrayLike, *, intervals: bool = False) -> RegressionFigures:
    """MAE, RMSE and R², with 95% bootstrap intervals when ``intervals``."""
    y, p = _arrays(y_true, y_pred)
    cis = {f"{n}_ci": bootstrap_interval(n, y, p) for n in STATISTICS} if intervals else {}
    return RegressionFigures(mae=mae(y, p), rmse=rmse(y, p), r2=r2(y, p), n=int(y.size), **cis)
