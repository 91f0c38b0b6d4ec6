"""Multi-objective studies: the Pareto front, dominance, and choosing one trial from the front by a rule.

A rule that cannot be used raises ``ValueError`` with the message for the user; the caller wraps it in its own
error type.

Light on purpose (Optuna, no torch or MLflow): ``tuner best`` and ``tuner status`` read a front through here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


def objective_names(study: optuna.Study) -> list[str]:
    """A name per objective: the study's metric names, else ``objective 0``, ``objective 1``, ..."""
    if study.metric_names:
        return list(study.metric_names)
    return [f"objective {i}" for i in range(len(study.directions))]


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[StudyDirection]) -> bool:
    """Whether values ``a`` are at least as good as ``b`` in every objective and better in one."""
    signed = [(x, y) if d == StudyDirection.MAXIMIZE else (-x, -y) for x, y, d in zip(a, b, directions, strict=True)]
    return all(x >= y for x, y in signed) and any(x > y for x, y in signed)


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front (Optuna's ``best_trials``), in trial order."""
    return sorted(study.best_trials, key=lambda t: t.number)


def front_listing(study: optuna.Study) -> str:
    """The front as one line per trial, for error messages: ``trial 3: completeness=0.8, contamination=0.1``."""
    names = objective_names(study)
    return "\n".join(
        f"  trial {t.number}: " + ", ".join(f"{n}={v:.4g}" for n, v in zip(names, t.values, strict=True))
        for t in front(study)
    )


_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Rule:
    """A constraint on one objective of a two-objective study; the other objective is optimised under it."""

    metric: str
    op: str
    bound: float

    def holds(self, value: float) -> bool:
        return {
            "<=": value <= self.bound,
            ">=": value >= self.bound,
            "<": value < self.bound,
            ">": value > self.bound,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_rule(text: str, names: Sequence[str]) -> Rule:
    """Read ``--rule`` such as ``contamination<=0.1``.

    Raises:
        ValueError: The rule is malformed, names no objective of the study, or the study has not two objectives.
    """
    if len(names) != 2:
        raise ValueError(
            f"--rule: a rule constrains one objective and optimises the other, so it needs a study with two "
            f"objectives; this one has {len(names)} ({', '.join(names)}): choose with --trial N, got {text!r}"
        )
    found = _RULE.match(text)
    if not found:
        raise ValueError(
            f"--rule: expected OBJECTIVE OP NUMBER with OP one of <=, >=, <, > (e.g. '{names[-1]}<=0.1'), got {text!r}"
        )
    metric, op, number = found.groups()
    if metric not in names:
        raise ValueError(f"--rule: {metric!r} is not an objective of this study ({', '.join(names)}), got {text!r}")
    try:
        bound = float(number)
    except ValueError:
        raise ValueError(f"--rule: {number!r} is not a number, got {text!r}") from None
    if not math.isfinite(bound):  # 1e999 reads as inf
        raise ValueError(f"--rule: {number!r} is not a finite number, got {text!r}")
    return Rule(metric, op, bound)


def choose(study: optuna.Study, rule: Rule) -> list[FrozenTrial]:
    """The front's trials that satisfy ``rule``, best first by the other objective (ties: the earlier trial).

    Raises:
        ValueError: No trial on the front satisfies the rule (the front is listed).
    """
    names = objective_names(study)
    i = names.index(rule.metric)
    j = 1 - i
    maximize = study.directions[j] == StudyDirection.MAXIMIZE
    feasible = [t for t in front(study) if rule.holds(t.values[i])]
    if not feasible:
        raise ValueError(f"--rule: no trial on the Pareto front has {rule}; the front:\n{front_listing(study)}")
    return sorted(feasible, key=lambda t: (-t.values[j] if maximize else t.values[j], t.number))


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The COMPLETE trials that hold values."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
