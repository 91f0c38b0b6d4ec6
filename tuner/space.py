"""The only place that names hyperparameters: an Optuna trial (or a warm-start entry) -> :class:`TrialParams`."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from tuner.config import ChoiceParam, FloatParam, IntParam, OptionalFloatParam, SearchSpace


class SuggestsParams(Protocol):
    """What :func:`suggest` needs of a trial: Optuna's ``Trial``, ``FixedTrial`` or ``FrozenTrial`` all fit."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class TrialParams:
    """One point of the search space, ready to build and train a model.

    ``momentum`` is SGD's momentum and, for Adam and AdamW, their first-moment coefficient beta1, so the
    space stays flat (no conditional parameter) for every sampler. ``max_grad_norm`` is None when gradients
    are not clipped. ``loss`` is a regression's loss (None: the task's default, see :mod:`tuner.tasks`),
    ``huber_delta`` Huber's delta when the loss is huber (None: the default), ``l1`` the L1 penalty's
    coefficient (None: no penalty).
    """

    n_layers: int
    widths: tuple[int, ...]
    lr: float
    momentum: float
    dropout: float
    weight_decay: float
    batch_size: int
    optimizer: str
    activation: str
    init: str
    batch_norm: bool
    max_grad_norm: float | None = None
    loss: str | None = None
    huber_delta: float | None = None
    l1: float | None = None

    def as_record(self, max_layers: int) -> dict[str, Any]:
        """Flat values with the same keys for every trial, so runs line up in MLflow's compare view."""
        record = asdict(self)
        for name in OPTIONAL_PARAMS:
            if record[name] is None:
                # Off for the whole study (unset in search_space): no column of "None" in MLflow.
                del record[name]
        record["widths"] = "-".join(str(w) for w in self.widths)
        for layer in range(max_layers):
            record[f"n_units_l{layer}"] = self.widths[layer] if layer < self.n_layers else 0
        return record


#: Parameters that are None when the search space leaves them out; records omit them then.
OPTIONAL_PARAMS = ("max_grad_norm", "loss", "huber_delta", "l1")


def width_name(layer: int) -> str:
    return f"n_units_l{layer}"


def _float(trial: SuggestsParams, name: str, p: FloatParam) -> float:
    if p.value is not None:
        return float(p.value)
    assert p.low is not None and p.high is not None
    return float(trial.suggest_float(name, p.low, p.high, log=p.log))


def _int(trial: SuggestsParams, name: str, p: IntParam) -> int:
    if p.value is not None:
        return int(p.value)
    assert p.low is not None and p.high is not None
    if p.powers_of_two:
        # Sample the exponent: an ordered integer the samplers can model, always a power of two.
        exponent = trial.suggest_int(f"log2_{name}", int(math.log2(p.low)), int(math.log2(p.high)))
        return 2**exponent
    return int(trial.suggest_int(name, p.low, p.high, log=p.log))


def _choice(trial: SuggestsParams, name: str, p: ChoiceParam) -> Any:
    if p.choices is None:
        return p.value
    return trial.suggest_categorical(name, list(p.choices))


def suggest(trial: SuggestsParams, space: SearchSpace) -> TrialParams:
    """Draw (or read back) a trial's hyperparameters.

    Args:
        trial: An Optuna trial or anything with its ``suggest_*`` methods.
        space: The study's search space.

    Returns:
        The trial's parameters.
    """
    n_layers = _int(trial, "n_layers", space.n_layers)
    widths = tuple(_int(trial, width_name(layer), space.width) for layer in range(n_layers))
    loss = None if space.loss is None else str(_choice(trial, "loss", space.loss))
    # Huber's delta exists only for trials that train with the Huber loss: a conditional parameter.
    draw_delta = loss == "huber" and not space.huber_delta.off
    return TrialParams(
        n_layers=n_layers,
        widths=widths,
        lr=_float(trial, "lr", space.lr),
        momentum=_float(trial, "momentum", space.momentum),
        dropout=_float(trial, "dropout", space.dropout),
        weight_decay=_float(trial, "weight_decay", space.weight_decay),
        batch_size=_int(trial, "batch_size", space.batch_size),
        optimizer=str(_choice(trial, "optimizer", space.optimizer)),
        activation=str(_choice(trial, "activation", space.activation)),
        init=str(_choice(trial, "init", space.init)),
        batch_norm=bool(_choice(trial, "batch_norm", space.batch_norm)),
        max_grad_norm=None if space.max_grad_norm.off else _float(trial, "max_grad_norm", space.max_grad_norm),
        loss=loss,
        huber_delta=_float(trial, "huber_delta", space.huber_delta) if draw_delta else None,
        l1=None if space.l1.off else _float(trial, "l1", space.l1),
    )


