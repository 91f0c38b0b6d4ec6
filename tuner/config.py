"""The study file: YAML in, a frozen and validated :class:`StudySpec` out.

Every mistake is found at load time, all of them at once, before any study or MLflow run exists. Each message
names the key (dotted path), the bad value and the rule, and unknown keys get a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from tuner.errors import ConfigError

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
ACTIVATIONS = ("relu", "tanh", "sigmoid", "elu")
INITS = ("xavier", "he")
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "gp", "nsga2")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "wilcoxon", "none")
#: Pruners that can judge a k-fold trial, which reports once per fold (per-epoch pruners would mix folds and epochs).
KFOLD_PRUNERS = ("wilcoxon", "none")
#: A label derived from a condition on a column, such as "class==QSO" or "redshift>1": column, operator, value.
CONDITION = re.compile(r"^\s*([^=!<>]+?)\s*(==|!=|>=|<=|>|<)\s*(.+?)\s*$")
OBJECTIVES = ("completeness_at_contamination", "val_loss", "roc_auc", "average_precision")
#: Objectives of the regression tasks, measured on validation in the target's unit.
REGRESSION_OBJECTIVES = ("mae", "rmse", "r2")
#: Every single objective by name; which ones a study may use depends on its task (TASK_OBJECTIVES).
SCALAR_OBJECTIVES = OBJECTIVES + REGRESSION_OBJECTIVES
#: The problem types of the lecture's table (see tuner.tasks for each one's last layer and loss).
TASKS = ("binary", "multiclass", "multilabel", "regression", "unit_regression")
#: Tasks whose rows belong to one class each: a positive class and its operating point.
SINGLE_LABEL_TASKS = ("binary", "multiclass")
#: Tasks that predict a value.
REGRESSION_TASKS = ("regression", "unit_regression")
#: The objectives each task can measure. Multilabel figures are macro averages over the labels.
TASK_OBJECTIVES = {
    "binary": OBJECTIVES,
    "multiclass": OBJECTIVES,
    "multilabel": OBJECTIVES,
    "regression": ("val_loss", *REGRESSION_OBJECTIVES),
    "unit_regression": ("val_loss", *REGRESSION_OBJECTIVES),
}
#: The losses a regression task can train with (search_space.loss); the first is its default.
TASK_LOSSES = {"regression": ("mse", "mae", "huber"), "unit_regression": ("mse", "bce")}
#: Metrics measured on validation at the fixed score threshold ``objective.threshold``: objectives of a
#: multi-objective study only (together they trace the trade-off that a Pareto front shows).
THRESHOLD_METRICS = ("completeness", "contamination")
#: Every name an ``objective.metric`` list may hold.
MULTI_OBJECTIVE_METRICS = SCALAR_OBJECTIVES + THRESHOLD_METRICS
#: Samplers that accept several objectives in Optuna 5 (CMA-ES raises on them).
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "random", "qmc", "gp", "nsga2")
#: Pruners a multi-objective study can use: the median rule on its guard metric, or none.
MULTI_OBJECTIVE_PRUNERS = ("median", "none")
#: pruner_options the guard's median rule reads.
GUARD_PRUNER_OPTIONS = ("n_startup_trials", "n_warmup_steps")
MONITORS = ("val_loss", "val_auc", "val_ap", "val_objective")
PREPROCESSORS = ("standardize", "pca_whiten", "none")

#: Direction of each objective metric, and of each early-stopping monitor.
OBJECTIVE_DIRECTION = {
    "completeness_at_contamination": "maximize",
    "val_loss": "minimize",
    "roc_auc": "maximize",
    "average_precision": "maximize",
    "completeness": "maximize",
    "contamination": "minimize",
    "mae": "minimize",
    "rmse": "minimize",
    "r2": "maximize",
}
MONITOR_MODE = {"val_loss": "min", "val_auc": "max", "val_ap": "max"}

DEFAULT_FEATURES = ("u-g", "g-r", "r-i", "i-z")
#: The longest study name, in UTF-8 bytes. The name names files (reports/NAME.html, exports/NAME-trial-N, and
#: MLflow's experiment of that name): a file name holds 255 bytes, and the suffixes need room beside it.
MAX_NAME_BYTES = 200


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _scalar_to_fixed(data: Any) -> Any:
    # A bare value in the search space means "fixed": keep one model per kind instead of a union whose
    # pydantic errors would be reported once per union member.
    if isinstance(data, dict):
        return data
    return {"value": data}


def _not_a_bool(v: Any) -> Any:
    # pydantic takes true for 1 in a number field: `n_layers: true` would be one layer, `lr: true` a rate of 1.
    if isinstance(v, bool):
        raise ValueError(f"must be a number, got {v!r}")
    return v


class FloatParam(_Frozen):
    """A float hyperparameter: a range ``{low, high, log}`` or a fixed ``value``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    value: float | None = None

    _to_fixed = model_validator(mode="before")(_scalar_to_fixed)
    _numbers = field_validator("low", "high", "value", mode="before")(_not_a_bool)

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.value)
        return self

    @property
    def fixed(self) -> bool:
        return self.value is not None


class OptionalFloatParam(FloatParam):
    """A float hyperparameter that can be off: ``null`` (the default), a fixed ``value`` or a range."""

    @model_validator(mode="after")
    def _check(self) -> OptionalFloatParam:
        if not self.off:
            _check_range(self.low, self.high, self.log, self.value)
        return self

    @property
    def off(self) -> bool:
        return self.value is None and self.low is None and self.high is None


