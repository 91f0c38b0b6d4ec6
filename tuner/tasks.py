"""The lecture's table of problem types: what the last layer means and which loss trains it, per ``task``.

======================  ===========================  ============================================
task                    outputs (last layer)         loss
======================  ===========================  ============================================
binary                  1 logit -> sigmoid           BCE
multiclass              k logits -> softmax          cross-entropy
multilabel              L logits -> sigmoid each     BCE per label, averaged over labels
regression              1 value, linear              MSE, MAE or Huber (delta in the search space)
unit_regression         1 logit -> sigmoid, [0, 1]   MSE on the sigmoid, or BCE on the logit
======================  ===========================  ============================================

Regression targets are standardised with the training rows' mean and standard deviation, so one learning-rate
range fits any unit; predictions are turned back into the target's unit before anything is measured. Every
function here works on any leading dimensions, so the eager engine (rows, outputs) and the packed engine
(trials, rows, outputs) share them. This module imports neither optuna nor mlflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuner.config import REGRESSION_TASKS as REGRESSION
from tuner.config import SINGLE_LABEL_TASKS as SINGLE_LABEL
from tuner.config import TASK_LOSSES as LOSSES
from tuner.config import TASKS

__all__ = ["LOSSES", "REGRESSION", "SINGLE_LABEL", "TASKS", "default_loss", "n_outputs", "outputs", "row_losses"]

#: Huber's delta (in standardised target units) when the loss is huber and ``search_space.huber_delta`` is unset.
DEFAULT_HUBER_DELTA = 1.0


def n_outputs(task: str, n_classes: int, n_labels: int) -> int:
    """Units of the last layer: one logit (binary, regressions), one per class, or one per label."""
    if task == "multiclass":
        return n_classes
    if task == "multilabel":
        return n_labels
    return 1


def default_loss(task: str) -> str | None:
    """The loss a regression task trains with when the search space does not choose one."""
    return LOSSES[task][0] if task in LOSSES else None


def huber(diff: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
    """Huber's loss of each residual: quadratic within ``delta``, linear beyond (as torch.nn.HuberLoss).

    ``delta`` may be a tensor that broadcasts against ``diff``: one delta per trial of a pack.
    """
    a = diff.abs()
    return torch.where(a < delta, 0.5 * diff * diff, delta * (a - 0.5 * delta))


def row_losses(
    logits: torch.Tensor,
    y: torch.Tensor,
    task: str,
    *,
    loss: str | None = None,
    delta: float | torch.Tensor = DEFAULT_HUBER_DELTA,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of each row: shape ``logits.shape[:-1]``.

    Args:
        logits: (..., rows, outputs) raw network outputs.
        y: Targets: class index (binary, multiclass), 0/1 per label (multilabel), standardised value
            (regression) or value in [0, 1] (unit_regression).
        task: One of :data:`TASKS`.
        loss: ``mse``, ``mae``, ``huber`` or ``bce`` for the regression tasks; None takes the task's default.
        delta: Huber's delta, a number or a tensor broadcasting against (..., rows).
        pos_weight: Weight of positive rows (binary: a scalar; multilabel: one per label).
    """
    if task == "binary":
        return F.binary_cross_entropy_with_logits(
            logits[..., 0], y.to(logits.dtype), pos_weight=pos_weight, reduction="none"
        )
    if task == "multiclass":
        classes = logits.shape[-1]
        flat = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none")
        return flat.view(logits.shape[:-1])
    if task == "multilabel":
        per_label = F.binary_cross_entropy_with_logits(
            logits, y.to(logits.dtype), pos_weight=pos_weight, reduction="none"
        )
        return per_label.mean(dim=-1)
    kind = loss or default_loss(task)
    target = y.to(logits.dtype)
    if task == "unit_regression" and kind == "bce":
        # BCE on the logit with a soft target in [0, 1]: the sigmoid is folded in, as for binary.
        return F.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")
    prediction = torch.sigmoid(logits[..., 0]) if task == "unit_regression" else logits[..., 0]
    diff = prediction - target
    if kind == "mse":
        return diff * diff
    if kind == "mae":
        return diff.abs()
    if kind == "huber":
        return huber(diff, delta)
    raise ValueError(f"unknown loss {kind!r} for task {task!r}")


def outputs(logits: torch.Tensor, task: str) -> torch.Tensor:
    """What the outputs mean, on the last dimension.

    binary: (..., 2) probabilities (rest, positive); multiclass: (..., k) softmax; multilabel: (..., L) sigmoid
    per label; regression: (..., 1) the standardised prediction; unit_regression: (..., 1) the prediction in
    [0, 1].
    """
    if task == "binary":
        p = torch.sigmoid(logits[..., 0])
        return torch.stack([1 - p, p], dim=-1)
    if task == "multiclass":
        return torch.softmax(logits, dim=-1)
    if task in ("multilabel", "unit_regression"):
        return torch.sigmoid(logits)
    return logits
