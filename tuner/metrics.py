"""Classification metrics for quasar selection, in the terms astronomers use.

A selection is judged by its *completeness* (the fraction of true quasars it recovers, i.e. recall/TPR) and
its *contamination* (the fraction of the selected sample that is not a quasar, i.e. 1 - precision); the
*efficiency* is 1 - contamination. A survey usually fixes the contamination it can tolerate and wants the
most complete sample under that ceiling, so the operating threshold is chosen on validation data with
:func:`choose_operating_point` and then frozen and measured, with Wilson intervals, on the holdout with
:func:`apply_operating_point`.

Everything here is a pure function of numpy arrays: labels are 0/1 (or bool), scores are finite floats where
larger means "more quasar-like", and a sample is predicted positive iff ``score >= threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ConfusionCounts",
    "Interval",
    "MeasuredPoint",
    "OperatingPoint",
    "apply_operating_point",
    "average_precision",
    "choose_operating_point",
    "completeness",
    "completeness_efficiency_curve",
    "confusion_counts",
    "contamination",
    "efficiency",
    "fpr",
    "roc_auc",
    "roc_points",
    "tpr",
    "wilson_interval",
]


@dataclass(frozen=True)
class ConfusionCounts:
    """The four cells of a binary confusion matrix.

    Attributes:
        tp: Positives predicted positive (quasars selected).
        fp: Negatives predicted positive (stars selected).
        tn: Negatives predicted negative.
        fn: Positives predicted negative (quasars missed).
    """

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n_pos(self) -> int:
        """Number of true positives in the data (TP + FN)."""
        return self.tp + self.fn

    @property
    def n_neg(self) -> int:
        """Number of true negatives in the data (FP + TN)."""
        return self.fp + self.tn

    @property
    def n_pred_pos(self) -> int:
        """Size of the selected sample (TP + FP)."""
        return self.tp + self.fp

    @property
    def n(self) -> int:
        """Total number of samples."""
        return self.tp + self.fp + self.tn + self.fn


@dataclass(frozen=True)
class Interval:
    """A closed confidence interval ``[low, high]``; both NaN when there is no data."""

    low: float
    high: float


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold chosen on validation data, with what it achieved there.

    Attributes:
        threshold: Predict positive iff ``score >= threshold``.
        target_contamination: The contamination ceiling the threshold was chosen for.
        completeness: Completeness on the validation data at ``threshold``.
        contamination: Contamination on the validation data at ``threshold``.
        counts: Confusion counts on the validation data at ``threshold``.
        feasible: False when no threshold met the target; then nothing is selected.
    """

    threshold: float
    target_contamination: float
    completeness: float
    contamination: float
    counts: ConfusionCounts
    feasible: bool


@dataclass(frozen=True)
class MeasuredPoint:
    """A frozen threshold measured on (holdout) data, with 95% Wilson intervals.

    Attributes:
        threshold: The threshold that was applied.
        counts: Confusion counts at ``threshold``.
        completeness: TP / (TP + FN); NaN when the data holds no positives.
        contamination: FP / (TP + FP); 0.0 when nothing is selected.
        completeness_ci: Wilson interval for completeness (k = TP, n = TP + FN).
        contamination_ci: Wilson interval for contamination (k = FP, n = TP + FP).
    """

    threshold: float
    counts: ConfusionCounts
    completeness: float
    contamination: float
    completeness_ci: Interval
    contamination_ci: Interval


# --------------------------------------------------------------------------------------------------------
# Input handling