class IntParam(_Frozen):
    """An integer hyperparameter: a range ``{low, high, log, powers_of_two}`` or a fixed ``value``."""

    low: int | None = None
    high: int | None = None
    log: bool = False
    powers_of_two: bool = False
    value: int | None = None

    _to_fixed = model_validator(mode="before")(_scalar_to_fixed)
    _numbers = field_validator("low", "high", "value", mode="before")(_not_a_bool)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, self.value)
        if self.powers_of_two:
            for name in ("low", "high", "value"):
                v = getattr(self, name)
                if v is not None and (v < 1 or v & (v - 1)):
                    raise ValueError(f"{name} must be a power of two when powers_of_two is true, got {name}={v}")
        return self

    @property
    def fixed(self) -> bool:
        return self.value is not None


class ChoiceParam(_Frozen):
    """A categorical hyperparameter: ``{choices: [...]}`` or a fixed ``value``."""

    choices: tuple[Any, ...] | None = None
    value: Any = None

    _to_fixed = model_validator(mode="before")(_scalar_to_fixed)

    @model_validator(mode="after")
    def _check(self) -> ChoiceParam:
        if self.value is None and self.choices is None:
            raise ValueError("give either choices: [...] or a fixed value")
        if self.value is not None and self.choices is not None:
            raise ValueError(f"give choices or a fixed value, not both, got choices={list(self.choices)}")
        infinite = [x for x in self.options if isinstance(x, float) and not math.isfinite(x)]
        if infinite:
            raise ValueError(
                f"must be a finite number, got {infinite[0]}"
                + ("" if self.choices is None else f" among choices {list(self.choices)}")
            )
        if self.choices is not None:
            if len(self.choices) == 0:
                raise ValueError("choices must not be empty, got []")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices must not repeat, got {list(self.choices)}")
        return self

    @property
    def fixed(self) -> bool:
        return self.value is not None

    @property
    def options(self) -> tuple[Any, ...]:
        return (self.value,) if self.choices is None else self.choices


def _check_range(low: float | None, high: float | None, log: bool, value: float | None) -> None:
    if value is not None:
        if not math.isfinite(value):
            # NaN passes every comparison below (and trains a model of NaNs, or with dropout nan none at all).
            raise ValueError(f"must be a finite number, got {value}")
        if low is not None or high is not None:
            raise ValueError(f"give low/high or a fixed value, not both, got low={low}, high={high}, value={value}")
        if log and value <= 0:
            raise ValueError(f"a log-scaled value must be > 0, got value={value}")
        return
    if low is None or high is None:
        raise ValueError(f"a range needs both low and high, got low={low}, high={high}")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"low and high must be finite, got low={low}, high={high}")
    if low >= high:
        raise ValueError(f"low must be < high, got low={low}, high={high}")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, got low={low}")


def _check_choices(param: ChoiceParam, allowed: tuple[Any, ...]) -> ChoiceParam:
    for option in param.options:
        if option not in allowed:
            hint = _did_you_mean(str(option), [str(a) for a in allowed])
            raise ValueError(f"unknown choice {option!r}; allowed: {', '.join(map(str, allowed))}{hint}")
    return param


def _bounds(param: FloatParam | IntParam) -> tuple[float, float]:
    if param.value is not None:
        return float(param.value), float(param.value)
    assert param.low is not None and param.high is not None
    return float(param.low), float(param.high)


