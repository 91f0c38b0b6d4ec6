"""A study's best trial as an MLflow pyfunc model that scores raw catalogue columns, with a model card.

The exported directory holds no pickle. The best epoch's weights are a plain state dict (loadable with
``torch.load(..., weights_only=True)``); the feature derivation (``u-g`` from magnitudes ``u`` and ``g``), the
scaling fitted on the training rows, the classes, the frozen threshold and the target contamination (for a
multilabel task each label's threshold; for a regression the target's standardisation) are numbers in a JSON
file; the code is :class:`TunerModel` in this module, reached through a three-line MLflow "models from code"
entry script. ``mlflow.pyfunc.load_model(uri).predict(frame)`` and ``tuner predict`` run the
same code and give the same answer.

Exporting never retrains unless the trial's weights artifact is missing; then it says so, replays the trial
from its stored parameters and seed, and refuses unless the replay reproduces the recorded validation
objective. Either way the saved model is scored again on the validation and holdout rows, so the figures in
the model card are those of the exported files.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from tuner import metrics
from tuner.data.preprocess import Preprocessor
from tuner.errors import DataError, ExportError, TunerError
from tuner.evaluation import MultilabelEvaluation, RegressionEvaluation, label_key
from tuner.model import load_state_dict_file, mlp_from_record, params_from_record
from tuner.paths import cannot_create
from tuner.space import TrialParams
from tuner.tasks import REGRESSION, SINGLE_LABEL
from tuner.train import mean_probabilities, predict_logits, probabilities

if TYPE_CHECKING:
    import optuna

    from tuner.config import StudySpec
    from tuner.data.dataset import Dataset
    from tuner.study import AnyEvaluation

log = logging.getLogger(__name__)

__all__ = [
    "ALIAS",
    "EnsembleScorer",
    "ExportResult",
    "PredictResult",
    "Scorer",
    "TunerModel",
    "check_input",
    "export_trial",
    "load_model_dir",
    "load_scorer",
    "predict_file",
    "predict_frame",
]

#: Version of ``tuner_model.json``; a loader refuses a format it does not know.
FORMAT = 1
#: ``tuner_model.json`` of a cross-validated trial: the mean of its fold models, each with its own scaling.
ENSEMBLE_FORMAT = 2
#: ``tuner_model.json`` of a multilabel or regression model. Its own number, so that a tuner that knows only
#: class probabilities refuses the file instead of reading its outputs as classes.
TASK_FORMAT = 3
#: Files inside an exported model directory.
CONFIG_FILE = "tuner_model.json"
WEIGHTS_FILE = "state_dict.pt"
ENTRY_FILE = "tuner_model.py"
CARD_MD = "model_card.md"
CARD_JSON = "model_card.json"
CURVE_HTML = "completeness_efficiency.html"
PREDICTION_HTML = "predicted_vs_true.html"
#: The registry alias that always names the latest export of a study.
ALIAS = "champion"
#: How closely re-measured (or retrained) figures must match the recorded ones. CPU training and evaluation
#: are deterministic for a given seed, so on the machine that ran the study the match is exact; the margin
#: only absorbs float formatting.
TOLERANCE = 1e-6
#: Contamination ceilings at which the card tabulates the holdout completeness-vs-efficiency curve.
CURVE_CEILINGS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Recorded per-trial figures compared with the exported model's (Optuna user attributes of the trial).
CHECKED = (
    "threshold",
    "val_completeness",
    "val_contamination",
    "holdout_completeness",
    "holdout_contamination",
)
#: Packages whose installed versions are pinned in the model's requirements.
PINNED = ("torch", "numpy", "pandas", "mlflow")

# Models from code instead of a pickled PythonModel instance: MLflow would cloudpickle an instance into
# python_model.pkl, and loading any pickle runs arbitrary code (and ties the file to one cloudpickle version).
# With this entry script the directory holds only JSON, a plain state dict and readable code, and it loads
# even with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. The price: the tuner package must be importable where
# the model is loaded; it is listed in the model's requirements.
ENTRY_SCRIPT = '''"""MLflow "models from code" entry point of a tuner export.

mlflow.pyfunc.load_model executes this file. The model class comes from the installed tuner package; it reads
the weights (a plain state dict) and the preprocessing (JSON) from the model's artifacts in load_context.
"""

from mlflow.models import set_model

from tuner.export import TunerModel

set_model(TunerModel())
'''


# --------------------------------------------------------------------------------------------------------------
# Scoring: raw catalogue columns -> features -> scaling -> network -> probabilities and decisions


def _describe_derivation(d: dict[str, Any]) -> str:
    return d["feature"] if "column" in d else f"{d['feature']} = {d['colour'][0]} - {d['colour'][1]}"


def check_input(frame: Any, config: dict[str, Any]) -> None:
    """Check that a frame holds the model's raw input columns, numeric and finite, before anything is scored.

    Args:
        frame: The rows to score.
        config: The exported model's ``tuner_model.json``.

    Raises:
        DataError: Naming every missing column, every non-numeric column and every column with NaN or inf
            values (how many, and the first rows), or the first row whose feature, as derived or as scaled,
            lies beyond what float32 holds, so that no row is ever scored as NaN.
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataError(
            f"model input: expected a pandas DataFrame of raw catalogue columns, got {type(frame).__name__}"
        )
    needed: list[str] = list(config["input_columns"])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        features = ", ".join(_describe_derivation(d) for d in config["derivations"])
        present = ", ".join(map(str, frame.columns[:30])) + (", ..." if len(frame.columns) > 30 else "")
        raise DataError(
            f"model input: missing column(s) {', '.join(map(repr, missing))}; the model needs "
            f"{', '.join(needed)} to compute its features ({features}); columns present: {present}"
        )
    problems: list[str] = []
    for name in needed:
        series = frame[name]
        if isinstance(series, pd.DataFrame):
            problems.append(f"column {name!r} appears {series.shape[1]} times; keep one")
            continue
        if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
            bad = series[pd.to_numeric(series, errors="coerce").isna() & series.notna()]
            example = f" (e.g. {bad.iloc[0]!r} in row {frame.index.get_loc(bad.index[0])})" if len(bad) else ""
            problems.append(f"column {name!r} must be numeric, got dtype {series.dtype}{example}")
            continue
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        bad_rows = np.flatnonzero(~np.isfinite(values))
        if bad_rows.size:
            problems.append(
                f"column {name!r} has {bad_rows.size} non-finite value(s) (NaN or inf), first at rows "
                f"{bad_rows[:5].tolist()}; clean or drop those rows before scoring"
            )
    if not problems:
        problems = _float32_problems(frame, config)
    if problems:
        if len(problems) == 1:
            raise DataError(f"model input: {problems[0]}")
        raise DataError("model input has problems:\n" + "\n".join(f"  - {p}" for p in problems))


def _derived(frame: pd.DataFrame, config: dict[str, Any]) -> np.ndarray:
    """The model's features from raw columns, float64, one column per derivation."""
    columns: list[np.ndarray] = []
    for d in config["derivations"]:
        if "column" in d:
            columns.append(frame[d["column"]].to_numpy(dtype=np.float64))
        else:
            left, right = d["colour"]
            columns.append(frame[left].to_numpy(dtype=np.float64) - frame[right].to_numpy(dtype=np.float64))
    if not columns:
        return np.empty((len(frame), 0), dtype=np.float64)
    return np.column_stack(columns)


def _float32_problems(frame: pd.DataFrame, config: dict[str, Any]) -> list[str]:
    """Rows whose values fed to the network lie beyond float32, where they would turn into inf and the score into
    NaN: a feature as derived (a colour can overflow where its magnitudes do not), then as scaled by the model (or
    by any fold model of an ensemble)."""
    from tuner.data.load import float32_problem

    features = _derived(frame, config)
    names = [d["feature"] for d in config["derivations"]]
    problems = []
    for d, values in zip(config["derivations"], features.T, strict=True):
        operands = None
        if "colour" in d:
            left, right = d["colour"]
            operands = (left, frame[left].to_numpy(dtype=np.float64)), (right, frame[right].to_numpy(dtype=np.float64))
        problem = float32_problem(values, d["feature"], operands=operands)
        if problem:
            problems.append(f"{problem}; clean or drop those rows before scoring")
    if problems:
        return problems
    members = config["ensemble"]["members"] if "ensemble" in config else [config]
    for member in members:
        problem = Preprocessor.from_dict(member["preprocessor"]).problem(features.astype(np.float32), names)
        if problem:
            return [f"{problem}; clean or drop those rows before scoring"]
    return []


def raw_features(frame: pd.DataFrame, config: dict[str, Any]) -> np.ndarray:
    """The model's features from raw columns, as float32 like the training catalogue (so scores match exactly).

    Raises:
        DataError: See :func:`check_input`.
    """
    check_input(frame, config)
    return _derived(frame, config).astype(np.float32)


def prediction_column(config: dict[str, Any]) -> str:
    """A regression's output column: ``redshift_predicted`` for target ``redshift``."""
    return f"{config['target_keys'][0]}_predicted"


