"""Orchestration: storage, sampler and pruner by name, the objective, the pruning adapter, resume rules, replay.

Data flows one way: spec -> dataset (once per process) -> per trial: params -> model -> fit -> evaluation
(validation picks the operating point, the holdout only measures it) -> tracker -> objective value. Every trial
records a manifest of what its numbers depend on, and :func:`replay_trial` retrains one trial alone through the
same :meth:`Objective.train_trial` and :func:`evaluate` to check that they reproduce. With ``validation.kind:
kfold`` a trial trains one model per fold (:meth:`Objective.cross_validate`) and is judged by
:func:`evaluate_folds`: the mean fold objective, the threshold from the out-of-fold scores, the holdout scored by
the fold models' mean.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import datetime
import functools
import hashlib
import inspect
import json
import logging
import math
import numbers
import os
import platform
import socket
import subprocess
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from tuner import metrics
from tuner.config import MONITOR_MODE, OBJECTIVE_DIRECTION, StudySpec
from tuner.data.dataset import LAYOUT_ATTR, MAX_LAYOUT_CHARS, MAX_LAYOUT_CHARS_MYSQL, Dataset, build_dataset
from tuner.errors import ConfigError, StorageError
from tuner.evaluation import (
    MultilabelEvaluation,
    RegressionEvaluation,
    evaluate_multilabel,
    evaluate_regression,
    multilabel_scorer,
    objective_values,
    per_class_figures,
    regression_scorer,
)
from tuner.health import VERDICTS, Verdict, judge
from tuner.model import build_mlp
from tuner.packed import PackedWith, PackMember, fit_as_packed, fit_pack, pack_key, run_in_order, split_by_cost
from tuner.space import OPTIONAL_PARAMS, TrialParams, enqueue_params, max_layers, suggest
from tuner.tasks import REGRESSION, SINGLE_LABEL
from tuner.tracking import (
    MlflowTracker,
    NullTracker,
    RunRecord,
    Tracker,
    call_by_name,
    mask_password,
    start_writer_process,
)
from tuner.train import FitConfig, FitResult, fit, mean_probabilities, predict_logits, probabilities
from tuner.worker import (
    INTERRUPTED,
    RUN_LEFT_OUT,
    RUN_REBUILT,
    Terminated,
    TrialFailed,
    TrialLost,
    behind_a_server,
    budget,
    check_terminated,
    find_study,
    finished_trials_marked,
    heartbeat_settings,
    is_sqlite,
    is_transient,
    make_storage,
    params_stored_at_once,
    record_trial,
    repair_lock,
    retrying,
    rewrite_finished_trial_attrs,
    settled_by_server_clock,
    sqlite_single_process,
    stale_trial_handler,
    started_trial_count,
    state_counts,
    storage_error_summary,
    work,
)

#: Sections of the study file whose change makes earlier trials incomparable.
FINGERPRINTED = ("data", "task", "search_space", "train", "objective", "validation")

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Strategies by name


SAMPLER_CLASSES: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "qmc": optuna.samplers.QMCSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}

PRUNER_CLASSES: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "none": optuna.pruners.NopPruner,
}


#: Strategies Optuna 5 marks experimental. The study file asked for one by name, so Optuna's warning would only
#: repeat that (and the interface it warns about is Optuna's, not the study file's).
EXPERIMENTAL = ("qmc", "wilcoxon")


def make_sampler(name: str, seed: int, options: dict[str, Any] | None = None) -> optuna.samplers.BaseSampler:
    """The sampler registered under ``name``, seeded by the study seed."""
    with warnings.catch_warnings():
        if name in EXPERIMENTAL:
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLER_CLASSES[name](seed=seed, **dict(options or {}))


def process_sampler_seed(spec: StudySpec, n_existing: int, mode: str) -> int:
    """The seed of this process's sampler: ``study.seed`` for a study run in one go, a stream of its own otherwise.

    An Optuna sampler keeps its random state in the process that made it. Seeded alike in every process, a study
    resumed in a new process would replay for its new trials the draws of its first ones (TPE's random start-up
    trials: the same parameters again), and workers joining one study would all draw the same parameters. So:

    - a process starting a study that holds no trials yet, and not as a worker, takes ``study.seed`` itself: a study
      run in one go gives the same parameters as ever;
    - a process continuing a study that holds ``n_existing`` trials takes a seed derived from ``study.seed`` and
      ``n_existing``: a new stream, the same one for the same resumption point;
    - a worker (``mode == "worker"``) mixes in its identity too, host name and ``TUNER_WORKER_INDEX`` (without it,
      its process id), so that workers starting together on a fresh study, on one machine or in containers, draw
      different parameters. A study run by several workers is not reproducible trial by trial.

    ``qmc`` keeps ``study.seed`` in every process (:func:`process_sampler` gives its random fallback the derived
    seed): Optuna's QMCSampler scrambles its sequence with the seed and keeps its position in a study attribute
    keyed by that seed, so processes sharing the seed continue one sequence where others would each start anew.
    Every other sampler offered (tpe, random, cmaes, gp, nsga2) shares no state between processes through the
    seed: CMA-ES reseeds its generator each trial, NSGA-II keeps its parent populations in the study.

    Args:
        spec: The validated study file.
        n_existing: Trials the study holds as this process starts, queued ones (WAITING) not counted.
        mode: ``run``, ``create`` or ``worker``, as :func:`run_study` takes it.

    Returns:
        A seed in [0, 2**32 - 1], as numpy takes it.
    """
    if n_existing == 0 and mode != "worker":
        return spec.study.seed
    words = [str(spec.study.seed), str(n_existing)]
    if mode == "worker":
        index = os.environ.get("TUNER_WORKER_INDEX")
        words += [socket.gethostname(), f"index {index}" if index else f"pid {os.getpid()}"]
    return int.from_bytes(hashlib.sha256("\0".join(words).encode()).digest()[:4], "big")


def process_sampler(spec: StudySpec, n_existing: int, mode: str) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded for this process by :func:`process_sampler_seed`.

    ``qmc`` keeps ``study.seed`` for its sequence; its independent sampler (the first trials, until one completes,
    and any parameter outside the first completed trial's space) takes this process's seed, as other samplers do.
    """
    seed = process_sampler_seed(spec, n_existing, mode)
    options = dict(spec.study.sampler_options or {})
    if spec.study.sampler != "qmc":
        return make_sampler(spec.study.sampler, seed, options)
    if options.get("independent_sampler") is None:
        options["independent_sampler"] = optuna.samplers.RandomSampler(seed=seed)
    return make_sampler("qmc", spec.study.seed, options)