class SearchSpace(_Frozen):
    """The hyperparameters a trial draws; every entry can be narrowed, fixed or widened."""

    n_layers: IntParam = IntParam(low=1, high=5)
    width: IntParam = IntParam(low=16, high=1024, log=True)
    lr: FloatParam = FloatParam(low=1e-4, high=1e-1, log=True)
    momentum: FloatParam = FloatParam(low=0.1, high=0.99)
    dropout: FloatParam = FloatParam(low=0.0, high=0.5)
    weight_decay: FloatParam = FloatParam(low=1e-6, high=1e-1, log=True)
    batch_size: IntParam = IntParam(low=16, high=1024, log=True, powers_of_two=True)
    optimizer: ChoiceParam = ChoiceParam(choices=OPTIMIZERS)
    activation: ChoiceParam = ChoiceParam(choices=ACTIVATIONS)
    init: ChoiceParam = ChoiceParam(choices=INITS)
    batch_norm: ChoiceParam = ChoiceParam(choices=(False, True))
    # Gradient clipping (clip_grad_norm_ over all parameters); null: no clipping.
    max_grad_norm: OptionalFloatParam = OptionalFloatParam()
    # A regression's loss (mse, mae, huber; unit_regression: mse, bce); null: the task's default (mse).
    loss: ChoiceParam | None = None
    # Huber's delta, in standardised target units; drawn for trials whose loss is huber. null: 1.0.
    huber_delta: OptionalFloatParam = OptionalFloatParam()
    # Coefficient of the L1 penalty on the weights (beside weight_decay, the L2 penalty); null: no penalty.
    l1: OptionalFloatParam = OptionalFloatParam()

    @model_serializer(mode="wrap")
    def _omit_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Unset, a key is left out: studies created before it existed keep their search_space fingerprint.
        data: dict[str, Any] = handler(self)
        for name in ("max_grad_norm", "huber_delta", "l1"):
            if getattr(self, name).off:
                data.pop(name, None)
        if self.loss is None:
            data.pop("loss", None)
        return data

    @field_validator("n_layers", "width", "batch_size")
    @classmethod
    def _positive_int(cls, p: IntParam) -> IntParam:
        low, _ = _bounds(p)
        if low < 1:
            raise ValueError(f"must be >= 1, got {low:g}")
        return p

    @field_validator("momentum")
    @classmethod
    def _momentum(cls, p: FloatParam) -> FloatParam:
        low, high = _bounds(p)
        if low < 0 or high >= 1:
            raise ValueError(f"momentum must lie in [0, 1), got low={low:g}, high={high:g}")
        return p

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, p: FloatParam) -> FloatParam:
        low, high = _bounds(p)
        if low < 0 or high >= 1:
            raise ValueError(f"dropout must lie in [0, 1), got low={low:g}, high={high:g}")
        return p

    @field_validator("weight_decay")
    @classmethod
    def _non_negative(cls, p: FloatParam) -> FloatParam:
        low, _ = _bounds(p)
        if low < 0:
            raise ValueError(f"must be >= 0, got low={low:g}")
        return p

    @field_validator("lr")
    @classmethod
    def _positive(cls, p: FloatParam) -> FloatParam:
        low, _ = _bounds(p)
        if low <= 0:
            raise ValueError(f"a learning rate must be > 0 (at 0 nothing trains), got low={low:g}")
        return p

    @field_validator("max_grad_norm")
    @classmethod
    def _max_grad_norm(cls, p: OptionalFloatParam) -> OptionalFloatParam:
        if p.off:
            return p
        low, _ = _bounds(p)
        if low <= 0:
            raise ValueError(
                f"max_grad_norm must be > 0 (null turns clipping off), got {'value' if p.fixed else 'low'}={low:g}"
            )
        return p

    @field_validator("huber_delta")
    @classmethod
    def _huber_delta(cls, p: OptionalFloatParam) -> OptionalFloatParam:
        if not p.off and _bounds(p)[0] <= 0:
            raise ValueError(
                f"huber_delta must be > 0 (null takes 1.0), got {'value' if p.fixed else 'low'}={_bounds(p)[0]:g}"
            )
        return p

    @field_validator("l1")
    @classmethod
    def _l1(cls, p: OptionalFloatParam) -> OptionalFloatParam:
        if not p.off and _bounds(p)[0] < 0:
            raise ValueError(
                f"l1 must be >= 0 (null turns the penalty off), got {'value' if p.fixed else 'low'}={_bounds(p)[0]:g}"
            )
        return p

    @field_validator("loss")
    @classmethod
    def _loss(cls, p: ChoiceParam | None) -> ChoiceParam | None:
        return None if p is None else _check_choices(p, tuple(dict.fromkeys(sum(TASK_LOSSES.values(), ()))))

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, p: ChoiceParam) -> ChoiceParam:
        return _check_choices(p, OPTIMIZERS)

    @field_validator("activation")
    @classmethod
    def _activation(cls, p: ChoiceParam) -> ChoiceParam:
        return _check_choices(p, ACTIVATIONS)

    @field_validator("init")
    @classmethod
    def _init(cls, p: ChoiceParam) -> ChoiceParam:
        return _check_choices(p, INITS)

    @field_validator("batch_norm")
    @classmethod
    def _batch_norm(cls, p: ChoiceParam) -> ChoiceParam:
        return _check_choices(p, (False, True))


class SimulatedSpec(_Frozen):
    """Sizes of the embedded simulated catalogue."""

    n_star: int = Field(100_000, ge=0)
    n_quasar: int = Field(1_000, ge=0)
    n_galaxy: int = Field(0, ge=0)


class SplitSpec(_Frozen):
    """Fractions of the one stratified split; train is what validation and holdout leave."""

    train: float | None = Field(None, allow_inf_nan=False)  # NaN would pass the sum's check below
    validation: float = Field(0.2, gt=0, lt=1)
    holdout: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums(self) -> SplitSpec:
        rest = 1.0 - self.validation - self.holdout
        # A tolerance: 0.7 + 0.3 leaves 5.6e-17 in floating point, which is no room for training rows.
        if rest <= 1e-9:
            raise ValueError(
                "validation + holdout must be < 1 to leave rows for training, "
                f"got validation={self.validation}, holdout={self.holdout}"
            )
        if self.train is not None and abs(self.train + self.validation + self.holdout - 1.0) > 1e-9:
            raise ValueError(
                "train + validation + holdout must sum to 1, "
                f"got train={self.train}, validation={self.validation}, holdout={self.holdout}"
            )
        return self

    @property
    def train_fraction(self) -> float:
        return 1.0 - self.validation - self.holdout


