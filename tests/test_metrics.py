"""Tests for tuner.metrics: hand-worked examples, published Wilson values and a brute-force cross-check."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from tuner.metrics import (
    ConfusionCounts,
    Interval,
    OperatingPoint,
    apply_operating_point,
    average_precision,
    choose_operating_point,
    completeness,
    completeness_efficiency_curve,
    confusion_counts,
    contamination,
    efficiency,
    fpr,
    roc_auc,
    roc_points,
    tpr,
    wilson_interval,
)

# Hand-made validation set, scores descending (labels: 1 = quasar). Cut by cut (predict positive iff
# score >= t):
#   t    0.9  0.8  0.7  0.6  0.5  0.4  0.3  0.2  0.1
#   TP    1    2    2    3    4    4    5    5    5
#   FP    0    0    1    1    1    2    2    3    4
#   cont  0    0   1/3  1/4  1/5  1/3  2/7  3/8  4/9
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
LABELS = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0])

Z95 = 1.959963984540054  # the 0.975 standard-normal quantile


def wilson_closed_form(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927) score interval, written out independently of scipy."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------------------------
# confusion counts and rates


def test_confusion_counts_hand_example() -> None:
    assert confusion_counts(LABELS, SCORES, 0.5) == ConfusionCounts(tp=4, fp=1, tn=3, fn=1)
    # The threshold itself is included (>=), and bool labels work the same as ints.
    assert confusion_counts(LABELS.astype(bool), SCORES, 0.55) == ConfusionCounts(tp=3, fp=1, tn=3, fn=2)
    assert confusion_counts(LABELS, SCORES, 1.0) == ConfusionCounts(tp=0, fp=0, tn=4, fn=5)
    assert confusion_counts(LABELS, SCORES, 0.0) == ConfusionCounts(tp=5, fp=4, tn=0, fn=0)
    c = confusion_counts(LABELS, SCORES, 0.5)
    assert (c.n_pos, c.n_pred_pos) == (5, 5)


def test_rates_values() -> None:
    c = ConfusionCounts(tp=8, fp=2, tn=88, fn=2)
    assert completeness(c) == pytest.approx(0.8)
    assert tpr(c) == completeness(c)
    assert contamination(c) == pytest.approx(0.2)
    assert efficiency(c) == pytest.approx(0.8)
    assert fpr(c) == pytest.approx(2 / 90)


def test_rates_degenerate() -> None:
    empty_selection = ConfusionCounts(tp=0, fp=0, tn=5, fn=3)
    assert contamination(empty_selection) == 0.0
    assert efficiency(empty_selection) == 1.0
    assert completeness(empty_selection) == 0.0
    no_positives = ConfusionCounts(tp=0, fp=2, tn=5, fn=0)
    assert math.isnan(completeness(no_positives))
    assert contamination(no_positives) == 1.0
    assert math.isnan(fpr(ConfusionCounts(tp=3, fp=0, tn=0, fn=1)))


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="length"):
        confusion_counts([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="0/1"):
        confusion_counts([0, 2, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        confusion_counts([0, 1, 1], [0.1, np.nan, 0.3], 0.5)


# ------------------------------------------------------------------------------------------------------
# Wilson intervals


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (81, 263, 0.2553, 0.3662)],
)
def test_wilson_published_values(k: int, n: int, low: float, high: float) -> None:
    ref_low, ref_high = wilson_closed_form(k, n)
    # The closed form reproduces the published four-decimal values...
    assert ref_low == pytest.approx(low, abs=5e-5)
    assert ref_high == pytest.approx(high, abs=5e-5)
    # ...and the implementation reproduces the closed form to full precision.
    ci = wilson_interval(k, n)
    assert ci.low == pytest.approx(ref_low, abs=1e-12)
    assert ci.high == pytest.approx(ref_high, abs=1e-12)


def test_wilson_is_scipys_to_the_last_bit() -> None:
    from scipy.stats import binomtest

    for n in (1, 2, 7, 40, 170, 263, 1000, 100_000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for confidence in (0.68, 0.9, 0.95, 0.99):
                want = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
                ci = wilson_interval(k, n, confidence)
                assert (ci.low, ci.high) == (want.low, want.high), (k, n, confidence)


def test_wilson_other_confidence_and_edges() -> None:
    z90 = 1.6448536269514722
    ref = wilson_closed_form(3, 40, z=z90)
    ci = wilson_interval(3, 40, confidence=0.90)
    assert (ci.low, ci.high) == pytest.approx(ref, abs=1e-12)
    full = wilson_interval(10, 10)
    assert full.high == pytest.approx(1.0)
    assert full.low == pytest.approx(1 - 0.2775, abs=5e-5)
    empty = wilson_interval(0, 0)
    assert math.isnan(empty.low) and math.isnan(empty.high)
    for k, n, conf in [(-1, 5, 0.95), (6, 5, 0.95), (1, 5, 0.0), (1, 5, 1.0)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n, conf)


# ------------------------------------------------------------------------------------------------------
# choose_operating_point


@pytest.mark.parametrize(
    ("target", "threshold", "tp", "fp"),
    [
        (0.1, 0.8, 2, 0),  # only the pure cuts qualify; 0.8 has the most TP
        (0.2, 0.5, 4, 1),  # contamination exactly at the target is allowed
        (0.25, 0.5, 4, 1),  # 0.6 also qualifies (1/4) but 0.5 is more complete
        (0.3, 0.3, 5, 2),  # 2/7 < 0.3 reaches full completeness
        (0.5, 0.3, 5, 2),  # 0.2 and 0.1 are feasible too but add only FP
    ],
)
def test_operating_point_hand_example(target: float, threshold: float, tp: int, fp: int) -> None:
    point = choose_operating_point(LABELS, SCORES, target)
    assert point.feasible
    assert point.threshold == threshold
    assert point.target_contamination == target
    assert point.counts == ConfusionCounts(tp=tp, fp=fp, tn=4 - fp, fn=5 - tp)
    assert point.completeness == pytest.approx(tp / 5)
    assert point.contamination == pytest.approx(fp / (tp + fp))
    # The recorded counts are what the threshold really gives.
    assert confusion_counts(LABELS, SCORES, point.threshold) == point.counts


def test_operating_point_prefers_fewest_fp_at_equal_tp() -> None:
    # Cuts: 0.9 (1,0), 0.8 (2,0), 0.7 (2,1)=1/3, 0.6 (2,2)=1/2, 0.5 (2,3)=3/5. With target 0.5 the cuts at
    # 0.8, 0.7 and 0.6 all reach TP=2; the one with no FP must win.
    y = [1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.5]
    point = choose_operating_point(y, s, 0.5)
    assert point.threshold == 0.8
    assert point.counts == ConfusionCounts(tp=2, fp=0, tn=3, fn=0)


def test_operating_point_does_not_split_ties() -> None:
    # The three samples at 0.7 go together: cut 0.9 -> (1,0); cut 0.7 -> (3,1) = 1/4; cut 0.2 -> (3,2).
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.7, 0.7, 0.7, 0.2])
    point = choose_operating_point(y, s, 0.3)
    assert point.threshold == 0.7
    assert point.counts == ConfusionCounts(tp=3, fp=1, tn=1, fn=0)
    # Below 1/4 the tie cannot be entered, so only the 0.9 cut remains.
    point = choose_operating_point(y, s, 0.2)
    assert point.threshold == 0.9
    assert point.completeness == pytest.approx(1 / 3)
    # Input order must not matter (a tie's negative first or last).
    perm = np.array([3, 4, 1, 0, 2])
    assert choose_operating_point(y[perm], s[perm], 0.3) == choose_operating_point(y, s, 0.3)


def test_operating_point_infeasible_because_of_tie() -> None:
    # Splitting the tie at 0.8 would give a pure sample of two, but the tie holds a star: every cut is
    # contaminated by at least 1/4, so a 0.1 target is infeasible.
    y = [1, 1, 0, 1]
    s = [0.8, 0.8, 0.8, 0.3]
    point = choose_operating_point(y, s, 0.1)
    assert not point.feasible
    assert point.threshold == np.nextafter(0.8, np.inf)
    assert point.threshold > 0.8
    assert point.completeness == 0.0
    assert point.contamination == 0.0
    assert point.counts == ConfusionCounts(tp=0, fp=0, tn=1, fn=3)
    assert confusion_counts(y, s, point.threshold) == point.counts


def test_operating_point_infeasible_when_top_score_is_a_star() -> None:
    point = choose_operating_point([0, 1, 0, 1], [0.9, 0.5, 0.4, 0.1], 0.4)
    # Cuts: (0,1), (1,1)=1/2, (1,2), (2,2)=1/2: nothing reaches 0.4.
    assert not point.feasible
    assert point.counts.n_pred_pos == 0


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_operating_point_target_validation(target: float) -> None:
    with pytest.raises(ValueError, match="target_contamination"):
        choose_operating_point(LABELS, SCORES, target)


def test_operating_point_empty_data() -> None:
    with pytest.raises(ValueError, match="empty"):
        choose_operating_point([], [], 0.1)


def _brute_force(y: np.ndarray, s: np.ndarray, target: float) -> tuple[float | None, ConfusionCounts | None]:
    """Try every distinct score as a threshold; best = max TP, then min FP."""
    best: tuple[float | None, ConfusionCounts | None] = (None, None)
    for t in np.unique(s):
        c = confusion_counts(y, s, float(t))
        if c.tp == 0 or contamination(c) > target:
            continue
        cur = best[1]
        if cur is None or c.tp > cur.tp or (c.tp == cur.tp and c.fp < cur.fp):
            best = (float(t), c)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_operating_point_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 150
    y = rng.random(n) < 0.3
    # Informative but noisy scores, rounded so that ties occur across classes.
    s = np.round(np.clip(0.5 * y + rng.normal(0.25, 0.2, n), 0, 1), 2)
    distinct = np.unique(s)[::-1]
    for target in (0.02, 0.05, 0.1, 0.2, 0.35, 0.6):
        point = choose_operating_point(y.astype(int), s, target)
        bf_threshold, bf_counts = _brute_force(y, s, target)
        if bf_counts is None:
            assert not point.feasible
            assert point.counts.n_pred_pos == 0
            continue
        assert point.feasible
        assert point.threshold == bf_threshold
        assert point.counts == bf_counts
        assert point.contamination <= target
        # Lowering the threshold to the next distinct score either breaks the target or gains nothing.
        i = int(np.flatnonzero(distinct == point.threshold)[0])
        if i + 1 < distinct.size:
            lower = confusion_counts(y, s, float(distinct[i + 1]))
            assert contamination(lower) > target or completeness(lower) <= point.completeness


# ------------------------------------------------------------------------------------------------------
# apply_operating_point


def test_apply_operating_point_uses_only_the_frozen_threshold() -> None:
    point = choose_operating_point(LABELS, SCORES, 0.2)
    assert point.threshold == 0.5
    # Holdout where re-tuning for 0.2 would pick 0.35 (TP=4, FP=0); the frozen 0.5 must be used instead.
    y_hold = np.array([1, 0, 1, 1, 1, 0, 0, 0])
    s_hold = np.array([0.95, 0.6, 0.55, 0.4, 0.35, 0.3, 0.2, 0.1])
    assert choose_operating_point(y_hold, s_hold, 0.2).threshold == 0.35
    m = apply_operating_point(y_hold, s_hold, point)
    assert m.threshold == 0.5
    assert m.counts == ConfusionCounts(tp=2, fp=1, tn=3, fn=2)
    assert m.completeness == pytest.approx(0.5)
    assert m.contamination == pytest.approx(1 / 3)
    assert m.completeness_ci == wilson_interval(2, 4)
    assert m.contamination_ci == wilson_interval(1, 3)
    assert m.completeness_ci.low < m.completeness < m.completeness_ci.high


def test_apply_infeasible_point_selects_nothing() -> None:
    point = OperatingPoint(
        threshold=2.0,
        target_contamination=0.01,
        completeness=0.0,
        contamination=0.0,
        counts=ConfusionCounts(0, 0, 4, 5),
        feasible=False,
    )
    m = apply_operating_point(LABELS, SCORES, point)
    assert m.counts == ConfusionCounts(tp=0, fp=0, tn=4, fn=5)
    assert m.contamination == 0.0
    assert math.isnan(m.contamination_ci.low) and math.isnan(m.contamination_ci.high)
    assert m.completeness_ci == Interval(0.0, pytest.approx(wilson_closed_form(0, 5)[1], abs=1e-12))


# ------------------------------------------------------------------------------------------------------
# curves and threshold-free summaries


def test_completeness_efficiency_curve_hand_example() -> None:
    # Shuffle so the function has to sort, and duplicate a score to make a tie.
    y = np.array([0, 1, 1, 0, 1])
    s = np.array([0.2, 0.9, 0.5, 0.5, 0.1])
    thresholds, comp, eff = completeness_efficiency_curve(y, s)
    np.testing.assert_array_equal(thresholds, [0.9, 0.5, 0.2, 0.1])
    np.testing.assert_allclose(comp, [1 / 3, 2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(eff, [1.0, 2 / 3, 1 / 2, 3 / 5])
    for t, c, e in zip(thresholds, comp, eff, strict=True):
        counts = confusion_counts(y, s, float(t))
        assert completeness(counts) == pytest.approx(c)
        assert efficiency(counts) == pytest.approx(e)


def test_completeness_efficiency_curve_no_positives() -> None:
    thresholds, comp, eff = completeness_efficiency_curve([0, 0], [0.3, 0.7])
    np.testing.assert_array_equal(thresholds, [0.7, 0.3])
    assert np.isnan(comp).all()
    np.testing.assert_array_equal(eff, [0.0, 0.0])


def test_auc_and_ap_hand_example() -> None:
    # 16 of the 20 positive/negative pairs are ordered correctly.
    assert roc_auc(LABELS, SCORES) == pytest.approx(16 / 20)
    # Precision at each recovered positive: 1, 1, 3/4, 4/5, 5/7.
    assert average_precision(LABELS, SCORES) == pytest.approx((1 + 1 + 3 / 4 + 4 / 5 + 5 / 7) / 5)


def test_auc_equals_sklearns_with_and_without_tied_scores() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    y = rng.random(3000) < 0.05
    for scores in (rng.random(3000) + 0.2 * y, np.round(rng.random(3000) + 0.2 * y, 2)):  # the second: many ties
        assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_ap_is_sklearns_to_the_last_bit_with_and_without_tied_scores() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(5)
    for size, rate in [(3000, 0.05), (200, 0.3), (17, 0.5)]:
        y = rng.random(size) < rate
        y[:2] = [True, False]
        for scores in (rng.random(size) + 0.2 * y, np.round(rng.random(size) + 0.2 * y, 2)):  # the second: ties
            assert average_precision(y, scores) == float(average_precision_score(y, scores))
            assert average_precision(y.astype(int), scores.astype(np.float32)) == float(
                average_precision_score(y.astype(int), scores.astype(np.float32))
            )


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], [True, True, True]])
def test_auc_and_ap_single_class_is_nan(labels: list[int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(roc_auc(labels, [0.1, 0.5, 0.9]))
        assert math.isnan(average_precision(labels, [0.1, 0.5, 0.9]))


def test_roc_points_wraps_sklearn() -> None:
    f, t, thr = roc_points(LABELS, SCORES)
    assert f[0] == 0.0 and t[0] == 0.0 and f[-1] == 1.0 and t[-1] == 1.0
    assert np.all(np.diff(thr) < 0)
    assert np.trapezoid(t, f) == pytest.approx(roc_auc(LABELS, SCORES))