def make_pruner(name: str, options: dict[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """The pruner registered under ``name``; ``none`` never prunes."""
    options = dict(options or {})
    if name == "percentile":
        options.setdefault("percentile", 25.0)
    if name in ("median", "percentile"):
        # The first epochs' validation objective is noise (completeness at a contamination target is often 0
        # until the net separates the classes at all): do not prune on them.
        options.setdefault("n_warmup_steps", 3)
    with warnings.catch_warnings():
        if name in EXPERIMENTAL:
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return PRUNER_CLASSES[name](**options)


# The annotations an option's value can be checked against; any other makes the option the constructor's to check.
_SIMPLE_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
#: Capitalised names in an annotation that a YAML value can still be: anything else names a Python class.
_PLAIN_NAMES = ("Any", "Sequence", "Mapping", "Literal", "None")

#: The ranges Optuna's strategies need of their numeric options, whichever strategy takes the option. Some
#: constructors check theirs; others keep the value and fail mid-study, after a trial is written: TPE's
#: n_ei_candidates 0 at its first model-based trial (IndexError), CMA-ES's popsize < 2 at its first generation
#: (AssertionError), Hyperband's reduction_factor 1 or min_resource 0 when it first prunes (ZeroDivisionError),
#: TPE's prior_weight < 0 when it first models the trials.
_OPTION_RANGES: dict[str, tuple[float, float]] = {
    "n_startup_trials": (0, math.inf),
    "n_ei_candidates": (1, math.inf),
    "prior_weight": (0, math.inf),
    "popsize": (2, math.inf),
    "population_size": (2, math.inf),
    "n_warmup_steps": (0, math.inf),
    "interval_steps": (1, math.inf),
    "n_min_trials": (1, math.inf),
    "percentile": (0, 100),
    "min_resource": (1, math.inf),
    "max_resource": (1, math.inf),
    "reduction_factor": (2, math.inf),
    "min_early_stopping_rate": (0, math.inf),
    "bootstrap_count": (0, math.inf),
    "n_startup_steps": (0, math.inf),
    "p_threshold": (0, 1),
    "crossover_prob": (0, 1),
    "mutation_prob": (0, 1),
    "swapping_prob": (0, 1),
}
#: Options that must be > 0 (a range's lower bound is inclusive).
_POSITIVE_OPTIONS = ("sigma0",)
#: Options that take the word auto besides a number.
_AUTO_OPTIONS = ("min_resource", "max_resource")


def _annotation_parts(annotation: Any) -> list[str]:
    """The members of a (union) annotation as text: ``"int | None"`` and ``int | None`` give ``["int", "None"]``."""
    if isinstance(annotation, type):
        return [annotation.__name__]
    if not isinstance(annotation, str):
        if typing.get_origin(annotation) is typing.Union or isinstance(annotation, type(int | None)):
            return [part for arg in typing.get_args(annotation) for part in _annotation_parts(arg)]
        annotation = str(annotation)
    parts: list[str] = []
    depth = start = 0
    for i, char in enumerate(annotation):  # split at the top level only: Callable[[A | None], B] | None
        depth += (char == "[") - (char == "]")
        if char == "|" and depth == 0:
            parts.append(annotation[start:i])
            start = i + 1
    parts.append(annotation[start:])
    names = [part.strip().rsplit(".", 1)[-1] if "[" not in part else part.strip() for part in parts]
    return ["None" if n == "NoneType" else n for n in names]


def _python_classes(part: str) -> list[str]:
    """The class names in one member of an annotation (``list[FrozenTrial]`` -> ``["FrozenTrial"]``)."""
    words = part.translate(str.maketrans("[],", "   ")).split()
    names = [word.rsplit(".", 1)[-1] for word in words]
    return [n for n in names if n[:1].isupper() and n not in _PLAIN_NAMES]


def option_type_problem(factory: Callable[..., Any], key: str, value: Any) -> str | None:
    """What is wrong with ``value``'s type for the keyword ``key`` of an Optuna sampler or pruner, or None.

    Optuna's constructors store most options unchecked, so a wrong type surfaces as a traceback mid-study.
    The check reads the constructor's annotation (a string under postponed evaluation, such as ``"int | None"``)
    and judges simple ones: int, float, bool, str and None. An option Optuna wants a Python function or object
    for (``gamma``, ``constraints_func``, ``independent_sampler``) cannot come from a YAML file: any value but
    null is refused.
    """
    try:
        parameter = inspect.signature(factory).parameters.get(key)
    except (TypeError, ValueError):
        return None
    if parameter is None:
        return None  # an unknown name: the constructor refuses it with its own message
    names = _annotation_parts(parameter.annotation)
    if value is not None:
        default = parameter.default  # inspect.Parameter.empty (a class) when there is none
        if any(n.startswith("Callable") for n in names) or (callable(default) and not isinstance(default, type)):
            return f"{key}: cannot be set from a study file (Optuna expects a Python function), got {value!r}"
        classes = [c for n in names if n != "None" for c in _python_classes(n)]
        if classes and all(_python_classes(n) for n in names if n != "None"):
            wanted = " or ".join(dict.fromkeys(classes))
            return f"{key}: cannot be set from a study file (Optuna expects a Python object, {wanted}), got {value!r}"
    if not names or any(n not in _SIMPLE_TYPES for n in names):
        return None
    accepted = {_SIMPLE_TYPES[n] for n in names}
    if isinstance(value, bool):
        ok = bool in accepted
    elif isinstance(value, int):
        ok = int in accepted or float in accepted
    elif isinstance(value, float):
        ok = float in accepted
    else:
        ok = type(value) in accepted
    if ok:
        return None
    wanted = " or ".join(_TYPE_WORDS[t] for t in (int, float, bool, str, type(None)) if t in accepted)
    return f"{key}: {value!r} must be {wanted}"


def option_value_problem(factory: Callable[..., Any], key: str, value: Any) -> str | None:
    """What is wrong with the value of the keyword ``key`` of an Optuna sampler or pruner, once its type is right.

    A number must be finite and lie in the range the strategy needs (``_OPTION_RANGES``).
    """
    try:
        parameter = inspect.signature(factory).parameters.get(key)
    except (TypeError, ValueError):
        return None
    if parameter is None:
        return None
    takes_auto = key in _AUTO_OPTIONS and "str" in _annotation_parts(parameter.annotation)
    if isinstance(value, str) and takes_auto and value != "auto":
        return f"{key}: must be an integer >= 1 or auto, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return f"{key}: must be a finite number, got {value}"
    if key in _POSITIVE_OPTIONS and value <= 0:
        return f"{key}: must be > 0, got {value}"
    low, high = _OPTION_RANGES.get(key, (-math.inf, math.inf))
    if low <= value <= high:
        return None
    if high < math.inf:
        return f"{key}: must lie in [{low:g}, {high:g}], got {value}"
    if takes_auto:
        return f"{key}: must be an integer >= {low:g} or auto, got {value}"
    return f"{key}: must be >= {low:g}, got {value}"


def option_problem(factory: Callable[..., Any], key: str, value: Any) -> str | None:
    """What is wrong with the option ``key: value`` of an Optuna sampler or pruner (its type, then its value),
    or None; an unknown name is left for the constructor to refuse."""
    try:
        known = key in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if known and key == "seed":
        return f"{key}: the sampler is seeded with study.seed, got {value!r}; set study.seed instead"
    return option_type_problem(factory, key, value) or option_value_problem(factory, key, value)


def enqueue_new(study: optuna.Study, entries: Sequence[dict[str, Any]]) -> int:
    """Queue each warm-start entry unless a trial of the study (any state) already holds its parameters, or an
    entry before it does; returns how many were queued.

    What ``enqueue_trial(..., skip_if_exists=True)`` does, with the study read once: Optuna reads every trial
    again for each entry, and the entries just queued each time among them.
    """
    seen = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(deepcopy=False)]
    queued = 0
    for params in entries:
        if any(_same_params(params, other) for other in seen):
            continue
        study.enqueue_trial(params)
        seen.append(params)
        queued += 1
    return queued


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same names and values; numbers equal to rounding (a stored float may come back through JSON)."""
    if a.keys() != b.keys():
        return False
    for name, value in a.items():
        other = b[name]
        if isinstance(value, bool) or isinstance(other, bool) or isinstance(value, str) or isinstance(other, str):
            if type(value) is not type(other) or value != other:
                return False
        elif isinstance(value, numbers.Real) and isinstance(other, numbers.Real):
            if not math.isclose(float(value), float(other), rel_tol=1e-9, abs_tol=0.0):
                return False
        elif value != other:
            return False
    return True


def check_spec(spec: StudySpec, extra_enqueue: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Checks that need Optuna: sampler/pruner options and warm-start entries. All problems at once.

    Returns:
        The warm-start entries in Optuna's parameter names.

    Raises:
        ConfigError: Listing every problem.
    """
    problems: list[str] = []
    for what, factories, options, build in (
        (
            "sampler",
            SAMPLER_CLASSES,
            spec.study.sampler_options,
            lambda: make_sampler(spec.study.sampler, spec.study.seed, spec.study.sampler_options),
        ),
        (
            "pruner",
            PRUNER_CLASSES,
            spec.study.pruner_options,
            lambda: make_pruner(spec.study.pruner, spec.study.pruner_options),
        ),
    ):
        name = getattr(spec.study, what)
        typed = [option_problem(factories[name], key, value) for key, value in (options or {}).items()]
        wrong = [f"study.{what}_options.{problem} (the {name} {what})" for problem in typed if problem]
        if wrong:
            problems += wrong
            continue
        try:
            build()
        except (TypeError, ValueError) as exc:
            problems.append(f"study.{what}_options: not accepted by the {name} {what}: {exc}")
    entries: list[dict[str, Any]] = []
    all_entries = [(f"study.enqueue[{i}]", e) for i, e in enumerate(spec.study.enqueue)]
    all_entries += [(f"--enqueue entry {i}", e) for i, e in enumerate(extra_enqueue)]
    for where, entry in all_entries:
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping of parameter names to values, got {entry!r}")
            continue
        params, found = enqueue_params(spec.search_space, entry, where)
        problems += found
        entries.append(params)
    if problems:
        raise ConfigError(problems)
    return entries


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is a CUDA device when one is present, else the CPU.

    With several GPUs visible, worker processes spread over them: worker ``TUNER_WORKER_INDEX`` (or, without
    it, the process id) modulo the number of GPUs.
    """
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        index = int(os.environ.get("TUNER_WORKER_INDEX", os.getpid())) % count if count > 1 else 0
        return torch.device(f"cuda:{index}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        # torch names more device types (mps, xpu, meta, ...); tuner's engines are built and tested for these two.
        raise ConfigError(f"--device: {device!r} is not a device tuner trains on; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device!r} asked for, but no CUDA device is available; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(
            f"--device: {device!r} asked for, but only {count} CUDA device(s) are visible: cuda:0 to cuda:{count - 1}"
        )
    return resolved


#: Seconds a study stopped by Ctrl-C or SIGTERM waits for its trials' last MLflow writes (docker/compose.yaml gives
#: a worker 60 s between SIGTERM and SIGKILL).
STOP_DRAIN_S = 30.0

#: Trials per pack when ``study.pack`` is auto and a GPU trains them: enough to fill the launches' gaps.
GPU_PACK = 8


def pack_size(pack: int | str, device: torch.device) -> int:
    """``study.pack`` as a number: auto packs on a GPU (:data:`GPU_PACK`) and trains one at a time on the CPU."""
    if pack == "auto":
        return GPU_PACK if device.type == "cuda" else 1
    return int(pack)


# --------------------------------------------------------------------------------------------------------------
# Storage


def storage_url(spec: StudySpec, storage: str | None = None) -> str:
    return storage or spec.study.storage


def _changed_sections(study: optuna.Study, spec: StudySpec) -> list[str]:
    stored = study.user_attrs.get("tuner.fingerprints", {})
    if stored and "validation" not in stored:
        # A study created before the validation section existed ran on one split, the default.
        stored = {**stored, "validation": StudySpec().fingerprint("validation")}
    return [s for s in FINGERPRINTED if s in stored and stored[s] != spec.fingerprint(s)]


# --------------------------------------------------------------------------------------------------------------
# One trial


@dataclass(frozen=True)
class Evaluation:
    """A trained model judged honestly: the operating point from validation, measured on the holdout."""

    objective: float
    val_point: metrics.OperatingPoint
    holdout: metrics.MeasuredPoint
    val_auc: float
    holdout_auc: float
    val_ap: float
    val_scores: np.ndarray
    holdout_scores: np.ndarray
    # A multi-objective study's values, in the order of objective.metric (``objective`` is the first); empty with
    # one objective.
    objectives: tuple[float, ...] = ()
    # Validation and holdout measured at the fixed threshold objective.threshold, when an objective uses it.
    val_fixed: metrics.MeasuredPoint | None = None
    holdout_fixed: metrics.MeasuredPoint | None = None
    # Multiclass: every class's completeness and contamination at the most probable class, and macro figures.
    per_class: dict[str, float] = field(default_factory=dict)

    @property
    def values(self) -> tuple[float, ...]:
        """The value per objective: what the trial returns to Optuna."""
        return self.objectives or (self.objective,)

    def final_metrics(self) -> dict[str, float]:
        h = self.holdout
        out = {
            "val_objective": self.objective,
            "threshold": self.val_point.threshold,
            "val_completeness": self.val_point.completeness,
            "val_contamination": self.val_point.contamination,
            "val_auc": self.val_auc,
            "val_ap": self.val_ap,
            "holdout_completeness": h.completeness,
            "holdout_completeness_low": h.completeness_ci.low,
            "holdout_completeness_high": h.completeness_ci.high,
            "holdout_contamination": h.contamination,
            "holdout_contamination_low": h.contamination_ci.low,
            "holdout_contamination_high": h.contamination_ci.high,
            "holdout_auc": self.holdout_auc,
        }
        out.update(objective_values(self.objectives))
        if self.val_fixed is not None and self.holdout_fixed is not None:
            v, f = self.val_fixed, self.holdout_fixed
            out.update(
                {
                    "fixed_threshold": v.threshold,
                    "val_completeness_at_threshold": v.completeness,
                    "val_contamination_at_threshold": v.contamination,
                    "holdout_completeness_at_threshold": f.completeness,
                    "holdout_completeness_at_threshold_low": f.completeness_ci.low,
                    "holdout_completeness_at_threshold_high": f.completeness_ci.high,
                    "holdout_contamination_at_threshold": f.contamination,
                    "holdout_contamination_at_threshold_low": f.contamination_ci.low,
                    "holdout_contamination_at_threshold_high": f.contamination_ci.high,
                }
            )
        out.update(self.per_class)
        return out


#: What judges a trained model: one positive class (binary, multiclass), each label, or a regression.
AnyEvaluation = Evaluation | MultilabelEvaluation | RegressionEvaluation


def measure_at(y: np.ndarray, scores: np.ndarray, threshold: float) -> metrics.MeasuredPoint:
    """Completeness and contamination at a fixed score threshold, with 95% Wilson intervals."""
    counts = metrics.confusion_counts(y, scores, threshold)
    return metrics.MeasuredPoint(
        threshold=threshold,
        counts=counts,
        completeness=metrics.completeness(counts),
        contamination=metrics.contamination(counts),
        completeness_ci=metrics.wilson_interval(counts.tp, counts.n_pos),
        contamination_ci=metrics.wilson_interval(counts.fp, counts.n_pred_pos),
    )


def scalar_metric(spec: StudySpec) -> tuple[str | None, str]:
    """The metric measured every epoch for pruning, and its key in the epoch's metrics.

    A single-objective study reports its objective as ``val_objective``; a multi-objective one its
    ``objective.guard`` as ``val_guard`` (``val_loss`` as itself), or nothing without a guard.
    """
    if not spec.objective.multi:
        metric = spec.objective.metrics[0]
        return metric, "val_objective"
    guard = spec.objective.guard
    return guard, "val_loss" if guard == "val_loss" else "val_guard"


def validation_scorer(spec: StudySpec, dataset: Dataset) -> Callable[[np.ndarray], dict[str, float]]:
    """Per-epoch validation metrics: the objective (what pruning compares) and the monitor when it differs."""
    target = spec.objective.target_contamination
    metric, key = scalar_metric(spec)
    if spec.task in REGRESSION:
        return regression_scorer(dataset.validation.y_numpy, dataset.unscale, metric, key)
    if spec.task == "multilabel":
        return multilabel_scorer(dataset.validation.y_numpy, target, metric, key, (spec.train.monitor,))
    # One class against the rest is a multilabel task of one label: the positive class's column.
    pos = dataset.positive_index
    score_labels = multilabel_scorer(
        (dataset.validation.y_numpy == pos)[:, None], target, metric, key, (spec.train.monitor,)
    )
    return lambda probs: score_labels(probs[:, [pos]])


def evaluate(model: torch.nn.Module, dataset: Dataset, spec: StudySpec, fit_result: FitResult) -> AnyEvaluation:
    """Choose the threshold on validation, freeze it, measure it on the holdout.

    With ``completeness`` or ``contamination`` among the objectives, validation and holdout are also measured at
    the fixed ``objective.threshold``, which defines those objectives. Regressions are measured by MAE, RMSE and
    R² (holdout with bootstrap intervals), multilabel tasks label by label (see :mod:`tuner.evaluation`).
    """
    chunk = spec.train.eval_batch_size
    pos = dataset.positive_index

    def outputs(x: torch.Tensor) -> np.ndarray:
        return probabilities(predict_logits(model, x, chunk), spec.task).cpu().numpy().astype(np.float64)

    val_out, hold_out = outputs(dataset.validation.x), outputs(dataset.holdout.x)
    val_loss = fit_result.best_metrics.get("val_loss", float("nan"))
    if spec.task in REGRESSION:
        return evaluate_regression(
            dataset.validation.y_numpy,
            dataset.unscale(val_out[:, 0]),
            dataset.holdout.y_numpy,
            dataset.unscale(hold_out[:, 0]),
            spec.objective.metrics,
            val_loss,
        )
    if spec.task == "multilabel":
        return evaluate_multilabel(
            dataset.catalogue.target_names,
            dataset.validation.y_numpy,
            val_out,
            dataset.holdout.y_numpy,
            hold_out,
            spec.objective.target_contamination,
            spec.objective.metrics,
            val_loss,
        )
    val_scores, hold_scores = val_out[:, pos], hold_out[:, pos]
    y_val = dataset.validation.y_numpy == pos
    y_hold = dataset.holdout.y_numpy == pos
    point = metrics.choose_operating_point(y_val, val_scores, spec.objective.target_contamination)
    measured = metrics.apply_operating_point(y_hold, hold_scores, point)
    val_auc = metrics.roc_auc(y_val, val_scores)
    val_ap = metrics.average_precision(y_val, val_scores)
    values = {
        "completeness_at_contamination": point.completeness,
        "val_loss": val_loss,
        "roc_auc": val_auc,
        "average_precision": val_ap,
    }
    val_fixed = hold_fixed = None
    if spec.objective.uses_threshold:
        val_fixed = measure_at(y_val, val_scores, spec.objective.threshold)
        hold_fixed = measure_at(y_hold, hold_scores, spec.objective.threshold)
        values["completeness"], values["contamination"] = val_fixed.completeness, val_fixed.contamination
    objectives = tuple(float(values[m]) for m in spec.objective.metrics)
    return Evaluation(
        objective=objectives[0],
        val_point=point,
        holdout=measured,
        val_auc=val_auc,
        holdout_auc=metrics.roc_auc(y_hold, hold_scores),
        val_ap=val_ap,
        val_scores=val_scores,
        holdout_scores=hold_scores,
        objectives=objectives if spec.objective.multi else (),
        val_fixed=val_fixed,
        holdout_fixed=hold_fixed,
        per_class=(
            per_class_figures(
                dataset.catalogue.class_names,
                dataset.validation.y_numpy,
                val_out,
                dataset.holdout.y_numpy,
                hold_out,
            )
            if spec.task == "multiclass"
            else {}
        ),
    )


# --------------------------------------------------------------------------------------------------------------
# k-fold cross-validation (validation.kind kfold)

#: Artifact path of fold ``i``'s weights in a cross-validated trial's run (``model/model.json`` describes them all).
FOLD_WEIGHTS_ARTIFACT = "model/fold_{fold}/state_dict.pt"


@dataclass(frozen=True)
class FoldOutcome:
    """One fold model: trained on the other folds, judged on its own fold."""

    index: int
    model: torch.nn.Module
    result: FitResult
    objective: float  # the validation objective on this fold, as a one-split trial measures it on validation
    val_scores: np.ndarray  # positive-class probability of each row of this fold


@dataclass
class FoldFits:
    """The fold models of one trial, in fold order, and the reason training stopped early, if it did."""

    folds: list[FoldOutcome]
    failure: str = ""
    failed_result: FitResult | None = None

    @property
    def results(self) -> list[FitResult]:
        return [f.result for f in self.folds] + ([self.failed_result] if self.failed_result is not None else [])

    @property
    def health(self) -> Verdict | None:
        return folds_verdict([r.health for r in self.results])


@dataclass(frozen=True)
class CrossValidation:
    """A cross-validated trial judged honestly.

    ``evaluation.objective`` is the mean of the fold objectives (what Optuna optimises); the threshold and the
    ``val_*`` figures come from the out-of-fold scores (each modelling row scored by the fold model that did not
    train on it); the holdout is scored by the mean of the fold models' probabilities at that frozen threshold.
    """

    evaluation: Evaluation
    fold_objectives: tuple[float, ...]
    oof_labels: np.ndarray  # is-positive of each out-of-fold score, in the order of evaluation.val_scores

    @property
    def objective(self) -> float:
        return self.evaluation.objective

    @property
    def objective_std(self) -> float:
        """Sample standard deviation of the fold objectives (ddof=1): the spread a fold-to-fold difference has."""
        return float(np.std(self.fold_objectives, ddof=1)) if len(self.fold_objectives) > 1 else 0.0

    def final_metrics(self) -> dict[str, float]:
        return {
            **self.evaluation.final_metrics(),
            "cv_objective_mean": self.objective,
            "cv_objective_std": self.objective_std,
        }


def folds_verdict(verdicts: Sequence[Verdict | None]) -> Verdict | None:
    """The most severe of the fold models' gradient-health verdicts, naming its fold."""
    found = [(i, v) for i, v in enumerate(verdicts) if v is not None]
    if not found:
        return None
    rank = {name: r for r, name in enumerate(VERDICTS)}
    i, worst = min(found, key=lambda iv: (rank.get(iv[1].name, len(VERDICTS)), iv[0]))
    return Verdict(worst.name, f"fold {i}: {worst.detail}" if worst.detail else f"fold {i}")


def fold_objective(
    model: torch.nn.Module, view: Dataset, spec: StudySpec, result: FitResult
) -> tuple[float, np.ndarray]:
    """A fold model's validation objective on its own fold, and its scores there; the holdout is not looked at.

    Args:
        model: The fold model, holding its best epoch's weights.
        view: The fold's view of the data (:meth:`Dataset.fold_view`).
        spec: The study.
        result: The fold's fit (its best epoch's ``val_loss`` is the objective ``val_loss``).

    Returns:
        The objective as :func:`evaluate` measures it on validation, and the fold rows' positive-class scores.
    """
    pos = view.positive_index
    logits = predict_logits(model, view.validation.x, spec.train.eval_batch_size)
    scores = probabilities(logits, spec.task)[:, pos].cpu().numpy().astype(np.float64)
    y = view.validation.y_numpy == pos
    metric = spec.objective.metric
    if metric == "completeness_at_contamination":
        value = metrics.choose_operating_point(y, scores, spec.objective.target_contamination).completeness
    elif metric == "val_loss":
        value = result.best_metrics.get("val_loss", float("nan"))
    elif metric == "roc_auc":
        value = metrics.roc_auc(y, scores)
    else:
        value = metrics.average_precision(y, scores)
    return float(value), scores


def evaluate_folds(folds: Sequence[FoldOutcome], dataset: Dataset, spec: StudySpec) -> CrossValidation:
    """Choose the threshold on the out-of-fold scores, freeze it, then measure the fold models' mean on the holdout.

    Args:
        folds: Every fold's outcome, in fold order.
        dataset: The study's data, with its folds.
        spec: The study.

    Returns:
        The cross-validated evaluation.
    """
    pos = dataset.positive_index
    oof_scores = np.concatenate([f.val_scores for f in folds])
    y_oof = np.concatenate([dataset.folds[f.index].validation.y_numpy for f in folds]) == pos
    point = metrics.choose_operating_point(y_oof, oof_scores, spec.objective.target_contamination)
    # The holdout only now, with the threshold frozen: each fold model scores it through its own scaling.
    hold_probs = mean_probabilities(
        [f.model for f in folds],
        [dataset.folds[f.index].holdout.x for f in folds],
        spec.task,
        spec.train.eval_batch_size,
    )
    hold_scores = hold_probs[:, pos]
    y_hold = dataset.holdout.y_numpy == pos
    values = tuple(f.objective for f in folds)
    per_class: dict[str, float] = {}
    if spec.task == "multiclass":
        # Every class at its most probable class: out of fold (each row by the model that did not train on it),
        # and on the holdout by the fold models' mean.
        chunk = spec.train.eval_batch_size
        oof_probs = np.concatenate(
            [
                probabilities(predict_logits(f.model, dataset.folds[f.index].validation.x, chunk), spec.task)
                .cpu()
                .numpy()
                .astype(np.float64)
                for f in folds
            ]
        )
        oof_labels = np.concatenate([dataset.folds[f.index].validation.y_numpy for f in folds])
        per_class = per_class_figures(
            dataset.catalogue.class_names, oof_labels, oof_probs, dataset.holdout.y_numpy, hold_probs
        )
    evaluation = Evaluation(
        objective=float(np.mean(values)),
        val_point=point,
        holdout=metrics.apply_operating_point(y_hold, hold_scores, point),
        val_auc=metrics.roc_auc(y_oof, oof_scores),
        holdout_auc=metrics.roc_auc(y_hold, hold_scores),
        val_ap=metrics.average_precision(y_oof, oof_scores),
        val_scores=oof_scores,
        holdout_scores=hold_scores,
        per_class=per_class,
    )
    return CrossValidation(evaluation=evaluation, fold_objectives=values, oof_labels=y_oof)


def measure_folds(models: Sequence[torch.nn.Module], dataset: Dataset, spec: StudySpec) -> CrossValidation:
    """Judge stored fold models as their trial was judged: fold objectives, out-of-fold threshold, holdout mean.

    Args:
        models: Fold ``i``'s model at index ``i``, holding its restored weights, on the dataset's device.
        dataset: The study's data, with its folds.
        spec: The study.

    Returns:
        The cross-validated evaluation (equal to the trial's when the weights are the trial's own).
    """
    from tuner.train import loss_function

    outcomes = []
    for i, model in enumerate(models):
        view = dataset.fold_view(i)
        # val_loss as fit computes it, for studies whose objective is the validation loss.
        logits = predict_logits(model, view.validation.x, spec.train.eval_batch_size)
        val_loss = float(loss_function(fit_config(spec, view), dataset.device)(logits, view.validation.y))
        result = FitResult(best_metrics={"val_loss": val_loss})
        value, scores = fold_objective(model, view, spec, result)
        outcomes.append(FoldOutcome(i, model, result, value, scores))
    return evaluate_folds(outcomes, dataset, spec)


class FoldTrackingCallback:
    """Buffers each epoch's metrics of one fold model for the trial's run, under ``fold{i}_`` keys."""

    def __init__(self, tracker: Tracker, run_key: str | None, fold: int) -> None:
        self.tracker = tracker
        self.run_key = run_key
        self.prefix = f"fold{fold}_"
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        check_terminated()  # a SIGTERM whose exception was lost ends the trial here
        self.history.append(metrics)
        self.tracker.log_epoch(self.run_key, epoch, {self.prefix + k: v for k, v in metrics.items()})


def crossval_model_files(
    fits: FoldFits, params: TrialParams, dataset: Dataset, spec: StudySpec, cv: CrossValidation, number: int
) -> dict[str, str | bytes]:
    """Each fold model's restored weights and ``model/model.json`` describing the ensemble, as artifacts.

    The description has no top-level ``preprocessor``: each member carries its own, fitted on its training folds.
    """
    import io

    files: dict[str, str | bytes] = {}
    members = []
    seed = spec.study.seed + number
    for outcome in fits.folds:
        fold = dataset.folds[outcome.index]
        path = FOLD_WEIGHTS_ARTIFACT.format(fold=outcome.index)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}, buffer)
        files[path] = buffer.getvalue()
        members.append(
            {
                "fold": outcome.index,
                "weights": path,
                "seed": seed + outcome.index,
                "preprocessor": fold.preprocessor.to_dict(),
                "train_rows": len(fold.train_rows),
                "validation_rows": len(fold.validation_rows),
                "objective": outcome.objective,
                "epochs": outcome.result.epochs,
                "best_epoch": outcome.result.best_epoch,
            }
        )
    meta = model_meta(params, dataset, spec, cv.evaluation, number)
    del meta["preprocessor"]
    meta["metrics"] = cv.final_metrics()
    meta["validation"] = {"kind": "kfold", "k": len(dataset.folds)}
    meta["ensemble"] = {
        "combine": "mean of the fold models' class probabilities, each model through its own scaling",
        "threshold_from": "out-of-fold scores",
        "members": members,
    }
    files[MODEL_META_ARTIFACT] = json.dumps(meta, indent=2)
    return files


