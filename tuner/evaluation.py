"""Judging a trained model of the tasks beyond one positive class: regressions, multilabel, multiclass per class.

The rule is the binary one (see :func:`tuner.study.evaluate`): whatever is chosen (a threshold per label) is
chosen on validation, and the holdout only measures it, with intervals — Wilson for completeness and
contamination, the bootstrap for MAE, RMSE and R². Pure functions of numpy arrays; no torch, optuna or mlflow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tuner import metrics
from tuner.regression import STATISTICS, RegressionFigures, metric, regression_figures

_OPERATORS = {"==": "_eq_", "!=": "_ne_", ">=": "_ge_", "<=": "_le_", ">": "_gt_", "<": "_lt_"}


def objective_values(values: Sequence[float]) -> dict[str, float]:
    """A multi-objective trial's value per objective as MLflow metrics (``val_objective_0``, ...); nothing for
    one objective, whose value is ``val_objective`` alone."""
    return {f"val_objective_{i}": v for i, v in enumerate(values)} if len(values) > 1 else {}


def label_key(name: str) -> str:
    """A label or class name as part of an MLflow metric key (letters, digits, ``_ - . /`` and spaces only).

    ``class==QSO`` becomes ``class_eq_QSO``, ``redshift>1`` becomes ``redshift_gt_1``.
    """
    for op in sorted(_OPERATORS, key=len, reverse=True):
        name = name.replace(op, _OPERATORS[op])
    return re.sub(r"[^\w\-. /]", "_", name)


# --------------------------------------------------------------------------------------------------------------
# Regression


@dataclass(frozen=True)
class RegressionEvaluation:
    """A regression judged on validation (the objective) and measured on the holdout with bootstrap intervals."""

    objective: float
    validation: RegressionFigures
    holdout: RegressionFigures
    val_loss: float
    val_predictions: np.ndarray  # in the target's unit
    holdout_predictions: np.ndarray
    objectives: tuple[float, ...] = ()

    @property
    def values(self) -> tuple[float, ...]:
        return self.objectives or (self.objective,)

    def final_metrics(self) -> dict[str, float]:
        out = {"val_objective": self.objective}
        out.update(self.validation.as_metrics("val"))
        out.update(self.holdout.as_metrics("holdout"))
        out.update(objective_values(self.objectives))
        return out


def evaluate_regression(
    y_val: np.ndarray,
    val_predictions: np.ndarray,
    y_hold: np.ndarray,
    holdout_predictions: np.ndarray,
    objective_metrics: Sequence[str],
    val_loss: float,
) -> RegressionEvaluation:
    """MAE, RMSE, R² on validation (what the objective is made of) and on the holdout (with intervals)."""
    validation = regression_figures(y_val, val_predictions)
    holdout = regression_figures(y_hold, holdout_predictions, intervals=True)
    values = {"val_loss": val_loss, **{name: getattr(validation, name) for name in STATISTICS}}
    objectives = tuple(float(values[m]) for m in objective_metrics)
    return RegressionEvaluation(
        objective=objectives[0],
        validation=validation,
        holdout=holdout,
        val_loss=val_loss,
        val_predictions=val_predictions,
        holdout_predictions=holdout_predictions,
        objectives=objectives if len(objectives) > 1 else (),
    )


def regression_scorer(
    y_val: np.ndarray, unscale: Callable[[np.ndarray], np.ndarray], objective: str | None, key: str
) -> Callable[[np.ndarray], dict[str, float]]:
    """Per-epoch validation figure for pruning: the objective metric in the target's unit (not val_loss)."""

    def score(outputs: np.ndarray) -> dict[str, float]:
        if objective not in STATISTICS:
            return {}
        return {key: metric(objective, y_val, unscale(outputs[:, 0]))}

    return score


# --------------------------------------------------------------------------------------------------------------
# Multilabel


@dataclass(frozen=True)
class LabelFigures:
    """One label: its operating point chosen on validation and measured on the holdout."""

    name: str
    point: metrics.OperatingPoint
    holdout: metrics.MeasuredPoint
    val_auc: float
    val_ap: float
    holdout_auc: float


@dataclass(frozen=True)
class MultilabelEvaluation:
    """Each label judged like a binary task; the objective and the headline figures are macro averages."""

    objective: float
    labels: tuple[LabelFigures, ...]
    val_loss: float
    val_scores: np.ndarray  # (n, L) label probabilities
    holdout_scores: np.ndarray
    objectives: tuple[float, ...] = ()

    @property
    def values(self) -> tuple[float, ...]:
        return self.objectives or (self.objective,)

    @property
    def thresholds(self) -> list[float]:
        return [f.point.threshold for f in self.labels]

    def macro(self) -> dict[str, float]:
        """Means over the labels (NaN-aware: a label without a figure does not count)."""
        return macro_figures(self.labels)

    def final_metrics(self) -> dict[str, float]:
        out = {"val_objective": self.objective, **self.macro()}
        for f in self.labels:
            key, h = label_key(f.name), f.holdout
            out.update(
                {
                    f"threshold_{key}": f.point.threshold,
                    f"val_completeness_{key}": f.point.completeness,
                    f"val_contamination_{key}": f.point.contamination,
                    f"val_auc_{key}": f.val_auc,
                    f"holdout_completeness_{key}": h.completeness,
                    f"holdout_completeness_{key}_low": h.completeness_ci.low,
                    f"holdout_completeness_{key}_high": h.completeness_ci.high,
                    f"holdout_contamination_{key}": h.contamination,
                    f"holdout_contamination_{key}_low": h.contamination_ci.low,
                    f"holdout_contamination_{key}_high": h.contamination_ci.high,
                    f"holdout_auc_{key}": f.holdout_auc,
                }
            )
        out.update(objective_values(self.objectives))
        return out


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def macro_figures(labels: Sequence[LabelFigures]) -> dict[str, float]:
    """The labels' figures averaged over labels; a label without a figure (NaN) does not count."""
    return {
        "val_completeness": _finite_mean([f.point.completeness for f in labels]),
        "val_contamination": _finite_mean([f.point.contamination for f in labels]),
        "val_auc": _finite_mean([f.val_auc for f in labels]),
        "val_ap": _finite_mean([f.val_ap for f in labels]),
        "holdout_completeness": _finite_mean([f.holdout.completeness for f in labels]),
        "holdout_contamination": _finite_mean([f.holdout.contamination for f in labels]),
        "holdout_auc": _finite_mean([f.holdout_auc for f in labels]),
    }