def max_layers(space: SearchSpace) -> int:
    p = space.n_layers
    return int(p.value if p.value is not None else p.high)  # type: ignore[arg-type]


_SCALARS = (
    "n_layers",
    "lr",
    "momentum",
    "dropout",
    "weight_decay",
    "batch_size",
    "optimizer",
    "activation",
    "init",
    "batch_norm",
    "max_grad_norm",
    "loss",
    "huber_delta",
    "l1",
)


def enqueue_params(space: SearchSpace, entry: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """Translate a warm-start entry (the names users read in MLflow) into Optuna's parameter names.

    Args:
        space: The study's search space.
        entry: e.g. ``{n_layers: 2, widths: [64, 32], lr: 0.01, batch_size: 256, optimizer: adam}``.
        where: The entry's location, for messages (``study.enqueue[0]``).

    Returns:
        The Optuna parameters, and the problems found (empty when the entry is valid).
    """
    problems: list[str] = []
    params: dict[str, Any] = {}
    known = {*_SCALARS, "widths", "width"} | {width_name(i) for i in range(64)}
    for key in entry:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known - {width_name(i) for i in range(64)}), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: unknown parameter {key!r}{hint}")

    def check(name: str, value: Any, p: FloatParam | IntParam | ChoiceParam | None, optuna_name: str) -> None:
        if p is None or (isinstance(p, OptionalFloatParam) and p.off):
            if value is not None:  # null agrees with a parameter the space leaves out
                problems.append(f"{where}.{name}: search_space.{name} is off (null), got {value!r}")
            return
        if isinstance(p, ChoiceParam):
            if value not in p.options:
                problems.append(f"{where}.{name}: {value!r} is not among search_space.{name} options {list(p.options)}")
            elif p.choices is not None:
                params[optuna_name] = value
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}.{name}: must be a number, got {value!r}")
            return
        if not math.isfinite(value):
            problems.append(f"{where}.{name}: must be a finite number, got {value}")
            return
        if p.value is not None:
            if value != p.value:
                problems.append(f"{where}.{name}: search_space.{name} is fixed to {p.value}, got {value}")
            return
        assert p.low is not None and p.high is not None
        if not p.low <= value <= p.high:
            problems.append(f"{where}.{name}: {value} is outside search_space.{name} [{p.low}, {p.high}]")
            return
        if isinstance(p, IntParam):
            if value != int(value):
                problems.append(f"{where}.{name}: must be an integer, got {value}")
                return
            if p.powers_of_two:
                if int(value) & (int(value) - 1):
                    problems.append(f"{where}.{name}: must be a power of two, got {value}")
                    return
                params[f"log2_{optuna_name}"] = int(math.log2(int(value)))
                return
            params[optuna_name] = int(value)
            return
        params[optuna_name] = float(value)

    for name in _SCALARS:
        if name in entry:
            check(name, entry[name], getattr(space, name), name)
    widths: list[Any] | None = None
    if "widths" in entry:
        widths = list(entry["widths"]) if isinstance(entry["widths"], list | tuple) else None
        if widths is None:
            problems.append(f"{where}.widths: must be a list of layer widths, got {entry['widths']!r}")
    elif "width" in entry:
        n = entry.get("n_layers", space.n_layers.value)
        if not isinstance(n, int):
            problems.append(f"{where}.width: give n_layers too, so the width can be applied to every layer")
        else:
            widths = [entry["width"]] * n
    if widths is not None:
        if "n_layers" in entry and entry["n_layers"] != len(widths):
            problems.append(f"{where}.widths: {len(widths)} widths for n_layers={entry['n_layers']}")
        elif "n_layers" not in entry:
            check("n_layers", len(widths), space.n_layers, "n_layers")
        for layer, w in enumerate(widths):
            check("width", w, space.width, width_name(layer))
    for layer in range(64):
        if width_name(layer) in entry:
            check("width", entry[width_name(layer)], space.width, width_name(layer))
    return params, problems