def _check_folds(spec: StudySpec, dataset: Dataset) -> None:
    # A dataset handed in (tests, notebooks) must have been built for this spec's validation.
    want = spec.validation.k if spec.validation.kind == "kfold" else 0
    if len(dataset.folds) != want:
        raise ValueError(
            f"the dataset has {len(dataset.folds)} folds but the spec asks for validation {spec.validation.kind}"
            + (f" with k={want}" if want else "")
            + "; build it with build_dataset(spec)"
        )


class PruningCallback:
    """Reports the validation objective to Optuna each epoch and raises ``TrialPruned`` when told to.

    With ``hold`` (a study without a pruner, where nothing reads a trial's reports before it ends) the values
    are kept in ``held`` instead, for the trial's end to store with its attributes in one transaction.
    """

    def __init__(self, trial: optuna.Trial, key: str = "val_objective", *, hold: bool = False) -> None:
        self.trial = trial
        self.key = key
        self.pruned_at: int | None = None
        self.hold = hold
        self.held: dict[int, float] = {}

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.key, metrics["val_loss"])
        if not math.isfinite(value):
            return
        if self.hold:
            self.held[epoch] = value
            return
        # Retried in place: a database restart would otherwise lose the trial's epochs, and in a pack its
        # members' too. Reporting the same step again stores nothing new.
        retrying(lambda: self.trial.report(value, epoch), what=f"report trial {self.trial.number}'s epoch {epoch}")
        if retrying(self.trial.should_prune, what=f"ask whether to prune trial {self.trial.number}"):
            self.pruned_at = epoch
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.key}={value:.6g})")


#: User attribute holding a multi-objective trial's guard metric per epoch (None where it was not finite).
GUARD_HISTORY = "guard_history"


def guard_median_rule(
    value: float,
    step: int,
    others: Sequence[Sequence[float | None]],
    *,
    maximize: bool,
    n_startup_trials: int = 5,
    n_warmup_steps: int = 3,
) -> tuple[bool, float | None]:
    """The median rule on a guard metric: prune when ``value`` at ``step`` is worse than the others' median there.

    Args:
        value: The trial's guard at this epoch.
        step: The epoch (0-based).
        others: The guard per epoch of each other COMPLETE trial.
        maximize: Whether a larger guard is better.
        n_startup_trials: Never prune before this many other trials completed.
        n_warmup_steps: Never prune before this epoch.

    Returns:
        Whether to prune, and the median compared with (None when the rule could not apply).
    """
    if step < n_warmup_steps or len(others) < n_startup_trials:
        return False, None
    at_step = [float(v) for h in others if len(h) > step and (v := h[step]) is not None and math.isfinite(v)]
    if not at_step:
        return False, None
    median = float(np.median(at_step))
    return (value < median if maximize else value > median), median