class DataSpec(_Frozen):
    """Where rows come from, which columns are features and target, and how they are split and scaled."""

    source: str = "simulated"
    simulated: SimulatedSpec = SimulatedSpec()
    features: tuple[str, ...] = DEFAULT_FEATURES
    # The label column (binary, multiclass), the value column (regressions), or a list of label columns
    # (multilabel): each a 0/1 or true/false column, or a condition on a column such as "class==QSO" or
    # "redshift>1".
    target: str | tuple[str, ...] = "class"
    positive: str | None = "QSO"
    # Rows kept, by column value: {class: GALAXY}, {class: [GALAXY, QSO]}, or a range {redshift: {min: 0, max: 1}}
    # (inclusive); every condition must hold. Empty keeps every row.
    where: dict[str, Any] = Field(default_factory=dict)
    id_columns: tuple[str, ...] = ()
    split: SplitSpec = SplitSpec()
    # The split uses seed and seed + 1 as scikit-learn random states, which must lie in [0, 2**32 - 1].
    seed: Annotated[int, Field(ge=0, le=2**32 - 2)] = 0
    preprocess: Literal["standardize", "pca_whiten", "none"] = "standardize"

    @model_serializer(mode="wrap")
    def _omit_where(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Without a filter the key is left out: studies created before it existed keep their data fingerprint.
        data: dict[str, Any] = handler(self)
        if not self.where:
            data.pop("where", None)
        return data

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            if not v or not all(isinstance(t, str) and t for t in v):
                raise ValueError(f"target must be a column name or a list of label columns, got {v!r}")
            if len(set(v)) != len(v):
                raise ValueError(f"target columns must not repeat, got {list(v)}")
            return tuple(v)
        if not isinstance(v, str) or not v:
            raise ValueError(f"target must be a column name or a list of label columns, got {v!r}")
        return v

    @field_validator("where")
    @classmethod
    def _where(cls, v: dict[str, Any]) -> dict[str, Any]:
        for column, allowed in v.items():
            if isinstance(allowed, dict):
                bounds = {k: allowed[k] for k in allowed if k in ("min", "max")}
                unknown = sorted(set(allowed) - {"min", "max"})
                numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in bounds.values())
                if unknown or not bounds or not numbers:
                    raise ValueError(
                        f"where.{column}: a range is {{min: number, max: number}} (either may be left out), "
                        f"got {allowed!r}"
                    )
                if not all(math.isfinite(x) for x in bounds.values()):
                    got = ", ".join(f"{k}={x}" for k, x in bounds.items())
                    raise ValueError(
                        f"where.{column}: min and max must be finite numbers (leave one out for no bound), got {got}"
                    )
                if len(bounds) == 2 and bounds["min"] > bounds["max"]:
                    raise ValueError(
                        f"where.{column}: min must be <= max, got min={bounds['min']}, max={bounds['max']}"
                    )
                continue
            values = allowed if isinstance(allowed, list | tuple) else [allowed]
            if not values or not all(isinstance(x, str | int | float | bool) for x in values):
                raise ValueError(
                    f"where.{column}: give a value, a list of values or a range {{min, max}} to keep, got {allowed!r}"
                )
        return v

    @property
    def targets(self) -> tuple[str, ...]:
        """The target columns: one, or the labels of a multilabel task."""
        return self.target if isinstance(self.target, tuple) else (self.target,)

    @model_validator(mode="after")
    def _simulated_classes(self) -> DataSpec:
        # Checked here too, not only when the catalogue is drawn, so that the message names the section.
        sim = self.simulated
        if self.source == "simulated" and sum(1 for n in (sim.n_star, sim.n_quasar, sim.n_galaxy) if n > 0) < 2:
            raise ValueError(
                "data.simulated: at least two of n_star, n_quasar, n_galaxy must be > 0 (one class alone is no "
                f"classification problem), got n_star={sim.n_star}, n_quasar={sim.n_quasar}, n_galaxy={sim.n_galaxy}"
            )
        return self

    @model_validator(mode="after")
    def _columns_keep_their_roles(self) -> DataSpec:
        carried = [c for c in self.id_columns if c in self.features]
        if carried:
            raise ValueError(
                f"data.id_columns: {carried} also in data.features; an identifier is carried through to the "
                "predictions, never learned from: drop it from one of the two lists"
            )
        label_columns = set()
        for target in self.targets:
            condition = CONDITION.match(target)
            label_columns.add(condition.group(1) if condition else target)
        leaking = [f for f in self.features if f in label_columns]
        if leaking:
            raise ValueError(
                f"data.features: {leaking} is the column the target is read from; a feature must not be the label "
                "it predicts"
            )
        return self

    @field_validator("features")
    @classmethod
    def _features(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one feature is needed, got []")
        dupes = sorted({f for f in v if v.count(f) > 1})
        if dupes:
            raise ValueError(f"features must not repeat, got {dupes} more than once")
        return v

    @field_validator("id_columns")
    @classmethod
    def _id_columns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"id_columns must not repeat, got {dupes} more than once")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"must not be empty: give simulated or a catalogue file, got {v!r}")
        return v


class TrainSpec(_Frozen):
    """How each trial trains: epochs, early stopping, evaluation chunking."""

    max_epochs: int = Field(60, ge=1)
    patience: int = Field(8, ge=0)
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False)  # inf: no epoch would ever count as better
    monitor: Literal["val_loss", "val_auc", "val_ap", "val_objective"] = "val_loss"
    eval_batch_size: int = Field(65_536, ge=1)
    pos_weight: float | Literal["balanced"] | None = None

    @field_validator("pos_weight", mode="before")
    @classmethod
    def _pos_weight(cls, v: Any) -> Any:
        # Checked before pydantic's union, which would report one message per member.
        if v is None or v == "balanced":
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"pos_weight must be a number > 0, 'balanced' or null, got {v!r}")
        return float(v)


