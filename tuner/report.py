"""Seeing a study: plotly figures for a trial, the self-contained HTML study report, the table of trials.

A trial's figures (learning curves; ROC and completeness vs efficiency with the operating point, per label for a
multilabel task; predicted against true values for a regression) are logged with its MLflow run. The study report
gathers Optuna's study plots (``optuna.visualization``), the best trial and the runner-up side by side, and a
table of the top trials into one HTML file that embeds plotly.js once and so opens offline. :func:`trials_frame`
is every trial as one row, for ``tuner trials``.
"""

from __future__ import annotations

import contextlib
import functools
import html
import math
import re
import socket
import subprocess
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import optuna
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio

from tuner import metrics
from tuner.config import REGRESSION_TASKS
from tuner.errors import ConfigError, TunerError

if TYPE_CHECKING:
    import pandas as pd
    from optuna.trial import FrozenTrial

    from tuner.config import StudySpec
    from tuner.data.dataset import Dataset
    from tuner.tracking import MlflowRuns

IncludeJs = Literal["cdn", "embed"]


def _html(fig: go.Figure | dict[str, Any], plotlyjs: IncludeJs) -> str:
    """A figure as a full HTML page: a Figure, or the plain ``{"data", "layout"}`` spec it serialises to."""
    if isinstance(fig, dict):
        # A plain spec is written without plotly's validation, which costs more than the rest of a trial's
        # plotting (about 10 ms a figure); the specs here are built to plotly's schema and tested through
        # go.Figure, which does validate them.
        spec = {**fig, "layout": {**fig.get("layout", {})}}
        template = spec["layout"].get("template")
        if isinstance(template, str):
            spec["layout"]["template"] = _template(template)
        page = str(pio.to_html(spec, full_html=True, include_plotlyjs=plotlyjs != "cdn", validate=False))
    elif plotlyjs != "cdn":
        return str(fig.to_html(full_html=True, include_plotlyjs=True))
    else:
        page = str(fig.to_html(full_html=True, include_plotlyjs=False))
    if plotlyjs != "cdn":
        return page
    # plotly hashes its bundled plotly.js for the CDN tag's integrity attribute on every call (about 20 ms, most
    # of a trial's plotting time): make the tag once and put it where plotly would.
    return page.replace("<body>", f"<body>\n{_cdn_script_tag()}", 1)


@functools.cache
def _template(name: str) -> dict[str, Any]:
    return dict(pio.templates[name].to_plotly_json())


def _vline(x: float, text: str) -> dict[str, list[dict[str, Any]]]:
    """A dashed vertical line across the plot at ``x`` with a label at its top (plotly's add_vline, as layout)."""
    return {
        "shapes": [
            {
                "type": "line",
                "x0": x,
                "x1": x,
                "xref": "x",
                "y0": 0,
                "y1": 1,
                "yref": "y domain",
                "line": {"dash": "dash"},
            }
        ],
        "annotations": [
            {
                "x": x,
                "xref": "x",
                "y": 1,
                "yref": "y domain",
                "text": text,
                "showarrow": False,
                "xanchor": "left",
                "yanchor": "top",
            }
        ],
    }


def _scatter(**trace: Any) -> dict[str, Any]:
    return {"type": "scatter", **trace}


@functools.cache
def _cdn_script_tag() -> str:
    page = str(go.Figure().to_html(full_html=True, include_plotlyjs="cdn"))
    match = re.search(r"<script[^>]*src=\"https://cdn\.plot\.ly/[^>]*></script>", page)
    if match is None:
        raise RuntimeError("plotly's HTML holds no CDN script tag")
    return match.group(0)


def learning_curves_spec(
    history: list[dict[str, float]],
    best_epoch: int | None,
    title: str,
    objective: dict[int, float] | None = None,
    objective_name: str = "validation objective",
) -> dict[str, Any]:
    """Training and validation loss per epoch, with the restored (best) epoch marked, as a plain figure spec.

    Args:
        history: One mapping per epoch with ``train_loss`` and ``val_loss``.
        best_epoch: The epoch whose weights were kept, or None.
        title: Figure title.
        objective: The validation objective per epoch (Optuna's intermediate values), drawn on a second axis.
        objective_name: Its label.

    Returns:
        The figure's ``{"data", "layout"}``; :func:`learning_curves` gives it as a Figure.
    """
    epochs = list(range(len(history)))
    data = [
        _scatter(x=epochs, y=[h.get(key) for h in history], mode="lines+markers", name=name)
        for key, name in (("train_loss", "training loss"), ("val_loss", "validation loss"))
    ]
    layout: dict[str, Any] = {
        "title": {"text": title},
        "xaxis": {"title": {"text": "epoch"}},
        "yaxis": {"title": {"text": "loss"}},
        "template": "plotly_white",
    }
    if objective:
        steps = sorted(objective)
        data.append(
            _scatter(
                x=steps,
                y=[objective[s] for s in steps],
                mode="lines+markers",
                name=objective_name,
                yaxis="y2",
                line={"dash": "dot"},
            )
        )
        layout["yaxis2"] = {"title": {"text": objective_name}, "overlaying": "y", "side": "right", "showgrid": False}
        # Beside the plot the legend would cover the second axis: put it underneath.
        layout["legend"] = {"orientation": "h", "yanchor": "top", "y": -0.22, "x": 0}
    if best_epoch is not None:
        layout.update(_vline(best_epoch, f"restored epoch {best_epoch}"))
    return {"data": data, "layout": layout}


def learning_curves(
    history: list[dict[str, float]],
    best_epoch: int | None,
    title: str,
    objective: dict[int, float] | None = None,
    objective_name: str = "validation objective",
) -> go.Figure:
    """:func:`learning_curves_spec` as a Figure."""
    return go.Figure(learning_curves_spec(history, best_epoch, title, objective, objective_name))


def roc_spec(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> dict[str, Any]:
    """ROC curves (one per data part), from ``{part: (y_true, score)}``, as a plain figure spec."""
    data = []
    for part, (y, score) in curves.items():
        fpr, tpr, _ = metrics.roc_points(y, score)
        auc = metrics.roc_auc(y, score)
        data.append(_scatter(x=fpr, y=tpr, mode="lines", name=f"{part} (AUC {auc:.4f})"))
    data.append(_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="chance"))
    layout = {
        "title": {"text": title},
        "xaxis": {"title": {"text": "false positive rate"}},
        "yaxis": {"title": {"text": "true positive rate (completeness)"}},
        "template": "plotly_white",
    }
    return {"data": data, "layout": layout}


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> go.Figure:
    """:func:`roc_spec` as a Figure."""
    return go.Figure(roc_spec(curves, title))


def completeness_efficiency_spec(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float]],
    target_contamination: float,
    title: str,
) -> dict[str, Any]:
    """Completeness against efficiency (1 - contamination), the frozen operating point marked on each part."""
    data = []
    for part, (y, score) in curves.items():
        _, comp, eff = metrics.completeness_efficiency_curve(y, score)
        data.append(_scatter(x=eff, y=comp, mode="lines", name=part))
    for part, (comp_at, cont_at) in points.items():
        data.append(
            _scatter(
                x=[1 - cont_at],
                y=[comp_at],
                mode="markers",
                marker={"size": 12, "symbol": "x"},
                name=f"{part} at frozen threshold",
            )
        )
    layout = {
        "title": {"text": title},
        "xaxis": {"title": {"text": "efficiency (1 - contamination)"}},
        "yaxis": {"title": {"text": "completeness"}},
        "template": "plotly_white",
        **_vline(1 - target_contamination, "target efficiency"),
    }
    return {"data": data, "layout": layout}


def completeness_efficiency_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float]],
    target_contamination: float,
    title: str,
) -> go.Figure:
    """:func:`completeness_efficiency_spec` as a Figure."""
    return go.Figure(completeness_efficiency_spec(curves, points, target_contamination, title))


#: How a data part's curve is drawn when each label has a colour of its own.
_PART_DASH = {"validation": "dot", "holdout": "solid"}


def label_roc_figure(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], title: str) -> go.Figure:
    """ROC curves of a multilabel model, from ``{label: {part: (has_label, score)}}``: a colour per label, a dash
    per part."""
    fig = go.Figure()
    colours = plotly.colors.qualitative.Plotly
    for i, (label, parts) in enumerate(curves.items()):
        for part, (y, score) in parts.items():
            fpr, tpr, _ = metrics.roc_points(y, score)
            auc = metrics.roc_auc(y, score)
            fig.add_scatter(
                x=fpr,
                y=tpr,
                mode="lines",
                name=f"{label}, {part} (AUC {auc:.4f})",
                legendgroup=label,
                line={"color": colours[i % len(colours)], "dash": _PART_DASH.get(part, "solid")},
            )
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="chance")
    fig.update_layout(
        title=title,
        xaxis_title="false positive rate",
        yaxis_title="true positive rate (completeness)",
        template="plotly_white",
    )
    return fig


def label_completeness_efficiency_figure(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    points: dict[str, dict[str, tuple[float, float]]],
    target_contamination: float,
    title: str,
) -> go.Figure:
    """Completeness against efficiency of each label, its frozen operating point marked on each part.

    ``points`` is ``{label: {part: (completeness, contamination)}}`` at the label's threshold.
    """
    fig = go.Figure()
    colours = plotly.colors.qualitative.Plotly
    for i, (label, parts) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for part, (y, score) in parts.items():
            _, comp, eff = metrics.completeness_efficiency_curve(y, score)
            fig.add_scatter(
                x=eff,
                y=comp,
                mode="lines",
                name=f"{label}, {part}",
                legendgroup=label,
                line={"color": colour, "dash": _PART_DASH.get(part, "solid")},
            )
        for part, (comp_at, cont_at) in points.get(label, {}).items():
            fig.add_scatter(
                x=[1 - cont_at],
                y=[comp_at],
                mode="markers",
                marker={"size": 12, "symbol": "x" if part == "holdout" else "circle-open", "color": colour},
                name=f"{label}, {part} at frozen threshold",
                legendgroup=label,
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
        **_learning_curves_page(history, best_epoch, label, plotlyjs),
        **_score_plots(curves, points, target_contamination, label, plotlyjs),
    }