class GuardPruningCallback:
    """Prunes a multi-objective trial on its ``objective.guard`` metric by the median rule.

    Optuna's ``trial.report`` and pruners take one objective only, so the guard's value per epoch is kept here and
    stored on the trial (:data:`GUARD_HISTORY`) when it ends; each epoch it is compared with the other COMPLETE
    trials' guard at the same epoch (:func:`guard_median_rule`). Without a guard it records and prunes nothing.
    """

    def __init__(
        self,
        trial: optuna.Trial,
        guard: str | None,
        key: str,
        *,
        enabled: bool,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 3,
    ) -> None:
        self.trial = trial
        self.guard = guard
        self.key = key
        self.enabled = enabled and guard is not None
        self.maximize = guard is not None and OBJECTIVE_DIRECTION[guard] == "maximize"
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps
        self.history: list[float | None] = []
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.guard is None:
            return
        value = float(metrics.get(self.key, math.nan))
        finite = math.isfinite(value)
        self.history.extend([None] * (epoch - len(self.history)))  # epochs that reached no callback
        self.history.append(value if finite else None)
        if not (self.enabled and finite) or epoch < self.n_warmup_steps:
            return
        complete = retrying(
            lambda: self.trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
            what=f"read the trials to judge trial {self.trial.number}",
        )
        others = [t.user_attrs[GUARD_HISTORY] for t in complete if GUARD_HISTORY in t.user_attrs]
        prune, median = guard_median_rule(
            value,
            epoch,
            others,
            maximize=self.maximize,
            n_startup_trials=self.n_startup_trials,
            n_warmup_steps=self.n_warmup_steps,
        )
        if prune:
            self.pruned_at = epoch
            raise optuna.TrialPruned(
                f"pruned at epoch {epoch} (guard {self.guard}={value:.6g}, worse than the median {median:.6g} of "
                f"{len(others)} complete trials)"
            )


class TrackingCallback:
    """Buffers each epoch's metrics for the trial's run."""

    def __init__(self, tracker: Tracker, run_key: str | None) -> None:
        self.tracker = tracker
        self.run_key = run_key
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        check_terminated()  # a SIGTERM whose exception was lost ends the trial here
        self.history.append(metrics)
        self.tracker.log_epoch(self.run_key, epoch, metrics)


def fit_config(spec: StudySpec, dataset: Dataset) -> FitConfig:
    pos_weight: float | tuple[float, ...] | None
    if spec.train.pos_weight == "balanced" and spec.task == "multilabel":
        # One weight per label: its negatives per positive among the training rows.
        positives = dataset.train.y_numpy.sum(axis=0)
        pos_weight = tuple(float((len(dataset.train) - n) / max(n, 1)) for n in positives)
    elif spec.train.pos_weight == "balanced":
        y = dataset.train.y_numpy == dataset.positive_index
        pos_weight = float((~y).sum() / max(int(y.sum()), 1))
    elif isinstance(spec.train.pos_weight, float) and spec.task == "multilabel":
        pos_weight = (spec.train.pos_weight,) * len(dataset.catalogue.target_names)
    else:
        pos_weight = spec.train.pos_weight if isinstance(spec.train.pos_weight, float) else None
    monitor = spec.train.monitor
    mode = MONITOR_MODE.get(monitor) or ("max" if spec.objective.direction == "maximize" else "min")
    return FitConfig(
        task=spec.task,
        max_epochs=spec.train.max_epochs,
        patience=spec.train.patience,
        min_delta=spec.train.min_delta,
        monitor=monitor,
        monitor_mode=mode,
        eval_batch_size=spec.train.eval_batch_size,
        pos_weight=pos_weight if spec.task in ("binary", "multilabel") else None,
    )


#: Artifact paths of a completed trial's model, read back by export.
WEIGHTS_ARTIFACT = "model/state_dict.pt"
MODEL_META_ARTIFACT = "model/model.json"


def params_json(params: TrialParams) -> dict[str, Any]:
    """A trial's parameters as JSON values; optional ones (clipping, loss, L1) only when the space sets them."""
    record: dict[str, Any] = {**params.__dict__, "widths": list(params.widths)}
    for name in OPTIONAL_PARAMS:
        if record[name] is None:
            del record[name]
    return record


def model_meta(
    params: TrialParams, dataset: Dataset, spec: StudySpec, ev: AnyEvaluation | None, trial_number: int
) -> dict[str, Any]:
    """Everything needed to rebuild a trial's model and apply it to raw catalogue columns, as plain numbers."""
    catalogue = dataset.catalogue
    meta: dict[str, Any] = {
        "format": 1,
        "trial_number": trial_number,
        "task": spec.task,
        "params": params_json(params),
        "feature_names": list(catalogue.feature_names),
        "class_names": list(catalogue.class_names),
        "positive_class": spec.positive_class,
        "positive_index": dataset.positive_index,
        "preprocessor": dataset.preprocessor.to_dict(),
        "target_contamination": spec.objective.target_contamination,
        "objective_metric": spec.objective.metric,
        "data": dataset.facts(),
        "seed": spec.study.seed + trial_number,
    }
    if spec.task not in SINGLE_LABEL:
        meta["n_outputs"] = dataset.n_out
        meta["target_names"] = list(catalogue.target_names)
    if dataset.target_scaling is not None:
        meta["target_scaling"] = {"mean": dataset.target_scaling[0], "std": dataset.target_scaling[1]}
    if isinstance(ev, Evaluation):
        meta["threshold"] = ev.val_point.threshold
    elif isinstance(ev, MultilabelEvaluation):
        meta["thresholds"] = ev.thresholds
    if ev is not None:
        meta["metrics"] = ev.final_metrics()
    return meta


def trial_model_files(
    model: torch.nn.Module, params: TrialParams, dataset: Dataset, spec: StudySpec, ev: AnyEvaluation, number: int
) -> dict[str, str | bytes]:
    """The restored best-epoch weights (a plain state dict) and the model's description, as artifacts."""
    import io

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    meta = model_meta(params, dataset, spec, ev, number)
    return {WEIGHTS_ARTIFACT: buffer.getvalue(), MODEL_META_ARTIFACT: json.dumps(meta, indent=2)}


#: Artifact path of every trial's manifest (also stored in the trial's ``manifest`` user attribute).
MANIFEST_ARTIFACT = "manifest.json"

#: Packages whose versions a trial's numbers may depend on, as their distributions are named.
MANIFEST_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "pandas", "optuna", "mlflow")


@functools.cache
def _package_versions() -> tuple[tuple[str, str], ...]:
    # Read once per process: every trial records them, and the lookups cost a trial some 50 ms.
    from importlib.metadata import PackageNotFoundError, version

    from tuner import __version__

    packages = {"python": platform.python_version(), "tuner": __version__}
    for name in MANIFEST_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            packages[name] = version(name)
    return tuple(packages.items())