class ObjectiveSpec(_Frozen):
    """What a trial returns to Optuna; measured on validation only.

    ``metric`` is one name (a single-objective study) or a list of 2 or 3 names (a multi-objective study, whose
    result is a Pareto front). ``completeness`` and ``contamination`` are measured at the fixed score
    ``threshold``; ``guard`` is the scalar metric that prunes a multi-objective study.
    """

    metric: str | tuple[str, ...] = "completeness_at_contamination"
    target_contamination: float = 0.1
    threshold: float = 0.5
    guard: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        # `objective: [completeness, contamination]` is short for `objective: {metric: [...]}`.
        if isinstance(data, list | tuple):
            return {"metric": list(data)}
        return data

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Keys a study does not use are left out: single-objective studies created before they existed keep
        # their objective fingerprint.
        data: dict[str, Any] = handler(self)
        if not self.uses_threshold:
            data.pop("threshold", None)
        if self.guard is None:
            data.pop("guard", None)
        return data

    @field_validator("metric", mode="before")
    @classmethod
    def _metric(cls, v: Any) -> Any:
        # Checked before pydantic's union, which would report one message per member.
        if isinstance(v, str):
            if v in THRESHOLD_METRICS:
                raise ValueError(
                    f"{v} is measured at a fixed threshold and is an objective of a multi-objective study only, "
                    f"given in a list such as [completeness, contamination], got {v!r}"
                )
            if v not in SCALAR_OBJECTIVES:
                raise ValueError(
                    f"unknown metric {v!r}; allowed: {', '.join(SCALAR_OBJECTIVES)}"
                    f"{_did_you_mean(v, SCALAR_OBJECTIVES)}"
                )
            return v
        if not isinstance(v, list | tuple):
            raise ValueError(f"metric must be a metric name or a list of 2 or 3 metric names, got {v!r}")
        for name in v:
            if not isinstance(name, str) or name not in MULTI_OBJECTIVE_METRICS:
                hint = _did_you_mean(str(name), MULTI_OBJECTIVE_METRICS)
                raise ValueError(
                    f"unknown metric {name!r} in the list; allowed: {', '.join(MULTI_OBJECTIVE_METRICS)}{hint}"
                )
        if len(set(v)) != len(v):
            raise ValueError(f"a metric list must not repeat a metric, got {list(v)}")
        if not 2 <= len(v) <= 3:
            raise ValueError(f"a metric list holds 2 or 3 metrics (a multi-objective study), got {list(v)}")
        return tuple(v)

    @field_validator("target_contamination")
    @classmethod
    def _target(cls, v: float) -> float:
        if not (0.0 < v < 1.0):
            raise ValueError(f"target_contamination must lie in (0, 1), got {v}")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        if not (0.0 < v < 1.0):
            raise ValueError(f"threshold must lie in (0, 1), got {v}")
        return v

    @field_validator("guard")
    @classmethod
    def _guard(cls, v: str | None) -> str | None:
        if v is not None and v not in SCALAR_OBJECTIVES:
            raise ValueError(
                f"the guard is one scalar metric measured every epoch; allowed: {', '.join(SCALAR_OBJECTIVES)}"
                f"{_did_you_mean(v, SCALAR_OBJECTIVES)}, got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _used(self) -> ObjectiveSpec:
        if "threshold" in self.model_fields_set and not self.uses_threshold:
            raise ValueError(
                "threshold is used by the metrics completeness and contamination only, "
                f"got threshold={self.threshold} with metric {self.metric}"
            )
        if self.guard is not None and not self.multi:
            raise ValueError(
                "guard prunes a multi-objective study; a single objective prunes on itself, "
                f"got guard={self.guard} with metric {self.metric}"
            )
        return self

    @property
    def metrics(self) -> tuple[str, ...]:
        """The objective metric names, in the order of the trial's values."""
        return self.metric if isinstance(self.metric, tuple) else (self.metric,)

    @property
    def multi(self) -> bool:
        """Whether the study has several objectives (a Pareto front rather than one best trial)."""
        return len(self.metrics) > 1

    @property
    def uses_threshold(self) -> bool:
        return any(m in THRESHOLD_METRICS for m in self.metrics)

    @property
    def directions(self) -> tuple[str, ...]:
        """``maximize`` or ``minimize`` per objective."""
        return tuple(OBJECTIVE_DIRECTION[m] for m in self.metrics)

    @property
    def direction(self) -> str:
        """The direction of the (first) objective."""
        return self.directions[0]


class StudySection(_Frozen):
    """The Optuna study: name, storage, sampler and pruner by name, budget, seed, warm-start trials."""

    name: str = Field("tuner-study", min_length=1)
    storage: str = "sqlite:///optuna.db"
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    pruner: str = "median"
    pruner_options: dict[str, Any] = Field(default_factory=dict)
    n_trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)
    # Optuna's samplers seed numpy, which takes [0, 2**32 - 1].
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    enqueue: tuple[dict[str, Any], ...] = ()
    # Worker fault tolerance (RDB storages): a trial whose heartbeat is older than grace_period is retried.
    heartbeat_interval: int = Field(10, ge=1)
    grace_period: int = Field(60, ge=2)
    max_retries: int = Field(3, ge=0)
    # Trials trained together as one vectorised model (tuner.packed): a number >= 1, or auto (8 on a GPU, 1 on
    # the CPU). With pack > 1 a worker takes up to that many trials at a time.
    pack: int | Literal["auto"] = "auto"
    # What trains a trial: packed (tuner.packed, also for one trial at a time: fused updates, no module
    # overhead) or eager (torch.nn and torch.optim, tuner.train.fit). k-fold trials train eagerly.
    engine: Literal["packed", "eager"] = "packed"

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, name: str) -> str:
        # The name names files too (reports/NAME.html, exports/NAME-trial-N): it must stay one file name.
        if "/" in name or "\\" in name or name in (".", "..") or any(ord(c) < 32 for c in name):
            raise ValueError(
                f"must be usable as a file name (no '/', '\\' or control characters, not '.' or '..'), got {name!r}"
            )
        size = len(name.encode("utf-8"))
        if size > MAX_NAME_BYTES:
            raise ValueError(
                f"must be at most {MAX_NAME_BYTES} bytes in UTF-8 (it names files such as reports/NAME.html and "
                f"exports/NAME-trial-N, and a file name holds 255 bytes), got {size} bytes: {name[:24]!r}..."
            )
        return name

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"must not be empty: give a storage URL such as sqlite:///optuna.db, got {v!r}")
        return v

    @model_validator(mode="after")
    def _pack_needs_packed_engine(self) -> StudySection:
        if self.engine == "eager" and self.pack != "auto" and self.pack > 1:
            raise ValueError(
                f"study.engine: the eager engine trains one trial at a time, got pack={self.pack}; "
                "use engine packed, or pack 1"
            )
        return self

    @field_validator("pack", mode="before")
    @classmethod
    def _pack(cls, v: Any) -> Any:
        # Checked before pydantic's union, which would report one message per member (and take true for 1).
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256):
            raise ValueError(f"pack must be auto or a whole number of trials from 1 to 256, got {v!r}")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        if v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; allowed: {', '.join(SAMPLERS)}{_did_you_mean(v, SAMPLERS)}")
        return v

    @model_validator(mode="after")
    def _heartbeat(self) -> StudySection:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                "grace_period must exceed heartbeat_interval, or live trials would be taken for dead, "
                f"got heartbeat_interval={self.heartbeat_interval}, grace_period={self.grace_period}"
            )
        return self

    @field_validator("pruner")
    @classmethod
    def _pruner(cls, v: str) -> str:
        if v not in PRUNERS:
            raise ValueError(f"unknown pruner {v!r}; allowed: {', '.join(PRUNERS)}{_did_you_mean(v, PRUNERS)}")
        return v