def evaluate_multilabel(
    names: Sequence[str],
    y_val: np.ndarray,
    val_scores: np.ndarray,
    y_hold: np.ndarray,
    holdout_scores: np.ndarray,
    target_contamination: float,
    objective_metrics: Sequence[str],
    val_loss: float,
) -> MultilabelEvaluation:
    """Per label: the threshold for ``target_contamination`` chosen on validation, measured on the holdout."""
    figures = []
    for j, name in enumerate(names):
        yv, yh = y_val[:, j] > 0.5, y_hold[:, j] > 0.5
        point = metrics.choose_operating_point(yv, val_scores[:, j], target_contamination)
        figures.append(
            LabelFigures(
                name=name,
                point=point,
                holdout=metrics.apply_operating_point(yh, holdout_scores[:, j], point),
                val_auc=metrics.roc_auc(yv, val_scores[:, j]),
                val_ap=metrics.average_precision(yv, val_scores[:, j]),
                holdout_auc=metrics.roc_auc(yh, holdout_scores[:, j]),
            )
        )
    macro = macro_figures(figures)
    values = {
        "completeness_at_contamination": macro["val_completeness"],
        "roc_auc": macro["val_auc"],
        "average_precision": macro["val_ap"],
        "val_loss": val_loss,
    }
    objectives = tuple(float(values[m]) for m in objective_metrics)
    return MultilabelEvaluation(
        objective=objectives[0],
        labels=tuple(figures),
        val_loss=val_loss,
        val_scores=val_scores,
        holdout_scores=holdout_scores,
        objectives=objectives if len(objectives) > 1 else (),
    )


def multilabel_scorer(
    y_val: np.ndarray, target_contamination: float, objective: str | None, key: str, want: Sequence[str] = ()
) -> Callable[[np.ndarray], dict[str, float]]:
    """Per-epoch macro validation figures: the objective (for pruning) and ``val_auc`` / ``val_ap`` when wanted.

    A single-label task's positive class is one label: its figures are that label's own.
    """
    labels = [y_val[:, j] > 0.5 for j in range(y_val.shape[1])]

    def macro(fn: Callable[[np.ndarray, np.ndarray], float], probs: np.ndarray) -> float:
        return _finite_mean([fn(y, probs[:, j]) for j, y in enumerate(labels)])

    def score(probs: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        if objective == "roc_auc" or "val_auc" in want:
            out["val_auc"] = macro(metrics.roc_auc, probs)
        if objective == "average_precision" or "val_ap" in want:
            out["val_ap"] = macro(metrics.average_precision, probs)
        if objective == "completeness_at_contamination":
            out[key] = macro(
                lambda y, p: metrics.choose_operating_point(y, p, target_contamination).completeness, probs
            )
        elif objective == "roc_auc":
            out[key] = out["val_auc"]
        elif objective == "average_precision":
            out[key] = out["val_ap"]
        return out

    return score


# --------------------------------------------------------------------------------------------------------------
# Multiclass: every class's completeness and contamination


def per_class_figures(
    class_names: Sequence[str],
    y_val: np.ndarray,
    val_probs: np.ndarray,
    y_hold: np.ndarray,
    holdout_probs: np.ndarray,
) -> dict[str, float]:
    """Each class's completeness and contamination when every row goes to its most probable class.

    The decision (argmax) involves no threshold, so nothing is chosen on the holdout; holdout figures carry 95%
    Wilson intervals. Macro figures are the means over classes (a class never predicted has contamination 0).
    """
    out: dict[str, float] = {}
    parts = (("val", y_val, val_probs.argmax(axis=1)), ("holdout", y_hold, holdout_probs.argmax(axis=1)))
    macro: dict[str, list[float]] = {}
    for c, name in enumerate(class_names):
        key = label_key(name)
        for part, y, pred in parts:
            counts = metrics.confusion_counts(y == c, (pred == c).astype(np.float64), 0.5)
            completeness, contamination = metrics.completeness(counts), metrics.contamination(counts)
            out[f"{part}_completeness_{key}"] = completeness
            out[f"{part}_contamination_{key}"] = contamination
            macro.setdefault(f"{part}_macro_completeness", []).append(completeness)
            macro.setdefault(f"{part}_macro_contamination", []).append(contamination)
            if part == "holdout":
                for which, k, n in (
                    ("completeness", counts.tp, counts.n_pos),
                    ("contamination", counts.fp, counts.n_pred_pos),
                ):
                    ci = metrics.wilson_interval(k, n)
                    out[f"holdout_{which}_{key}_low"], out[f"holdout_{which}_{key}_high"] = ci.low, ci.high
    for part, y, pred in parts:
        out[f"{part}_accuracy"] = float(np.mean(y == pred)) if len(y) else math.nan
    for key, values in macro.items():
        out[key] = _finite_mean(values)
    return out
