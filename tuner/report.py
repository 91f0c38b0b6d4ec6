"""Figures (plotly) for a trial: learning curves, ROC, completeness vs efficiency with the operating point."""

from __future__ import annotations

from typing import Literal

import numpy as np
import plotly.graph_objects as go

from tuner import metrics

IncludeJs = Literal["cdn", "embed"]


def _html(fig: go.Figure, plotlyjs: IncludeJs) -> str:
    return str(fig.to_html(full_html=True, include_plotlyjs="cdn" if plotlyjs == "cdn" else True))


def learning_curves(history: list[dict[str, float]], best_epoch: int | None, title: str) -> go.Figure:
    """Training and validation loss per epoch, with the restored (best) epoch marked."""
    fig = go.Figure()
    epochs = list(range(len(history)))
    for key, name in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        fig.add_scatter(x=epochs, y=[h.get(key) for h in history], mode="lines+markers", name=name)
    if best_epoch is not None:
        fig.add_vline(x=best_epoch, line_dash="dash", annotation_text=f"restored epoch {best_epoch}")
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="loss", template="plotly_white")
    return fig


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> go.Figure:
    """ROC curves (one per data part), from ``{part: (y_true, score)}``."""
    fig = go.Figure()
    for part, (y, score) in curves.items():
        fpr, tpr, _ = metrics.roc_points(y, score)
        auc = metrics.roc_auc(y, score)
        fig.add_scatter(x=fpr, y=tpr, mode="lines", name=f"{part} (AUC {auc:.4f})")
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="chance")
    fig.update_layout(
        title=title,
        xaxis_title="false positive rate",
        yaxis_title="true positive rate (completeness)",
        template="plotly_white",
    )
    return fig


def completeness_efficiency_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float]],
    target_contamination: float,
    title: str,
) -> go.Figure:
    """Completeness against efficiency (1 - contamination), the frozen operating point marked on each part."""
    fig = go.Figure()
    for part, (y, score) in curves.items():
        _, comp, eff = metrics.completeness_efficiency_curve(y, score)
        fig.add_scatter(x=eff, y=comp, mode="lines", name=part)
    for part, (comp_at, cont_at) in points.items():
        fig.add_scatter(
            x=[1 - cont_at],
            y=[comp_at],
            mode="markers",
            marker={"size": 12, "symbol": "x"},
            name=f"{part} at frozen threshold",
        )
    fig.add_vline(x=1 - target_contamination, line_dash="dash", annotation_text="target efficiency")
    fig.update_layout(
        title=title, xaxis_title="efficiency (1 - contamination)", yaxis_title="completeness", template="plotly_white"
    )
    return fig


def trial_artifacts(
    history: list[dict[str, float]],
    best_epoch: int | None,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float]],
    target_contamination: float,
    label: str,
    plotlyjs: IncludeJs = "cdn",
) -> dict[str, str]:
    """The three HTML plots of a finished trial, keyed by artifact path."""
    return {
        "plots/learning_curves.html": _html(
            learning_curves(history, best_epoch, f"{label}: learning curves"), plotlyjs
        ),
        "plots/roc.html": _html(roc_figure(curves, f"{label}: ROC"), plotlyjs),
        "plots/completeness_efficiency.html": _html(
            completeness_efficiency_figure(
                curves, points, target_contamination, f"{label}: completeness vs efficiency"
            ),
            plotlyjs,
        ),
    }