class TrackingSpec(_Frozen):
    """MLflow: where metadata and artifacts go, and what is logged."""

    enabled: bool = True
    uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    experiment: str | None = None
    plots: bool = True
    plotlyjs: Literal["cdn", "embed"] = "cdn"
    # How the writes after a run's creation go out: auto = on a background thread for a store across the network,
    # in a writer process for a local one (in line on one core; tuner.tracking.writes_for); or one of them.
    writes: Literal["auto", "process", "background", "inline"] = "auto"

    @field_validator("uri", "artifact_location")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        # MLflow takes an empty value for its default, a folder in the working directory: not what was meant.
        if not v.strip():
            raise ValueError(
                f"must not be empty (MLflow would fall back to its default, a folder in the working directory), "
                f"got {v!r}; leave the key out for tuner's default"
            )
        return v


class ValidationSpec(_Frozen):
    """How a trial is judged: on the validation part (``split``) or by k-fold cross-validation (``kfold``).

    k-fold cross-validation cuts the modelling set (train + validation rows) into k folds; the holdout stays out
    either way.
    """

    kind: Literal["split", "kfold"] = "split"
    # Number of folds; used by kind kfold only.
    k: int = 5

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, v: Any) -> Any:
        # Checked before pydantic's coercion, which would take true as 1 and word its errors without the range.
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 50:
            raise ValueError(f"k must be a whole number of folds from 2 to 50, got {v!r}")
        return v