def _as_arrays(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Validate and convert labels and scores to 1-D bool and float64 arrays of equal length.

    Raises:
        ValueError: If the arrays are not 1-D, differ in length, labels are not 0/1, or a score is not finite.
    """
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score differ in length: {y.shape[0]} != {s.shape[0]}")
    if y.dtype != np.bool_:
        if y.size and not np.isin(y, (0, 1)).all():
            bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
            raise ValueError(f"y_true must hold only 0/1 labels, found {bad.tolist()}")
        y = y.astype(np.bool_)
    if not np.isfinite(s).all():
        # A NaN score would silently count as negative at every threshold (NaN >= t is False).
        raise ValueError(f"y_score holds {int((~np.isfinite(s)).sum())} non-finite value(s)")
    return y, s


def _has_both_classes(y: NDArray[np.bool_]) -> bool:
    return bool(y.any()) and not bool(y.all())


# --------------------------------------------------------------------------------------------------------
# Confusion counts and the rates derived from them


def confusion_counts(y_true: ArrayLike, y_score: ArrayLike, threshold: float) -> ConfusionCounts:
    """Count the confusion-matrix cells when predicting positive iff ``score >= threshold``.

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.
        threshold: The decision threshold.

    Returns:
        The confusion counts.
    """
    y, s = _as_arrays(y_true, y_score)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    tn = int(y.size) - tp - fp - fn
    return ConfusionCounts(tp=tp, fp=fp, tn=tn, fn=fn)


def completeness(counts: ConfusionCounts) -> float:
    """Completeness (recall, TPR): TP / (TP + FN).

    Args:
        counts: Confusion counts.

    Returns:
        The completeness, or NaN when there are no positives (nothing to be complete about).
    """
    return counts.tp / counts.n_pos if counts.n_pos else math.nan


def contamination(counts: ConfusionCounts) -> float:
    """Contamination (1 - precision, false-discovery rate): FP / (TP + FP).

    Args:
        counts: Confusion counts.

    Returns:
        The contamination, or 0.0 when nothing is predicted positive: an empty sample contains no
        interlopers, so it is not contaminated (and this keeps "contamination <= target" true for it).
    """
    return counts.fp / counts.n_pred_pos if counts.n_pred_pos else 0.0


def efficiency(counts: ConfusionCounts) -> float:
    """Efficiency (precision, purity): 1 - contamination; 1.0 for an empty selection.

    Args:
        counts: Confusion counts.

    Returns:
        The efficiency.
    """
    return 1.0 - contamination(counts)


def tpr(counts: ConfusionCounts) -> float:
    """True-positive rate; identical to :func:`completeness`.

    Args:
        counts: Confusion counts.

    Returns:
        TP / (TP + FN), NaN when there are no positives.
    """
    return completeness(counts)


def fpr(counts: ConfusionCounts) -> float:
    """False-positive rate: FP / (FP + TN).

    Args:
        counts: Confusion counts.

    Returns:
        The false-positive rate, or NaN when there are no negatives.
    """
    return counts.fp / counts.n_neg if counts.n_neg else math.nan


# --------------------------------------------------------------------------------------------------------
# Threshold-free summaries


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve.

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.

    Returns:
        The ROC AUC, or NaN when only one class is present (sklearn would raise).
    """
    y, s = _as_arrays(y_true, y_score)
    if not _has_both_classes(y):
        return math.nan
    # The Mann-Whitney form: the chance that a positive outscores a negative, ties counting half (tied scores
    # share their mean rank). The same number as sklearn's roc_auc_score, 5-8x faster (no input checks).
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks, tied values sharing their mean rank (scipy's ``rankdata`` with its default method, whose
    module takes about 0.4 s to import); the values are finite."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.empty(len(values), dtype=np.bool_)
    starts_run[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_run[1:])
    starts = np.flatnonzero(starts_run)
    ends = np.append(starts[1:], len(values))
    # A run of ties at positions start..end-1 holds ranks start+1..end, whose mean is (start + 1 + end) / 2.
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(starts_run) - 1]
    return ranks