def environment_manifest(device: torch.device) -> dict[str, Any]:
    """What a trial's numbers depend on besides its parameters, seed and data: versions, device, torch settings.

    Versions are read from the installed distributions, so this imports no tracking library.
    """
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return {
        "packages": dict(_package_versions()),
        "git_commit": _git_commit(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name,
        "torch": {
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
        },
    }


def trial_manifest(
    spec: StudySpec, dataset: Dataset, params: TrialParams, seed: int, number: int, engine: str = "eager"
) -> dict[str, Any]:
    """Everything needed to replay a trial alone and to explain a replay that differs.

    Args:
        spec: The study.
        dataset: The study's data (its hash identifies the rows and split).
        params: The trial's parameters.
        seed: The trial's seed (initial weights, dropout, shuffling).
        number: The trial number.
        engine: How the trial was trained (:data:`ENGINES`); a replay uses the same.

    Returns:
        A JSON-ready mapping: seeds, data identity, parameters, package versions, device and torch settings.
    """
    return {
        "format": 1,
        "study": spec.study.name,
        "trial_number": number,
        "seed": seed,
        "seeds": {"trial": seed, "study": spec.study.seed, "data": spec.data.seed},
        "data": {key.removeprefix("data."): value for key, value in dataset.facts().items()},
        "params": params_json(params),
        "engine": engine,
        **environment_manifest(dataset.device),
    }


def _record_health(attrs: dict[str, Any], verdict: Verdict | None, tags: dict[str, str]) -> None:
    """The verdict for the Optuna trial (user attributes) and for its run (tags, searchable in MLflow)."""
    if verdict is None:
        return
    attrs["gradient_health"] = verdict.name
    attrs["gradient_health_detail"] = verdict.detail
    tags["gradient_health"] = verdict.name
    tags["gradient_health_detail"] = verdict.detail


#: How a trial was trained: ``eager`` (:func:`tuner.train.fit`, one model) or ``packed`` (:func:`fit_pack`).
ENGINES = ("eager", "packed")


@dataclass
class TrialRun:
    """A trial between its start (parameters drawn, MLflow run open) and its end (value, pruned or failed)."""

    trial: optuna.Trial
    params: TrialParams
    seed: int
    run_key: str | None  # the tracker's key of its MLflow run, whose id is recorded at the trial's end
    tracking: TrackingCallback
    pruning: PruningCallback | GuardPruningCallback
    artifacts: dict[str, str | bytes]
    # How it trained beside other trials (set as it leaves its pack), which a replay needs to match it exactly.
    packed_with: PackedWith | None = None

    @property
    def callbacks(self) -> list[Any]:
        return [self.tracking, self.pruning]


#: Threads that settle the trials leaving a pack together (see Objective.run_pack).
SETTLE_THREADS = 4


class SettleTogether:
    """Runs a batch of calls on a few threads and returns when all have returned, raising the first error."""

    def __init__(self, threads: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="settle")

    def __call__(self, calls: Sequence[Callable[[], None]]) -> None:
        if len(calls) == 1:
            calls[0]()
            return
        futures = [self._pool.submit(call) for call in calls]
        concurrent.futures.wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Objective:
    """The function Optuna calls: one trial, tracked, judged on validation, measured on the holdout.

    With ``engine="packed"`` the worker hands over several trials at once (:meth:`run_pack`); those of one
    shape (:func:`pack_key`) train together as one vectorised model, and each is still started, reported,
    pruned, judged and closed as its own trial.
    """

    def __init__(self, spec: StudySpec, dataset: Dataset, tracker: Tracker, engine: str = "eager") -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.spec = spec
        self.dataset = dataset
        self.tracker = tracker
        self.engine = engine
        self.config = fit_config(spec, dataset)
        self.score_validation = validation_scorer(spec, dataset)
        self.max_layers = max_layers(spec.search_space)
        self.n_out = dataset.n_out

    def train_trial(
        self,
        params: TrialParams,
        seed: int,
        callbacks: Sequence[Any],
        engine: str | None = None,
        packed_with: PackedWith | None = None,
    ) -> tuple[torch.nn.Module, FitResult]:
        """Build and fit one model with this objective's engine (or ``engine``); also used to replay a trial, one
        that trained in a pack as it trained there (``packed_with``, see :func:`fit_as_packed`)."""
        if (engine or self.engine) == "packed":
            member = PackMember(params, seed, callbacks)
            data = (self.dataset.train, self.dataset.validation, self.config)
            if packed_with is not None:
                outcome = fit_as_packed(
                    member, packed_with, *data, n_out=self.n_out, score_validation=self.score_validation
                )
            else:
                (outcome,) = fit_pack([member], *data, n_out=self.n_out, score_validation=self.score_validation)
            if outcome.error is not None:
                raise outcome.error
            return outcome.model, outcome.result
        model = build_mlp(
            self.dataset.n_features, params, self.n_out, generator=torch.Generator().manual_seed(seed)
        ).to(self.dataset.device)
        result = fit(
            model,
            self.dataset.train,
            self.dataset.validation,
            params,
            self.config,
            seed=seed,
            score_validation=self.score_validation,
            callbacks=callbacks,
        )
        return model, result

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        run = self.begin(trial)
        if self.dataset.folds:
            return self.cross_validate_trial(run)
        try:
            model, result = self.train_trial(run.params, run.seed, run.callbacks)
        except BaseException as exc:  # closed as PRUNED or FAIL by finish(), which re-raises
            return self.finish(run, None, None, exc)
        return self.finish(run, model, result, None)

    def run_pack(
        self,
        trials: Sequence[optuna.Trial],
        on_settled: Callable[[int, float | list[float] | Exception], None] | None = None,
    ) -> list[float | list[float] | Exception]:
        """Run several trials, packing those of one shape; each trial's value, or the exception that ended it.

        A trial is settled (judged, its run closed) as soon as it leaves its pack, and ``on_settled(index,
        outcome)`` is called then, so its worker can tell Optuna while the rest of the pack trains.
        ``optuna.TrialPruned`` and :class:`TrialFailed` end one trial and are returned in its place, as is
        :class:`TrialLost` for a storage error while it was judged; anything else (Ctrl-C, SIGTERM, a defect)
        closes every run still open as failed and is raised.
        """
        runs = [self.begin(trial) for trial in trials]
        outcomes: list[float | list[float] | Exception | None] = [None] * len(runs)

        def settle(
            i: int,
            model: torch.nn.Module | None,
            result: FitResult | None,
            error: BaseException | None,
            packed_with: PackedWith | None = None,
        ) -> None:
            runs[i].packed_with = packed_with
            outcomes[i] = outcome = self._settle(runs[i], model, result, error)
            if on_settled is not None:
                on_settled(i, outcome)

        # Trials that leave a pack together (the same epoch's end) are settled at once when each settling waits on
        # a database server (Optuna's tell, the trial's records): their round trips overlap instead of adding up.
        together = len(runs) > 1 and behind_a_server(trials[0].storage) and self.tracker.closes_from_threads
        hand_off = SettleTogether(min(len(runs), SETTLE_THREADS)) if together else None
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, run in enumerate(runs):
            groups.setdefault(pack_key(run.params), []).append(i)
        packs = list(groups.values())
        if self.dataset.device.type == "cpu":
            # On the CPU padding costs arithmetic: a wide trial does not drag narrow ones to its size.
            packs = [
                [rows[j] for j in part]
                for rows in packs
                for part in split_by_cost([runs[i].params for i in rows], self.dataset.n_features, self.n_out)
            ]
        try:
            for rows in packs:
                members = [
                    PackMember(
                        runs[i].params,
                        runs[i].seed,
                        runs[i].callbacks,
                        on_finish=lambda out, i=i: settle(  # type: ignore[misc]
                            i, out.model, out.result, out.error, out.packed_with
                        ),
                    )
                    for i in rows
                ]
                try:
                    fit_pack(
                        members,
                        self.dataset.train,
                        self.dataset.validation,
                        self.config,
                        n_out=self.n_out,
                        score_validation=self.score_validation,
                        hand_off=hand_off or run_in_order,
                    )
                except torch.OutOfMemoryError as exc:
                    for i in rows:
                        if outcomes[i] is None:
                            settle(i, None, None, exc)
        except BaseException as exc:
            if hand_off is not None:
                hand_off.close()  # settlings under way end first (Ctrl-C or SIGTERM while waiting for them)
            for i, run in enumerate(runs):
                if outcomes[i] is None:
                    with contextlib.suppress(BaseException):
                        self.finish(run, None, None, exc)
            raise
        finally:
            if hand_off is not None:
                hand_off.close()
        return [o for o in outcomes if o is not None]

    def _settle(
        self, run: TrialRun, model: torch.nn.Module | None, result: FitResult | None, error: BaseException | None
    ) -> float | list[float] | Exception:
        try:
            return self.finish(run, model, result, error)
        except (optuna.TrialPruned, TrialFailed) as exc:
            return exc
        except Exception as exc:
            if not is_transient(exc):
                raise
            # The database went away while this trial was judged: it alone is lost, the rest of its pack trains on.
            return TrialLost(storage_error_summary(exc))

    def begin(self, trial: optuna.Trial) -> TrialRun:
        """Draw the trial's parameters, record its seed and manifest, open its MLflow run."""
        with params_stored_at_once(trial):
            params = suggest(trial, self.spec.search_space)
        seed = self.spec.study.seed + trial.number
        manifest = trial_manifest(self.spec, self.dataset, params, seed, trial.number, self.engine)
        attrs: dict[str, Any] = {"seed": seed, "engine": self.engine, "manifest": manifest}
        run_key = self.tracker.start_trial(
            trial.number,
            params.as_record(self.max_layers),
            {
                "optuna.trial_number": str(trial.number),
                "optuna.study_name": self.spec.study.name,
                "seed": str(seed),
                "engine": self.engine,
            },
        )
        record_trial(trial, attrs)
        return TrialRun(
            trial=trial,
            params=params,
            seed=seed,
            run_key=run_key,
            tracking=TrackingCallback(self.tracker, run_key),
            pruning=self._pruning(trial),
            # Every trial's run holds its manifest, whatever its end.
            artifacts={MANIFEST_ARTIFACT: json.dumps(manifest, indent=2)},
        )

    def _pruning(self, trial: optuna.Trial) -> PruningCallback | GuardPruningCallback:
        objective, study = self.spec.objective, self.spec.study
        if not objective.multi:
            return PruningCallback(trial, hold=isinstance(trial.study.pruner, optuna.pruners.NopPruner))
        options = study.pruner_options
        return GuardPruningCallback(
            trial,
            objective.guard,
            scalar_metric(self.spec)[1],
            enabled=study.pruner == "median",
            n_startup_trials=int(options.get("n_startup_trials", 5)),
            n_warmup_steps=int(options.get("n_warmup_steps", 3)),
        )

    def finish(
        self,
        run: TrialRun,
        model: torch.nn.Module | None,
        result: FitResult | None,
        error: BaseException | None,
    ) -> float | list[float]:
        """Judge a trained trial and close its run; or close it as PRUNED / FAIL and raise ``error``.

        Returns:
            The objective value of a completed trial; a list of values in a multi-objective study.

        Raises:
            optuna.TrialPruned: The trial was pruned.
            TrialFailed: It cannot produce a value (non-finite loss, gradients or objective; out of memory).
            BaseException: ``error`` itself when it is anything else (Ctrl-C, SIGTERM, a defect).
        """
        trial, run_key, tracking = run.trial, run.run_key, run.tracking
        artifacts = run.artifacts
        plots: Callable[[], dict[str, str | bytes]] | None = None
        state: str = "FAIL"
        final: dict[str, float] = {}
        tags: dict[str, str] = {}
        attrs: dict[str, Any] = {}  # the trial's user attributes, written at once on every path
        if run.packed_with is not None:
            attrs["packed_with"] = run.packed_with.as_record()
        if isinstance(run.pruning, GuardPruningCallback) and run.pruning.guard is not None:
            # Stored whatever the trial's end (the median rule reads the complete trials'); a failed write must not
            # hide the error that ended the trial.
            with contextlib.suppress(Exception):
                trial.set_user_attr(GUARD_HISTORY, run.pruning.history)
        try:
            if isinstance(error, optuna.TrialPruned):
                state = "PRUNED"
                tags = {"stop_reason": str(error)}
                final = {"epochs": float(len(tracking.history))}
                attrs.update(stop_reason=str(error), epochs=len(tracking.history))
                if self.config.health:
                    _record_health(attrs, judge(tracking.history, self.config.health_thresholds), tags)
                raise error
            if isinstance(error, torch.OutOfMemoryError):
                tags = {"stop_reason": f"out of memory: {error}"}
                raise TrialFailed(f"out of memory: {error}") from None
            if error is not None:
                raise error
            assert model is not None and result is not None
            attrs.update(stop_reason=result.stop_reason, epochs=result.epochs, best_epoch=result.best_epoch)
            tags = {"stop_reason": result.stop_reason}
            _record_health(attrs, result.health, tags)
            final = {"epochs": float(result.epochs), "best_epoch": float(result.best_epoch or 0)}
            if result.failed:
                if len(tracking.history) < result.epochs:
                    # The epoch that ended the fit reached no callback: log it, so the curves show the blow-up.
                    self.tracker.log_epoch(run_key, result.epochs - 1, result.history[-1])
                attrs["fail_reason"] = result.stop_reason
                raise TrialFailed(result.stop_reason)
            ev = evaluate(model, self.dataset, self.spec, result)
            bad = [(m, v) for m, v in zip(self.spec.objective.metrics, ev.values, strict=True) if not math.isfinite(v)]
            if bad:
                reason = "non-finite objective " + ", ".join(f"{m}={v}" for m, v in bad)
                attrs["fail_reason"] = reason
                tags["stop_reason"] = reason
                raise TrialFailed(reason)
            final.update(ev.final_metrics())
            attrs.update(ev.final_metrics())
            if self.spec.tracking.enabled:
                artifacts.update(trial_model_files(model, run.params, self.dataset, self.spec, ev, trial.number))
                if self.spec.tracking.plots:
                    # Drawn where the tracker's writes go, while the next trial trains.
                    plots = self._plots(result, ev, trial.number)
            state = "COMPLETE"
            return list(ev.values) if self.spec.objective.multi else ev.objective
        except (KeyboardInterrupt, Terminated):
            # Stopped while training (``error``) or while being judged: the run says why it ended, as others do.
            tags["stop_reason"] = INTERRUPTED
            raise
        finally:
            self._close(run, state, attrs, final, tags, plots)

    def _close(
        self,
        run: TrialRun,
        state: str,
        attrs: dict[str, Any],
        final: dict[str, float],
        tags: dict[str, str],
        plots: Callable[[], dict[str, str | bytes]] | None,
    ) -> None:
        """Store the trial's attributes (and held reports) at once, then close its run, on every path."""
        held = run.pruning.held if isinstance(run.pruning, PruningCallback) else None
        try:
            # Known by now: the run's creation went out before the trial trained.
            run_id = self.tracker.run_id(run.run_key)
            if run_id is not None:
                attrs["mlflow_run_id"] = run_id
            elif run.run_key is not None:
                # Its run could not be created (the store unreachable): kept for the next start to create it.
                attrs[RUN_LEFT_OUT] = left_out_record(final, tags, self.tracker.epoch_metrics(run.run_key))
            record_trial(run.trial, attrs, held)
        except BaseException:
            state = "FAIL"  # a trial whose figures were not stored is not complete
            raise
        finally:
            # Runs close on every path, Ctrl-C included: a run left RUNNING misleads the UI.
            self.tracker.end_trial(run.run_key, state, final, tags, run.artifacts, plots)

    def _plots(self, result: FitResult, ev: AnyEvaluation, number: int) -> Callable[[], dict[str, str | bytes]]:
        """The trial's plots as a call the tracker makes where its writes go (another process, another thread):
        only the figures' inputs travel, and this process need not import the plotting code."""
        label, plotlyjs = f"trial {number}", self.spec.tracking.plotlyjs
        if isinstance(ev, RegressionEvaluation):
            parts = {
                "validation": (self.dataset.validation.y_numpy, ev.val_predictions),
                "holdout": (self.dataset.holdout.y_numpy, ev.holdout_predictions),
            }
            name = self.dataset.catalogue.target_names[0]
            return call_by_name(
                "tuner.report:regression_artifacts", result.history, result.best_epoch, parts, name, label, plotlyjs
            )
        if isinstance(ev, MultilabelEvaluation):
            # One curve per label on the holdout, each label's frozen operating point marked.
            y_hold = self.dataset.holdout.y_numpy
            curves = {f.name: (y_hold[:, j] > 0.5, ev.holdout_scores[:, j]) for j, f in enumerate(ev.labels)}
            points = {f.name: (f.holdout.completeness, f.holdout.contamination) for f in ev.labels}
        else:
            pos = self.dataset.positive_index
            curves = {
                "validation": (self.dataset.validation.y_numpy == pos, ev.val_scores),
                "holdout": (self.dataset.holdout.y_numpy == pos, ev.holdout_scores),
            }
            points = {
                "validation": (ev.val_point.completeness, ev.val_point.contamination),
                "holdout": (ev.holdout.completeness, ev.holdout.contamination),
            }
        return call_by_name(
            "tuner.report:trial_artifacts",
            result.history,
            result.best_epoch,
            curves,
            points,
            self.spec.objective.target_contamination,
            label,
            plotlyjs,
        )

    # ----------------------------------------------------------------------------------------------------------
    # k-fold cross-validation

    @functools.cached_property
    def _fold_objectives(self) -> list[Objective]:
        # One objective per fold, on the fold's view of the data: the one-split code (fit configuration, per-epoch
        # validation scores, balanced class weights) then sees the fold's rows and scaling.
        return [Objective(self.spec, self.dataset.fold_view(i), self.tracker) for i in range(len(self.dataset.folds))]

    def cross_validate(
        self,
        params: TrialParams,
        seed: int,
        *,
        callbacks: Callable[[int], Sequence[Any]] = lambda fold: (),
        after_fold: Callable[[FoldOutcome], None] | None = None,
    ) -> FoldFits:
        """Train the k fold models in fold order; fold ``i`` is seeded with ``seed + i``. Also used to replay.

        Args:
            params: The trial's parameters.
            seed: The trial's seed.
            callbacks: The per-epoch callbacks of fold ``i``.
            after_fold: Called with each finished fold (reports to Optuna; may raise ``optuna.TrialPruned``).

        Returns:
            The fold models; at the first fold whose fit fails or whose objective is not finite, training stops
            and ``failure`` names the fold and the reason.
        """
        fits = FoldFits(folds=[])
        for i, runner in enumerate(self._fold_objectives):
            model, result = runner.train_trial(params, seed + i, list(callbacks(i)), engine="eager")
            if result.failed:
                fits.failure, fits.failed_result = f"fold {i}: {result.stop_reason}", result
                return fits
            value, scores = fold_objective(model, runner.dataset, self.spec, result)
            if not math.isfinite(value):
                fits.failure = f"fold {i}: non-finite objective {self.spec.objective.metric}={value}"
                fits.failed_result = result
                return fits
            outcome = FoldOutcome(i, model, result, value, scores)
            fits.folds.append(outcome)
            if after_fold is not None:
                after_fold(outcome)
        return fits

    def cross_validate_trial(self, run: TrialRun) -> float:
        """One k-fold trial: train the folds (each fold's objective reported with step = fold), judge, close the run.

        Returns:
            The mean of the fold objectives.

        Raises:
            optuna.TrialPruned: The pruner stopped the trial after a fold.
            TrialFailed: A fold failed (non-finite loss, gradients or objective; out of memory).
        """
        trial, run_key, artifacts = run.trial, run.run_key, run.artifacts
        plots: Callable[[], dict[str, str | bytes]] | None = None
        k = len(self.dataset.folds)
        trackers = [FoldTrackingCallback(self.tracker, run_key, i) for i in range(k)]
        done: list[FoldOutcome] = []
        state, final, tags = "FAIL", {}, {}
        attrs: dict[str, Any] = {}  # the trial's user attributes, written at once on every path

        def after_fold(outcome: FoldOutcome) -> None:
            done.append(outcome)
            result = outcome.result
            fold_metrics = {"fold_objective": outcome.objective, "fold_epochs": float(result.epochs)}
            fold_metrics["fold_best_epoch"] = float(result.best_epoch or 0)
            self.tracker.log_epoch(run_key, outcome.index, fold_metrics)
            trial.report(outcome.objective, outcome.index)
            # After the last fold the trial is complete: pruning it would save nothing and lose its value.
            if outcome.index < k - 1 and trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned after {outcome.index + 1} of {k} folds (fold {outcome.index} "
                    f"{self.spec.objective.metric}={outcome.objective:.6g})"
                )

        def record_folds(results: Sequence[FitResult]) -> None:
            attrs["fold_objectives"] = [o.objective for o in done]
            attrs["fold_epochs"] = [r.epochs for r in results]
            attrs["fold_best_epochs"] = [r.best_epoch for r in results]
            attrs["epochs"] = sum(r.epochs for r in results)
            final["epochs"] = float(sum(r.epochs for r in results))
            for i, r in enumerate(results):
                tags[f"fold{i}_stop_reason"] = r.stop_reason

        try:
            try:
                fits = self.cross_validate(
                    run.params, run.seed, callbacks=lambda i: [trackers[i]], after_fold=after_fold
                )
            except optuna.TrialPruned as exc:
                state = "PRUNED"
                tags["stop_reason"] = str(exc)
                attrs["stop_reason"] = str(exc)
                record_folds([o.result for o in done])
                if self.config.health:
                    _record_health(attrs, folds_verdict([o.result.health for o in done]), tags)
                raise
            except torch.OutOfMemoryError as exc:
                tags["stop_reason"] = f"out of memory: {exc}"
                raise TrialFailed(f"out of memory: {exc}") from None
            results = fits.results
            record_folds(results)
            summary = (
                f"{k} folds; epochs per fold {', '.join(str(r.epochs) for r in results)}, restored "
                f"{', '.join(str(r.best_epoch) for r in results)}"
            )
            attrs["stop_reason"] = fits.failure or summary
            tags["stop_reason"] = fits.failure or summary
            _record_health(attrs, fits.health, tags)
            if fits.failure:
                failed = fits.failed_result
                if failed is not None and len(trackers[len(fits.folds)].history) < failed.epochs:
                    # The epoch that ended the fit reached no callback: log it, so the curves show the blow-up.
                    trackers[len(fits.folds)].on_epoch_end(failed.epochs - 1, failed.history[-1])
                attrs["fail_reason"] = fits.failure
                raise TrialFailed(fits.failure)
            cv = evaluate_folds(fits.folds, self.dataset, self.spec)
            if not math.isfinite(cv.objective):
                reason = f"non-finite objective {self.spec.objective.metric}={cv.objective}"
                attrs["fail_reason"] = reason
                tags["stop_reason"] = reason
                raise TrialFailed(reason)
            final.update(cv.final_metrics())
            attrs.update(cv.final_metrics())
            if self.spec.tracking.enabled:
                artifacts.update(crossval_model_files(fits, run.params, self.dataset, self.spec, cv, trial.number))
                if self.spec.tracking.plots:
                    plots = self._crossval_plots(fits, cv, trial.number)
            state = "COMPLETE"
            return cv.objective
        finally:
            self._close(run, state, attrs, final, tags, plots)

    def _crossval_plots(self, fits: FoldFits, cv: CrossValidation, number: int) -> Callable[[], dict[str, str | bytes]]:
        ev = cv.evaluation
        y_hold = self.dataset.holdout.y_numpy == self.dataset.positive_index
        oof, hold = "out-of-fold", "holdout (mean of the fold models)"
        curves = {oof: (cv.oof_labels, ev.val_scores), hold: (y_hold, ev.holdout_scores)}
        points = {
            oof: (ev.val_point.completeness, ev.val_point.contamination),
            hold: (ev.holdout.completeness, ev.holdout.contamination),
        }
        return call_by_name(
            "tuner.report:crossval_trial_artifacts",
            [f.result.history for f in fits.folds],
            [f.result.best_epoch for f in fits.folds],
            curves,
            points,
            self.spec.objective.target_contamination,
            f"trial {number}",
            self.spec.tracking.plotlyjs,
        )


# --------------------------------------------------------------------------------------------------------------
# The study


@dataclass
class StudyResult:
    """What :func:`run_study` did."""

    study: optuna.Study
    dataset: Dataset
    n_run: int
    ui_hint: str
    tracking_warnings: int = 0
    facts: dict[str, str] = field(default_factory=dict)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else value


def masked_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as JSON with passwords in the storage and tracking URLs masked: safe to store and log."""
    raw = spec.model_dump(mode="json")
    raw["study"]["storage"] = mask_password(raw["study"]["storage"])
    raw["tracking"]["uri"] = mask_password(raw["tracking"]["uri"])
    return raw


def spec_params(spec: StudySpec) -> dict[str, Any]:
    """The spec flattened into dotted MLflow params, passwords masked."""
    out: dict[str, Any] = {}
    _flatten("", masked_spec(spec), out)
    return out


@functools.cache
def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def environment_tags() -> dict[str, str]:
    """Package versions and the code's commit, so a run can be traced to what produced it."""
    versions = dict(_package_versions())
    # "mlflow." is MLflow's own tag namespace: keep ours under "env.". The installed distribution's version, so
    # that a study with tracking off does not import MLflow for its tags.
    tags = {
        "env.tuner": versions["tuner"],
        "env.python": platform.python_version(),
        "env.torch": torch.__version__,
        "env.optuna": optuna.__version__,
        "env.mlflow": versions.get("mlflow", "not installed"),
        "env.numpy": np.__version__,
    }
    commit = _git_commit()
    if commit:
        tags["env.git_commit"] = commit
    return tags


def _same_sqlite_file(first: str, second: str) -> bool:
    paths = [Path(u[len("sqlite:///") :]).resolve() for u in (first, second) if u.startswith("sqlite:///")]
    return len(paths) == 2 and paths[0] == paths[1]


def make_tracker(spec: StudySpec, tracking_uri: str | None = None) -> Tracker:
    if not spec.tracking.enabled:
        return NullTracker()
    return MlflowTracker(
        tracking_uri or spec.tracking.uri,
        spec.tracking.experiment or spec.study.name,
        spec.tracking.artifact_location,
        writes=spec.tracking.writes,
    )


def run_study(
    spec: StudySpec,
    *,
    storage: str | optuna.storages.BaseStorage | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    tracker: Tracker | None = None,
    device: str | torch.device = "auto",
    n_trials: int | None = None,
    enqueue: Sequence[dict[str, Any]] = (),
    dataset: Dataset | None = None,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    on_start: Callable[[optuna.Study, int], None] | None = None,
    mode: str = "run",
) -> StudyResult:
    """Run (or continue) a study until it holds ``n_trials`` finished trials in total.

    Every check that can fail on user input runs before the study or any MLflow run is created.

    Args:
        spec: The validated study file.
        storage: Overrides ``study.storage``: a URL or an Optuna storage object.
        sampler: Overrides the sampler named in the spec.
        pruner: Overrides the pruner named in the spec.
        tracker: Overrides the tracker built from ``tracking``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a torch device.
        n_trials: Overrides ``study.n_trials`` (the total, counting earlier runs and every worker).
        enqueue: More warm-start entries, evaluated first.
        dataset: An already built dataset (tests, notebooks); built from the spec when None.
        callbacks: Optuna-style callbacks, called after each trial this process finishes (progress displays).
        on_start: Called once with the study and the number of trials still to run, before the first.
        mode: ``run`` creates the study when missing and runs trials; ``create`` only creates it (tables, warm
            start queue, MLflow parent run), so that workers started afterwards do not race; ``worker`` joins a
            study that must already exist.

    Returns:
        The study and what was run.

    Raises:
        ConfigError, DataError, StorageError, TrackingError: With a message naming the key and the rule.
    """
    if mode not in ("run", "create", "worker"):
        raise ValueError(f"mode must be run, create or worker, got {mode!r}")
    entries = check_spec(spec, enqueue)
    total = n_trials or spec.study.n_trials
    torch_device = resolve_device(device) if isinstance(device, str) else device
    if tracker is None and mode != "create" and spec.tracking.enabled:
        # The MLflow writer process imports while the data are built.
        start_writer_process(spec.tracking.uri, spec.tracking.writes)
    url = storage_url(spec, storage) if storage is None or isinstance(storage, str) else None
    target: str | optuna.storages.BaseStorage = url if url is not None else storage  # type: ignore[assignment]
    if tracker is None and spec.tracking.enabled and url and _same_sqlite_file(url, spec.tracking.uri):
        raise ConfigError(
            f"tracking.uri: {spec.tracking.uri} is the study's storage too ({url}); Optuna's and MLflow's tables "
            "do not share a file: give MLflow one of its own, e.g. sqlite:///mlruns/mlflow.db"
        )
    with sqlite_single_process(url) if url else contextlib.nullcontext():
        existing = find_study(spec.study.name, target)
        if existing is None and mode == "worker":
            raise StorageError(
                f"study.name: study {spec.study.name!r} not found in {_where(target)}; a worker joins an "
                "existing study: create it first with `tuner create STUDY.yaml --storage URL`"
            )
        # Each opening read and write is retried in place, as the trials' are: a worker starting while the
        # database restarts would otherwise exit before its first trial.
        layout = (
            None
            if existing is None or dataset is not None
            else retrying(lambda: existing.user_attrs.get(LAYOUT_ATTR), what="read the study")
        )
        dataset = dataset or build_dataset(spec, torch_device, recorded=layout)
        _check_folds(spec, dataset)
        if existing is not None:
            retrying(lambda: _check_compatible(existing, spec, dataset, target), what="read the study")
        # The trials the study holds as this process starts (queued warm-start entries not counted) seed its sampler.
        n_existing = 0 if existing is None else retrying(lambda: started_trial_count(existing), what="count trials")
        tracker = tracker or make_tracker(spec)
        study_storage: str | optuna.storages.BaseStorage = (
            make_storage(
                url,
                heartbeat_interval=spec.study.heartbeat_interval,
                grace_period=spec.study.grace_period,
                on_stale=stale_trial_handler(
                    tracker, spec.study.max_retries, f"no heartbeat for {spec.study.grace_period} s", total
                ),
                create_tables=mode != "worker",
            )
            if url
            else target
        )
        study = retrying(
            lambda: optuna.create_study(
                study_name=spec.study.name,
                storage=study_storage,
                # Seeded per process: a resumed run or a worker must not replay the draws of earlier trials.
                sampler=sampler or process_sampler(spec, n_existing, mode),
                # A multi-objective study prunes on its guard (GuardPruningCallback): Optuna's pruners take one value.
                pruner=pruner
                or (
                    optuna.pruners.NopPruner()
                    if spec.objective.multi
                    else make_pruner(spec.study.pruner, spec.study.pruner_options)
                ),
                directions=[
                    optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
                    for d in spec.objective.directions
                ],
                load_if_exists=True,
            ),
            what="create the study",
        )
        retrying(
            lambda: _record_study_facts(study, spec, dataset, _attribute_limit(target)), what="record the study's facts"
        )
        if mode != "worker":
            retrying(lambda: enqueue_new(study, entries), what="queue the warm-start trials")
        if url and is_sqlite(url):
            # The lock proves no other process is running: any RUNNING trial was left by a crash.
            _fail_orphans(study, tracker, spec)
        tags = {
            "tuner.study_name": spec.study.name,
            "tuner.sampler": spec.study.sampler if sampler is None else type(sampler).__name__,
            "tuner.pruner": spec.study.pruner if pruner is None else type(pruner).__name__,
            "tuner.storage": _where(target),
            **{f"tuner.{k}": v for k, v in dataset.facts().items()},
            **environment_tags(),
        }
        stored_parent = retrying(lambda: study.user_attrs.get("tuner.mlflow_parent_run_id"), what="read the study")
        parent = tracker.start_study(spec.study.name, spec_params(spec), tags, stored_parent)
        if url and stored_parent is not None:  # a study run just made has no trial runs yet
            sqlite = is_sqlite(url)
            retrying(lambda: repair_runs(study, tracker, spec, sqlite), what="repair the runs a tracking outage left")
        if parent is not None and stored_parent != parent:
            retrying(
                lambda: study.set_user_attr("tuner.mlflow_parent_run_id", parent), what="record the study's MLflow run"
            )
        before = retrying(lambda: budget(study, total), what="count trials")
        if on_start is not None:
            on_start(study, max(total - before.used - before.running, 0) if mode != "create" else 0)
        started = time.monotonic()
        finished = before.done
        ran = 0
        status = "FAILED"
        try:
            if mode != "create":
                pack = pack_size(spec.study.pack, dataset.device)
                engine = spec.study.engine
                if dataset.folds:
                    # A k-fold trial trains its folds one after the other, eagerly (study.pack auto).
                    pack, engine = 1, "eager"
                elif spec.study.pack == "auto" and engine == "eager":
                    pack = 1
                done = work(
                    study,
                    Objective(spec, dataset, tracker, engine=engine),
                    pack=pack,
                    total=total,
                    timeout=spec.study.timeout,
                    max_retries=spec.study.max_retries,
                    # An idle worker looks for a free slot (a lost trial's retry) every second.
                    poll_interval=1,
                    callbacks=callbacks,
                )
                ran, finished = done.ran, done.finished_study
            status = "FINISHED"
        except (KeyboardInterrupt, Terminated):
            status = "KILLED"
            raise
        finally:
            # The trials' closing MLflow writes may still be going out in the background (tracking.writes). On
            # Ctrl-C or SIGTERM they get a bounded wait (under compose's stop_grace_period) before the study run
            # closes. Otherwise the study run closes while they go out, and the wait after it takes as long as
            # they take: the study's own writes do not depend on them.
            if status != "FINISHED":
                tracker.drain(STOP_DRAIN_S)
            try:
                # With several workers the parent run stays open until the last one finds the study complete.
                others_running = retrying(lambda: budget(study, total), what="count trials").running > 0
                if mode != "create" and (finished or (status != "FINISHED" and not others_running)):
                    elapsed = time.monotonic() - started
                    summary = retrying(lambda: _study_summary_metrics(study, elapsed), what="summarise the study")
                    tracker.end_study(status, summary)
                elif mode == "create":
                    # Workers close the run when they finish the study; one already finished stays closed.
                    tracker.end_study("FINISHED" if finished else "RUNNING")
            finally:
                if status == "FINISHED":
                    tracker.drain(None)
    return StudyResult(
        study=study,
        dataset=dataset,
        n_run=ran,
        ui_hint=tracker.ui_hint(),
        tracking_warnings=getattr(tracker, "failed_writes", 0),
        facts=dataset.facts(),
    )


def _attribute_limit(storage: str | optuna.storages.BaseStorage) -> int:
    """The longest split record the storage is given (:meth:`Dataset.layout`)."""
    if isinstance(storage, optuna.storages.RDBStorage):
        dialect = storage.engine.dialect.name
    elif isinstance(storage, str):
        dialect = storage.split(":", 1)[0].split("+", 1)[0]
    else:
        dialect = ""
    return MAX_LAYOUT_CHARS_MYSQL if dialect in ("mysql", "mariadb") else MAX_LAYOUT_CHARS


def _record_study_facts(study: optuna.Study, spec: StudySpec, dataset: Dataset, layout_limit: int) -> None:
    """What the study was made from (once), and a multi-objective study's metric names."""
    if spec.objective.multi and not study.metric_names:
        # Experimental in Optuna 5; it names the values in the dashboard and the report.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.objective.metrics))
    stored = study.user_attrs
    if "tuner.fingerprints" not in stored:
        # The fingerprints last: once they are stored, so is the rest, even where a restart cut an earlier call short.
        study.set_user_attr("tuner.spec", masked_spec(spec))
        study.set_user_attr("tuner.data", dataset.facts())
        study.set_user_attr(LAYOUT_ATTR, dataset.layout(spec, layout_limit))
        study.set_user_attr("tuner.fingerprints", {s: spec.fingerprint(s) for s in FINGERPRINTED})
    elif LAYOUT_ATTR not in stored:
        # A study made before splits were recorded: from now on every process uses the split this one made.
        study.set_user_attr(LAYOUT_ATTR, dataset.layout(spec, layout_limit))


def _check_compatible(
    existing: optuna.Study, spec: StudySpec, dataset: Dataset, where: str | optuna.storages.BaseStorage
) -> None:
    changed = _changed_sections(existing, spec)
    if changed:
        raise ConfigError(
            f"study.name: study {spec.study.name!r} already exists in {_where(where)} with a different "
            f"{', '.join(changed)}; its trials would not be comparable. Restore the study file, or start a new "
            "study with --study-name NEW_NAME"
        )
    stored = [d.name.lower() for d in existing.directions]
    if stored != list(spec.objective.directions):
        raise ConfigError(
            f"objective.metric: study {spec.study.name!r} exists with direction(s) {', '.join(stored)}, "
            f"got {spec.objective.metric} ({', '.join(spec.objective.directions)})"
        )
    stored_hash = existing.user_attrs.get("tuner.data", {}).get("data.hash")
    if stored_hash and stored_hash != dataset.catalogue.data_hash:
        raise ConfigError(
            f"data.source: the catalogue's contents changed since study {spec.study.name!r} was created "
            f"(data hash {dataset.catalogue.data_hash}, study has {stored_hash}); use --study-name NEW_NAME"
        )


def _fail_orphans(study: optuna.Study, tracker: Tracker, spec: StudySpec) -> None:
    on_stale = stale_trial_handler(
        tracker, spec.study.max_retries, "the process running it died; found RUNNING when the study started again"
    )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            log.warning("trial %d was left RUNNING by a process that died; marked FAIL and queued again", trial.number)
            on_stale(study, study._storage.get_trial(trial._trial_id))


#: A finished trial's run still open this many seconds after the trial ended lost its end to a tracking outage.
#: An earlier study process's writer process (tracking.writes: process) may still be sending what it holds: on
#: a tracking server that does not answer, its requests take minutes each.
LEFT_OPEN_S = 600.0


def close_runs_left_open(
    study: optuna.Study, tracker: Tracker, settled_for: float, alone: Callable[[], bool] = lambda: True
) -> int:
    """Close the runs of trials that finished more than ``settled_for`` seconds ago but whose runs are still open,
    their end lost to a tracking outage; return how many. Runs of trials still running are left alone.

    Only for a study no other process runs (the SQLite lock), whose trials' end times are this machine's clock,
    or by the holder of its repair lock on PostgreSQL, where the trials' heartbeats tell their age by the
    server's clock.
    """
    open_runs = tracker.open_trial_runs(study.study_name)
    if not open_runs:
        return 0
    interval, _ = heartbeat_settings(study)
    by_server = settled_by_server_clock(study, set(open_runs), settled_for + interval)
    closed = 0
    for number, run_id in sorted(open_runs.items()):
        if not alone():
            break
        try:
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        except KeyError:
            continue
        trial = study._storage.get_trial(trial_id)
        ended = trial.datetime_complete
        if (
            not trial.state.is_finished()
            or ended is None
            or trial.user_attrs.get("mlflow_run_id") not in (None, run_id)
        ):
            continue
        if by_server is not None and number not in by_server:
            continue
        if by_server is None and (datetime.datetime.now() - ended).total_seconds() < settled_for:
            continue
        metrics: dict[str, float] = {}
        if trial.state == TrialState.COMPLETE and trial.values is not None:
            metrics = {"val_objective": trial.values[0], **objective_values(trial.values)}
        reason = (
            f"the trial ended {trial.state.name} but its run's end was never recorded (the tracking store was "
            "unreachable); closed when the study started again, without the trial's final metrics and artifacts"
        )
        if not tracker.close_run_left_open(run_id, trial.state.name, metrics, reason):
            break  # the store is likely gone again: the rest wait for the next start
        closed += 1
    if closed:
        log.warning("closed %d MLflow run(s) left open by a tracking outage (tag tracking_incomplete)", closed)
    return closed


#: The most JSON a trial keeps for its run left out: a user attribute is a TEXT column, 64 KiB on MySQL.
LEFT_OUT_LIMIT = 32_000
#: The learning curves kept when all of them would not fit: the per-layer and per-fold ones go first.
LEFT_OUT_CORE = ("train_loss", "val_loss", "val_objective")


def left_out_record(
    metrics: dict[str, float], tags: dict[str, str], curves: dict[str, dict[int, float]]
) -> dict[str, Any]:
    """What a trial keeps for a run that could not be created, within :data:`LEFT_OUT_LIMIT`: the curves other
    than :data:`LEFT_OUT_CORE` go first, then those, then every final figure but the objective's."""
    last_step = max((step for by_step in curves.values() for step in by_step), default=0)

    def record(kept: dict[str, dict[int, float]], figures: dict[str, float]) -> dict[str, Any]:
        # JSON keys are strings: the epochs travel as such and come back as numbers (create_runs_left_out).
        as_json = {key: {str(step): value for step, value in by_step.items()} for key, by_step in kept.items()}
        return {"metrics": figures, "tags": tags, "curves": as_json, "last_step": last_step}

    core = {key: by_step for key, by_step in curves.items() if key in LEFT_OUT_CORE}
    objective = {key: value for key, value in metrics.items() if key.startswith("val_objective")}
    for kept, figures in ((curves, metrics), (core, metrics), ({}, metrics), ({}, objective)):
        found = record(kept, figures)
        if len(json.dumps(found)) <= LEFT_OUT_LIMIT:
            return found
    return {**record({}, objective), "tags": {}}


def no_run_reason(trial: FrozenTrial) -> str:
    """Why a trial has no MLflow run with model files: tracking was off, or a tracking outage left them out."""
    if RUN_LEFT_OUT in trial.user_attrs or RUN_REBUILT in trial.user_attrs:
        return (
            f"trial {trial.number}'s MLflow run could not be created as it trained (the tracking store was "
            "unreachable), so its model files were never logged"
        )
    return f"trial {trial.number} has no MLflow run (tracking was off)"


def create_runs_left_out(
    study: optuna.Study, tracker: Tracker, spec: StudySpec, alone: Callable[[], bool] = lambda: True
) -> int:
    """Create the runs of finished trials whose runs could not be created (the tracking store unreachable as they
    started), from what the study holds: parameters, tags, per-epoch and final metrics, the manifest; return how
    many. Each made run's id then replaces the trial's :data:`RUN_LEFT_OUT` record. Their plots and model files
    are lost. The first failure ends the round: the store is likely gone again, and the rest wait for the next
    start.

    Only while ``alone()``: under an SQLite study's lock, or by the holder of its repair lock (PostgreSQL); two
    processes could make the same run twice.
    """
    left_out = finished_trials_marked(study, RUN_LEFT_OUT)
    if not left_out:
        return 0
    # An earlier repair's run whose id did not reach the trial (a crash in between) is found by its tags.
    runs = tracker.trial_runs(study.study_name)
    if runs is None:  # not searched (warned): making them now could make some twice
        return 0
    layers = max_layers(spec.search_space)
    created = 0
    for trial in left_out:
        if not alone():
            break
        if trial.datetime_start is None or trial.datetime_complete is None:
            continue
        run_id, whole = runs.get(trial.number, (None, False))
        if run_id is not None and whole:
            _record_rebuilt(study, trial, run_id)
            continue
        if run_id is not None and not tracker.discard_run(run_id):  # left half made by an earlier repair
            break
        made = tracker.create_run_left_out(trial.number, _run_record(trial, spec, layers))
        if made is None:
            break
        _record_rebuilt(study, trial, made)
        created += 1
    if created:
        log.warning("created %d MLflow run(s) a tracking outage left out (tag tracking_incomplete)", created)
    return created


def _run_record(trial: FrozenTrial, spec: StudySpec, layers: int) -> RunRecord:
    """The run of a trial left out, from what the study holds."""
    assert trial.datetime_start is not None and trial.datetime_complete is not None
    stored = trial.user_attrs[RUN_LEFT_OUT]
    try:
        # A copy: suggest on a FrozenTrial records the distributions on it, and this one is the storage cache's.
        params = suggest(copy.deepcopy(trial), spec.search_space).as_record(layers)
    except (ValueError, KeyError):
        params = dict(trial.params)
    attrs = trial.user_attrs
    tags = {
        "optuna.trial_number": str(trial.number),
        "optuna.study_name": spec.study.name,
        **{key: str(attrs[key]) for key in ("seed", "engine") if key in attrs},
        **stored.get("tags", {}),
        "tracking_incomplete": "the tracking store was unreachable as the trial started; this run was created "
        "when the study started again, from what the study holds: its parameters, tags and metrics, without its "
        "plots and model files",
    }
    return RunRecord(
        params=params,
        tags=tags,
        curves={
            key: {int(step): float(value) for step, value in by_step.items()}
            for key, by_step in stored.get("curves", {}).items()
        },
        metrics={key: float(value) for key, value in stored.get("metrics", {}).items()},
        last_step=int(stored.get("last_step", 0)),
        state=trial.state.name,
        started_ms=int(trial.datetime_start.timestamp() * 1000),
        ended_ms=int(trial.datetime_complete.timestamp() * 1000),
        artifacts={MANIFEST_ARTIFACT: json.dumps(attrs["manifest"], indent=2)} if "manifest" in attrs else {},
    )


def _record_rebuilt(study: optuna.Study, trial: FrozenTrial, run_id: str) -> None:
    """The made run's id in place of the trial's record, so that later starts leave it alone and reports find it.
    Where the storage cannot be written so (in memory), the next start finds the run by its tags instead."""
    rewrite_finished_trial_attrs(study, trial, {"mlflow_run_id": run_id, RUN_REBUILT: True}, drop=(RUN_LEFT_OUT,))


def repair_runs(study: optuna.Study, tracker: Tracker, spec: StudySpec, sqlite: bool) -> None:
    """Close the runs a tracking outage left open and create those it left out, when this process alone may: under
    an SQLite study's lock no other study process writes runs; on PostgreSQL, where workers start at once, the one
    holding the repair lock does it and the others go on. Elsewhere (MySQL) live workers may be writing them."""
    with repair_lock(study) as held:
        alone = (lambda: True) if sqlite else held
        if alone():
            close_runs_left_open(study, tracker, LEFT_OPEN_S, alone)
            create_runs_left_out(study, tracker, spec, alone)


def _where(storage: str | optuna.storages.BaseStorage) -> str:
    return mask_password(storage) if isinstance(storage, str) else type(storage).__name__


def _study_summary_metrics(study: optuna.Study, seconds: float) -> dict[str, float]:
    counts = state_counts(study)
    out = {f"n_{state.lower()}": float(n) for state, n in counts.items()}
    out["wall_seconds_last_run"] = seconds
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if complete and len(study.directions) > 1:
        out["pareto_front_size"] = float(len(study.best_trials))
    elif complete:
        best = study.best_trial
        out["best_value"] = float(best.value)  # type: ignore[arg-type]
        out["best_trial"] = float(best.number)
        # The headline holdout figures of the task: a classifier's selection, or a regression's errors.
        for key in (
            "holdout_completeness",
            "holdout_contamination",
            "threshold",
            "holdout_mae",
            "holdout_rmse",
            "holdout_r2",
        ):
            if key in best.user_attrs:
                out[f"best_{key}"] = float(best.user_attrs[key])
    return out


# --------------------------------------------------------------------------------------------------------------
# Replay

#: A replay reproduces a trial when the validation objectives agree this closely.
REPLAY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Replay:
    """A trial retrained alone on the CPU, next to what the study recorded for it.

    A COMPLETE trial is reproduced when the validation objectives agree within ``tolerance``; a FAIL trial
    when the replay fails for the same reason.
    """

    trial_number: int
    state: str
    seed: int
    data_hash: str
    recorded: float | None
    replayed: float | None
    recorded_reason: str
    replayed_reason: str
    recorded_health: str | None
    replayed_health: str | None
    tolerance: float = REPLAY_TOLERANCE
    notes: tuple[str, ...] = ()

    @property
    def difference(self) -> float | None:
        """Replayed minus recorded validation objective, when both exist."""
        if self.recorded is None or self.replayed is None:
            return None
        return self.replayed - self.recorded

    @property
    def matches(self) -> bool:
        if self.state == "FAIL":
            return self.replayed_reason == self.recorded_reason
        diff = self.difference
        return diff is not None and abs(diff) <= self.tolerance

    def summary(self) -> list[str]:
        """The comparison as lines for a terminal, ending with the conclusion and the exit code it implies."""

        def num(value: float | None) -> str:
            return "-" if value is None else f"{value:.12g}"

        lines = [f"trial {self.trial_number}: seed {self.seed}, data hash {self.data_hash}, recorded {self.state}"]
        if self.state == "FAIL":
            lines += [
                f"recorded failure   {self.recorded_reason}",
                f"replayed failure   {self.replayed_reason or '(none: the replay trained to the end)'}",
            ]
        else:
            lines += [
                f"recorded validation objective  {num(self.recorded)}",
                f"replayed validation objective  {num(self.replayed)}"
                + (f"  ({self.replayed_reason})" if self.replayed_reason else ""),
                f"difference                     {num(self.difference)}  (tolerance {self.tolerance:g})",
            ]
        lines.append(
            f"gradient health    replayed {self.replayed_health or '-'}, recorded {self.recorded_health or '-'}"
        )
        if self.matches:
            what = "failure" if self.state == "FAIL" else f"validation objective within {self.tolerance:g}"
            lines.append(f"reproduced: the replay matches the recorded {what} (exit code 0)")
        elif self.state == "FAIL":
            lines.append("NOT reproduced: the replay does not fail the way the trial did (exit code 1)")
        else:
            diff = self.difference
            gap = "the replay has no objective" if diff is None else f"they differ by {abs(diff):.3g}"
            lines.append(
                f"NOT reproduced: {gap}, more than the tolerance {self.tolerance:g} (exit code 1); "
                "see the notes for what changed since the trial ran"
            )
        return lines


def _environment_notes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the trial's recorded environment and the replay's: the usual causes of a mismatch."""
    notes = []
    if recorded.get("device") != now.get("device"):
        notes.append(
            f"the trial ran on {recorded.get('device')}, the replay on {now.get('device')}: "
            "results on different devices can differ in the last digits"
        )
    for name, version in sorted(recorded.get("packages", {}).items()):
        current = now["packages"].get(name)
        if current != version:
            notes.append(f"{name} was {version} when the trial ran, now {current}")
    for key, value in sorted(recorded.get("torch", {}).items()):
        if key != "num_threads" and now["torch"].get(key) != value:
            notes.append(f"torch {key} was {value} when the trial ran, now {now['torch'].get(key)}")
    if recorded.get("git_commit") and recorded.get("git_commit") != now.get("git_commit"):
        notes.append(f"the code was at commit {recorded['git_commit']}, now {now.get('git_commit')}")
    return notes


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    # The CPU kernels' reduction order can depend on the thread count: replay with the trial's.
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def trained_as(trial: optuna.trial.FrozenTrial) -> tuple[str, PackedWith | None]:
    """The engine that trained a stored trial, and how it was packed (None: alone, or not recorded)."""
    attrs = trial.user_attrs
    packed_with = PackedWith.from_record(attrs["packed_with"]) if "packed_with" in attrs else None
    return str(attrs.get("engine", "eager")), packed_with


def replay_trial(
    study: optuna.Study,
    spec: StudySpec,
    number: int,
    *,
    dataset: Dataset | None = None,
    tolerance: float = REPLAY_TOLERANCE,
    on_start: Callable[[], None] | None = None,
) -> Replay:
    """Retrain one trial alone on the CPU, from its stored parameters and seed, and compare it with the record.

    The data are rebuilt from the spec, split and scaled as the study recorded; training and evaluation go
    through :meth:`Objective.train_trial` and :func:`evaluate`, the study's own code path.

    Args:
        study: The stored study.
        spec: The spec the study was created with (the study file, or the spec stored in the study).
        number: The trial number.
        dataset: The study's data on the CPU, when already built (tests, notebooks).
        tolerance: Largest difference of validation objectives that still counts as reproduced.
        on_start: Called once the trial is known to be one that can be replayed, before the retraining.

    Returns:
        The comparison; ``matches`` says whether the trial reproduced.

    Raises:
        StorageError: No such trial, or one with nothing to compare (pruned, running, waiting, or failed
            without a recorded reason).
        DataError: The catalogue cannot be rebuilt.
    """
    name = spec.study.name
    trials = study.get_trials(deepcopy=False)
    found = [t for t in trials if t.number == number]
    if not found:
        raise StorageError(
            f"TRIAL: study {name!r} has no trial {number}; its trials are numbered 0 to {len(trials) - 1}"
        )
    trial = found[0]
    attrs = trial.user_attrs
    state = trial.state.name
    if state not in ("COMPLETE", "FAIL") or (state == "FAIL" and "fail_reason" not in attrs):
        complete = ", ".join(str(t.number) for t in trials if t.state == TrialState.COMPLETE) or "none"
        raise StorageError(
            f"TRIAL: trial {number} is {state}"
            + (" without a recorded reason (interrupted, or its worker was lost)" if state == "FAIL" else "")
            + f"; only a COMPLETE trial, or a FAIL trial with its reason, can be compared (complete: {complete})"
        )
    try:
        params = suggest(trial, spec.search_space)
    except (KeyError, ValueError) as exc:
        raise StorageError(f"TRIAL: trial {number} holds no parameters for this search space: {exc}") from None
    if on_start is not None:
        on_start()
    seed = int(attrs.get("seed", spec.study.seed + number))
    dataset = dataset or build_dataset(spec, "cpu", recorded=study.user_attrs.get(LAYOUT_ATTR))
    _check_folds(spec, dataset)
    manifest: dict[str, Any] = attrs.get("manifest") or {}
    notes = (
        _environment_notes(manifest, environment_manifest(dataset.device))
        if manifest
        else [
            f"trial {number} holds no manifest (it ran before manifests were recorded): nothing to compare the "
            "environment with"
        ]
    )
    changed = _changed_sections(study, spec)
    if changed:
        notes.insert(0, f"the study's {', '.join(changed)} section(s) changed since the study was created")
    recorded_hash = manifest.get("data", {}).get("hash") or study.user_attrs.get("tuner.data", {}).get("data.hash")
    data_hash = dataset.catalogue.data_hash
    if recorded_hash and recorded_hash != data_hash:
        notes.insert(0, f"the data hash {recorded_hash} when the trial ran differs from the rebuilt data's {data_hash}")
    if dataset.folds:
        return _replay_folds(trial, dataset, Objective(spec, dataset, NullTracker()), params, seed, notes, tolerance)
    objective = Objective(spec, dataset, NullTracker())
    replayed: float | None = None
    reason = ""
    with _threads(manifest.get("torch", {}).get("num_threads")):
        engine, packed_with = trained_as(trial)
        if packed_with is not None:
            notes.append(
                f"trial {number} trained in a pack padded to widths {list(packed_with.widths)}: replayed at those "
                f"widths beside copies of itself, as many as its pack held ({packed_with.layout[0][1]})"
            )
        model, result = objective.train_trial(params, seed, [], engine=engine, packed_with=packed_with)
        if result.failed:
            reason = result.stop_reason
        else:
            value = evaluate(model, dataset, spec, result).objective
            if math.isfinite(value):
                replayed = value
            else:
                reason = f"non-finite objective {spec.objective.metric}={value}"
    return Replay(
        trial_number=number,
        state=state,
        seed=seed,
        data_hash=data_hash,
        recorded=trial.values[0] if state == "COMPLETE" and trial.values else None,
        replayed=replayed,
        recorded_reason=str(attrs.get("fail_reason", "")),
        replayed_reason=reason,
        recorded_health=attrs.get("gradient_health"),
        replayed_health=result.health.name if result.health else None,
        tolerance=tolerance,
        notes=tuple(notes),
    )


def _replay_folds(
    trial: FrozenTrial,
    dataset: Dataset,
    objective: Objective,
    params: TrialParams,
    seed: int,
    notes: list[str],
    tolerance: float,
) -> Replay:
    """Replay a k-fold trial: retrain its k fold models and compare the mean of their objectives with its value."""
    attrs = trial.user_attrs
    manifest: dict[str, Any] = attrs.get("manifest") or {}
    notes = [
        *notes,
        f"k-fold trial: its {len(dataset.folds)} fold models are retrained; the objective is their mean",
    ]
    with _threads(manifest.get("torch", {}).get("num_threads")):
        fits = objective.cross_validate(params, seed)
    replayed = None if fits.failure else float(np.mean([f.objective for f in fits.folds]))
    state = trial.state.name
    health = fits.health
    return Replay(
        trial_number=trial.number,
        state=state,
        seed=seed,
        data_hash=dataset.catalogue.data_hash,
        recorded=trial.values[0] if state == "COMPLETE" and trial.values else None,
        replayed=replayed,
        recorded_reason=str(attrs.get("fail_reason", "")),
        replayed_reason=fits.failure,
        recorded_health=attrs.get("gradient_health"),
        replayed_health=health.name if health else None,
        tolerance=tolerance,
        notes=tuple(notes),
    )