class StudySpec(_Frozen):
    """A whole study file, validated. Build it with :func:`load_spec` or :func:`spec_from_dict`."""

    data: DataSpec = DataSpec()
    task: Literal["binary", "multiclass", "multilabel", "regression", "unit_regression"] = "binary"
    search_space: SearchSpace = SearchSpace()
    train: TrainSpec = TrainSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    validation: ValidationSpec = ValidationSpec()
    study: StudySection = StudySection()
    tracking: TrackingSpec = TrackingSpec()
    # Directory that relative data paths are resolved against (the study file's folder); not a YAML key.
    base_dir: str = Field(".", exclude=True)

    @model_serializer(mode="wrap")
    def _omit_split(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # One split (the default) leaves the section out: studies created before it existed keep their stored
        # spec and fingerprints.
        data: dict[str, Any] = handler(self)
        if self.validation.kind == "split":
            data.pop("validation", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _regression_objective(cls, data: Any) -> Any:
        # A regression has no completeness: unless the file names an objective, it is the holdout-comparable RMSE.
        if isinstance(data, dict) and data.get("task") in ("multilabel", *REGRESSION_TASKS):
            # No positive class either: the default (QSO) belongs to the binary task.
            section = data.get("data")
            if section is None:
                data = {**data, "data": {"positive": None}}
            elif isinstance(section, dict) and "positive" not in section:
                data = {**data, "data": {**section, "positive": None}}
        if isinstance(data, dict) and data.get("task") in REGRESSION_TASKS:
            objective = data.get("objective")
            if objective is None:
                data = {**data, "objective": {"metric": "rmse"}}
            elif isinstance(objective, dict) and "metric" not in objective:
                data = {**data, "objective": {**objective, "metric": "rmse"}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _kfold_pruner(cls, data: Any) -> Any:
        # A k-fold trial reports once per fold; unless the file names a pruner, it is the Wilcoxon test across folds.
        if isinstance(data, dict):
            validation, study = data.get("validation"), data.get("study") or {}
            kfold = isinstance(validation, dict) and validation.get("kind") == "kfold"
            if kfold and isinstance(study, dict) and "pruner" not in study:
                data = {**data, "study": {**study, "pruner": "wilcoxon"}}
        return data

    def _task_rules(self, problems: list[str]) -> None:
        task, data, space = self.task, self.data, self.search_space
        if task == "multilabel":
            if len(data.targets) < 2:
                problems.append(
                    f"data.target: a multilabel task needs a list of 2 or more label columns, got {data.target!r}"
                )
        elif isinstance(data.target, tuple):
            problems.append(
                f"data.target: a list of label columns is for task multilabel; a {task} task has one target column, "
                f"got {list(data.target)}"
            )
        if task not in SINGLE_LABEL_TASKS and data.positive is not None:
            problems.append(
                f"data.positive: a {task} task has no positive class (each label or value is scored on its own), "
                f"got {data.positive!r}; drop data.positive"
            )
        allowed = TASK_OBJECTIVES[task] + (THRESHOLD_METRICS if task in SINGLE_LABEL_TASKS else ())
        for metric in self.objective.metrics:
            if metric not in allowed:
                problems.append(
                    f"objective.metric: {metric} does not apply to a {task} task; use one of {', '.join(allowed)}"
                )
        guard = self.objective.guard
        if guard is not None and guard not in TASK_OBJECTIVES[task]:
            problems.append(
                f"objective.guard: {guard} does not apply to a {task} task; "
                f"use one of {', '.join(TASK_OBJECTIVES[task])}"
            )
        if task in TASK_LOSSES and self.train.monitor in ("val_auc", "val_ap"):
            problems.append(
                f"train.monitor: {self.train.monitor} needs classes; a {task} task monitors val_loss or "
                f"val_objective, got {self.train.monitor}"
            )
        if self.train.pos_weight is not None and task not in ("binary", "multilabel"):
            problems.append(
                f"train.pos_weight: weights positive rows of a binary or multilabel task, got "
                f"{self.train.pos_weight!r} with task {task}"
            )
        if space.loss is not None:
            losses = TASK_LOSSES.get(task)
            if losses is None:
                problems.append(
                    f"search_space.loss: the loss of a {task} task is fixed by the task "
                    f"({'cross-entropy' if task == 'multiclass' else 'BCE'}); loss is chosen for regression and "
                    f"unit_regression, got {list(space.loss.options)}"
                )
            elif wrong := [x for x in space.loss.options if x not in losses]:
                problems.append(
                    f"search_space.loss: a {task} task trains with {' or '.join(losses)}, got {', '.join(wrong)}"
                )
        if not space.huber_delta.off and (space.loss is None or "huber" not in space.loss.options):
            options = "unset" if space.loss is None else list(space.loss.options)
            problems.append(
                f"search_space.huber_delta: Huber's delta is used with loss huber only, got search_space.loss "
                f"{options}; add huber to search_space.loss or drop huber_delta"
            )
        if task not in SINGLE_LABEL_TASKS and self.validation.kind == "kfold":
            problems.append(
                f"validation.kind: k-fold cross-validation is available for binary and multiclass tasks, got kfold "
                f"with task {task}; use kind split"
            )

    @model_validator(mode="after")
    def _cross(self) -> StudySpec:
        # Every rule across sections is checked, so that a file's mistakes are all listed at once.
        problems: list[str] = []
        self._task_rules(problems)
        if self.task == "binary" and self.data.positive is None:
            problems.append("data.positive: a binary task needs the positive class, got null")
        elif self.task in SINGLE_LABEL_TASKS and self.data.positive is None:
            # Without a positive class these would score whichever class comes first, not what the user meant.
            for metric in (*self.objective.metrics, *([self.objective.guard] if self.objective.guard else [])):
                if metric not in ("val_loss",):
                    problems.append(
                        f"data.positive: objective {metric} scores one class against the rest and needs a positive "
                        "class, got null; name data.positive, or use objective val_loss (every class's figures are "
                        "reported either way)"
                    )
            if self.train.monitor in ("val_auc", "val_ap"):
                problems.append(
                    f"data.positive: train.monitor {self.train.monitor} scores one class against the rest and needs "
                    "a positive class, got null; name data.positive, or monitor val_loss"
                )
        kfold = self.validation.kind == "kfold"
        if not kfold and "k" in self.validation.model_fields_set:
            problems.append(
                f"validation.k: k is used by kind kfold only, got k={self.validation.k} with kind split; "
                "add kind: kfold or drop k"
            )
        if kfold and self.study.pruner not in KFOLD_PRUNERS:
            problems.append(
                "study.pruner: with validation.kind kfold a trial reports once per fold, so only wilcoxon or none "
                f"can prune it, got {self.study.pruner}"
            )
        if not kfold and self.study.pruner == "wilcoxon":
            problems.append(
                "study.pruner: wilcoxon compares trials fold by fold and needs validation.kind kfold; with one split "
                f"use one of {', '.join(p for p in PRUNERS if p != 'wilcoxon')}, got wilcoxon"
            )
        if kfold and self.study.pack != "auto" and self.study.pack > 1:
            problems.append(
                "study.pack: packing is not available with validation.kind kfold; use pack 1 (or auto), "
                f"got pack={self.study.pack}"
            )
        if self.objective.multi:
            self._multi_objective_rules(problems)
        if problems:
            raise RuleProblems(problems)
        return self

    def _multi_objective_rules(self, problems: list[str]) -> None:
        objective, study, metrics = self.objective, self.study, list(self.objective.metrics)
        if study.sampler not in MULTI_OBJECTIVE_SAMPLERS:
            problems.append(
                f"study.sampler: {study.sampler} cannot optimise several objectives (objective.metric {metrics}); "
                f"use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}"
            )
        if self.validation.kind == "kfold":
            problems.append(
                f"validation.kind: a multi-objective study (objective.metric {metrics}) runs on one split for now; "
                "use kind split, got kfold"
            )
        if self.train.monitor == "val_objective":
            problems.append(
                f"train.monitor: val_objective is ambiguous with several objectives ({metrics}); "
                f"use one of {', '.join(m for m in MONITORS if m != 'val_objective')}"
            )
        if study.pruner not in MULTI_OBJECTIVE_PRUNERS:
            problems.append(
                f"study.pruner: a multi-objective study prunes with the median rule on objective.guard, or not at "
                f"all; use one of {', '.join(MULTI_OBJECTIVE_PRUNERS)}, got {study.pruner}"
            )
        elif study.pruner != "none" and objective.guard is None:
            problems.append(
                f"objective.guard: Optuna cannot prune on several objectives ({metrics}); name the scalar metric "
                f"to prune on (one of {', '.join(OBJECTIVES)}), or set study.pruner: none"
            )
        unknown = sorted(set(study.pruner_options) - set(GUARD_PRUNER_OPTIONS))
        if unknown:
            problems.append(
                f"study.pruner_options: the guard's median rule takes {', '.join(GUARD_PRUNER_OPTIONS)} only, "
                f"got {', '.join(unknown)}"
            )

    @property
    def positive_class(self) -> str | None:
        """The class whose completeness the study is about: binary and multiclass tasks only."""
        return self.data.positive if self.task in SINGLE_LABEL_TASKS else None

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of the named sections, to detect a study file changed under an existing study."""
        dumped = self.model_dump(mode="json", include=set(sections))
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]

    def data_path(self) -> Path | None:
        """The catalogue file, resolved against the study file's folder; None for the simulated catalogue."""
        if self.data.source == "simulated":
            return None
        path = Path(self.data.source).expanduser()
        return path if path.is_absolute() else (Path(self.base_dir) / path).resolve()

    def with_overrides(self, overrides: dict[str, Any]) -> StudySpec:
        """Return a validated copy with dotted keys replaced (``{"study.n_trials": 5}``)."""
        raw = self.model_dump(mode="python", exclude_defaults=False)
        for dotted, value in overrides.items():
            node = raw
            *parents, leaf = dotted.split(".")
            for i, key in enumerate(parents):
                # An unknown section is added empty, so validation reports it with a "did you mean".
                child = node.setdefault(key, {})
                if not isinstance(child, dict):
                    section = ".".join(parents[: i + 1])
                    raise ConfigError(f"{dotted}: {section} is not a section, got {child!r}")
                node = child
            node[leaf] = value
        return spec_from_dict(raw, base_dir=self.base_dir)


class RuleProblems(ValueError):
    """Every rule across sections that a study file breaks, each message naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that holds the keys at a dotted location, for "did you mean" on unknown keys."""
    model: type[BaseModel] = StudySpec
    for key in path:
        field = model.model_fields.get(str(key))
        if field is None:
            return None
        inner = _model_in(field.annotation)
        if inner is None:
            return None
        model = inner
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _format_error(err: Any) -> str:
    loc = tuple(p for p in err["loc"] if p != "value")
    where = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        options = list(parent.model_fields) if parent else []
        options = [o for o in options if o != "base_dir"]
        section = ".".join(str(p) for p in loc[:-1]) or "the study file"
        return f"unknown key {str(loc[-1])!r} in {section}{_did_you_mean(str(loc[-1]), options)}"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        # A rule across keys names its own key: keep it instead of "(top level)" or its section's name.
        named = msg.split(" ", 1)[0]
        if ":" in named and (not loc or named.startswith(f"{where}.")):
            return msg
        return f"{where}: {msg}"
    return f"{where}: {msg}, got {err.get('input')!r}"


def spec_from_dict(raw: Any, *, base_dir: str | Path = ".", source: str | None = None) -> StudySpec:
    """Validate a parsed study file.

    Args:
        raw: The parsed YAML mapping.
        base_dir: Folder that relative data paths are resolved against.
        source: Name of the file, for messages.

    Returns:
        The frozen spec.

    Raises:
        ConfigError: Listing every problem found.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the study file must be a mapping of sections, got {type(raw).__name__}", source=source)
    raw = {k: v for k, v in raw.items() if k != "base_dir"} | {"base_dir": str(base_dir)}
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as exc:
        found: list[str] = []
        for error in exc.errors():
            rules = error.get("ctx", {}).get("error")
            found.extend(rules.problems if isinstance(rules, RuleProblems) else [_format_error(error)])
        problems = list(dict.fromkeys(found))
        raise ConfigError(problems, source=source) from None


def _repeated_keys(node: yaml.Node | None) -> list[str]:
    """One message per key given more than once in the same mapping, anywhere in the document, with its lines."""
    problems: list[tuple[int, str]] = []
    seen: set[int] = set()  # an alias shares its anchor's node (and may even contain itself)

    def walk(node: yaml.Node | None, where: str) -> None:
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{where}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], list[int]] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines.setdefault((key.tag, key.value), []).append(key.start_mark.line + 1)
                    walk(value, f"{where}.{key.value}" if where else str(key.value))
            for (_, name), found in lines.items():
                if len(found) > 1:
                    dotted = f"{where}.{name}" if where else name
                    times = "twice" if len(found) == 2 else f"{len(found)} times"
                    if len(set(found)) == 1:  # a flow mapping on one line: {lr: 0.1, lr: 0.2}
                        at = f"line {found[0]}"
                    else:
                        at = "lines " + ", ".join(map(str, found[:-1])) + f" and {found[-1]}"
                    problems.append(
                        (
                            found[0],
                            f"{dotted}: the key is given {times} ({at}), and YAML would keep the last one "
                            "without a word; give it once",
                        )
                    )

    walk(node, "")
    return [message for _, message in sorted(problems)]


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file (YAML).

    Args:
        path: The study file.

    Returns:
        The frozen spec; a study without ``study.name`` is named after the file.

    Raises:
        ConfigError: The file is missing, is not YAML, or breaks a rule (all problems listed).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        # YAML keeps the last of two equal keys without a word: find them on the node tree first.
        repeated = _repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        if repeated:
            raise ConfigError(repeated, source=str(path))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", source=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not a text file in UTF-8: byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8",
            source=str(path),
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the study file: {exc.strerror or exc}", source=str(path)) from None
    if raw is None:  # an empty file: every default, named after the file like any other
        raw = {}
    if isinstance(raw, dict) and isinstance(raw.get("study"), dict) and "name" not in raw["study"]:
        raw["study"] = {**raw["study"], "name": path.stem}
    elif isinstance(raw, dict) and "study" not in raw:
        raw = {**raw, "study": {"name": path.stem}}
    return spec_from_dict(raw, base_dir=path.resolve().parent, source=str(path))