def average_precision(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Average precision (step-wise area under the precision-recall curve).

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.

    Returns:
        The average precision, or NaN when only one class is present (sklearn would warn and return a
        number that means nothing).
    """
    y, s = _as_arrays(y_true, y_score)
    if not _has_both_classes(y):
        return math.nan
    # sklearn's average_precision_score from the counts at each distinct cut, its arrays in its order (so the
    # same number to the last bit), without its input checks: 0.16 ms instead of 1.2 ms on 2,000 rows.
    _, tp, fp = _cumulative_counts(y, s)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    recall_steps = np.diff(np.append(recall[::-1], 0.0))
    return float(-np.sum(recall_steps * precision[::-1]))


def roc_points(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve points for plotting; a thin wrapper on :func:`sklearn.metrics.roc_curve`.

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.

    Returns:
        ``(fpr, tpr, thresholds)`` as returned by sklearn (thresholds descending, the first one ``inf``).
    """
    # Imported here: scikit-learn's metrics take about 0.4 s to import, and a worker that only trains never plots.
    from sklearn.metrics import roc_curve

    y, s = _as_arrays(y_true, y_score)
    fpr_, tpr_, thresholds = roc_curve(y, s)
    return (
        np.asarray(fpr_, dtype=np.float64),
        np.asarray(tpr_, dtype=np.float64),
        np.asarray(thresholds, dtype=np.float64),
    )


# --------------------------------------------------------------------------------------------------------
# Confidence intervals


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion k / n.

    Wilson rather than the normal (Wald) interval because it stays inside [0, 1] and keeps close to nominal
    coverage for small n and for proportions near 0 or 1, which is where contamination usually lives.

    Args:
        k: Number of successes, ``0 <= k <= n``.
        n: Number of trials, ``n >= 0``.
        confidence: Confidence level in (0, 1).

    Returns:
        The interval, or ``Interval(nan, nan)`` when ``n == 0``.

    Raises:
        ValueError: If k or n are out of range or confidence is not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Interval(math.nan, math.nan)
    # Newcombe (1998)'s form, as scipy's binomtest(k, n).proportion_ci(method="wilson") computes it, operation
    # for operation, without the test's p-value (binomial probabilities) that it computes first.
    from scipy.special import ndtri

    p = k / n
    z = float(ndtri(0.5 + 0.5 * confidence))
    denom = 2 * (n + z**2)
    center = (2 * n * p + z**2) / denom
    delta = z / denom * math.sqrt(4 * n * p * (1 - p) + z**2)
    return Interval(0.0 if k == 0 else center - delta, 1.0 if k == n else center + delta)


# --------------------------------------------------------------------------------------------------------
# Operating points


def _cumulative_counts(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """Cumulative TP and FP at every distinct score cut, thresholds descending.

    Hand-written because sklearn's equivalent (``_binary_clf_curve``) is private, and its public curves
    (``precision_recall_curve``, ``roc_curve``) return ratios, not the integer counts needed for exact
    feasibility checks and Wilson intervals (and they divide by zero when a class is absent).

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.

    Returns:
        ``(thresholds, tp, fp)``: ``tp[i]``/``fp[i]`` are the counts when predicting positive iff
        ``score >= thresholds[i]``. Tied scores are never split: each cut lies between distinct values.
        The last cut selects everything, so ``tp[-1]`` and ``fp[-1]`` are the class totals. All three are
        empty for empty input.
    """
    y, s = _as_arrays(y_true, y_score)
    if s.size == 0:
        return np.empty(0, np.float64), np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    # The last position of each run of equal scores: cutting only there keeps ties on one side.
    last = np.append(np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1)
    tp = np.cumsum(y[order], dtype=np.int64)[last]
    fp = (last + 1).astype(np.int64) - tp
    return s_sorted[last], tp, fp


def choose_operating_point(y_true: ArrayLike, y_score: ArrayLike, target_contamination: float) -> OperatingPoint:
    """Choose the threshold with the highest completeness whose contamination is at most the target.

    Meant for validation data; freeze the result and measure it on the holdout with
    :func:`apply_operating_point`. Among the cuts reaching the largest feasible TP, the one with the
    fewest FP (the highest such threshold) is taken. If no cut with TP > 0 meets the target, the threshold
    is set just above the maximum score so nothing is selected, and ``feasible`` is False.

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.
        target_contamination: Contamination ceiling, in (0, 1).

    Returns:
        The chosen operating point. Its completeness is 0.0 when infeasible, or NaN if the data hold no
        positives at all.

    Raises:
        ValueError: If the target is not in (0, 1), the data are empty or otherwise invalid.
    """
    target = float(target_contamination)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_contamination must be in (0, 1), got {target_contamination!r}")
    thresholds, tp, fp = _cumulative_counts(y_true, y_score)
    if thresholds.size == 0:
        raise ValueError("cannot choose an operating point on empty data")
    n_pos, n_neg = int(tp[-1]), int(fp[-1])

    # Every cut selects at least one sample, so tp + fp > 0; cuts with tp == 0 are excluded explicitly
    # (they are contamination 1 anyway, since target < 1).
    feasible = (tp > 0) & (fp / (tp + fp) <= target)
    if not feasible.any():
        counts = ConfusionCounts(tp=0, fp=0, tn=n_neg, fn=n_pos)
        return OperatingPoint(
            threshold=float(np.nextafter(thresholds[0], np.inf)),
            target_contamination=target,
            completeness=0.0 if n_pos else math.nan,
            contamination=0.0,
            counts=counts,
            feasible=False,
        )
    best_tp = tp[feasible].max()
    # tp and fp are non-decreasing along the cuts, so the first cut with the best TP has the fewest FP
    # (and is itself feasible, having contamination no larger than any later cut with the same TP).
    i = int(np.flatnonzero(feasible & (tp == best_tp))[0])
    counts = ConfusionCounts(tp=int(tp[i]), fp=int(fp[i]), tn=n_neg - int(fp[i]), fn=n_pos - int(tp[i]))
    return OperatingPoint(
        threshold=float(thresholds[i]),
        target_contamination=target,
        completeness=completeness(counts),
        contamination=contamination(counts),
        counts=counts,
        feasible=True,
    )


def apply_operating_point(y_true: ArrayLike, y_score: ArrayLike, point: OperatingPoint) -> MeasuredPoint:
    """Measure a frozen operating point on (holdout) data, with 95% Wilson intervals.

    Only ``point.threshold`` is used; nothing is re-tuned on these data.

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.
        point: The operating point chosen on validation data.

    Returns:
        Counts, completeness and contamination at the threshold, with their Wilson intervals (NaN bounds
        where the denominator is zero).
    """
    counts = confusion_counts(y_true, y_score, point.threshold)
    return MeasuredPoint(
        threshold=point.threshold,
        counts=counts,
        completeness=completeness(counts),
        contamination=contamination(counts),
        completeness_ci=wilson_interval(counts.tp, counts.n_pos),
        contamination_ci=wilson_interval(counts.fp, counts.n_pred_pos),
    )


def completeness_efficiency_curve(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Completeness and efficiency at every distinct score cut, for plotting.

    Args:
        y_true: True labels, 0/1 integers or bools.
        y_score: Scores, larger meaning more likely positive.

    Returns:
        ``(thresholds, completeness, efficiency)`` with thresholds descending; completeness is all NaN
        when there are no positives.
    """
    thresholds, tp, fp = _cumulative_counts(y_true, y_score)
    n_pos = int(tp[-1]) if tp.size else 0
    # No positives: completeness is undefined at every cut, not 0.
    comp = tp / n_pos if n_pos else np.full(tp.shape, np.nan)
    # Every cut selects at least one sample, so the denominator is never zero.
    eff = tp / (tp + fp)
    return thresholds, comp.astype(np.float64), eff.astype(np.float64)