def _learning_curves_page(
    history: list[dict[str, float]], best_epoch: int | None, label: str, plotlyjs: IncludeJs
) -> dict[str, str]:
    return {
        "plots/learning_curves.html": _html(
            learning_curves_spec(history, best_epoch, f"{label}: learning curves"), plotlyjs
        )
    }


def prediction_spec(parts: dict[str, tuple[np.ndarray, np.ndarray]], target: str, title: str) -> dict[str, Any]:
    """Predicted against true values per data part, the diagonal marked: a regression's residuals at a glance."""
    data = []
    low, high = math.inf, -math.inf
    for part, (y, predicted) in parts.items():
        rmse = float(np.sqrt(np.mean((np.asarray(y) - np.asarray(predicted)) ** 2))) if len(y) else math.nan
        data.append(
            _scatter(
                x=y, y=predicted, mode="markers", marker={"size": 4, "opacity": 0.5}, name=f"{part} (RMSE {rmse:.4g})"
            )
        )
        if len(y):
            low = min(low, float(np.min(y)), float(np.min(predicted)))
            high = max(high, float(np.max(y)), float(np.max(predicted)))
    if math.isfinite(low):
        data.append(
            _scatter(x=[low, high], y=[low, high], mode="lines", line={"dash": "dot", "color": "grey"}, name="perfect")
        )
    layout = {
        "title": {"text": title},
        "xaxis": {"title": {"text": f"true {target}"}},
        "yaxis": {"title": {"text": f"predicted {target}"}},
        "template": "plotly_white",
    }
    return {"data": data, "layout": layout}


def prediction_figure(parts: dict[str, tuple[np.ndarray, np.ndarray]], target: str, title: str) -> go.Figure:
    """:func:`prediction_spec` as a Figure."""
    return go.Figure(prediction_spec(parts, target, title))


def regression_artifacts(
    history: list[dict[str, float]],
    best_epoch: int | None,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    target: str,
    label: str,
    plotlyjs: IncludeJs = "cdn",
) -> dict[str, str]:
    """The HTML plots of a finished regression trial: learning curves and predicted against true values."""
    return {
        **_learning_curves_page(history, best_epoch, label, plotlyjs),
        "plots/predicted_vs_true.html": _html(
            prediction_spec(parts, target, f"{label}: predicted vs true {target}"), plotlyjs
        ),
    }


def _score_plots(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float]],
    target_contamination: float,
    label: str,
    plotlyjs: IncludeJs,
) -> dict[str, str]:
    """ROC and completeness vs efficiency of a trial's scores, keyed by artifact path."""
    return {
        "plots/roc.html": _html(roc_spec(curves, f"{label}: ROC"), plotlyjs),
        "plots/completeness_efficiency.html": _html(
            completeness_efficiency_spec(curves, points, target_contamination, f"{label}: completeness vs efficiency"),
            plotlyjs,
        ),
    }


def fold_learning_curves(
    histories: list[list[dict[str, float]]], best_epochs: list[int | None], title: str
) -> go.Figure:
    """Training and validation loss per epoch of each fold model of a cross-validated trial, restored epochs marked."""
    fig = go.Figure()
    colours = plotly.colors.qualitative.Plotly  # one colour per fold, training and validation alike
    for i, (history, best) in enumerate(zip(histories, best_epochs, strict=True)):
        colour = colours[i % len(colours)]
        epochs = list(range(len(history)))
        for key, name, dash in (("train_loss", "training", "dot"), ("val_loss", "validation", "solid")):
            fig.add_scatter(
                x=epochs,
                y=[h.get(key) for h in history],
                mode="lines",
                name=f"fold {i} {name} loss",
                legendgroup=f"fold {i}",
                line={"color": colour, "dash": dash},
            )
        if best is not None and best < len(history):
            fig.add_scatter(
                x=[best],
                y=[history[best].get("val_loss")],
                mode="markers",
                marker={"color": colour, "size": 10, "symbol": "x"},
                name=f"fold {i} restored epoch {best}",
                legendgroup=f"fold {i}",
            )
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="loss", template="plotly_white")
    return fig


def crossval_trial_artifacts(
    histories: list[list[dict[str, float]]],
    best_epochs: list[int | None],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    points: dict[str, tuple[float, float]],
    target_contamination: float,
    label: str,
    plotlyjs: IncludeJs = "cdn",
) -> dict[str, str]:
    """The three HTML plots of a finished cross-validated trial, keyed by artifact path (as :func:`trial_artifacts`).

    The learning curves show every fold model; ROC and completeness-vs-efficiency show the out-of-fold scores and
    the holdout scored by the fold models' mean.
    """
    return {
        "plots/learning_curves.html": _html(
            fold_learning_curves(histories, best_epochs, f"{label}: learning curves per fold"), plotlyjs
        ),
        **_score_plots(curves, points, target_contamination, label, plotlyjs),
    }


# --------------------------------------------------------------------------------------------------------------
# The study report

#: The report's sections, in order: key (the HTML id) -> heading.
SECTION_TITLES: dict[str, str] = {
    "facts": "Study facts",
    "history": "Optimization history",
    "intermediate": "Intermediate values",
    "importance": "Hyperparameter importances",
    "parallel": "Parallel coordinates",
    "slice-contour": "Slice and contour of the top pair",
    "pareto": "Pareto front",
    "compare": "Best trial and runner-up",
    "top": "Top trials",
}
#: Where the report goes in the study's parent MLflow run.
REPORT_ARTIFACT = "report/study_report.html"

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_STATE_STYLE = {
    "COMPLETE": ("completed", "rgba(31,119,180,0.45)"),
    "PRUNED": ("pruned (cut short)", "rgba(255,127,14,0.75)"),
    "FAIL": ("failed", "rgba(214,39,40,0.75)"),
}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1500px;
  padding:1rem 2rem;color:#1f2933}