def output_columns(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The model's output columns and their MLflow types, in order.

    Binary: ``p_<positive>``, ``predicted_<positive>``; multiclass: ``p_<class>`` per class, ``predicted_class``
    (and ``predicted_<positive>``); multilabel: ``p_<label>``, ``predicted_<label>`` per label, the label's name
    made safe (``class==QSO`` -> ``class_eq_QSO``); regressions: ``<target>_predicted``, in the target's unit.
    """
    task = config["task"]
    if task in REGRESSION:
        return [(prediction_column(config), "double")]
    if task == "multilabel":
        return [
            col for key in config["target_keys"] for col in ((f"p_{key}", "double"), (f"predicted_{key}", "boolean"))
        ]
    positive = config["positive_class"]
    if config["task"] == "binary":
        return [(f"p_{positive}", "double"), (f"predicted_{positive}", "boolean")]
    out = [(f"p_{name}", "double") for name in config["class_names"]]
    out.append(("predicted_class", "string"))
    if positive is not None:
        out.append((f"predicted_{positive}", "boolean"))
    return out


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict_file(path)
    except ValueError as exc:
        raise ExportError(f"weights: {exc}") from None


@dataclass(frozen=True)
class Scorer:
    """An exported model in memory: its configuration, network and scaling."""

    config: dict[str, Any]
    net: torch.nn.Module
    preprocessor: Preprocessor

    @classmethod
    def load(cls, config_path: str | Path, weights_path: str | Path) -> Scorer:
        """Read ``tuner_model.json`` and the state dict of an exported model.

        Raises:
            ExportError: An unknown format or weights that do not fit the described network.
        """
        config = json.loads(Path(config_path).read_text())
        if config.get("format") not in (FORMAT, TASK_FORMAT):
            raise ExportError(
                f"{config_path}: tuner model format {config.get('format')!r} is not supported (expected {FORMAT}, "
                f"{TASK_FORMAT} for a multilabel or regression model, or {ENSEMBLE_FORMAT} for a cross-validated "
                "ensemble); export the study again with this version of tuner"
            )
        net = mlp_from_record(config["params"], config["n_features"], config["n_outputs"])
        try:
            net.load_state_dict(_load_state(Path(weights_path)))
        except RuntimeError as exc:
            raise ExportError(
                f"weights: {weights_path} does not fit the network described in {config_path}: {exc}"
            ) from None
        net.eval()
        return cls(config, net, Preprocessor.from_dict(config["preprocessor"]))

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Probabilities and decisions at the frozen threshold, one row per input row (same index).

        Raises:
            DataError: Missing, non-numeric or non-finite input columns.
        """
        cfg = self.config
        x = self.preprocessor.transform(raw_features(frame, cfg))
        if len(x):
            logits = predict_logits(self.net, torch.from_numpy(x), int(cfg["eval_batch_size"]))
            probs = probabilities(logits, cfg["task"]).numpy().astype(np.float64)
        else:  # no rows: an empty answer with the right columns, not an error
            probs = np.empty((0, _n_scores(cfg)), dtype=np.float64)
        return _decisions(probs, cfg, frame.index)


@dataclass(frozen=True)
class EnsembleScorer:
    """An exported cross-validated trial in memory: its fold models, each with the scaling of its training folds.

    A row's probabilities are the mean of the fold models' probabilities; the threshold was chosen on the
    out-of-fold scores.
    """

    config: dict[str, Any]
    members: tuple[tuple[torch.nn.Module, Preprocessor], ...]

    @classmethod
    def load(cls, config_path: str | Path, weights_path: str | Path) -> EnsembleScorer:
        """Read ``tuner_model.json`` (format 2) and the state dict of every fold model (fold ``i`` under ``i.*``).

        Raises:
            ExportError: Weights that do not fit the described networks.
        """
        config = json.loads(Path(config_path).read_text())
        members = config["ensemble"]["members"]
        nets = torch.nn.ModuleList(
            mlp_from_record(config["params"], config["n_features"], config["n_outputs"]) for _ in members
        )
        try:
            nets.load_state_dict(_load_state(Path(weights_path)))
        except RuntimeError as exc:
            raise ExportError(
                f"weights: {weights_path} does not fit the {len(members)} fold networks described in {config_path}: "
                f"{exc}"
            ) from None
        scalings = [Preprocessor.from_dict(m["preprocessor"]) for m in members]
        return cls(config, tuple(zip(nets.eval(), scalings, strict=True)))

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Probabilities (the fold models' mean) and decisions at the frozen threshold; see :meth:`Scorer.score`."""
        cfg = self.config
        raw = raw_features(frame, cfg)
        if len(raw):
            nets = [net for net, _ in self.members]
            inputs = [torch.from_numpy(scaling.transform(raw)) for _, scaling in self.members]
            probs = mean_probabilities(nets, inputs, cfg["task"], int(cfg["eval_batch_size"]))
        else:
            probs = np.empty((0, _n_scores(cfg)), dtype=np.float64)
        return _decisions(probs, cfg, frame.index)


def load_scorer(config_path: str | Path, weights_path: str | Path) -> Scorer | EnsembleScorer:
    """The scorer an exported model's ``tuner_model.json`` describes: one network, or a cross-validated ensemble.

    Raises:
        ExportError: An unknown format, or weights that do not fit.
    """
    fmt = json.loads(Path(config_path).read_text()).get("format")
    if fmt == ENSEMBLE_FORMAT:
        return EnsembleScorer.load(config_path, weights_path)
    return Scorer.load(config_path, weights_path)


def _n_scores(cfg: dict[str, Any]) -> int:
    """Columns of :func:`tuner.train.probabilities`: two for binary (rest, positive), else one per output."""
    return len(cfg["class_names"]) if cfg["task"] in SINGLE_LABEL else int(cfg["n_outputs"])


def _decisions(probs: np.ndarray, cfg: dict[str, Any], index: pd.Index) -> pd.DataFrame:
    """The output frame: probabilities and decisions at the frozen threshold(s), or a regression's predictions."""
    if cfg["task"] in REGRESSION:
        values = probs[:, 0]
        scaling = cfg.get("target_scaling")
        if scaling is not None:  # the network predicts (value - mean) / std of the training rows
            values = values * float(scaling["std"]) + float(scaling["mean"])
        return pd.DataFrame({prediction_column(cfg): values}, index=index)
    if cfg["task"] == "multilabel":
        labels: dict[str, Any] = {}
        for j, (key, threshold) in enumerate(zip(cfg["target_keys"], cfg["thresholds"], strict=True)):
            labels[f"p_{key}"] = probs[:, j]
            labels[f"predicted_{key}"] = probs[:, j] >= float(threshold)
        return pd.DataFrame(labels, index=index)
    threshold = float(cfg["threshold"])
    out: dict[str, Any] = {}
    positive, pos = cfg["positive_class"], int(cfg["positive_index"])
    if cfg["task"] == "binary":
        out[f"p_{positive}"] = probs[:, pos]
        out[f"predicted_{positive}"] = probs[:, pos] >= threshold
    else:
        classes = list(cfg["class_names"])
        for i, name in enumerate(classes):
            out[f"p_{name}"] = probs[:, i]
        out["predicted_class"] = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
        if positive is not None:
            out[f"predicted_{positive}"] = probs[:, pos] >= threshold
    return pd.DataFrame(out, index=index)


class TunerModel(PythonModel):
    """The pyfunc model of a tuner export: raw catalogue columns in; probabilities and decisions (each label's, for
    a multilabel task), or a regression's predictions in the target's unit, out.

    Created empty by the models-from-code entry script when MLflow loads the model (never pickled); everything
    it knows is read from ``context.artifacts`` in :meth:`load_context`.
    """

    _scorer: Scorer | EnsembleScorer

    def load_context(self, context: Any) -> None:
        self._scorer = load_scorer(context.artifacts["config"], context.artifacts["weights"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score a frame of raw catalogue columns (``u, g, r, i, z`` ...); see :meth:`Scorer.score`."""
        return self._scorer.score(model_input)


# --------------------------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_trial` wrote."""

    path: Path
    study_name: str
    trial_number: int
    runner_up: int | None
    retrained: bool
    card: dict[str, Any]
    notes: tuple[str, ...] = ()
    run_id: str | None = None
    logged_uri: str | None = None
    registered_name: str | None = None
    version: str | None = None

    @property
    def champion_uri(self) -> str:
        """``models:/<study>@champion``: what loads the latest registered export."""
        return f"models:/{self.registered_name or self.study_name}@{ALIAS}"


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN and inf become null, numpy scalars become Python numbers, tuples become lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _study_spec(study: optuna.Study, spec: StudySpec) -> tuple[StudySpec, list[str]]:
    """The spec the trials ran with (stored in the study), with the caller's data folder and stores."""
    from tuner.config import spec_from_dict
    from tuner.study import FINGERPRINTED

    stored = study.user_attrs.get("tuner.spec")
    if not stored:
        return spec, []
    ran = spec_from_dict(stored, base_dir=spec.base_dir).with_overrides(
        {"tracking.uri": spec.tracking.uri, "study.storage": spec.study.storage}
    )
    changed = [s for s in FINGERPRINTED if ran.fingerprint(s) != spec.fingerprint(s)]
    notes = []
    if changed:
        notes.append(
            f"the study file's {', '.join(changed)} differ from what study {ran.study.name!r} ran with; "
            "exporting with the stored settings"
        )
    return ran, notes


def _value(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's (first) objective value: ``val_objective``, as every trial's run records it."""
    return trial.values[0] if trial.values else None


def _pick_front(
    study: optuna.Study, spec: StudySpec, number: int | None, rule: str | None, notes: list[str]
) -> tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial | None] | None:
    """In a multi-objective study, the trial named by ``--trial`` or chosen from the Pareto front by ``--rule``.

    Returns None when ``--trial`` names one (checked as in a single-objective study; a note says when it is off
    the front). With ``--rule`` the runner-up is the next front trial satisfying the rule.
    """
    from tuner import pareto

    name = spec.study.name
    if number is not None and rule is not None:
        raise ExportError(f"--rule: give --trial or --rule, not both, got --trial {number} --rule {rule!r}")
    if not pareto.complete_trials(study):
        raise ExportError(f"study {name!r} has no COMPLETE trial to export")
    if number is not None:
        chosen = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        on_front = {t.number for t in study.best_trials}
        if chosen and chosen[0].values and number not in on_front:
            better = [
                t.number
                for t in pareto.complete_trials(study)
                if pareto.dominates(t.values, chosen[0].values, study.directions)
            ]
            notes.append(f"trial {number} is not on the Pareto front: trial(s) {better} are better in every objective")
        return None
    if rule is None:
        raise ExportError(
            f"study {name!r} has {len(study.directions)} objectives and no single best trial; choose from its Pareto "
            f"front with --trial N or --rule (e.g. --rule '{pareto.objective_names(study)[-1]}<=0.1'):\n"
            + pareto.front_listing(study)
        )
    try:
        ranked = pareto.choose(study, pareto.parse_rule(rule, pareto.objective_names(study)))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    notes.append(f"trial {ranked[0].number} chosen from the Pareto front by the rule {rule!r}")
    return ranked[0], (ranked[1] if len(ranked) > 1 else None)


def _pick_trials(
    study: optuna.Study, spec: StudySpec, number: int | None, rule: str | None = None, notes: list[str] | None = None
) -> tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial | None]:
    """The trial to export (best by default) and the best other COMPLETE trial to compare it with.

    A multi-objective study has no best trial: ``number`` or ``rule`` chooses one (:func:`_pick_front`).
    """
    from optuna.trial import TrialState

    name = spec.study.name
    if len(study.directions) > 1:
        picked = _pick_front(study, spec, number, rule, notes if notes is not None else [])
        if picked is not None:
            return picked
    elif rule is not None:
        raise ExportError(
            f"--rule: chooses from the Pareto front of a multi-objective study; study {name!r} has one "
            f"objective, so its best trial is exported (or --trial N), got --rule {rule!r}"
        )
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    if number is None:
        if not complete:
            raise ExportError(f"study {name!r} has no COMPLETE trial to export")
        chosen = study.best_trial
    else:
        found = [t for t in trials if t.number == number]
        if not found:
            raise ExportError(
                f"--trial: study {name!r} has no trial {number}; its trials are numbered 0 to {len(trials) - 1}"
            )
        chosen = found[0]
        if chosen.state != TrialState.COMPLETE:
            listing = ", ".join(str(t.number) for t in complete) or "none"
            raise ExportError(
                f"--trial: trial {number} is {chosen.state.name}; only COMPLETE trials have a model to export "
                f"(complete trials: {listing})"
            )
    if len(study.directions) > 1:
        return chosen, None  # a trial named on a front: no other trial is "the next best"
    maximize = spec.objective.direction == "maximize"
    others = sorted(
        (t for t in complete if t.number != chosen.number),
        key=lambda t: (-(_value(t) or 0.0) if maximize else (_value(t) or 0.0), t.number),
    )
    return chosen, (others[0] if others else None)


def _check_creatable(path: Path, flag: str) -> None:
    """Refuse, before any work, a path that cannot be made."""
    problem = cannot_create(path)
    if problem:
        raise ExportError(f"{flag}: {path} cannot be made: {problem}")


def _prepare_out(out: Path, force: bool) -> None:
    _check_creatable(out, "--out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out: {out} exists and is not empty; choose another directory or pass --force")
        if not (out / "MLmodel").is_file():
            # --force only ever deletes a previous export, never an arbitrary folder given by mistake.
            raise ExportError(
                f"--out: {out} is not empty and is not a previous export (no MLmodel file); --force replaces only "
                "an exported model directory"
            )


def _load_data(study: optuna.Study, spec: StudySpec) -> tuple[pd.DataFrame, Dataset]:
    from tuner.data.dataset import LAYOUT_ATTR, build_dataset, raw_frame
    from tuner.data.load import catalogue_from_frame, keep_rows

    frame, source = raw_frame(spec)
    # The rows data.where keeps, renumbered as the catalogue numbers them: the split's indices point into these.
    frame = keep_rows(frame, spec.data.where)
    catalogue = catalogue_from_frame(frame, spec.data, task=spec.task, source=source)
    recorded = study.user_attrs.get("tuner.data", {}).get("data.hash")
    if recorded and recorded != catalogue.data_hash:
        raise DataError(
            f"data.source: the catalogue changed since study {spec.study.name!r} ran (data hash "
            f"{catalogue.data_hash}, the study recorded {recorded}); its trials cannot be checked or exported "
            "against these rows"
        )
    return frame, build_dataset(spec, "cpu", catalogue, recorded=study.user_attrs.get(LAYOUT_ATTR))


def _derivations(columns: Sequence[Any], features: Sequence[str]) -> list[dict[str, Any]]:
    """How each feature comes from raw columns, decided as tuner.data.load.derive_feature decided in training."""
    present = {str(c) for c in columns}
    out: list[dict[str, Any]] = []
    for name in features:
        if name in present:
            out.append({"feature": name, "column": name})
        else:
            left, _, right = name.partition("-")
            out.append({"feature": name, "colour": [left, right]})
    return out


def _measure(
    net: torch.nn.Module, dataset: Dataset, spec: StudySpec, params: TrialParams | None = None
) -> AnyEvaluation:
    """The threshold chosen on validation and its holdout figures, for a network as it stands.

    For a cross-validated trial ``net`` is its fold models (a ``ModuleList``): the threshold comes from their
    out-of-fold scores and the holdout is scored by their mean. A multilabel network gets a threshold per label,
    a regression its MAE, RMSE and R² (see :func:`tuner.study.evaluate`); ``params`` are the trial's, whose loss
    (a regression's mse, mae or huber) the validation loss is computed with.
    """
    from tuner.study import evaluate, fit_config, measure_folds
    from tuner.train import FitResult, loss_function

    if dataset.folds:
        if not isinstance(net, torch.nn.ModuleList) or len(net) != len(dataset.folds):
            raise ExportError(f"a cross-validated study needs its {len(dataset.folds)} fold models, got {type(net)}")
        return measure_folds(list(net), dataset, spec).evaluation

    # val_loss computed as fit computes it, for studies whose objective is the validation loss.
    logits = predict_logits(net, dataset.validation.x, spec.train.eval_batch_size)
    criterion = loss_function(fit_config(spec, dataset), dataset.device, params)
    val_loss = float(criterion(logits, dataset.validation.y))
    return evaluate(net, dataset, spec, FitResult(best_metrics={"val_loss": val_loss}))


def _differs(a: Any, b: Any, tolerance: float) -> bool:
    if a is None or b is None:
        return False
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) != math.isnan(b)
    return abs(a - b) > tolerance


def _recorded(trial: optuna.trial.FrozenTrial, checked: Sequence[str] = CHECKED) -> dict[str, float]:
    value = _value(trial)
    out = {"val_objective": float(value)} if value is not None else {}
    out.update({k: float(trial.user_attrs[k]) for k in checked if k in trial.user_attrs})
    return out


def _checked(ev: AnyEvaluation) -> list[str]:
    """The figures compared with the trial's record: for a multilabel or regression model every final metric
    (each label's threshold and figures, the bootstrap intervals), which are all functions of its outputs."""
    if isinstance(ev, MultilabelEvaluation | RegressionEvaluation):
        return [k for k in ev.final_metrics() if not k.startswith("val_objective")]
    return list(CHECKED)


def _truth(dataset: Dataset) -> np.ndarray:
    """What the holdout rows are: positive or not (binary, multiclass), 0/1 per label, or the target values."""
    y = dataset.holdout.y_numpy
    if dataset.task in REGRESSION:
        return np.asarray(y, dtype=np.float64)
    if dataset.task == "multilabel":
        return np.asarray(y) > 0.5
    return np.asarray(y == dataset.positive_index)


def _held(ev: AnyEvaluation) -> np.ndarray:
    """The holdout outputs the plots show: the positive class's or each label's scores, or predictions."""
    return ev.holdout_predictions if isinstance(ev, RegressionEvaluation) else ev.holdout_scores


def _curve_table(y: np.ndarray, scores: np.ndarray, target: float) -> list[dict[str, Any]]:
    """Points of the holdout completeness-vs-efficiency curve: the most complete cut under each ceiling."""
    rows = []
    for ceiling in sorted({*CURVE_CEILINGS, float(target)}):
        point = metrics.choose_operating_point(y, scores, ceiling)
        rows.append(
            {
                "max_contamination": ceiling,
                "completeness": point.completeness,
                "contamination": point.contamination,
                "efficiency": 1.0 - point.contamination if point.feasible else None,
                "threshold": point.threshold,
                "selected": point.counts.n_pred_pos,
            }
        )
    return rows


def _ci_pair(interval: Any) -> list[float | None]:
    return [None, None] if interval is None else [interval.low, interval.high]


def _figures(ev: AnyEvaluation, y_hold: np.ndarray, target: float) -> dict[str, Any]:
    """The card's figures of one trial. Every task's figures hold ``val_objective``, ``threshold`` and holdout
    ``completeness`` / ``contamination`` with intervals (None where the task has no such figure), so a reader
    of any card finds the same keys; the task's own figures come beside them."""
    if isinstance(ev, RegressionEvaluation):
        return _regression_figures(ev)
    if isinstance(ev, MultilabelEvaluation):
        return _multilabel_figures(ev, y_hold, target)
    h = ev.holdout
    return {
        "val_objective": ev.objective,
        "threshold": ev.val_point.threshold,
        **_rates(ev.val_point, h, ev.val_auc, ev.holdout_auc),
        "holdout_curve": _curve_table(y_hold, ev.holdout_scores, target),
    }


def _rates(
    point: metrics.OperatingPoint, measured: metrics.MeasuredPoint, val_auc: float, holdout_auc: float
) -> dict[str, Any]:
    """A threshold's validation figures and its holdout figures with Wilson intervals, as the card holds them."""
    c = measured.counts
    return {
        "validation": {
            "completeness": point.completeness,
            "contamination": point.contamination,
            "auc": val_auc,
            "feasible": point.feasible,
        },
        "holdout": {
            "completeness": measured.completeness,
            "completeness_95ci": [measured.completeness_ci.low, measured.completeness_ci.high],
            "contamination": measured.contamination,
            "contamination_95ci": [measured.contamination_ci.low, measured.contamination_ci.high],
            "counts": {"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn},
            "auc": holdout_auc,
        },
    }


_NO_RATES = {
    "completeness": None,
    "completeness_95ci": [None, None],
    "contamination": None,
    "contamination_95ci": [None, None],
}


def _regression_figures(ev: RegressionEvaluation) -> dict[str, Any]:
    """MAE, RMSE and R² on validation and (with 95% bootstrap intervals) on the holdout, in the target's unit."""
    v, h = ev.validation, ev.holdout
    holdout: dict[str, Any] = {"rows": h.n}
    for name in ("mae", "rmse", "r2"):
        holdout[name] = getattr(h, name)
        holdout[f"{name}_95ci"] = _ci_pair(getattr(h, f"{name}_ci"))
    return {
        "val_objective": ev.objective,
        "threshold": None,
        "val_loss": ev.val_loss,
        "validation": {"mae": v.mae, "rmse": v.rmse, "r2": v.r2, "rows": v.n},
        "holdout": {**holdout, **_NO_RATES},
        "holdout_curve": None,
    }


def _multilabel_figures(ev: MultilabelEvaluation, y_hold: np.ndarray, target: float) -> dict[str, Any]:
    """Each label's frozen threshold, its validation figures and its holdout figures with Wilson intervals; the
    headline validation and holdout figures are the macro averages over labels (which have no interval)."""
    labels = []
    for f in ev.labels:
        labels.append(
            {
                "name": f.name,
                "key": label_key(f.name),
                "threshold": f.point.threshold,
                **_rates(f.point, f.holdout, f.val_auc, f.holdout_auc),
            }
        )
    macro = ev.macro()
    return {
        "val_objective": ev.objective,
        "threshold": None,  # one per label, below
        "labels": labels,
        "validation": {
            "completeness": macro["val_completeness"],
            "contamination": macro["val_contamination"],
            "auc": macro["val_auc"],
            "ap": macro["val_ap"],
            "average": "macro over labels",
        },
        "holdout": {
            **_NO_RATES,
            "completeness": macro["holdout_completeness"],
            "contamination": macro["holdout_contamination"],
            "auc": macro["holdout_auc"],
            "average": "macro over labels",
        },
        "holdout_curve": {
            f.name: _curve_table(y_hold[:, j], ev.holdout_scores[:, j], target) for j, f in enumerate(ev.labels)
        },
    }


def _recorded_figures(
    trial: optuna.trial.FrozenTrial, task: str = "binary", labels: Sequence[str] = ()
) -> dict[str, Any]:
    """A trial's figures as its run recorded them (for a runner-up whose weights are not stored)."""
    if task in REGRESSION:
        return _recorded_regression(trial)
    if task == "multilabel":
        return _recorded_multilabel(trial, labels)
    a = trial.user_attrs
    return {
        "val_objective": _value(trial),
        "threshold": a.get("threshold"),
        "validation": {
            "completeness": a.get("val_completeness"),
            "contamination": a.get("val_contamination"),
            "auc": a.get("val_auc"),
        },
        "holdout": {
            "completeness": a.get("holdout_completeness"),
            "completeness_95ci": [a.get("holdout_completeness_low"), a.get("holdout_completeness_high")],
            "contamination": a.get("holdout_contamination"),
            "contamination_95ci": [a.get("holdout_contamination_low"), a.get("holdout_contamination_high")],
            "counts": None,
            "auc": a.get("holdout_auc"),
        },
        "holdout_curve": None,
    }


def _recorded_regression(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    a = trial.user_attrs
    holdout: dict[str, Any] = {"rows": None}
    for name in ("mae", "rmse", "r2"):
        holdout[name] = a.get(f"holdout_{name}")
        holdout[f"{name}_95ci"] = [a.get(f"holdout_{name}_low"), a.get(f"holdout_{name}_high")]
    return {
        "val_objective": _value(trial),
        "threshold": None,
        "val_loss": None,
        "validation": {"mae": a.get("val_mae"), "rmse": a.get("val_rmse"), "r2": a.get("val_r2"), "rows": None},
        "holdout": {**holdout, **_NO_RATES},
        "holdout_curve": None,
    }


def _recorded_multilabel(trial: optuna.trial.FrozenTrial, names: Sequence[str]) -> dict[str, Any]:
    a = trial.user_attrs
    labels = []
    for name in names:
        key = label_key(name)
        labels.append(
            {
                "name": name,
                "key": key,
                "threshold": a.get(f"threshold_{key}"),
                "validation": {
                    "completeness": a.get(f"val_completeness_{key}"),
                    "contamination": a.get(f"val_contamination_{key}"),
                    "auc": a.get(f"val_auc_{key}"),
                },
                "holdout": {
                    "completeness": a.get(f"holdout_completeness_{key}"),
                    "completeness_95ci": [
                        a.get(f"holdout_completeness_{key}_low"),
                        a.get(f"holdout_completeness_{key}_high"),
                    ],
                    "contamination": a.get(f"holdout_contamination_{key}"),
                    "contamination_95ci": [
                        a.get(f"holdout_contamination_{key}_low"),
                        a.get(f"holdout_contamination_{key}_high"),
                    ],
                    "counts": None,
                    "auc": a.get(f"holdout_auc_{key}"),
                },
            }
        )
    return {
        "val_objective": _value(trial),
        "threshold": None,
        "labels": labels,
        "validation": {
            "completeness": a.get("val_completeness"),
            "contamination": a.get("val_contamination"),
            "auc": a.get("val_auc"),
            "ap": a.get("val_ap"),
            "average": "macro over labels",
        },
        "holdout": {
            **_NO_RATES,
            "completeness": a.get("holdout_completeness"),
            "contamination": a.get("holdout_contamination"),
            "auc": a.get("holdout_auc"),
            "average": "macro over labels",
        },
        "holdout_curve": None,
    }


def _trial_info(trial: optuna.trial.FrozenTrial, params: dict[str, Any]) -> dict[str, Any]:
    a = trial.user_attrs
    return {
        "number": trial.number,
        "params": params,
        "seed": a.get("seed"),
        "epochs": a.get("epochs"),
        "best_epoch": a.get("best_epoch"),
        "stop_reason": a.get("stop_reason"),
        "mlflow_run_id": a.get("mlflow_run_id"),
    }


def _trial_params(trial: optuna.trial.FrozenTrial, spec: StudySpec) -> TrialParams:
    from tuner.space import suggest

    # A FrozenTrial answers suggest_* with its stored values: the same names and fixed values as in training.
    return suggest(trial, spec.search_space)


def _params_record(params: TrialParams) -> dict[str, Any]:
    record = asdict(params)
    record["widths"] = list(params.widths)
    return record


@dataclass
class _Trained:
    net: torch.nn.Module
    params: dict[str, Any]
    weights_file: Path | None  # the run's own file, copied verbatim; None when retrained
    retrained: bool = False
    notes: list[str] = field(default_factory=list)


def _fetch_trial(
    trial: optuna.trial.FrozenTrial, tracking_uri: str, tmp: Path
) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """The trial's weights file and model description from its MLflow run; (None, None, why) without a run."""
    from tuner.study import MODEL_META_ARTIFACT, RUN_REBUILT, WEIGHTS_ARTIFACT, no_run_reason
    from tuner.tracking import download_run_artifact

    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id or RUN_REBUILT in trial.user_attrs:
        return None, None, no_run_reason(trial)
    meta_file = download_run_artifact(tracking_uri, run_id, MODEL_META_ARTIFACT, tmp)
    weights = download_run_artifact(tracking_uri, run_id, WEIGHTS_ARTIFACT, tmp)
    meta = json.loads(meta_file.read_text()) if meta_file is not None else None
    why = None if weights is not None else f"the weights artifact {WEIGHTS_ARTIFACT} is missing from run {run_id}"
    return weights, meta, why


def _trained_model(
    trial: optuna.trial.FrozenTrial, spec: StudySpec, dataset: Dataset, tracking_uri: str, tmp: Path
) -> _Trained:
    """The trial's best-epoch network: its stored weights, or (only when they are missing) a checked replay."""
    n_out = dataset.n_out
    if dataset.folds:
        nets, record, reason = _stored_folds(trial, spec, dataset, tracking_uri, tmp)
        if nets is not None:
            return _Trained(nets, record, None)
        return _retrain_folds(trial, spec, dataset, reason)
    weights, meta, why = _fetch_trial(trial, tracking_uri, tmp)
    if weights is not None:
        params = meta["params"] if meta else _params_record(_trial_params(trial, spec))
        net = mlp_from_record(params, dataset.n_features, n_out)
        try:
            net.load_state_dict(_load_state(weights))
        except RuntimeError as exc:
            raise ExportError(f"trial {trial.number}: its weights do not fit its parameters: {exc}") from None
        return _Trained(net.eval(), params, weights)
    return _retrain(trial, spec, dataset, why or "no weights")


def _stored_folds(
    trial: optuna.trial.FrozenTrial, spec: StudySpec, dataset: Dataset, tracking_uri: str, tmp: Path
) -> tuple[torch.nn.ModuleList | None, dict[str, Any], str]:
    """A cross-validated trial's fold models from its MLflow run; (None, params, why) when any is missing."""
    from tuner.study import FOLD_WEIGHTS_ARTIFACT, MODEL_META_ARTIFACT, RUN_REBUILT, no_run_reason
    from tuner.tracking import download_run_artifact

    params = _params_record(_trial_params(trial, spec))
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id or RUN_REBUILT in trial.user_attrs:
        return None, params, no_run_reason(trial)
    paths = [FOLD_WEIGHTS_ARTIFACT.format(fold=i) for i in range(len(dataset.folds))]
    # One folder per fold: a downloaded file lands under its base name, and every fold's is state_dict.pt.
    files = [download_run_artifact(tracking_uri, run_id, path, tmp / f"fold_{i}") for i, path in enumerate(paths)]
    missing = [path for path, file in zip(paths, files, strict=True) if file is None]
    if missing:
        return None, params, f"the weights artifact(s) {', '.join(missing)} are missing from run {run_id}"
    meta_file = download_run_artifact(tracking_uri, run_id, MODEL_META_ARTIFACT, tmp)
    if meta_file is not None:
        params = json.loads(meta_file.read_text())["params"]
    n_out = dataset.n_out
    nets = torch.nn.ModuleList(mlp_from_record(params, dataset.n_features, n_out) for _ in paths)
    for i, (net, file) in enumerate(zip(nets, files, strict=True)):
        assert file is not None
        try:
            net.load_state_dict(_load_state(file))
        except RuntimeError as exc:
            raise ExportError(f"trial {trial.number}: fold {i}'s weights do not fit its parameters: {exc}") from None
    return nets.eval(), params, ""


def _require_reproduced(trial: optuna.trial.FrozenTrial, value: float, what: str, artifacts: str) -> str:
    """The note that a retrained trial gave its recorded objective; an ExportError when it did not."""
    recorded = _value(trial)
    if recorded is None or _differs(value, recorded, TOLERANCE) or math.isnan(value):
        raise ExportError(
            f"trial {trial.number}: retraining gave {what} {value:.10g}, the trial recorded "
            f"{recorded!r} (tolerance {TOLERANCE:g}); the data, code or library versions no longer reproduce "
            f"it, so it is not exported. Restore the {artifacts} or export another trial with --trial"
        )
    return f"retrained {what} {value:.10g} matches the recorded {recorded:.10g}"


def _start_retraining(
    trial: optuna.trial.FrozenTrial, spec: StudySpec, what: str, condition: str
) -> tuple[TrialParams, int, str]:
    """A trial's parameters and seed for retraining, and the note that says so (logged as a warning)."""
    params = _trial_params(trial, spec)
    seed = int(trial.user_attrs.get("seed", spec.study.seed + trial.number))
    note = (
        f"{what} on the CPU from its stored parameters and seed {seed}; {condition} the recorded one within "
        f"{TOLERANCE:g}"
    )
    log.warning("%s", note)
    return params, seed, note


def _retrain_folds(trial: optuna.trial.FrozenTrial, spec: StudySpec, dataset: Dataset, why: str) -> _Trained:
    from tuner.study import Objective
    from tuner.tracking import NullTracker

    params, seed, note = _start_retraining(
        trial,
        spec,
        f"{why}: retraining the {len(dataset.folds)} fold models of trial {trial.number}",
        "they are exported only if their mean validation objective matches",
    )
    fits = Objective(spec, dataset, NullTracker()).cross_validate(params, seed)
    if fits.failure:
        raise ExportError(f"trial {trial.number}: retraining failed ({fits.failure}); not exported")
    value = float(np.mean([f.objective for f in fits.folds]))
    notes = [note, _require_reproduced(trial, value, "mean validation objective", "weights artifacts")]
    nets = torch.nn.ModuleList(f.model.cpu().eval() for f in fits.folds)
    return _Trained(nets, _params_record(params), None, retrained=True, notes=notes)


def _retrain(trial: optuna.trial.FrozenTrial, spec: StudySpec, dataset: Dataset, why: str) -> _Trained:
    from tuner.study import Objective, evaluate, trained_as
    from tuner.tracking import NullTracker

    params, seed, note = _start_retraining(
        trial,
        spec,
        f"{why}: retraining trial {trial.number}",
        "it is exported only if the retrained validation objective matches",
    )
    # The engine that trained the trial (packed or eager) retrains it, as it was packed: each reproduces its own
    # numbers.
    engine, packed_with = trained_as(trial)
    model, result = Objective(spec, dataset, NullTracker()).train_trial(
        params, seed, [], engine=engine, packed_with=packed_with
    )
    if result.failed:
        raise ExportError(f"trial {trial.number}: retraining failed ({result.stop_reason}); not exported")
    ev = evaluate(model, dataset, spec, result)
    notes = [note, _require_reproduced(trial, ev.objective, "validation objective", "weights artifact")]
    return _Trained(model.cpu().eval(), _params_record(params), None, retrained=True, notes=notes)


def pinned_requirements() -> list[str]:
    """``name==version`` of the installed torch, numpy, pandas and mlflow, and of tuner (the model's code)."""
    from importlib.metadata import PackageNotFoundError, version

    from tuner import __version__

    out = []
    for name in PINNED:
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        # A local build tag (torch's "+cpu") names no version an index serves; pin the public version.
        out.append(f"{name}=={installed.split('+')[0]}")
    out.append(f"tuner=={__version__}")
    return out


def _signature(config: dict[str, Any]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("double", name) for name in config["input_columns"]])
    outputs = Schema([ColSpec(kind, name) for name, kind in output_columns(config)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _overlap(first: Sequence[Any], second: Sequence[Any]) -> bool | None:
    """Whether two intervals overlap; None when a bound is missing."""
    lo1, hi1 = first
    lo2, hi2 = second
    known = None not in (lo1, hi1, lo2, hi2) and not any(math.isnan(float(v)) for v in (lo1, hi1, lo2, hi2))
    return (max(lo1, lo2) <= min(hi1, hi2)) if known else None


def _comparison(
    chosen: dict[str, Any],
    other: dict[str, Any] | None,
    direction: str,
    task: str = "binary",
    metric: str | None = None,
) -> dict[str, Any] | None:
    """Whether the holdout separates the exported trial from the runner-up: do their 95% intervals overlap?

    A regression compares the intervals of its objective's metric (RMSE for a val_loss objective); a multilabel
    model those of each label's completeness.
    """
    if other is None:
        return None
    a, b = chosen["val_objective"], other["val_objective"]
    lead = None if a is None or b is None else (a - b if direction == "maximize" else b - a)
    out: dict[str, Any] = {"validation_lead": lead}
    if task in REGRESSION:
        return {**out, **_regression_comparison(chosen, other, metric)}
    if task == "multilabel":
        return {**out, **_multilabel_comparison(chosen, other)}
    for key in ("completeness", "contamination"):
        out[f"holdout_{key}_intervals_overlap"] = _overlap(
            chosen["holdout"][f"{key}_95ci"], other["holdout"][f"{key}_95ci"]
        )
    if out["holdout_completeness_intervals_overlap"]:
        out["reading"] = (
            "The holdout completeness intervals overlap: on the holdout the two trials are not distinguishable at "
            "95%, so the lead on validation may be noise."
        )
    elif out["holdout_completeness_intervals_overlap"] is False:
        out["reading"] = "The holdout completeness intervals do not overlap: the holdout confirms a real difference."
    else:
        out["reading"] = "The holdout figures are missing; the lead cannot be judged."
    return out


_STATISTIC_NAMES = {"mae": "MAE", "rmse": "RMSE", "r2": "R²"}


def _regression_comparison(chosen: dict[str, Any], other: dict[str, Any], metric: str | None) -> dict[str, Any]:
    name = metric if metric in _STATISTIC_NAMES else "rmse"
    overlap = _overlap(chosen["holdout"][f"{name}_95ci"], other["holdout"][f"{name}_95ci"])
    shown = _STATISTIC_NAMES[name]
    if overlap:
        reading = (
            f"The holdout {shown} intervals overlap: on the holdout the two trials are not distinguishable at 95%, so "
            "the lead on validation may be noise."
        )
    elif overlap is False:
        reading = f"The holdout {shown} intervals do not overlap: the holdout confirms a real difference."
    else:
        reading = "The holdout figures are missing; the lead cannot be judged."
    return {"compared": f"holdout_{name}", f"holdout_{name}_intervals_overlap": overlap, "reading": reading}


def _multilabel_comparison(chosen: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    theirs = {entry["name"]: entry for entry in other.get("labels") or []}
    overlaps: dict[str, bool | None] = {}
    for entry in chosen["labels"]:
        match = theirs.get(entry["name"])
        overlaps[entry["name"]] = (
            _overlap(entry["holdout"]["completeness_95ci"], match["holdout"]["completeness_95ci"]) if match else None
        )
    apart = [name for name, o in overlaps.items() if o is False]
    unknown = [name for name, o in overlaps.items() if o is None]
    if unknown and len(unknown) == len(overlaps):
        reading = "The holdout figures are missing; the lead cannot be judged."
    elif apart:
        reading = (
            f"The holdout completeness intervals do not overlap for {', '.join(apart)}: the holdout confirms a real "
            "difference there"
            + (
                f"; for {', '.join(n for n in overlaps if n not in apart and n not in unknown)} they overlap."
                if len(apart) + len(unknown) < len(overlaps)
                else "."
            )
        )
    else:
        reading = (
            "For every label the holdout completeness intervals overlap: on the holdout the two trials are not "
            "distinguishable at 95%, so the lead on validation may be noise."
        )
    return {"holdout_completeness_intervals_overlap": overlaps, "reading": reading}


def _plot_file(task: str) -> str:
    """The card's plot: completeness vs efficiency, or a regression's predicted vs true values."""
    return PREDICTION_HTML if task in REGRESSION else CURVE_HTML


def _curve_html(
    dataset: Dataset, spec: StudySpec, scored: dict[str, tuple[np.ndarray, dict[str, Any]]], title: str
) -> str:
    """The holdout plot of each scored trial: its completeness-vs-efficiency curve (each label's for a multilabel
    model) with the frozen operating point, or a regression's predictions against the true values."""
    from tuner.report import completeness_efficiency_figure, prediction_figure

    include = "cdn" if spec.tracking.plotlyjs == "cdn" else True
    if spec.task in REGRESSION:
        values = _truth(dataset)
        parts = {label: (values, predictions) for label, (predictions, _) in scored.items()}
        target = dataset.catalogue.target_names[0]
        return str(prediction_figure(parts, target, title).to_html(full_html=True, include_plotlyjs=include))
    if spec.task == "multilabel":
        labels = _truth(dataset)
        curves, points = {}, {}
        for label, (scores, fig) in scored.items():
            for j, entry in enumerate(fig["labels"]):
                name = f"{label}: {entry['name']}"
                curves[name] = (labels[:, j], scores[:, j])
                points[name] = (entry["holdout"]["completeness"], entry["holdout"]["contamination"])
        figure = completeness_efficiency_figure(curves, points, spec.objective.target_contamination, title)
        return str(figure.to_html(full_html=True, include_plotlyjs=include))
    y = dataset.holdout.y_numpy == dataset.positive_index
    curves = {label: (y, scores) for label, (scores, _) in scored.items()}
    points = {
        label: (fig["holdout"]["completeness"], fig["holdout"]["contamination"]) for label, (_, fig) in scored.items()
    }
    figure = completeness_efficiency_figure(curves, points, spec.objective.target_contamination, title)
    return str(figure.to_html(full_html=True, include_plotlyjs=include))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _ci(pair: Sequence[Any]) -> str:
    return f"[{_fmt(pair[0])}, {_fmt(pair[1])}]"


def _space_lines(space: dict[str, Any]) -> list[str]:
    lines = []
    for name, p in space.items():
        if p.get("value") is not None:
            lines.append(f"- {name}: fixed at {_fmt(p['value'])}")
        elif p.get("choices") is not None:
            lines.append(f"- {name}: one of {', '.join(_fmt(c) for c in p['choices'])}")
        else:
            scale = ", log scale" if p.get("log") else ""
            scale += ", powers of two" if p.get("powers_of_two") else ""
            lines.append(f"- {name}: [{_fmt(p['low'])}, {_fmt(p['high'])}]{scale}")
    return lines


def _validation_lines(v: dict[str, Any]) -> list[str]:
    if v.get("kind") != "kfold":
        return []
    folds = ", ".join(_fmt(x) for x in v.get("fold_objectives") or [])
    return [
        f"**Cross-validated ({v['k']} folds of train + validation).** The model is the mean of the {v['k']} fold "
        "models' probabilities, each fold model through the scaling fitted on its own training folds. The "
        "validation objective is the mean of the fold objectives "
        f"({folds}; standard deviation {_fmt(v.get('objective_std'))}); the threshold and the validation "
        "completeness and contamination come from the out-of-fold scores (each row scored by the fold model that "
        "did not train on it). The holdout was used for nothing but the figures below.",
        "",
    ]


def render_card(card: dict[str, Any]) -> str:
    """The model card as Markdown, from ``model_card.json``'s content."""
    if card["task"] not in SINGLE_LABEL:
        return _render_task_card(card)
    m, d, t, r = card["model"], card["data"], card["trial"], card.get("runner_up")
    lines = [
        f"# Model card: study `{m['study']}`, trial {t['number']}",
        "",
        f"Exported {m['exported_at']} by tuner {m['tuner_version']}. Task: {card['task']}; classes: "
        f"{', '.join(card['classes'])}; positive class: {card['positive_class']}.",
        "",
        f"**Weights:** {m['weights']}",
        "",
        "## Data",
        "",
        f"- source: `{d['source']}`",
        *_where_lines(d),
        f"- hash: `{d['hash']}`; rows: {d['rows']}; classes: {d['class_counts']}",
        f"- split sizes: {', '.join(f'{k} {v}' for k, v in d['split_sizes'].items())} (stratified, fixed by "
        f"data.seed {d['seed']})",
        *_input_lines(d),
        "",
        *_trial_lines(card),
        "## Figures at the frozen threshold",
        "",
        f"Objective: {card['objective']['metric']} ({card['objective']['direction']}), target contamination "
        f"{card['objective']['target_contamination']}. The threshold is chosen on validation and frozen; the holdout "
        "only measures it. Intervals are 95% Wilson intervals." + _fixed_threshold_note(card["objective"]),
        "",
        *_figure_table(
            card,
            [
                ("validation objective", lambda f: _fmt(f["val_objective"], 6)),
                ("threshold", lambda f: _fmt(f["threshold"], 6)),
                ("validation completeness", lambda f: _fmt(f["validation"]["completeness"])),
                ("validation contamination", lambda f: _fmt(f["validation"]["contamination"])),
                (
                    "holdout completeness (95% CI)",
                    lambda f: f"{_fmt(f['holdout']['completeness'])} {_ci(f['holdout']['completeness_95ci'])}",
                ),
                (
                    "holdout contamination (95% CI)",
                    lambda f: f"{_fmt(f['holdout']['contamination'])} {_ci(f['holdout']['contamination_95ci'])}",
                ),
                ("holdout AUC", lambda f: _fmt(f["holdout"]["auc"])),
            ],
        ),
    ]
    if card.get("comparison"):
        lines += ["", f"**Is the lead real?** {card['comparison']['reading']}"]
    lines += [
        "",
        "## Holdout completeness vs efficiency",
        "",
        f"The most complete cut of the holdout under each contamination ceiling (descriptive: these thresholds are "
        f"read off the holdout, not chosen for use). Plot: `{CURVE_HTML}`.",
        "",
    ]
    for label, entry in (("exported", t), ("runner-up", r)):
        if entry is None:
            continue
        lines += [f"Trial {entry['number']} ({label}):", ""]
        lines += _curve_lines(entry["figures"].get("holdout_curve"), entry.get("curve_note"))
    lines += _closing_lines(card, "scores")
    return "\n".join(lines) + "\n"


def _where_lines(d: dict[str, Any]) -> list[str]:
    where = d.get("where")
    if not where:
        return []
    return [
        f"- rows kept (data.where): {'; '.join(_describe_where(c, a) for c, a in where.items())}; the model "
        "learned from these rows only"
    ]


def _describe_where(column: str, allowed: Any) -> str:
    if isinstance(allowed, dict):
        low, high = allowed.get("min"), allowed.get("max")
        return " ".join(
            [*([f"{low} <="] if low is not None else []), column, *([f"<= {high}"] if high is not None else [])]
        )
    if isinstance(allowed, list | tuple):
        return f"{column} in {', '.join(map(str, allowed))}"
    return f"{column} = {allowed}"


def _input_lines(d: dict[str, Any]) -> list[str]:
    return [
        f"- features: {', '.join(_describe_derivation(x) for x in d['derivations'])}",
        f"- raw input columns: {', '.join(d['input_columns'])}; preprocessing: {d['preprocess']} "
        "(fitted on the training rows only, stored as numbers)",
    ]


def _fixed_threshold_note(objective: dict[str, Any]) -> str:
    """A study whose objectives are measured at a fixed score threshold: which figures are at which threshold."""
    if "threshold" not in objective:
        return ""
    values = objective.get("values")
    measured = (
        f" ({', '.join(f'{m} {_fmt(v, 6)}' for m, v in zip(objective['metric'].split(', '), values, strict=False))})"
        if values
        else ""
    )
    return (
        f" The objective{measured} is measured at the fixed score threshold {objective['threshold']}, not at the "
        "frozen one: the validation objective below is at that fixed threshold, every other figure at the frozen one."
    )


def _trial_lines(card: dict[str, Any]) -> list[str]:
    """The search space, the trial's parameters, seed and epochs (and the cross-validation, if any)."""
    t = card["trial"]
    lines = [
        "## Search space and trial",
        "",
        *_space_lines(card["search_space"]),
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in t["params"].items()]
    return [
        *lines,
        "",
        f"Seed {t['seed']}; trained {t['epochs']} epochs, restored epoch {t['best_epoch']} ({t['stop_reason']})."
        if (card.get("validation") or {}).get("kind") != "kfold"
        else f"Seed {t['seed']} (fold i seeded with {t['seed']} + i); {t['stop_reason']}.",
        "",
        *_validation_lines(card.get("validation") or {}),
    ]


def _figure_table(card: dict[str, Any], rows: Sequence[tuple[str, Any]]) -> list[str]:
    """One row per figure, one column for the exported trial and one for the runner-up."""
    t, r = card["trial"], card.get("runner_up")
    lines = [
        "| | trial " + str(t["number"]) + (f" (exported) | trial {r['number']} (runner-up) |" if r else " |"),
        "|---|---|" + ("---|" if r else ""),
    ]
    for label, get in rows:
        lines.append(f"| {label} | {get(t['figures'])} |" + (f" {get(r['figures'])} |" if r else ""))
    return lines


def _curve_lines(curve: list[dict[str, Any]] | None, note: str | None) -> list[str]:
    if not curve:
        return [f"_{note or 'curve not available'}_", ""]
    lines = [
        "| max contamination | completeness | contamination | threshold | selected |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {_fmt(p['max_contamination'])} | {_fmt(p['completeness'])} | {_fmt(p['contamination'])} | "
        f"{_fmt(p['threshold'], 6)} | {p['selected']} |"
        for p in curve
    ]
    return [*lines, ""]


def _closing_lines(card: dict[str, Any], outputs: str, described: Sequence[str] = ()) -> list[str]:
    """Verification, use (with ``described``: what the output columns mean) and notes."""
    m, d, v = card["model"], card["data"], card["verification"]
    lines = [
        "## Verification",
        "",
        f"Re-measured from the exported files on the study's validation and holdout rows: "
        f"{'matches' if v['passed'] else 'DOES NOT match'} the trial's recorded figures (tolerance {v['tolerance']:g}; "
        f"largest difference {_fmt(v['max_abs_difference'], 3)}). The saved pyfunc model's {outputs} equal the "
        f"network's within {_fmt(v['pyfunc_max_abs_score_difference'], 3)}.",
        "",
        "## Use",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f"model = mlflow.pyfunc.load_model({card['usage']['uri']!r})",
        f"scores = model.predict(catalogue[{d['input_columns']!r}])",
        "```",
        "",
        f"or `tuner predict {card['usage']['uri']} --data catalogue.csv --out scored.csv`. Requirements: "
        f"{', '.join(card['usage']['requirements'])}; the model's code is the tuner package (install it from its "
        "repository where the model is loaded).",
    ]
    if described:
        lines += ["", *described]
    if m.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in m["notes"]]
    return lines


def _cell(text: Any) -> str:
    """A table cell: a label such as ``a|b`` must not split the Markdown row."""
    return str(text).replace("|", "\\|")


def _render_task_card(card: dict[str, Any]) -> str:
    """:func:`render_card` for a multilabel or regression model."""
    m, d, t = card["model"], card["data"], card["trial"]
    task, targets = card["task"], card["targets"]
    if task == "multilabel":
        about = (
            f"labels: {', '.join(targets)} (one sigmoid each: a row may carry any number of them, each selected at "
            "its own threshold)"
        )
        target_line = f"labels (positive rows): {d['label_counts']}"
        strata = "stratified by label combination"
    else:
        about = f"target: {targets[0]}"
        scaling = card.get("target_scaling")
        if scaling:
            about += (
                f", predicted in its own unit (the network learns it standardised with the training rows' mean "
                f"{_fmt(scaling['mean'], 6)} and standard deviation {_fmt(scaling['std'], 6)}; the scorer undoes it)"
            )
        else:
            about += ", predicted in [0, 1] (a sigmoid output)"
        target_line = f"target {d['target']}"
        strata = "stratified by target quantile"
    lines = [
        f"# Model card: study `{m['study']}`, trial {t['number']}",
        "",
        f"Exported {m['exported_at']} by tuner {m['tuner_version']}. Task: {task}; {about}.",
        "",
        f"**Weights:** {m['weights']}",
        "",
        "## Data",
        "",
        f"- source: `{d['source']}`",
        *_where_lines(d),
        f"- hash: `{d['hash']}`; rows: {d['rows']}; {target_line}",
        f"- split sizes: {', '.join(f'{k} {v}' for k, v in d['split_sizes'].items())} ({strata}, fixed by "
        f"data.seed {d['seed']})",
        *_input_lines(d),
        "",
        *_trial_lines(card),
    ]
    if task == "multilabel":
        lines += _multilabel_sections(card)
        described = [
            "Output columns, per label: `p_<label>` is its probability and `predicted_<label>` is "
            "`p_<label> >= threshold`, the label's threshold frozen on validation:",
            "",
            *(
                f"- {entry['name']}: `p_{entry['key']}`, `predicted_{entry['key']}` (threshold "
                f"{_fmt(entry['threshold'], 6)})"
                for entry in t["figures"]["labels"]
            ),
        ]
        return "\n".join([*lines, *_closing_lines(card, "scores", described)]) + "\n"
    lines += _regression_sections(card)
    column = card["usage"]["output_columns"][0]
    unit = "in [0, 1]" if task == "unit_regression" else "in its own unit"
    described = [f"Output column: `{column}`, the predicted {targets[0]} {unit}."]
    return "\n".join([*lines, *_closing_lines(card, "predictions", described)]) + "\n"


def _regression_sections(card: dict[str, Any]) -> list[str]:
    from tuner.regression import N_RESAMPLES

    o, target = card["objective"], card["targets"][0]
    lines = [
        "## Figures",
        "",
        f"Objective: {o['metric']} ({o['direction']}) on the validation rows; MAE, RMSE and R² are in the unit of "
        f"{target}. The holdout only measures the model. Holdout intervals are 95% percentile bootstrap intervals "
        f"({N_RESAMPLES} resamples of its rows, fixed random state).",
        "",
        *_figure_table(
            card,
            [
                ("validation objective", lambda f: _fmt(f["val_objective"], 6)),
                ("validation MAE", lambda f: _fmt(f["validation"]["mae"])),
                ("validation RMSE", lambda f: _fmt(f["validation"]["rmse"])),
                ("validation R²", lambda f: _fmt(f["validation"]["r2"])),
                ("holdout MAE (95% CI)", lambda f: f"{_fmt(f['holdout']['mae'])} {_ci(f['holdout']['mae_95ci'])}"),
                ("holdout RMSE (95% CI)", lambda f: f"{_fmt(f['holdout']['rmse'])} {_ci(f['holdout']['rmse_95ci'])}"),
                ("holdout R² (95% CI)", lambda f: f"{_fmt(f['holdout']['r2'])} {_ci(f['holdout']['r2_95ci'])}"),
            ],
        ),
    ]
    if card.get("comparison"):
        lines += ["", f"**Is the lead real?** {card['comparison']['reading']}"]
    lines += [
        "",
        "## Holdout: predicted vs true",
        "",
        f"Each holdout row's prediction against its true {target}: `{PREDICTION_HTML}`.",
        "",
    ]
    return lines


def _label_table(figures: dict[str, Any]) -> list[str]:
    """One row per label at its frozen threshold, then the macro averages."""
    lines = [
        "| label | threshold | validation completeness | validation contamination | holdout completeness (95% CI) | "
        "holdout contamination (95% CI) | holdout AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in figures["labels"]:
        v, h = entry["validation"], entry["holdout"]
        lines.append(
            f"| {_cell(entry['name'])} | {_fmt(entry['threshold'], 6)} | {_fmt(v['completeness'])} | "
            f"{_fmt(v['contamination'])} | {_fmt(h['completeness'])} {_ci(h['completeness_95ci'])} | "
            f"{_fmt(h['contamination'])} {_ci(h['contamination_95ci'])} | {_fmt(h['auc'])} |"
        )
    v, h = figures["validation"], figures["holdout"]
    lines.append(
        f"| macro average | | {_fmt(v['completeness'])} | {_fmt(v['contamination'])} | {_fmt(h['completeness'])} | "
        f"{_fmt(h['contamination'])} | {_fmt(h['auc'])} |"
    )
    infeasible = [e["name"] for e in figures["labels"] if e["validation"].get("feasible") is False]
    if infeasible:
        lines += [
            "",
            f"No threshold met the target contamination on validation for {', '.join(infeasible)}: its threshold "
            "lies above every validation score, so it selects (almost) nothing.",
        ]
    return lines


def _multilabel_sections(card: dict[str, Any]) -> list[str]:
    o, t, r = card["objective"], card["trial"], card.get("runner_up")
    lines = [
        "## Figures at the frozen thresholds",
        "",
        f"Objective: {o['metric']} ({o['direction']}), the macro average over the labels; target contamination "
        f"{o['target_contamination']}. Each label's threshold is chosen on validation for the target contamination "
        "and frozen; the holdout only measures it. Intervals are 95% Wilson intervals; the macro averages (means "
        "over the labels) have none.",
        "",
    ]
    for label, entry in (("exported", t), ("runner-up", r)):
        if entry is None:
            continue
        lines += [
            f"Trial {entry['number']} ({label}): validation objective {_fmt(entry['figures']['val_objective'], 6)}.",
            "",
            *_label_table(entry["figures"]),
            "",
        ]
    if card.get("comparison"):
        lines += [f"**Is the lead real?** {card['comparison']['reading']}", ""]
    lines += [
        "## Holdout completeness vs efficiency",
        "",
        "Per label, the most complete cut of the holdout under each contamination ceiling (descriptive: these "
        f"thresholds are read off the holdout, not chosen for use). Plot: `{CURVE_HTML}`.",
        "",
    ]
    for label, entry in (("exported", t), ("runner-up", r)):
        if entry is None:
            continue
        curves = entry["figures"].get("holdout_curve")
        if not curves:
            lines += [f"Trial {entry['number']} ({label}):", ""]
            lines += _curve_lines(None, entry.get("curve_note"))
            continue
        for name, curve in curves.items():
            lines += [f"Trial {entry['number']} ({label}), label {name}:", ""]
            lines += _curve_lines(curve, None)
    return lines


def _verification(trial: optuna.trial.FrozenTrial, ev: AnyEvaluation) -> dict[str, Any]:
    """The trial's recorded figures against those of the network being exported."""
    checked = _checked(ev)
    recorded = _recorded(trial, checked)
    final = ev.final_metrics()
    measured = {"val_objective": ev.objective, **{k: final[k] for k in checked}}
    common = [k for k in recorded if k in measured]
    diffs = [abs(float(measured[k]) - recorded[k]) for k in common if not math.isnan(recorded[k] - measured[k])]
    mismatched = [k for k in common if _differs(measured[k], recorded[k], TOLERANCE)]
    return {
        "tolerance": TOLERANCE,
        "recorded": recorded,
        "exported_model": measured,
        "max_abs_difference": max(diffs, default=0.0),
        "mismatched": mismatched,
        "passed": not mismatched,
    }


def _model_config(
    name: str,
    trial: optuna.trial.FrozenTrial,
    spec: StudySpec,
    dataset: Dataset,
    frame: pd.DataFrame,
    params: Any,
    ev: AnyEvaluation,
) -> dict[str, Any]:
    """``tuner_model.json``: everything the scorer needs besides the weights, as plain numbers and names."""
    from tuner import __version__

    derivations = _derivations(frame.columns, dataset.catalogue.feature_names)
    columns = (c for d in derivations for c in ([d["column"]] if "column" in d else d["colour"]))
    config: dict[str, Any] = {
        "format": FORMAT,
        "study": name,
        "trial_number": trial.number,
        "task": spec.task,
        "params": params,
        "n_features": dataset.n_features,
        "n_outputs": dataset.n_out,
        "feature_names": list(dataset.catalogue.feature_names),
        "derivations": derivations,
        "input_columns": list(dict.fromkeys(columns)),
        "id_columns": list(spec.data.id_columns),
        "preprocessor": dataset.preprocessor.to_dict(),
    }
    if isinstance(ev, MultilabelEvaluation | RegressionEvaluation):
        config.update(_task_config(spec, dataset, ev))
    else:
        config.update(
            {
                "class_names": list(dataset.catalogue.class_names),
                "positive_class": spec.data.positive,
                "positive_index": dataset.positive_index,
                # Chosen on validation with these very weights (equal to the recorded one when verification passed).
                "threshold": ev.val_point.threshold,
                "target_contamination": spec.objective.target_contamination,
            }
        )
    config.update({"eval_batch_size": spec.train.eval_batch_size, "tuner_version": __version__})
    if dataset.folds:
        # Each fold model has its own scaling: no single preprocessor describes the model.
        del config["preprocessor"]
        config.update(_ensemble_config(dataset))
    return config


def _task_config(spec: StudySpec, dataset: Dataset, ev: MultilabelEvaluation | RegressionEvaluation) -> dict[str, Any]:
    """What a multilabel or regression scorer needs: the targets, each label's frozen threshold, or the target's
    standardisation to undo. Their output columns are named after the targets (made safe by label_key)."""
    names = list(dataset.catalogue.target_names)
    keys = [label_key(n) for n in names]
    seen: dict[str, str] = {}
    for name, key in zip(names, keys, strict=True):
        if key in seen:
            raise ExportError(
                f"data.target: labels {seen[key]!r} and {name!r} would both be output as p_{key} / predicted_{key}; "
                "rename one of the label columns so that their names differ in letters or digits"
            )
        seen[key] = name
    config: dict[str, Any] = {
        "format": TASK_FORMAT,
        "positive_class": None,
        "target_names": names,
        "target_keys": keys,
    }
    if isinstance(ev, MultilabelEvaluation):
        # Chosen on validation with these very weights, one per label in target_names' order.
        config["thresholds"] = ev.thresholds
        config["target_contamination"] = spec.objective.target_contamination
    elif dataset.target_scaling is not None:
        mean, std = dataset.target_scaling
        config["target_scaling"] = {"mean": mean, "std": std}
    else:
        config["target_scaling"] = None
    return config


def _ensemble_config(dataset: Dataset) -> dict[str, Any]:
    """For a cross-validated trial: format 2, and each fold model's scaling."""
    return {
        "format": ENSEMBLE_FORMAT,
        "ensemble": {
            "combine": "mean of the fold models' class probabilities, each model through its own scaling",
            "threshold_from": "out-of-fold scores",
            "members": [{"fold": f.index, "preprocessor": f.preprocessor.to_dict()} for f in dataset.folds],
        },
    }


def _save_pyfunc(stage: Path, src: Path, trained: _Trained, config: dict[str, Any], example: pd.DataFrame) -> None:
    """Write the weights, the JSON and the entry script, and let MLflow assemble the model directory."""
    import mlflow.pyfunc

    src.mkdir(parents=True)
    weights_file = src / WEIGHTS_FILE
    if trained.weights_file is not None:
        shutil.copyfile(trained.weights_file, weights_file)  # verbatim: the run's own best-epoch state dict
    else:
        torch.save({k: v.detach().cpu() for k, v in trained.net.state_dict().items()}, weights_file)
    config_file = src / CONFIG_FILE
    config_file.write_text(json.dumps(_json_safe(config), indent=1))
    entry = src / ENTRY_FILE
    entry.write_text(ENTRY_SCRIPT)
    mlflow.pyfunc.save_model(
        str(stage),
        python_model=str(entry),  # a path: models from code, see ENTRY_SCRIPT
        artifacts={"weights": str(weights_file), "config": str(config_file)},
        signature=_signature(config),
        input_example=example,
        pip_requirements=pinned_requirements(),
        metadata={"tuner.study": config["study"], "tuner.trial_number": config["trial_number"]},
    )


def _check_saved(
    stage: Path, frame: pd.DataFrame, dataset: Dataset, ev: AnyEvaluation, config: dict[str, Any]
) -> float:
    """Load the saved directory as a user would and score the validation and holdout rows from raw columns.

    Returns:
        The largest difference from the scores the network gave during measurement (zero when all is well): the
        positive class's probability, each label's, or a regression's prediction in the target's unit.

    Raises:
        ExportError: The saved model scores differently: derivation, scaling, weights, a label's threshold or a
            regression's target scaling did not survive.
    """
    rows = np.concatenate([dataset.split.validation, dataset.split.holdout])
    if isinstance(ev, RegressionEvaluation):
        expected = np.concatenate([ev.val_predictions, ev.holdout_predictions])[:, None]
        columns = [prediction_column(config)]
    elif isinstance(ev, MultilabelEvaluation):
        expected = np.concatenate([ev.val_scores, ev.holdout_scores])
        columns = [f"p_{key}" for key in config["target_keys"]]
    else:
        expected = np.concatenate([ev.val_scores, ev.holdout_scores])
        if dataset.folds:
            # The validation scores of a cross-validated trial are out-of-fold (one fold model each), not the mean.
            rows, expected = dataset.split.holdout, ev.holdout_scores
        columns = [f"p_{config['class_names'][config['positive_index']]}"]
        expected = expected[:, None]
    scored = predict_frame(stage, frame.iloc[rows])
    saved = scored[columns].to_numpy(dtype=np.float64)
    diff = float(np.max(np.abs(saved - expected))) if len(rows) else 0.0
    if diff > TOLERANCE:
        raise ExportError(
            f"the saved model scores the study's rows differently from the trained network (largest difference "
            f"{diff:.3g} > {TOLERANCE:g}); not exported"
        )
    if isinstance(ev, MultilabelEvaluation):
        # The holdout selections at the saved thresholds must be those the holdout figures count.
        held = scored.iloc[len(dataset.split.validation) :]
        for key, figures in zip(config["target_keys"], ev.labels, strict=True):
            selected = int(held[f"predicted_{key}"].sum())
            if selected != figures.holdout.counts.n_pred_pos:
                raise ExportError(
                    f"the saved model selects {selected} holdout rows as {figures.name!r}, the measured threshold "
                    f"{figures.point.threshold:.6g} selects {figures.holdout.counts.n_pred_pos}; not exported"
                )
    return diff


def _validation_card(trial: optuna.trial.FrozenTrial, spec: StudySpec) -> dict[str, Any]:
    if spec.validation.kind != "kfold":
        return {"kind": "split"}
    a = trial.user_attrs
    return {
        "kind": "kfold",
        "k": spec.validation.k,
        "fold_objectives": a.get("fold_objectives"),
        "objective_std": a.get("cv_objective_std"),
    }


def _card(
    study: optuna.Study,
    spec: StudySpec,
    dataset: Dataset,
    config: dict[str, Any],
    trial: optuna.trial.FrozenTrial,
    trained: _Trained,
    chosen: dict[str, Any],
    runner: dict[str, Any] | None,
    verification: dict[str, Any],
    usage_uri: str,
    notes: list[str],
) -> dict[str, Any]:
    """``model_card.json``: provenance, data, search space, the trial and its runner-up, and the checks."""
    from tuner import __version__

    facts = {**dataset.facts(), **study.user_attrs.get("tuner.data", {})}
    if trained.retrained:
        weights = (
            "retrained from the stored parameters and seed (the run's weights artifact was missing); the retrained "
            f"validation objective matched the recorded {_value(trial)!r} within {TOLERANCE:g}"
        )
    elif dataset.folds:
        run = trial.user_attrs.get("mlflow_run_id")
        weights = (
            f"the best epochs' state dicts of the {len(dataset.folds)} fold models as logged by trial run {run}, "
            "held in one state dict (fold i under the keys i.*)"
        )
    else:
        run = trial.user_attrs.get("mlflow_run_id")
        weights = f"the best epoch's state dict as logged by trial run {run}, copied verbatim"
    card = {
        "format": FORMAT,
        "model": {
            "study": config["study"],
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "tuner_version": __version__,
            "weights": weights,
            "retrained": trained.retrained,
            "mlflow_parent_run_id": study.user_attrs.get("tuner.mlflow_parent_run_id"),
            "notes": list(notes),
        },
        "task": spec.task,
        **_card_targets(config),
        "data": {
            "source": facts.get("data.source"),
            **({"where": dict(spec.data.where)} if spec.data.where else {}),
            "hash": facts.get("data.hash"),
            "rows": facts.get("data.rows"),
            "class_counts": facts.get("data.class_counts"),
            # A regression's target (mean, std, range) or a multilabel task's positive rows per label.
            **{k: facts.get(f"data.{k}") for k in ("target", "label_counts") if spec.task not in SINGLE_LABEL},
            "split_sizes": dataset.split.sizes(),
            "seed": spec.data.seed,
            "features": config["feature_names"],
            "derivations": config["derivations"],
            "input_columns": config["input_columns"],
            "id_columns": config["id_columns"],
            "preprocess": spec.data.preprocess,
        },
        "search_space": spec.search_space.model_dump(mode="json"),
        "training": spec.train.model_dump(mode="json"),
        "objective": {
            "metric": ", ".join(spec.objective.metrics),
            "direction": ", ".join(spec.objective.directions),
            "target_contamination": spec.objective.target_contamination,
            # A multi-objective study: the trial's value per objective (val_objective is the first) and the fixed
            # threshold that completeness and contamination objectives are measured at.
            **({"values": list(trial.values)} if spec.objective.multi and trial.values else {}),
            **({"threshold": spec.objective.threshold} if spec.objective.uses_threshold else {}),
        },
        "trial": {**_trial_info(trial, trained.params), "figures": chosen},
        "validation": _validation_card(trial, spec),
        "runner_up": runner,
        "comparison": _comparison(
            chosen,
            runner["figures"] if runner else None,
            spec.objective.direction,
            spec.task,
            spec.objective.metrics[0],
        ),
        "verification": verification,
        "usage": {
            "uri": usage_uri,
            "requirements": pinned_requirements(),
            "input_columns": config["input_columns"],
            "output_columns": [c for c, _ in output_columns(config)],
        },
    }
    safe: dict[str, Any] = _json_safe(card)
    return safe


def _card_targets(config: dict[str, Any]) -> dict[str, Any]:
    """What the model predicts: classes and the positive class, or the labels, or the regression's target."""
    if config["task"] in SINGLE_LABEL:
        return {"classes": config["class_names"], "positive_class": config["positive_class"]}
    out = {"classes": None, "positive_class": None, "targets": config["target_names"]}
    if config["task"] in REGRESSION:
        out["target_scaling"] = config["target_scaling"]
    return out


def figures_summary(figures: dict[str, Any], task: str) -> str:
    """One line of a trial's card figures, for the export's console summary.

    Binary and multiclass: the validation objective, the threshold and the holdout completeness and
    contamination with their Wilson intervals; multilabel: the same per label at each label's threshold, after
    the macro averages; regressions: the holdout MAE, RMSE and R² with their bootstrap intervals.
    """
    f, h = figures, figures["holdout"]
    head = f"validation objective {_fmt(f['val_objective'], 5)}"
    if task in REGRESSION:
        shown = ", ".join(f"{_STATISTIC_NAMES[k]} {_fmt(h[k])} {_ci(h[f'{k}_95ci'])}" for k in ("mae", "rmse", "r2"))
        return f"{head}; holdout {shown} (95% bootstrap intervals)"
    if task == "multilabel":
        labels = "; ".join(
            f"{e['name']}: threshold {_fmt(e['threshold'], 5)}, completeness {_fmt(e['holdout']['completeness'])} "
            f"{_ci(e['holdout']['completeness_95ci'])}, contamination {_fmt(e['holdout']['contamination'])} "
            f"{_ci(e['holdout']['contamination_95ci'])}"
            for e in f["labels"]
        )
        return (
            f"{head}; holdout macro completeness {_fmt(h['completeness'])}, macro contamination "
            f"{_fmt(h['contamination'])}; {labels}"
        )
    return (
        f"{head}, threshold {_fmt(f['threshold'], 5)}; holdout completeness {_fmt(h['completeness'])} "
        f"{_ci(h['completeness_95ci'])}, contamination {_fmt(h['contamination'])} {_ci(h['contamination_95ci'])}"
    )


def _registry_tags(card: dict[str, Any]) -> dict[str, str]:
    """The holdout headline figures as registry tags: completeness and contamination (macro for a multilabel
    model), or a regression's MAE, RMSE and R²."""
    h = card["trial"]["figures"]["holdout"]
    if card["task"] in REGRESSION:
        return {f"tuner.holdout_{k}": str(h[k]) for k in ("mae", "rmse", "r2")}
    if card["task"] == "multilabel":
        return {
            "tuner.holdout_macro_completeness": str(h["completeness"]),
            "tuner.holdout_macro_contamination": str(h["contamination"]),
        }
    return {
        "tuner.holdout_completeness": str(h["completeness"]),
        "tuner.holdout_contamination": str(h["contamination"]),
    }


def _log_and_register(
    uri: str,
    run_id: str,
    target: Path,
    name: str,
    trial: optuna.trial.FrozenTrial,
    card: dict[str, Any],
    register: bool,
) -> tuple[str, str | None]:
    """Upload the directory to ``run_id``; with ``register``, make it a new version of ``name`` at ``champion``."""
    from tuner.tracking import log_model_dir, register_model_version

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    # A fresh path per export: a registered version must never see its files replaced by a later export.
    artifact_path = f"exports/trial-{trial.number:04d}-{stamp}"
    source = log_model_dir(uri, run_id, target, artifact_path)
    if not register:
        return f"runs:/{run_id}/{artifact_path}", None
    h = card["trial"]["figures"]["holdout"]
    metric = card["objective"]["metric"]
    version = register_model_version(
        uri,
        name,
        source,
        run_id,
        alias=ALIAS,
        tags={
            "tuner.study": name,
            "tuner.trial_number": str(trial.number),
            "tuner.val_objective": str(_value(trial)),
            **_registry_tags(card),
            "tuner.retrained": str(card["model"]["retrained"]).lower(),
        },
        description=_registry_description(card, name, trial, metric, h),
    )
    return f"runs:/{run_id}/{artifact_path}", version


def _registry_description(
    card: dict[str, Any], name: str, trial: optuna.trial.FrozenTrial, metric: str, h: dict[str, Any]
) -> str:
    head = f"Trial {trial.number} of study {name}: validation {metric} {_fmt(_value(trial))}"
    if card["task"] in REGRESSION:
        shown = ", ".join(f"{_STATISTIC_NAMES[k]} {_fmt(h[k])} {_ci(h[f'{k}_95ci'])}" for k in ("mae", "rmse", "r2"))
        return f"{head}; holdout {shown} (95% bootstrap intervals), in the unit of {card['targets'][0]}."
    if card["task"] == "multilabel":
        labels = "; ".join(
            f"{e['name']} completeness {_fmt(e['holdout']['completeness'])} {_ci(e['holdout']['completeness_95ci'])}, "
            f"contamination {_fmt(e['holdout']['contamination'])} {_ci(e['holdout']['contamination_95ci'])}"
            for e in card["trial"]["figures"]["labels"]
        )
        return f"{head}; holdout, each label at its frozen threshold: {labels}."
    return (
        f"{head}; holdout completeness "
        f"{_fmt(h['completeness'])} {_ci(h['completeness_95ci'])}, contamination {_fmt(h['contamination'])} "
        f"{_ci(h['contamination_95ci'])} at the frozen threshold."
    )


def export_trial(
    study: optuna.Study,
    spec: StudySpec,
    *,
    trial_number: int | None = None,
    rule: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
    register: bool = False,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
) -> ExportResult:
    """Export a COMPLETE trial as an MLflow pyfunc model directory, log it to MLflow and optionally register it.

    Args:
        study: The stored study.
        spec: The study's spec (a study file, or the one stored in the study); the stored one wins for what the
            trials ran with, this one says where the data and the stores are.
        trial_number: The trial to export; the best trial when None (a multi-objective study needs it or ``rule``).
        rule: In a multi-objective study, choose from the Pareto front: ``contamination<=0.1`` exports the front
            trial with the best other objective among those with contamination <= 0.1.
        out: The model directory; ``exports/<study>-trial-<N>`` when None.
        force: Replace ``out`` when it holds a previous export.
        register: Register the model under the study's name and move alias ``champion`` to the new version.
        tracking_uri: The MLflow tracking store; ``tracking.uri`` of the spec when None.
        log_to_mlflow: Upload the directory to the study's parent run (else the trial's run).

    Returns:
        Where the model went, its card, and any notes (a retrained trial, a changed study file).

    Raises:
        ExportError: No such trial, an occupied ``out``, weights that cannot be used or reproduced.
        DataError: The study's catalogue is unreadable or changed since the study ran.
        TrackingError: The MLflow store cannot be read or written.
    """
    spec, notes = _study_spec(study, spec)
    uri = tracking_uri or spec.tracking.uri
    trial, runner = _pick_trials(study, spec, trial_number, rule, notes)
    name = spec.study.name
    target = Path(out) if out is not None else Path("exports") / f"{name.replace('/', '_')}-trial-{trial.number}"
    _prepare_out(target, force)
    run_id = study.user_attrs.get("tuner.mlflow_parent_run_id") or trial.user_attrs.get("mlflow_run_id")
    if register and not (log_to_mlflow and run_id):
        raise ExportError(
            f"--register: study {name!r} has no MLflow run to log the model to (tracking was off); export without "
            "--register"
        )
    frame, dataset = _load_data(study, spec)
    y_hold = _truth(dataset)
    target_contamination = spec.objective.target_contamination

    with tempfile.TemporaryDirectory(prefix="tuner-export-") as tmp_name:
        tmp = Path(tmp_name)
        trained = _trained_model(trial, spec, dataset, uri, tmp / "trial")
        notes += trained.notes
        ev = _measure(trained.net, dataset, spec, params_from_record(trained.params))
        verification = _verification(trial, ev)
        if verification["mismatched"]:
            # Stored weights are the trial's own, so a mismatch means other numerics (a study trained on a GPU,
            # measured here on the CPU): the card gives the exported model's figures and says so. A retrained
            # model was held to the recorded objective in _retrain.
            m, r = verification["exported_model"], verification["recorded"]
            detail = ", ".join(f"{k} recorded {r[k]:.6g}, exported {m[k]:.6g}" for k in verification["mismatched"])
            notes.append(f"the exported model's figures differ from the trial's recorded ones: {detail}")
            log.warning("%s", notes[-1])

        config = _model_config(name, trial, spec, dataset, frame, trained.params, ev)
        stage = tmp / "model"
        example = frame.iloc[dataset.split.train[:5]][config["input_columns"]].reset_index(drop=True)
        _save_pyfunc(stage, tmp / "src", trained, config, example.astype(np.float64))
        verification["pyfunc_max_abs_score_difference"] = _check_saved(stage, frame, dataset, ev, config)

        # The runner-up (best other COMPLETE trial) so a reader can judge whether the lead is real.
        chosen = _figures(ev, y_hold, target_contamination)
        scored = {f"trial {trial.number} (exported)": (_held(ev), chosen)}
        runner_card = None
        if runner is not None:
            runner_card = _runner_up(runner, spec, dataset, uri, tmp / "runner", y_hold, scored)
        usage_uri = f"models:/{name}@{ALIAS}" if register else str(target)
        card = _card(study, spec, dataset, config, trial, trained, chosen, runner_card, verification, usage_uri, notes)
        (stage / CARD_JSON).write_text(json.dumps(card, indent=1))
        (stage / CARD_MD).write_text(render_card(card))
        what = "predicted vs true" if spec.task in REGRESSION else "completeness vs efficiency"
        title = f"study {name}: holdout {what}"
        (stage / _plot_file(spec.task)).write_text(_curve_html(dataset, spec, scored, title))
        if target.exists():
            shutil.rmtree(target)  # _prepare_out allowed it: empty, or a previous export with --force
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(stage, target)
        except OSError as exc:
            shutil.rmtree(target, ignore_errors=True)  # no half-copied model
            raise ExportError(f"--out: cannot write {target}: {exc.strerror or exc}") from None

    logged_uri = version = None
    if log_to_mlflow and run_id:
        logged_uri, version = _log_and_register(uri, run_id, target, name, trial, card, register)
    elif log_to_mlflow:
        notes.append("the study has no MLflow run; the model was saved locally only")
    return ExportResult(
        path=target,
        study_name=name,
        trial_number=trial.number,
        runner_up=runner.number if runner is not None else None,
        retrained=trained.retrained,
        card=card,
        notes=tuple(notes),
        run_id=run_id if logged_uri else None,
        logged_uri=logged_uri,
        registered_name=name if version else None,
        version=version,
    )


def _runner_up(
    runner: optuna.trial.FrozenTrial,
    spec: StudySpec,
    dataset: Dataset,
    tracking_uri: str,
    tmp: Path,
    y_hold: np.ndarray,
    scored: dict[str, tuple[np.ndarray, dict[str, Any]]],
) -> dict[str, Any]:
    """The runner-up's figures: re-measured from its stored weights when present (never retrained), else recorded."""
    info = _trial_info(runner, _params_record(_trial_params(runner, spec)))
    if dataset.folds:
        return _runner_up_folds(runner, spec, dataset, tracking_uri, tmp, y_hold, scored, info)
    try:
        weights, meta, why = _fetch_trial(runner, tracking_uri, tmp)
    except TunerError as exc:
        weights, meta, why = None, None, str(exc)
    recorded = _recorded_figures(runner, spec.task, dataset.catalogue.target_names)
    if weights is None:
        return {**info, "figures": recorded, "curve_note": f"curve not available: {why}"}
    params = meta["params"] if meta else info["params"]
    net = mlp_from_record(params, dataset.n_features, dataset.n_out)
    try:
        net.load_state_dict(_load_state(weights))
    except (RuntimeError, ExportError) as exc:
        return {**info, "figures": recorded, "curve_note": f"curve not available: {exc}"}
    ev = _measure(net.eval(), dataset, spec, params_from_record(params))
    figures = _figures(ev, y_hold, spec.objective.target_contamination)
    scored[f"trial {runner.number} (runner-up)"] = (_held(ev), figures)
    return {**info, "figures": figures, "curve_note": None}


def _runner_up_folds(
    runner: optuna.trial.FrozenTrial,
    spec: StudySpec,
    dataset: Dataset,
    tracking_uri: str,
    tmp: Path,
    y_hold: np.ndarray,
    scored: dict[str, tuple[np.ndarray, dict[str, Any]]],
    info: dict[str, Any],
) -> dict[str, Any]:
    """:func:`_runner_up` for a cross-validated study: its fold models re-measured when stored, else recorded."""
    try:
        nets, _, why = _stored_folds(runner, spec, dataset, tracking_uri, tmp)
    except TunerError as exc:
        nets, why = None, str(exc)
    if nets is None:
        return {**info, "figures": _recorded_figures(runner), "curve_note": f"curve not available: {why}"}
    ev = _measure(nets, dataset, spec)
    figures = _figures(ev, y_hold, spec.objective.target_contamination)
    scored[f"trial {runner.number} (runner-up)"] = (_held(ev), figures)
    return {**info, "figures": figures, "curve_note": None}


# --------------------------------------------------------------------------------------------------------------
# Scoring files: tuner predict


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_file` wrote."""

    out: Path
    rows: int
    selected: int | None  # rows predicted as the positive class (binary, multiclass with one); else None
    positive_class: str | None
    threshold: float  # the positive class's frozen threshold; NaN for a multilabel or regression model
    columns: tuple[str, ...]
    task: str = "binary"
    # Multilabel: per label, the rows selected at its frozen threshold, and that threshold.
    selected_per_label: dict[str, int] | None = None
    thresholds: dict[str, float] | None = None


def load_model_dir(model: str, tracking_uri: str | None, tmp: str | Path) -> Path:
    """A local model directory from a directory, ``runs:/...`` or ``models:/...`` (downloaded into ``tmp``).

    Raises:
        ExportError: ``model`` is neither an exported directory nor a model URI.
        TrackingError: The URI names nothing in the tracking store.
    """
    from tuner.tracking import download_model

    if model.startswith(("runs:/", "models:/")):
        import os

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns/mlflow.db"
        path = download_model(model, uri, tmp)
    else:
        path = Path(model)
        if not path.is_dir():
            raise ExportError(f"MODEL: {model!r} is neither a directory nor a runs:/ or models:/ URI")
    if not (path / "MLmodel").is_file() or not (path / "artifacts" / CONFIG_FILE).is_file():
        raise ExportError(f"MODEL: {model} is not a tuner export (no MLmodel or artifacts/{CONFIG_FILE} in it)")
    return path


def predict_frame(model_dir: str | Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Score raw catalogue rows with an exported model directory, through MLflow as a user would.

    Raises:
        DataError: Missing, non-numeric or non-finite input columns (checked before MLflow's own schema check,
            so the message names them).
    """
    import mlflow.pyfunc

    config = json.loads((Path(model_dir) / "artifacts" / CONFIG_FILE).read_text())
    check_input(frame, config)
    # Only the columns the signature names: MLflow warns about (and drops) any others.
    scores: pd.DataFrame = mlflow.pyfunc.load_model(str(model_dir)).predict(frame[config["input_columns"]])
    return scores


def _check_scores(scores: pd.DataFrame, frame: pd.DataFrame, config: dict[str, Any]) -> None:
    """The last guard of "never a NaN score": a row whose scaled features fit float32 can still lie so far from the
    training rows that the network's float32 arithmetic overflows (inf - inf).

    Raises:
        DataError: Naming the first such row, its features and how many rows score NaN.
    """
    numeric = [c for c in scores.columns if pd.api.types.is_float_dtype(scores[c])]
    bad = ~np.isfinite(scores[numeric].to_numpy(dtype=np.float64)).all(axis=1)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    features = _derived(frame.iloc[rows[:1]], config)[0]
    shown = ", ".join(f"{d['feature']} = {v:.6g}" for d, v in zip(config["derivations"], features, strict=True))
    raise DataError(
        f"model input: row {int(rows[0])} ({shown}) lies so far from the training rows that the network's float32 "
        f"arithmetic overflows and scores it NaN ({rows.size} row(s), first at rows {rows[:5].tolist()}); clean or "
        "drop those rows before scoring"
    )


def _read_input(path: Path) -> pd.DataFrame:
    from tuner.data.load import read_table

    try:
        return read_table(path)
    except DataError as exc:
        raise DataError(str(exc).replace("data.source:", "--data:", 1)) from None


def _writer(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        return "parquet"
    if ".tsv" in suffixes:
        return "tsv"
    if ".csv" in suffixes:
        return "csv"
    raise ExportError(
        f"--out: unknown file type {''.join(path.suffixes)!r} for {path}; use .csv, .csv.gz, .tsv or .parquet"
    )


def predict_file(
    model: str,
    data: str | Path,
    out: str | Path,
    *,
    id_columns: Sequence[str] = (),
    tracking_uri: str | None = None,
) -> PredictResult:
    """Score a catalogue file with an exported model and write the id columns, probabilities and decisions.

    Args:
        model: A model directory, ``runs:/RUN_ID/PATH``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        data: CSV (optionally compressed), TSV or Parquet with the model's raw input columns.
        out: Where to write; the type follows the suffix (.csv, .csv.gz, .tsv, .parquet).
        id_columns: More columns to copy through, besides the study's ``data.id_columns`` found in the input.
        tracking_uri: The MLflow store for a URI ``model``; ``MLFLOW_TRACKING_URI`` or tuner's default when None.

    Returns:
        What was written.

    Raises:
        DataError: An unreadable input, a missing id or feature column, non-numeric or non-finite values.
        ExportError: An unknown model or output type.
        TrackingError: The model URI names nothing in the store.
    """
    out_path, data_path = Path(out), Path(data)
    kind = _writer(out_path)
    _check_creatable(out_path, "--out")
    frame = _read_input(data_path)
    with tempfile.TemporaryDirectory(prefix="tuner-model-") as tmp:
        model_dir = load_model_dir(model, tracking_uri, tmp)
        config = json.loads((model_dir / "artifacts" / CONFIG_FILE).read_text())
        missing = [c for c in id_columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"--id-columns: column(s) {', '.join(map(repr, missing))} not in {data_path}; columns: "
                f"{', '.join(map(str, frame.columns))}"
            )
        ids = list(dict.fromkeys([*(c for c in config["id_columns"] if c in frame.columns), *id_columns]))
        outputs = [c for c, _ in output_columns(config)]
        clash = [c for c in ids if c in outputs]
        if clash:
            raise DataError(
                f"--id-columns: {', '.join(map(repr, clash))} would collide with the model's output columns"
            )
        scores = predict_frame(model_dir, frame)
        _check_scores(scores, frame, config)
    result = pd.concat([frame[ids].reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
    # Written beside the target under a name with the same suffixes (the compression follows them), then moved
    # into place: a failed write leaves neither a half-written file nor a damaged earlier one.
    partial = out_path.with_name(f".partial-{os.getpid()}-{out_path.name}")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "parquet":
            result.to_parquet(partial, index=False)
        else:
            result.to_csv(partial, index=False, sep="\t" if kind == "tsv" else ",")
        os.replace(partial, out_path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ExportError(f"--out: cannot write {out_path}: {exc.strerror or exc}") from None
    positive = config["positive_class"]
    decision = f"predicted_{positive}" if positive is not None else None
    per_label = thresholds = None
    if config["task"] == "multilabel":
        names, keys = config["target_names"], config["target_keys"]
        per_label = {n: int(result[f"predicted_{k}"].sum()) for n, k in zip(names, keys, strict=True)}
        thresholds = {n: float(t) for n, t in zip(names, config["thresholds"], strict=True)}
    return PredictResult(
        out=out_path,
        rows=len(result),
        selected=int(result[decision].sum()) if decision in result.columns else None,
        positive_class=positive,
        threshold=float(config.get("threshold", math.nan)),
        columns=tuple(result.columns),
        task=config["task"],
        selected_per_label=per_label,
        thresholds=thresholds,
    )