h1{margin-bottom:.2rem} .sub{color:#52606d;margin-top:0}
nav{margin:.8rem 0} nav a{margin-right:1rem;color:#1f5fa8;text-decoration:none}
section{margin:1.5rem 0;border-top:1px solid #d9e2ec;padding-top:.3rem}
table{border-collapse:collapse;font-size:.86rem;margin:.5rem 0;max-width:100%}
td,th{border:1px solid #d9e2ec;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f0f4f8} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.key{font-weight:600;white-space:nowrap} td.params{min-width:16rem}
td.mono{font-family:monospace;font-size:.8rem;word-break:break-all}
/* Two fixed columns: plotly sizes a figure once, when its script runs, before the second column exists. */
.pair{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1.5rem} .pair>div{min-width:0}
.note{color:#7c5e10;background:#fffbea;padding:.35rem .6rem;border-left:3px solid #f0b429}
.figure{min-height:320px} footer{color:#7b8794;font-size:.8rem;margin:2rem 0}
"""


@dataclass
class Section:
    """One ``<h2>`` section of the report: HTML fragments in order."""

    key: str
    parts: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return SECTION_TITLES[self.key]

    def note(self, text: str) -> None:
        """Add a visible remark (why something is missing or approximate)."""
        self.parts.append(f'<p class="note">{html.escape(text)}</p>')

    def figure(self, fig: go.Figure, name: str, height: int = 450) -> None:
        """Add a plotly figure (its data only: plotly.js is embedded once, in the page head)."""
        self.parts.append(figure_div(fig, f"fig-{self.key}-{name}", height))

    def html(self) -> str:
        return f'<section id="{self.key}"><h2>{html.escape(self.title)}</h2>\n' + "\n".join(self.parts) + "</section>"


@dataclass
class Report:
    """A rendered study report and what could not go into it."""

    html: str
    warnings: list[str] = field(default_factory=list)


def figure_div(fig: go.Figure, div_id: str, height: int = 450) -> str:
    """A figure as a ``<div>`` with its ``Plotly.newPlot`` call; no plotly.js."""

    fig.update_layout(height=height)
    body = pio.to_html(
        fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=_PLOT_CONFIG, default_height=height
    )
    return f'<div class="figure">{body}</div>'


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 4) -> str:
    """A number for people: ``digits`` significant digits; a dash when there is none (None, NaN)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    """An HTML table; ``classes[i]`` is the CSS class of column i (``num``, ``params``, ``mono``)."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>"
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
            cells.append(f"<td{cls}>{_esc(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def objective_names(study: optuna.Study, spec: StudySpec) -> list[str]:
    """A name per objective: the study's metric names, else the spec's objective metric."""
    if study.metric_names:
        return list(study.metric_names)
    if len(study.directions) == 1:
        return [spec.objective.metrics[0]]
    return [f"objective {i}" for i in range(len(study.directions))]


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, best first by the (first) objective; ties go to the earlier trial."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
    return sorted(complete, key=lambda t: (sign * t.values[0], t.number))


def trial_params(trial: FrozenTrial, spec: StudySpec) -> Any:
    """The trial's :class:`~tuner.space.TrialParams` (batch size as used, fixed values included), or None.

    None when the trial holds no parameters yet (waiting or just started).
    """
    from tuner.space import suggest

    try:
        return suggest(trial, spec.search_space)
    except (ValueError, KeyError):  # FrozenTrial.suggest_* raise for a parameter the trial never drew
        return None


def _params_text(trial: FrozenTrial, spec: StudySpec) -> str:
    params = trial_params(trial, spec)
    if params is None:
        return ", ".join(f"{k}={_num(v, 3)}" for k, v in trial.params.items())
    widths = "×".join(str(w) for w in params.widths)
    text = (
        f"{widths} {params.activation} {params.optimizer}, lr {_num(params.lr, 3)}, momentum "
        f"{_num(params.momentum, 3)}, dropout {_num(params.dropout, 3)}, weight decay {_num(params.weight_decay, 3)}, "
        f"batch {params.batch_size}, init {params.init}, batch norm {'on' if params.batch_norm else 'off'}"
    )
    # A regression's loss and the L1 penalty, only where the search space sets them.
    if params.loss is not None:
        text += f", loss {params.loss}"
        if params.huber_delta is not None:
            text += f" (delta {_num(params.huber_delta, 3)})"
    if params.l1 is not None:
        text += f", L1 {_num(params.l1, 3)}"
    return text


def _class_names(study: optuna.Study) -> list[str]:
    """The classes in model order, read back from the study's recorded class counts (``name=count, ...``)."""
    counts = str(study.user_attrs.get("tuner.data", {}).get("data.class_counts", ""))
    return re.findall(r"(?:^|, )(.+?)=\d+(?=, |$)", counts)


def _per_class(study: optuna.Study, spec: StudySpec) -> list[tuple[str, str]]:
    """(class, metric key) of each class whose holdout figures a multiclass study's trials carry, in class order.

    Empty for the other tasks, and for a multiclass study whose trials carry no per-class figures.
    """
    from tuner.evaluation import label_key

    if spec.task != "multiclass":
        return []
    attrs = [t.user_attrs for t in study.get_trials(deepcopy=False)]
    if not any("holdout_macro_completeness" in a for a in attrs):
        return []
    names = _class_names(study)
    if names:
        return [(name, label_key(name)) for name in names]
    # No recorded class counts: the classes the trials were measured on, by their keys.
    found = {
        m.group(1)
        for a in attrs
        for k in a
        if (m := re.fullmatch(r"holdout_completeness_(.+)_low", k)) and m.group(1) != "at_threshold"
    }
    return [(key, key) for key in sorted(found)]


def _labels(spec: StudySpec) -> list[tuple[str, str]]:
    """(label, metric key) of each label of a multilabel study, in output order; empty for the other tasks."""
    from tuner.evaluation import label_key

    return [(name, label_key(name)) for name in spec.data.targets] if spec.task == "multilabel" else []


def _is_regression(spec: StudySpec) -> bool:
    return spec.task in REGRESSION_TASKS


def _model_figures(spec: StudySpec) -> str:
    """What the report draws from a trial's model, for notes about leaving it out."""
    if _is_regression(spec):
        return "predicted-vs-true plots"
    if spec.task == "multilabel":
        return "per-label ROC and completeness curves"
    return "ROC and completeness curves"


def _task_text(study: optuna.Study, spec: StudySpec) -> str:
    """The study's task and what it predicts, for the facts."""
    task, data = spec.task, spec.data
    if task == "binary":
        return f"binary, positive class {data.positive}"
    if task == "multiclass":
        classes = _class_names(study)
        listed = f" ({len(classes)} classes: {', '.join(classes)})" if classes else ""
        if data.positive:
            return f"multiclass{listed}, positive class {data.positive}"
        first = classes[0] if classes else "the first class"
        return f"multiclass{listed}, no positive class: threshold and curves are those of {first}"
    if task == "multilabel":
        return f"multilabel, {len(data.targets)} labels: {', '.join(data.targets)} (a sigmoid and a threshold each)"
    target = data.targets[0]
    if task == "regression":
        return (
            f"regression of {target} (linear output, trained on {target} standardised with the training rows' "
            f"mean and standard deviation; every figure in {target}'s own unit)"
        )
    return f"unit_regression of {target} (sigmoid output in [0, 1])"


def study_facts(study: optuna.Study, spec: StudySpec) -> list[tuple[str, str]]:
    """What the study is and how far it got, as (label, text) rows."""
    from tuner.tracking import mask_password

    trials = study.get_trials(deepcopy=False)
    data = study.user_attrs.get("tuner.data", {})
    by_state: dict[str, int] = {}
    for t in trials:
        by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
    ranked = ranked_trials(study)
    names = objective_names(study, spec)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    busy = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    wall = (
        f"{_duration((max(ends) - min(starts)).total_seconds())} from the first trial's start to the last one's end "
        f"({_duration(busy)} inside trials)"
        if starts and ends
        else "no finished trial"
    )

    train = spec.train
    parent = study.user_attrs.get("tuner.mlflow_parent_run_id", "none")

    def options(values: dict[str, Any]) -> str:
        return f" {values}" if values else ""

    objective = ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(names, study.directions, strict=True))
    if spec.task == "multilabel":
        objective += f"; target contamination {spec.objective.target_contamination:g} per label"
    elif not _is_regression(spec):
        objective += f"; target contamination {spec.objective.target_contamination:g}"
    if _is_regression(spec):
        target_row = ("target", data.get("data.target", "not recorded"))
    elif spec.task == "multilabel":
        target_row = ("label counts", data.get("data.label_counts", "not recorded"))
    else:
        target_row = ("class counts", data.get("data.class_counts", "not recorded"))
    rows = [
        ("study", study.study_name),
        ("task", _task_text(study, spec)),
        ("objective", objective),
        ("trials by state", ", ".join(f"{s} {n}" for s, n in sorted(by_state.items())) or "none"),
        ("best trial", f"#{ranked[0].number}: {_num(ranked[0].values[0], 5)}" if ranked else "none completed"),
        ("sampler", f"{spec.study.sampler}{options(spec.study.sampler_options)}, seed {spec.study.seed}"),
        ("pruner", f"{spec.study.pruner}{options(spec.study.pruner_options)}"),
        ("wall time", wall),
        ("data source", data.get("data.source", spec.data.source)),
        ("data hash", data.get("data.hash", "not recorded")),
        ("rows", data.get("data.rows", "not recorded")),
        target_row,
        ("split sizes", data.get("data.split_sizes", "not recorded")),
        ("features", data.get("data.features", ", ".join(spec.data.features))),
        ("preprocessing", spec.data.preprocess),
        ("training", f"max {train.max_epochs} epochs, patience {train.patience}, monitor {train.monitor}"),
        ("MLflow", f"{mask_password(spec.tracking.uri)}, parent run {parent}"),
    ]
    return rows


def intermediate_values_figure(
    study: optuna.Study, objective_name: str, best: int | None, step: str = "epoch"
) -> go.Figure:
    """The validation objective per epoch (per ``step``: ``fold`` in a k-fold study) of every trial, by state.

    Pruned trials end in a cross.

    Hand-written rather than ``optuna.visualization.plot_intermediate_values``: Optuna draws one trace per trial
    in one colour, so a pruned trial cannot be told from one that stopped early, and restyling its 1,000 traces
    took 5 s (bench/bench_report.py) and made the page slow to draw. Here each state is one trace, trials
    separated by gaps, and every point still names its trial.
    """
    groups: dict[str, tuple[list[Any], list[Any], list[Any]]] = {}
    counts: dict[str, int] = {}
    ends: tuple[list[Any], list[Any], list[str]] = ([], [], [])
    best_curve: tuple[list[int], list[float]] | None = None
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        if t.number == best:
            best_curve = (steps, values)
        xs, ys, texts = groups.setdefault(t.state.name, ([], [], []))
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
        xs += [*steps, None]
        ys += [*values, None]
        texts += [f"trial {t.number}"] * len(steps) + [None]
        if t.state.name == "PRUNED":
            ends[0].append(steps[-1])
            ends[1].append(values[-1])
            ends[2].append(f"trial {t.number} pruned after {step} {steps[-1]}")
    fig = go.Figure()
    order = ["COMPLETE", "FAIL", "PRUNED"]
    for state in sorted(groups, key=lambda name: order.index(name) if name in order else len(order)):
        xs, ys, texts = groups[state]
        label, color = _STATE_STYLE.get(state, (state.lower(), "rgba(120,120,120,0.6)"))
        fig.add_scatter(
            x=xs,
            y=ys,
            text=texts,
            mode="lines",
            name=f"{label}: {counts[state]}",
            line={"color": color, "width": 1},
            hovertemplate=f"%{{text}} ({state.lower()})<br>{step} %{{x}}: %{{y:.4g}}<extra></extra>",
        )
    if best_curve is not None:  # drawn last, on top
        fig.add_scatter(
            x=best_curve[0],
            y=best_curve[1],
            mode="lines+markers",
            name=f"best: trial {best}",
            line={"color": "rgb(20,20,20)", "width": 3},
            hovertemplate=f"trial {best} (best)<br>{step} %{{x}}: %{{y:.4g}}<extra></extra>",
        )
    if ends[0]:
        fig.add_scatter(
            x=ends[0],
            y=ends[1],
            text=ends[2],
            mode="markers",
            marker={"symbol": "x", "size": 8, "color": "rgb(230,110,0)"},
            name="pruned here",
            hoverinfo="text",
        )
    fig.update_layout(
        title=f"Validation objective per {step} (Optuna's intermediate values)",
        xaxis_title=step,
        yaxis_title=objective_name,
        template="plotly_white",
    )
    return fig


def importance_figure(importances: dict[str, float], target_name: str) -> go.Figure:
    """Parameter importances as horizontal bars, the most important on top.

    Hand-written rather than ``optuna.visualization.plot_param_importances``: for its hover text Optuna copies
    every trial once per parameter, 7 s of a 1,000-trial report (bench/bench_report.py), to show a
    distribution's name.
    """
    names = list(importances)[::-1]
    fig = go.Figure(
        go.Bar(
            x=[importances[n] for n in names],
            y=names,
            orientation="h",
            text=[f"{importances[n]:.2f}" for n in names],
            textposition="outside",
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Hyperparameter importances for {target_name} (Optuna's default evaluator, PED-ANOVA)",
        xaxis_title="importance (normalised to sum to 1)",
        yaxis_title="parameter",
        template="plotly_white",
    )
    return fig


def param_importances(
    study: optuna.Study, target: Callable[[FrozenTrial], float] | None
) -> tuple[dict[str, float], list[str]]:
    """Optuna's parameter importances (its default evaluator), most important first, and remarks.

    Returns:
        The importances (empty when they cannot be computed) and why, or Optuna's warnings about them.
    """
    n = len(ranked_trials(study))
    if n < 2:
        return {}, [f"importances need at least 2 completed trials; this study has {n}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study, target=target)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            return {}, [f"importances could not be computed: {exc}"]
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    return dict(sorted(values.items(), key=lambda kv: -kv[1])), notes


def _ci(attrs: dict[str, Any], key: str) -> str:
    """A recorded figure with its 95% interval (``key``, ``key_low``, ``key_high``); a dash when not recorded."""
    if key not in attrs:
        return "–"
    return f"{_num(attrs[key])} [{_num(attrs.get(key + '_low'))}, {_num(attrs.get(key + '_high'))}]"


Cell = Callable[[dict[str, Any]], str]


def _top_columns(study: optuna.Study, spec: StudySpec) -> list[tuple[str, Cell]]:
    """The holdout columns of the top-trials table for the study's task: (heading, cell from user attributes)."""

    def value(key: str) -> Cell:
        return lambda a: _num(a.get(key))

    def interval(key: str) -> Cell:
        return lambda a: _ci(a, key)

    def label_cell(key: str) -> Cell:
        return lambda a: f"{_ci(a, f'holdout_completeness_{key}')}; {_ci(a, f'holdout_contamination_{key}')}"

    if _is_regression(spec):
        return [
            ("holdout MAE [95% CI]", interval("holdout_mae")),
            ("holdout RMSE [95% CI]", interval("holdout_rmse")),
            ("holdout R² [95% CI]", interval("holdout_r2")),
            ("validation MAE, RMSE, R²", lambda a: ", ".join(_num(a.get(f"val_{m}")) for m in ("mae", "rmse", "r2"))),
        ]
    if spec.task == "multilabel":
        columns: list[tuple[str, Cell]] = [
            ("holdout completeness, macro", value("holdout_completeness")),
            ("holdout contamination, macro", value("holdout_contamination")),
            ("holdout AUC, macro", value("holdout_auc")),
        ]
        for name, key in _labels(spec):
            columns.append((f"{name}: holdout completeness; contamination [95% CI]", label_cell(key)))
        return columns
    columns = [
        ("holdout completeness [95% CI]", interval("holdout_completeness")),
        ("holdout contamination [95% CI]", interval("holdout_contamination")),
        ("holdout AUC", value("holdout_auc")),
        ("threshold", value("threshold")),
    ]
    if _per_class(study, spec):
        columns += [
            ("holdout accuracy", value("holdout_accuracy")),
            ("holdout completeness, macro over classes", value("holdout_macro_completeness")),
            ("holdout contamination, macro over classes", value("holdout_macro_contamination")),
        ]
    return columns


def study_sections(study: optuna.Study, spec: StudySpec, *, top: int = 10) -> list[Section]:
    """Every section of the report except the best-trial comparison (which needs the models).

    Args:
        study: The study.
        spec: The spec the study was created with.
        top: Rows in the top-trials table.

    Returns:
        The sections, in report order (the comparison belongs before "top").
    """
    from optuna import visualization as vis

    names = objective_names(study, spec)
    multi = len(study.directions) > 1
    # Optuna's study plots need a single target; with several objectives they show the first.
    target: Callable[[FrozenTrial], float] | None = (lambda t: t.values[0]) if multi else None
    target_name = names[0]
    ranked = ranked_trials(study)
    best = ranked[0].number if ranked else None
    sections: list[Section] = []

    facts = Section("facts")
    facts.parts.append(_table(None, study_facts(study, spec), ("key",)))
    sections.append(facts)

    history = Section("history")
    intermediate = Section("intermediate")
    importance = Section("importance")
    parallel = Section("parallel")
    pair = Section("slice-contour")
    sections += [history, intermediate, importance, parallel, pair]
    if not ranked:
        for section in (history, importance, parallel, pair):
            section.note("no completed trial yet")
    else:
        history.figure(vis.plot_optimization_history(study, target=target, target_name=target_name), "history")
        importances, notes = param_importances(study, target)
        for text in notes:
            importance.note(text)
        if importances:
            fig = importance_figure(importances, target_name)
            importance.figure(fig, "importances", height=max(300, 60 + 28 * len(importances)))
        parallel.figure(vis.plot_parallel_coordinate(study, target=target, target_name=target_name), "parallel")
        top_pair = list(importances)[:2]
        if not top_pair:
            pair.note("no parameter importances, so no top pair to show")
        else:
            pair.parts.append(f'<p>Most important: {_esc(", ".join(top_pair))}.</p><div class="pair">')
            pair.figure(vis.plot_slice(study, params=top_pair, target=target, target_name=target_name), "slice")
            if len(top_pair) == 2:
                contour = vis.plot_contour(study, params=top_pair, target=target, target_name=target_name)
                pair.figure(contour, "contour")
            else:
                pair.note("a contour needs two tuned parameters; the study has one")
            pair.parts.append("</div>")
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        step = "fold" if spec.validation.kind == "kfold" else "epoch"
        intermediate.figure(intermediate_values_figure(study, target_name, best, step), "intermediate", height=500)
    else:
        intermediate.note("no trial reported intermediate values")

    if multi:
        pareto = Section("pareto")
        if ranked:
            pareto.figure(vis.plot_pareto_front(study, target_names=names), "pareto")
        else:
            pareto.note("no completed trial yet")
        sections.append(pareto)

    table = Section("top")
    columns = _top_columns(study, spec)
    rows = []
    for rank, trial in enumerate(ranked[:top], start=1):
        a = trial.user_attrs
        rows.append(
            (
                rank,
                trial.number,
                ", ".join(_num(v, 5) for v in trial.values),
                *(cell(a) for _, cell in columns),
                f"{a.get('epochs', '–')} ({a.get('best_epoch', '–')})",
                _params_text(trial, spec),
                a.get("mlflow_run_id", "–"),
            )
        )
    header = (
        "rank",
        "trial",
        "objective" if len(names) == 1 else "objectives",
        *(title for title, _ in columns),
        "epochs (best)",
        "parameters",
        "MLflow run",
    )
    if rows:
        table.parts.append(_table(header, rows, ("num",) * (len(columns) + 4) + ("params", "mono")))
        n_complete = len(ranked)
        if n_complete > top:
            table.parts.append(f"<p>{top} of {n_complete} completed trials; <code>tuner trials</code> lists all.</p>")
    else:
        table.note("no completed trial yet")
    sections.append(table)
    return sections


@dataclass
class TrialEvidence:
    """What the comparison shows of one trial: its curves, and its scores at the frozen threshold.

    Attributes:
        trial: The Optuna trial.
        history: Per-epoch ``train_loss`` / ``val_loss`` (empty when unknown).
        curves: ``{"validation"|"holdout": (is_positive, score)}``; empty when the model could not be had.
        counts: Confusion counts at the frozen threshold, per part.
        labels: Multilabel: ``{label: {part: (has_label, score)}}``.
        label_counts: Multilabel: confusion counts at each label's frozen threshold, ``{label: {part: counts}}``.
        predictions: Regression: ``{part: (true, predicted)}`` in the target's own unit.
        positive: The class whose scores ``curves`` holds (the first class of a multiclass task without one).
        source: Where the model came from.
        notes: What is missing or approximate, and why.
    """

    trial: FrozenTrial
    history: list[dict[str, float]] = field(default_factory=list)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    counts: dict[str, metrics.ConfusionCounts] = field(default_factory=dict)
    labels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    label_counts: dict[str, dict[str, metrics.ConfusionCounts]] = field(default_factory=dict)
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    positive: str = ""
    source: str = ""
    notes: list[str] = field(default_factory=list)


def study_dataset(study: optuna.Study, spec: StudySpec) -> Dataset:
    """The study's data, rebuilt on the CPU and checked against the hash the study recorded.

    Raises:
        DataError: The catalogue cannot be read, or it is not the one the study was run on.
    """
    from tuner.data.dataset import LAYOUT_ATTR, build_dataset
    from tuner.errors import DataError

    dataset = build_dataset(spec, "cpu", recorded=study.user_attrs.get(LAYOUT_ATTR))
    recorded = study.user_attrs.get("tuner.data", {}).get("data.hash")
    if recorded and recorded != dataset.catalogue.data_hash:
        raise DataError(
            f"data.source: {dataset.catalogue.source} now hashes to {dataset.catalogue.data_hash}, but study "
            f"{study.study_name!r} was run on data with hash {recorded}; the curves would not describe its trials"
        )
    return dataset


def _model_meta(runs: MlflowRuns, run_id: str, dataset: Dataset, workdir: Path) -> dict[str, Any]:
    """A run's ``model.json``, checked against the study's data: same features, task and labels.

    Raises:
        DataError: The run's model was trained on other features or labels.
        TrackingError: The run holds a model of another task, or no readable description.
    """
    import json

    from tuner.errors import DataError, TrackingError
    from tuner.study import MODEL_META_ARTIFACT

    try:
        meta = json.loads(runs.download(run_id, MODEL_META_ARTIFACT, workdir).read_text())
    except (OSError, ValueError) as exc:
        raise TrackingError(f"{MODEL_META_ARTIFACT} of run {run_id} cannot be read: {exc}") from None
    if list(meta["feature_names"]) != list(dataset.catalogue.feature_names):
        raise DataError(
            f"data.features: run {run_id} was trained on {meta['feature_names']}, the study's data has "
            f"{list(dataset.catalogue.feature_names)}"
        )
    task = meta.get("task", "binary")
    if task != dataset.task:
        raise TrackingError(f"run {run_id} holds a {task} model, but the study's task is {dataset.task}")
    targets = list(dataset.catalogue.target_names)
    if "target_names" in meta and list(meta["target_names"]) != targets:
        # The outputs follow the labels' order: another order would mislabel every curve.
        raise DataError(
            f"data.target: run {run_id} was trained on {meta['target_names']}, the study's data has {targets}"
        )
    return meta


def _n_outputs(meta: dict[str, Any]) -> int:
    """Units of the stored model's last layer; written to model.json for every task but binary and multiclass."""
    if "n_outputs" in meta:
        return int(meta["n_outputs"])
    return 1 if meta.get("task", "binary") == "binary" else len(meta["class_names"])


def _model_from_mlflow(runs: MlflowRuns, run_id: str, dataset: Dataset, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """A trial's network with its restored weights, and its ``model.json``."""
    from tuner.errors import TrackingError
    from tuner.model import load_state_dict_file, mlp_from_record
    from tuner.study import WEIGHTS_ARTIFACT

    meta = _model_meta(runs, run_id, dataset, workdir)
    net = mlp_from_record(meta["params"], dataset.n_features, _n_outputs(meta))
    weights = runs.download(run_id, WEIGHTS_ARTIFACT, workdir)
    try:
        net.load_state_dict(load_state_dict_file(weights))
    except (RuntimeError, ValueError) as exc:
        raise TrackingError(f"{WEIGHTS_ARTIFACT} of run {run_id} cannot be loaded: {exc}") from None
    return net, meta


def _unscale(dataset: Dataset, meta: dict[str, Any] | None) -> Callable[[np.ndarray], np.ndarray]:
    """Back to the target's unit with the scaling the model was trained with (model.json's, when it has one)."""
    scaling = (meta or {}).get("target_scaling")
    if scaling is None:
        return dataset.unscale
    mean, std = float(scaling["mean"]), float(scaling["std"])
    return lambda values: np.asarray(values, dtype=np.float64) * std + mean


def _label_thresholds(trial: FrozenTrial, spec: StudySpec, meta: dict[str, Any] | None) -> list[float] | None:
    """Each label's threshold as the trial recorded it (``threshold_{label}``), else model.json's; None if neither."""
    recorded = [trial.user_attrs.get(f"threshold_{key}") for _, key in _labels(spec)]
    if all(t is not None for t in recorded):
        return [float(t) for t in recorded if t is not None]
    stored = (meta or {}).get("thresholds")
    if stored is not None and len(stored) == len(recorded):
        return [float(t) for t in stored]
    return None


def trial_evidence(
    trial: FrozenTrial,
    spec: StudySpec,
    dataset: Dataset | None,
    runs: MlflowRuns | None,
    *,
    replay: bool = True,
    workdir: Path,
    say: Callable[[str], None] | None = None,
) -> TrialEvidence:
    """Gather one trial's curves: the model from its MLflow run, else replayed from its seed.

    What is gathered follows the task: a positive class's scores (binary, multiclass), each label's scores
    (multilabel), or predictions in the target's unit (regression, unit_regression).

    Args:
        trial: A completed trial.
        spec: The study's spec.
        dataset: The study's data; None when it could not be rebuilt (then only the learning curves).
        runs: The MLflow store; None when unreachable.
        replay: Retrain the trial from its seed when MLflow does not hold its model.
        workdir: Where downloaded artifacts go.
        say: Told before a replay, which can take minutes.

    Returns:
        The evidence, with notes on anything missing.
    """
    if dataset is not None and dataset.folds:
        return _fold_evidence(trial, spec, dataset, runs, replay=replay, workdir=workdir, say=say)
    ev = TrialEvidence(trial=trial)
    run_id = trial.user_attrs.get("mlflow_run_id")
    model = None
    meta: dict[str, Any] | None = None
    if runs is not None and run_id:
        try:
            ev.history = runs.epoch_history(run_id, ("train_loss", "val_loss"))
            if dataset is not None:
                model, meta = _model_from_mlflow(runs, run_id, dataset, workdir / run_id)
                ev.source = f"model from MLflow run {run_id}"
        except TunerError as exc:
            ev.notes.append(f"MLflow run {run_id}: {exc}")
    elif not run_id:
        from tuner.study import no_run_reason

        ev.notes.append(no_run_reason(trial))
    if model is None and dataset is not None and replay:
        from tuner.study import Objective, trained_as
        from tuner.tracking import NullTracker

        params = trial_params(trial, spec)
        seed = int(trial.user_attrs.get("seed", spec.study.seed + trial.number))
        if say is not None:
            say(f"replaying trial {trial.number} from seed {seed} for its curves (MLflow holds no model of it) ...")
        engine, packed_with = trained_as(trial)
        model, result = Objective(spec, dataset, NullTracker()).train_trial(
            params, seed, [], engine=engine, packed_with=packed_with
        )
        ev.history = ev.history or result.history
        ev.source = f"replayed from seed {seed} on the CPU"
        ev.notes.append(f"model {ev.source}; figures may differ slightly from the recorded trial")
    if model is None or dataset is None:
        if dataset is not None:
            ev.notes.append(f"no model: {_model_figures(spec)} are not shown")
        return ev
    from tuner.train import predict_logits, probabilities

    parts = {"validation": dataset.validation, "holdout": dataset.holdout}
    outputs = {
        name: probabilities(predict_logits(model, part.x, spec.train.eval_batch_size), spec.task)
        .cpu()
        .numpy()
        .astype(np.float64)
        for name, part in parts.items()
    }
    if _is_regression(spec):
        unscale = _unscale(dataset, meta)
        ev.predictions = {
            name: (np.asarray(part.y_numpy, dtype=np.float64), unscale(outputs[name][:, 0]))
            for name, part in parts.items()
        }
        return ev
    if spec.task == "multilabel":
        thresholds = _label_thresholds(trial, spec, meta)
        if thresholds is None:
            ev.notes.append(f"trial {trial.number} has no recorded label thresholds (user attributes 'threshold_*')")
            return ev
        for j, ((name, _), cut) in enumerate(zip(_labels(spec), thresholds, strict=True)):
            ev.labels[name] = {part: (parts[part].y_numpy[:, j] > 0.5, outputs[part][:, j]) for part in parts}
            ev.label_counts[name] = {
                part: metrics.confusion_counts(y, score, cut) for part, (y, score) in ev.labels[name].items()
            }
        return ev
    threshold = trial.user_attrs.get("threshold")
    if threshold is None:
        ev.notes.append(f"trial {trial.number} has no recorded threshold (user attribute 'threshold')")
        return ev
    pos = dataset.positive_index
    ev.positive = dataset.catalogue.class_names[pos]
    for part_name, part in parts.items():
        score = outputs[part_name][:, pos]
        y = part.y_numpy == pos
        ev.curves[part_name] = (y, score)
        ev.counts[part_name] = metrics.confusion_counts(y, score, float(threshold))
    return ev


def _folds_from_mlflow(runs: MlflowRuns, run_id: str, dataset: Dataset, workdir: Path) -> list[Any]:
    from tuner.errors import TrackingError
    from tuner.model import load_state_dict_file, mlp_from_record
    from tuner.study import FOLD_WEIGHTS_ARTIFACT

    meta = _model_meta(runs, run_id, dataset, workdir)
    n_out = _n_outputs(meta)
    models = []
    for i in range(len(dataset.folds)):
        path = FOLD_WEIGHTS_ARTIFACT.format(fold=i)
        net = mlp_from_record(meta["params"], dataset.n_features, n_out)
        try:
            # One folder per fold: a downloaded file lands under its base name, the same for every fold.
            net.load_state_dict(load_state_dict_file(runs.download(run_id, path, workdir / f"fold_{i}")))
        except (RuntimeError, ValueError) as exc:
            raise TrackingError(f"{path} of run {run_id} cannot be loaded: {exc}") from None
        models.append(net)
    return models


def _fold_evidence(
    trial: FrozenTrial,
    spec: StudySpec,
    dataset: Dataset,
    runs: MlflowRuns | None,
    *,
    replay: bool,
    workdir: Path,
    say: Callable[[str], None] | None,
) -> TrialEvidence:
    """:func:`trial_evidence` of a cross-validated trial: out-of-fold and holdout (fold models' mean) scores."""
    from tuner.study import CrossValidation, Objective, evaluate_folds, measure_folds

    ev = TrialEvidence(trial=trial)
    k = len(dataset.folds)
    run_id = trial.user_attrs.get("mlflow_run_id")
    cv: CrossValidation | None = None
    if runs is not None and run_id:
        try:
            # Fold 0's curves stand for the fold models' (all of them are in the run's plots/learning_curves.html).
            history = runs.epoch_history(run_id, ("fold0_train_loss", "fold0_val_loss"))
            ev.history = [{key.removeprefix("fold0_"): v for key, v in h.items()} for h in history]
            cv = measure_folds(_folds_from_mlflow(runs, run_id, dataset, workdir / run_id), dataset, spec)
            ev.source = f"its {k} fold models from MLflow run {run_id}"
        except TunerError as exc:
            ev.notes.append(f"MLflow run {run_id}: {exc}")
    elif not run_id:
        from tuner.study import no_run_reason

        ev.notes.append(no_run_reason(trial))
    if cv is None and replay:
        from tuner.tracking import NullTracker

        params = trial_params(trial, spec)
        seed = int(trial.user_attrs.get("seed", spec.study.seed + trial.number))
        if say is not None:
            say(f"replaying the {k} fold models of trial {trial.number} from seed {seed} for its curves ...")
        fits = Objective(spec, dataset, NullTracker()).cross_validate(params, seed)
        if fits.failure:
            ev.notes.append(f"replaying trial {trial.number} failed: {fits.failure}")
        else:
            cv = evaluate_folds(fits.folds, dataset, spec)
            ev.history = ev.history or fits.folds[0].result.history
            ev.source = f"its {k} fold models replayed from seed {seed} on the CPU"
            ev.notes.append(f"models {ev.source}; figures may differ slightly from the recorded trial")
    if cv is None:
        ev.notes.append(f"no model: {_model_figures(spec)} are not shown")
        return ev
    ev.notes.append(
        f"a {k}-fold trial: its learning curves are fold 0's; out-of-fold scores stand for validation, and the "
        "holdout is scored by the mean of the fold models"
    )
    threshold = trial.user_attrs.get("threshold")
    if threshold is None:
        ev.notes.append(f"trial {trial.number} has no recorded threshold (user attribute 'threshold')")
        return ev
    y_hold = dataset.holdout.y_numpy == dataset.positive_index
    ev.positive = dataset.catalogue.class_names[dataset.positive_index]
    ev.curves = {
        "out-of-fold": (cv.oof_labels, cv.evaluation.val_scores),
        "holdout": (y_hold, cv.evaluation.holdout_scores),
    }
    ev.counts = {part: metrics.confusion_counts(y, score, float(threshold)) for part, (y, score) in ev.curves.items()}
    return ev


def _holdout_facts(a: dict[str, Any], spec: StudySpec, classes: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The trial's recorded validation and holdout figures for the facts table of its column."""
    if _is_regression(spec):
        return [
            ("validation MAE, RMSE, R²", ", ".join(_num(a.get(f"val_{m}")) for m in ("mae", "rmse", "r2"))),
            ("holdout MAE [95% bootstrap CI]", _ci(a, "holdout_mae")),
            ("holdout RMSE [95% bootstrap CI]", _ci(a, "holdout_rmse")),
            ("holdout R² [95% bootstrap CI]", _ci(a, "holdout_r2")),
        ]
    if spec.task == "multilabel":
        return [
            ("holdout completeness, macro over labels", _num(a.get("holdout_completeness"))),
            ("holdout contamination, macro over labels", _num(a.get("holdout_contamination"))),
            ("holdout AUC, macro over labels", _num(a.get("holdout_auc"))),
        ]
    facts = [
        ("threshold (frozen on validation)", _num(a.get("threshold"))),
        ("holdout completeness", _ci(a, "holdout_completeness")),
        ("holdout contamination", _ci(a, "holdout_contamination")),
    ]
    if classes and "holdout_macro_completeness" in a:
        facts += [
            ("holdout accuracy", _num(a.get("holdout_accuracy"))),
            (
                "holdout completeness, contamination, macro over classes",
                f"{_num(a.get('holdout_macro_completeness'))}, {_num(a.get('holdout_macro_contamination'))}",
            ),
        ]
    return facts


def _per_name_table(a: dict[str, Any], names: Sequence[tuple[str, str]], kind: str) -> str:
    """The recorded figures of each label (``kind`` "label", with its threshold and AUC) or class (``kind`` "class"):
    validation, and holdout with 95% Wilson intervals."""
    rows = []
    for name, key in names:
        row: list[Any] = [name]
        if kind == "label":
            row.append(_num(a.get(f"threshold_{key}")))
        row += [
            _num(a.get(f"val_completeness_{key}")),
            _num(a.get(f"val_contamination_{key}")),
            _ci(a, f"holdout_completeness_{key}"),
            _ci(a, f"holdout_contamination_{key}"),
        ]
        if kind == "label":
            row.append(_num(a.get(f"holdout_auc_{key}")))
        rows.append(row)
    header = [kind]
    if kind == "label":
        header.append("threshold")
    header += [
        "validation completeness",
        "validation contamination",
        "holdout completeness [95% CI]",
        "holdout contamination [95% CI]",
    ]
    if kind == "label":
        header.append("holdout AUC")
    return _table(header, rows, ("",) + ("num",) * (len(header) - 1))


def _counts_rows(counts: dict[str, metrics.ConfusionCounts]) -> list[tuple[Any, ...]]:
    return [
        (part, c.tp, c.fp, c.tn, c.fn, _num(metrics.completeness(c)), _num(metrics.contamination(c)))
        for part, c in counts.items()
    ]


_COUNTS_HEADER = ("part", "TP", "FP", "TN", "FN", "completeness", "contamination")


def _model_figures_html(ev: TrialEvidence, spec: StudySpec, key: str, label: str) -> list[str]:
    """The figures and tables drawn from the trial's model, for its column."""
    out = []
    if ev.predictions:
        from tuner import regression

        target = spec.data.targets[0]
        fig = prediction_figure(ev.predictions, target, f"{label}: predicted vs true {target}")
        out.append(figure_div(fig, f"fig-{key}-predicted", 420))
        rows = [
            (part, len(y), _num(regression.mae(y, p)), _num(regression.rmse(y, p)), _num(regression.r2(y, p)))
            for part, (y, p) in ev.predictions.items()
        ]
        out.append(f"<p>The model's figures, in {_esc(target)}'s unit:</p>")
        out.append(_table(("part", "rows", "MAE", "RMSE", "R²"), rows, ("", "num", "num", "num", "num")))
    if ev.labels:
        points = {
            name: {part: (metrics.completeness(c), metrics.contamination(c)) for part, c in counts.items()}
            for name, counts in ev.label_counts.items()
        }
        out.append(figure_div(label_roc_figure(ev.labels, f"{label}: ROC per label"), f"fig-{key}-roc", 420))
        ce = label_completeness_efficiency_figure(
            ev.labels, points, spec.objective.target_contamination, f"{label}: completeness vs efficiency per label"
        )
        out.append(figure_div(ce, f"fig-{key}-ce", 420))
        rows = [(name, *row) for name, counts in ev.label_counts.items() for row in _counts_rows(counts)]
        out.append("<p>Confusion counts at each label's frozen threshold:</p>")
        out.append(_table(("label", *_COUNTS_HEADER), rows, ("", "", "num", "num", "num", "num", "num", "num")))
    if ev.curves:
        points_at = {part: (metrics.completeness(c), metrics.contamination(c)) for part, c in ev.counts.items()}
        out.append(figure_div(roc_figure(ev.curves, f"{label}: ROC"), f"fig-{key}-roc", 380))
        ce = completeness_efficiency_figure(
            ev.curves, points_at, spec.objective.target_contamination, f"{label}: completeness vs efficiency"
        )
        out.append(figure_div(ce, f"fig-{key}-ce", 380))
        positive = ev.positive or spec.data.positive
        out.append(f"<p>Confusion counts at the frozen threshold (positive = {_esc(positive)}):</p>")
        out.append(_table(_COUNTS_HEADER, _counts_rows(ev.counts), ("", "num", "num", "num", "num", "num", "num")))
    return out


def _trial_column(
    ev: TrialEvidence, role: str, spec: StudySpec, names: list[str], classes: Sequence[tuple[str, str]] = ()
) -> str:
    t = ev.trial
    a = t.user_attrs
    key = f"{role}-{t.number}"
    out = [f"<div><h3>{_esc(role)}: trial {t.number}</h3>"]
    facts = [
        (", ".join(names), ", ".join(_num(v, 5) for v in t.values)),
        ("parameters", _params_text(t, spec)),
        *_holdout_facts(a, spec, classes),
        ("epochs (best)", f"{a.get('epochs', '–')} ({a.get('best_epoch', '–')}); {a.get('stop_reason', '')}"),
        ("MLflow run", a.get("mlflow_run_id", "–")),
    ]
    if ev.source:
        facts.append(("curves from", ev.source))
    out.append(_table(None, facts, ("key", "", "")))
    if spec.task == "multilabel":
        out.append("<p>Each label's threshold is chosen on validation for the target contamination:</p>")
        out.append(_per_name_table(a, _labels(spec), "label"))
    out += [f'<p class="note">{_esc(n)}</p>' for n in ev.notes]
    label = f"trial {t.number}"
    out.append(
        figure_div(
            learning_curves(
                ev.history,
                a.get("best_epoch") if spec.validation.kind != "kfold" else (a.get("fold_best_epochs") or [None])[0],
                f"{label}: learning curves" + (" (fold 0)" if spec.validation.kind == "kfold" else ""),
                # A k-fold trial reports per fold, not per epoch: its reports do not belong on an epoch axis.
                dict(t.intermediate_values) if spec.validation.kind != "kfold" else None,
            ),
            f"fig-{key}-learning",
            380,
        )
    )
    out += _model_figures_html(ev, spec, key, label)
    if classes and "holdout_macro_completeness" in a:
        out.append("<p>Each class, every row given to its most probable class (no threshold):</p>")
        out.append(_per_name_table(a, classes, "class"))
    out.append("</div>")
    return "\n".join(out)


def comparison_section(
    study: optuna.Study,
    spec: StudySpec,
    *,
    tracking_uri: str | None = None,
    replay: bool = True,
    dataset: Dataset | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[Section, list[str]]:
    """The best trial and the runner-up side by side: learning curves and what their models do on validation and
    the holdout (ROC and completeness vs efficiency, per label for a multilabel task; predicted against true values
    for a regression), beside their recorded holdout figures.

    Arguments are :func:`build_report`'s.

    Returns:
        The section and warnings for the person running the report (also shown in the section).
    """
    import tempfile

    from tuner.tracking import MlflowRuns

    section = Section("compare")
    found: list[str] = []
    leaders = ranked_trials(study)[:2]
    if not leaders:
        section.note("no completed trial yet")
        return section, found
    if len(leaders) == 1:
        section.note("only one completed trial: no runner-up")
    if dataset is None:
        try:
            dataset = study_dataset(study, spec)
        except TunerError as exc:
            hint = ""
            if spec.data_path() is not None and not Path(spec.data.source).is_absolute():
                hint = f" ({spec.data.source} is relative: give the study file rather than the study's name)"
            found.append(f"{_model_figures(spec)} left out: {exc}{hint}")
    runs = None
    if spec.tracking.enabled or tracking_uri:
        try:
            runs = MlflowRuns(tracking_uri or spec.tracking.uri)
        except TunerError as exc:
            found.append(f"MLflow not read: {exc}")
    names = objective_names(study, spec)
    classes = _per_class(study, spec)
    columns = []
    with tempfile.TemporaryDirectory(prefix="tuner-report-") as tmp:
        for role, trial in zip(("best", "runner-up"), leaders, strict=False):
            ev = trial_evidence(trial, spec, dataset, runs, replay=replay, workdir=Path(tmp), say=say)
            columns.append(_trial_column(ev, role, spec, names, classes))
    for text in found:
        section.note(text)
    section.parts.append('<div class="pair">' + "\n".join(columns) + "</div>")
    return section, found


def _footer(spec: StudySpec) -> str:
    """How the report's holdout figures came about, for the page's foot."""
    if _is_regression(spec):
        return (
            "Validation ranks the trials; the holdout only measures them (MAE, RMSE and R² with 95% bootstrap "
            "intervals)."
        )
    if spec.task == "multilabel":
        return "Validation picks each label's threshold; the holdout only measures it (95% Wilson intervals)."
    return "Validation picks each trial's threshold; the holdout only measures it (95% Wilson intervals)."


def build_report(
    study: optuna.Study,
    spec: StudySpec,
    *,
    compare: bool = True,
    tracking_uri: str | None = None,
    replay: bool = True,
    top: int = 10,
    dataset: Dataset | None = None,
    say: Callable[[str], None] | None = None,
) -> Report:
    """The whole study report: one self-contained HTML page (plotly.js embedded once; opens offline).

    Args:
        study: The study.
        spec: The spec it was created with (``tuner.spec`` in the study's user attributes).
        compare: Include the best trial and runner-up side by side (reads MLflow, rebuilds the data).
        tracking_uri: Overrides ``spec.tracking.uri`` for reading the trials' runs.
        replay: Retrain a compared trial from its seed when MLflow does not hold its model.
        top: Rows in the top-trials table.
        dataset: The study's data, when already built.
        say: Told about slow steps (a trial replayed from its seed).

    Returns:
        The page and warnings about what could not go into it.
    """
    from plotly.offline import get_plotlyjs

    from tuner import __version__

    sections = study_sections(study, spec, top=top)
    found: list[str] = []
    if compare:
        section, found = comparison_section(
            study, spec, tracking_uri=tracking_uri, replay=replay, dataset=dataset, say=say
        )
        sections.insert(len(sections) - 1, section)
    nav = "".join(f'<a href="#{s.key}">{_esc(s.title)}</a>' for s in sections)
    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Study {_esc(study.study_name)}: tuner report</title>
<style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>Study {_esc(study.study_name)}</h1>
<p class="sub">tuner {__version__} report, generated {_esc(when)}</p>
<nav>{nav}</nav>
{"".join(s.html() for s in sections)}
<footer>{_esc(_footer(spec))}</footer>
</body></html>
"""
    return Report(html=page, warnings=found)


def write_report(report: Report, out: str | Path) -> Path:
    """Write the page, creating its folder.

    Raises:
        ConfigError: The file cannot be written (names ``--out``, the path and the reason).
    """
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a directory; give a file name such as {path / 'report.html'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.html, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {path}: {exc.strerror or exc}") from None
    return path


def log_report(study: optuna.Study, spec: StudySpec, report: Report, tracking_uri: str | None = None) -> str:
    """Attach the written report to the study's parent MLflow run.

    Returns:
        Where it went, for the person running the command.

    Raises:
        TrackingError: The study has no parent run, or MLflow refused the file.
    """
    from tuner.errors import TrackingError
    from tuner.tracking import MlflowRuns

    parent = study.user_attrs.get("tuner.mlflow_parent_run_id")
    if not parent:
        raise TrackingError(
            f"study {study.study_name!r} has no MLflow parent run (tuner.mlflow_parent_run_id); "
            "it was run with tracking disabled"
        )
    runs = MlflowRuns(tracking_uri or spec.tracking.uri)
    runs.log_text(parent, report.html, REPORT_ARTIFACT)
    return f"MLflow run {parent}: {REPORT_ARTIFACT}"


# --------------------------------------------------------------------------------------------------------------
# Every trial as a row

#: Per-trial figures ``tuner trials`` reports, after the parameters.
TRIAL_METRICS = (
    "holdout_completeness",
    "holdout_completeness_low",
    "holdout_completeness_high",
    "holdout_contamination",
    "holdout_contamination_low",
    "holdout_contamination_high",
    "holdout_auc",
    "threshold",
    "val_completeness",
    "val_contamination",
    "val_auc",
    "val_ap",
)


#: A regression's figures in ``tuner trials``: validation, then the holdout with 95% bootstrap intervals.
REGRESSION_METRICS = (
    "val_mae",
    "val_rmse",
    "val_r2",
    *(f"holdout_{m}{end}" for m in ("mae", "rmse", "r2") for end in ("", "_low", "_high")),
)
#: A multilabel task's macro figures (means over labels) in ``tuner trials``; each label's follow.
MULTILABEL_METRICS = (
    "holdout_completeness",
    "holdout_contamination",
    "holdout_auc",
    "val_completeness",
    "val_contamination",
    "val_auc",
    "val_ap",
)
#: A multiclass task's figures over all classes, after :data:`TRIAL_METRICS`; each class's follow.
MULTICLASS_METRICS = (
    "holdout_accuracy",
    "holdout_macro_completeness",
    "holdout_macro_contamination",
    "val_accuracy",
    "val_macro_completeness",
    "val_macro_contamination",
)
#: Search-space parameters that only studies setting them get a column for (they are None otherwise).
_TASK_PARAMS = ("loss", "huber_delta", "l1")


def trial_metric_columns(study: optuna.Study, spec: StudySpec) -> list[str]:
    """The figures ``tuner trials`` reports for the study's task, in order (see :func:`trials_frame`)."""
    if _is_regression(spec):
        return list(REGRESSION_METRICS)
    columns: list[str] = []
    if spec.task == "multilabel":
        columns += MULTILABEL_METRICS
        for _, key in _labels(spec):
            columns += [
                f"threshold_{key}",
                *(
                    f"holdout_{w}_{key}{end}"
                    for w in ("completeness", "contamination")
                    for end in ("", "_low", "_high")
                ),
                f"holdout_auc_{key}",
                f"val_completeness_{key}",
                f"val_contamination_{key}",
                f"val_auc_{key}",
            ]
        return columns
    columns += TRIAL_METRICS
    classes = _per_class(study, spec)
    if classes:
        columns += MULTICLASS_METRICS
        for _, key in classes:
            columns += [
                *(
                    f"holdout_{w}_{key}{end}"
                    for w in ("completeness", "contamination")
                    for end in ("", "_low", "_high")
                ),
                f"val_completeness_{key}",
                f"val_contamination_{key}",
            ]
    return columns


def trials_frame(study: optuna.Study, spec: StudySpec) -> pd.DataFrame:
    """Every trial as one row: number, state, objective(s), parameters, holdout figures, epochs, stop reason, run.

    Parameters use the names read in MLflow (``batch_size``, not ``log2_batch_size``; ``widths`` as ``64-32``
    and one ``n_units_lN`` per possible layer, 0 where absent), so every row has the same columns; a regression's
    ``loss``, Huber's ``huber_delta`` and ``l1`` only when the search space sets them.

    The figures follow the task: :data:`TRIAL_METRICS` for a positive class (binary, multiclass; a multiclass study
    adds accuracy and each class's completeness and contamination), :data:`REGRESSION_METRICS` for the regressions,
    macro figures and each label's threshold and figures for a multilabel task (keys from
    :func:`tuner.evaluation.label_key`).

    Args:
        study: The study.
        spec: The spec it was created with.

    Returns:
        One row per trial, in trial order.
    """
    import dataclasses

    import pandas as pd

    from tuner.space import TrialParams, max_layers

    n_max = max_layers(spec.search_space)
    names = objective_names(study, spec)
    objective_cols = ["objective"] if len(names) == 1 else [f"objective_{n}" for n in names]
    space = spec.search_space
    set_here = {"loss": space.loss is not None, "huber_delta": not space.huber_delta.off, "l1": not space.l1.off}
    fields = [f.name for f in dataclasses.fields(TrialParams) if f.name not in _TASK_PARAMS or set_here[f.name]]
    unit_cols = [f"n_units_l{i}" for i in range(n_max)]
    param_cols = fields + unit_cols
    metric_cols = trial_metric_columns(study, spec)
    columns = [
        "number",
        "state",
        *objective_cols,
        "last_reported",
        *param_cols,
        *metric_cols,
        "epochs",
        "best_epoch",
        "gradient_health",
        "stop_reason",
        "duration_s",
        "datetime_start",
        "mlflow_run_id",
    ]
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        # Optuna stores a pruned trial's last report as its value: that is no objective, keep it apart.
        values = list(t.values or []) if t.state.name == "COMPLETE" else []
        steps = sorted(t.intermediate_values)
        row["last_reported"] = t.intermediate_values[steps[-1]] if steps else None
        for i, col in enumerate(objective_cols):
            row[col] = values[i] if i < len(values) else None
        params = trial_params(t, spec)
        if params is not None:
            row.update({k: v for k, v in params.as_record(n_max).items() if k in param_cols})
        for key in (*metric_cols, "epochs", "best_epoch", "gradient_health", "mlflow_run_id"):
            row[key] = a.get(key)
        # A failed trial's own reason first: its stop_reason may be the (normal) end of training before it.
        row["stop_reason"] = a.get("fail_reason") or a.get("stop_reason") or ""
        row["duration_s"] = t.duration.total_seconds() if t.duration is not None else None
        row["datetime_start"] = t.datetime_start
        rows.append(row)
    frame = pd.DataFrame(rows, columns=columns)
    for col in (
        *objective_cols,
        "last_reported",
        *metric_cols,
        "lr",
        "momentum",
        "dropout",
        "weight_decay",
        *(c for c in ("huber_delta", "l1") if c in fields),
        "duration_s",
    ):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    for col in ("epochs", "best_epoch", "n_layers", "batch_size", *unit_cols):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    frame["batch_norm"] = frame["batch_norm"].astype("boolean")
    return frame


def write_trials(frame: pd.DataFrame, path: str | Path, fmt: Literal["csv", "parquet"]) -> Path:
    """Write the trial table as CSV or Parquet.

    Raises:
        ConfigError: The path is a folder, has the other format's suffix, or cannot be written.
    """
    out = Path(path)
    flag = f"--{fmt}"
    other = {"csv": (".parquet", ".pq"), "parquet": (".csv", ".tsv")}[fmt]
    if out.suffix.lower() in other:
        fix = "--parquet" if fmt == "csv" else "--csv"
        raise ConfigError(f"{flag}: {out} has a {out.suffix} suffix but {fmt} was asked for; use {fix} {out}")
    if out.is_dir():
        raise ConfigError(f"{flag}: {out} is a directory; give a file name such as {out / ('trials.' + fmt)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            frame.to_csv(out, index=False)
        else:
            frame.to_parquet(out, index=False)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot write {out}: {exc.strerror or exc}") from None
    return out


def trials_table(frame: pd.DataFrame, title: str) -> Any:
    """The trial table for the terminal (a rich ``Table``): the columns that fit, parameters condensed."""
    import pandas as pd
    from rich.table import Table
    from rich.text import Text

    objective_cols = [c for c in frame.columns if c == "objective" or c.startswith("objective_")]
    # The holdout figures the frame has: a regression's errors, else completeness and contamination (a multilabel
    # frame has no single threshold: its figures are macro averages over the labels).
    if "holdout_rmse" in frame.columns:
        shown = [("holdout MAE", "holdout_mae"), ("holdout RMSE", "holdout_rmse"), ("holdout R²", "holdout_r2")]
    elif "threshold" not in frame.columns:
        shown = [
            ("holdout compl. (macro)", "holdout_completeness"),
            ("holdout contam. (macro)", "holdout_contamination"),
        ]
    else:
        shown = [("holdout compl.", "holdout_completeness"), ("holdout contam.", "holdout_contamination")]
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("#", "right"),
        ("state", "left"),
        *((c, "right") for c in objective_cols),
        *((heading, "right") for heading, _ in shown),
        ("epochs", "right"),
        ("gradients", "left"),
        ("parameters", "left"),
        ("stop reason", "left"),
        ("MLflow run", "left"),
    ):
        # fold, not ellipsis: a run id cut short cannot be pasted into MLflow.
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    style = {"COMPLETE": "", "PRUNED": "yellow", "FAIL": "red"}

    def cell(value: Any) -> Text:
        # Text, not str: a stop reason such as "[...]" must not be read as rich markup.
        return Text("–" if value is None or pd.isna(value) else _num(value))

    for row in frame.itertuples(index=False):
        r = row._asdict()
        params = (
            f"{r['widths']} {r['activation']} {r['optimizer']} lr={_num(r['lr'], 3)} bs={r['batch_size']}"
            if isinstance(r.get("widths"), str)
            else "–"
        )
        table.add_row(
            Text(str(r["number"])),
            Text(r["state"]),
            *(cell(r[c]) for c in objective_cols),
            *(cell(r[col]) for _, col in shown),
            cell(r["epochs"]),
            Text(r["gradient_health"] if isinstance(r["gradient_health"], str) else "–"),
            Text(params),
            Text("" if pd.isna(r["stop_reason"]) else str(r["stop_reason"])),
            Text("–" if pd.isna(r["mlflow_run_id"]) else str(r["mlflow_run_id"])),
            style=style.get(r["state"], "dim"),
        )
    return table


# --------------------------------------------------------------------------------------------------------------
# Serving: the MLflow UI and optuna-dashboard, in the foreground until Ctrl-C


def check_port(host: str, port: int) -> socket.AddressFamily:
    """Fail early, and clearly, when the server could not listen there.

    Returns:
        The host's address family, for a server to listen with.

    Raises:
        ConfigError: The port is out of range or already taken.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port: must lie in 1..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise ConfigError(f"--host: cannot resolve {host!r}: {exc}") from None
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"--port: cannot listen on {host}:{port} ({exc.strerror or exc}); another server may be using it, "
                "choose another with --port"
            ) from None
    return family


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def experiment_url(base: str, experiment_id: str, *, minimize: bool = False) -> str:
    """The MLflow UI page of an experiment's runs, trials sorted best first by ``val_objective``.

    Sorted by a metric, the UI lists the trials' (nested) runs flat instead of folded under the study's run.
    """
    return (
        f"{base}/#/experiments/{experiment_id}/runs?orderByKey=metrics.%60val_objective%60"
        f"&orderByAsc={'true' if minimize else 'false'}"
    )


def run_foreground(command: list[str], say: Callable[[str], None]) -> int:
    """Run a server until it exits or Ctrl-C (or SIGTERM), then stop it and everything it started.

    The server gets a session of its own so that stopping it reaches any workers it spawned; Ctrl-C is
    forwarded to it.

    Returns:
        0 after Ctrl-C, else the server's exit status.
    """
    import os
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    proc = subprocess.Popen(command, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut this short: the server would be left running, detached.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("stopping ...")
        for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def serve_mlflow_ui(
    tracking_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    experiment: str | None = None,
    minimize: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Start ``mlflow ui`` on the study's tracking store and say where to look.

    Args:
        tracking_uri: The MLflow store.
        host: Address to listen on.
        port: Port to listen on.
        experiment: The study's experiment, whose trials the printed link lists; None for the home page.
        minimize: The objective is minimised (the link sorts trials best first).
        say: Prints a line for the person.

    Returns:
        0 after Ctrl-C, else the server's exit status.

    Raises:
        ConfigError: The port cannot be used.
        TrackingError: No MLflow store there, or it has no such experiment.
    """
    from tuner.errors import TrackingError
    from tuner.tracking import MlflowRuns, mask_password, mlflow_ui_command

    check_port(host, port)
    runs = MlflowRuns(tracking_uri)
    url = _url(host, port)
    if experiment is not None:
        experiment_id = runs.experiment_id(experiment)
        if experiment_id is None:
            raise TrackingError(
                f"tracking.experiment: no experiment {experiment!r} in {mask_password(tracking_uri)}; "
                f"experiments there: {', '.join(runs.experiment_names()) or 'none'}"
            )
        url = experiment_url(url, experiment_id, minimize=minimize)
    say(f"MLflow UI for {mask_password(tracking_uri)}: {url}   (Ctrl-C to stop)")
    return run_foreground(mlflow_ui_command(tracking_uri, host, port), say)


def serve_dashboard(
    storage: str, *, study_name: str, host: str = "127.0.0.1", port: int = 8080, say: Callable[[str], None] = print
) -> int:
    """Start optuna-dashboard on the study's storage and say where to look; returns 0 when stopped.

    Raises:
        ConfigError: The port cannot be used.
    """
    import threading
    from wsgiref.simple_server import WSGIServer, make_server

    import optuna_dashboard

    from tuner.tracking import mask_password

    family = check_port(host, port)
    server_class = type("DashboardServer", (WSGIServer,), {"address_family": family})  # IPv6 hosts too
    try:
        server: WSGIServer = make_server(host, port, optuna_dashboard.wsgi(storage), server_class=server_class)
    except OSError as exc:  # taken between the check and now
        raise ConfigError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    say(f"optuna-dashboard for {mask_password(storage)} (study {study_name!r}): {_url(host, port)}   (Ctrl-C to stop)")
    # Requests are served on another thread: wsgiref turns any exception raised while it handles one, Ctrl-C's
    # KeyboardInterrupt included, into a 500 page and serves on, so a Ctrl-C that came mid-request was lost.
    # The main thread only waits, and Ctrl-C always reaches it.
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:  # raised again in the main thread, not lost behind "stopped"
            failed.append(exc)

    serving = threading.Thread(target=serve, name="dashboard", daemon=True)
    serving.start()
    try:
        serving.join()
    except KeyboardInterrupt:
        server.shutdown()  # lets a request being served finish
    finally:
        server.server_close()
    if failed:
        raise failed[0]
    say("stopped")
    return 0
