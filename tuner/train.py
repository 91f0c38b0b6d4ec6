"""Training one model: on-device batches, early stopping that restores the best weights, gradient health.

This module knows nothing of tuning or tracking. Callers observe training through callbacks; the only exception
meant to leave :func:`fit` is one a callback raises on purpose (the pruning adapter's). Gradient health (see
:mod:`tuner.health`) is sampled on a few steps per epoch; non-finite or exploding gradients end the fit as failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from tuner.health import HealthMonitor, HealthThresholds, Problem, Verdict, judge
from tuner.space import TrialParams
from tuner.tasks import DEFAULT_HUBER_DELTA, outputs, row_losses


class Part(Protocol):
    """Features and labels already on the device (see :class:`tuner.data.dataset.Part`)."""

    @property
    def x(self) -> torch.Tensor: ...

    @property
    def y(self) -> torch.Tensor: ...


class Callback(Protocol):
    """Observes training; ``on_epoch_end`` may raise to end the fit (pruning does)."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class FitConfig:
    """How to train, independent of the hyperparameters being tuned."""

    task: str = "binary"
    max_epochs: int = 60
    patience: int = 8
    min_delta: float = 0.0
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    eval_batch_size: int = 65_536
    # Weight of positive rows: one number (binary) or one per label (multilabel).
    pos_weight: float | tuple[float, ...] | None = None
    # Gradient health: sample the first step of each epoch (0) or every n-th step; off with health=False.
    health: bool = True
    health_every: int = 0
    health_thresholds: HealthThresholds = field(default_factory=HealthThresholds)


class EarlyStopping:
    """Watches one validation quantity; sets ``should_stop`` and ``reason`` rather than raising.

    An epoch improves when the value beats the best so far by more than ``min_delta`` in the monitor's
    direction; after ``patience`` consecutive epochs without improvement training stops (Keras' convention:
    ``patience=0`` stops at the first epoch that does not improve). A non-finite value never improves.
    """

    def __init__(self, monitor: str, *, patience: int, min_delta: float = 0.0, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.should_stop = False
        self.reason = ""

    def update(self, epoch: int, value: float) -> bool:
        """Record one epoch's value; return True when it is the new best."""
        improved = math.isfinite(value) and (
            self.best is None
            or (value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta)
        )
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.should_stop = True
            best = "none" if self.best is None else f"{self.best:.6g} at epoch {self.best_epoch}"
            self.reason = (
                f"early stopping: {self.monitor} did not improve by more than {self.min_delta:g} "
                f"for {self.bad_epochs} epochs (best {best})"
            )
        return False


@dataclass
class FitResult:
    """What a fit produced. ``state_dict`` holds the best epoch's weights, already loaded into the model."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str = ""
    failed: bool = False
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    health: Verdict | None = None

    @property
    def epochs(self) -> int:
        return len(self.history)


def make_optimizer(model: nn.Module, params: TrialParams) -> torch.optim.Optimizer:
    """SGD (plain or Nesterov momentum), Adam or AdamW; ``momentum`` is beta1 for the Adam family.

    Nesterov with momentum 0 is plain SGD (torch refuses the combination; the packed engine does the same).
    """
    if params.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            nesterov=params.optimizer == "nesterov" and params.momentum > 0,
            weight_decay=params.weight_decay,
        )
    adam = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return adam(model.parameters(), lr=params.lr, betas=(params.momentum, 0.999), weight_decay=params.weight_decay)


def loss_function(
    config: FitConfig, device: torch.device, params: TrialParams | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean loss over rows for the task (see :mod:`tuner.tasks`); ``params`` chooses a regression's loss.

    Binary: BCE on one logit (sigmoid folded in, stable); multiclass: cross-entropy on the logits; multilabel:
    BCE per label; regression: MSE, MAE or Huber; unit_regression: MSE on the sigmoid or BCE on the logit.
    """
    if config.task == "multiclass":
        # torch's mean-reduced cross-entropy sums in an order of its own, unlike the mean of the rows' losses:
        # kept, so that eager multiclass trials of earlier studies still replay bit for bit.
        return nn.CrossEntropyLoss()
    pos_weight = None if config.pos_weight is None else torch.tensor(config.pos_weight, device=device)
    loss = params.loss if params is not None else None
    delta = params.huber_delta if params is not None and params.huber_delta is not None else DEFAULT_HUBER_DELTA
    task = config.task
    return lambda logits, y: row_losses(logits, y, task, loss=loss, delta=delta, pos_weight=pos_weight).mean()


def l1_norm(model: nn.Module) -> torch.Tensor:
    """The sum of absolute weights of the linear layers (biases and batch norm are not penalised)."""
    return torch.stack([m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.Linear)]).sum()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """Logits for every row, in evaluation mode, in large chunks."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])
    model.train(was_training)
    return out


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """What the outputs mean: class probabilities, (n, 2) for binary (rest, positive) and (n, k) for multiclass;
    (n, L) label probabilities for multilabel; (n, 1) predictions for the regressions (see tuner.tasks.outputs)."""
    return outputs(logits, task)


def mean_probabilities(
    models: Sequence[nn.Module], inputs: Sequence[torch.Tensor], task: str, chunk: int = 65_536
) -> np.ndarray:
    """The mean of several models' class probabilities, as float64 (n, classes).

    Args:
        models: The networks of an ensemble (the fold models of a cross-validated trial).
        inputs: The rows each model scores, in the same order for every model; each through that model's own
            scaling.
        task: ``binary`` or ``multiclass``.
        chunk: Rows per forward pass.

    Returns:
        The averaged probabilities, summed in model order (so the same models give the same bits).
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    total: np.ndarray | None = None
    for model, x in zip(models, inputs, strict=True):
        p = probabilities(predict_logits(model, x, chunk), task).cpu().numpy().astype(np.float64)
        total = p if total is None else total + p
    assert total is not None
    return total / len(models)


def fit(
    model: nn.Module,
    train: Part,
    validation: Part,
    params: TrialParams,
    config: FitConfig,
    *,
    seed: int,
    score_validation: Callable[[np.ndarray], dict[str, float]] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train with mini-batches drawn on the device, early stopping and best-weight restore.

    Args:
        model: The network, already on the device of ``train.x``.
        train: Training rows.
        validation: Validation rows, for the loss and the monitored quantity.
        params: Learning rate, momentum, weight decay, batch size, optimizer, gradient clipping.
        config: Epochs, patience, monitor, task, gradient-health sampling.
        seed: Seeds shuffling and dropout, so the fit can be replayed.
        score_validation: Extra validation metrics from the (n, classes) probabilities, e.g. ``val_auc``.
        callbacks: Called after each epoch with that epoch's metrics (per-layer health metrics included).

    Returns:
        The history, best epoch, stop reason and gradient-health verdict; the model holds the best epoch's
        weights. A non-finite loss, or non-finite or exploding gradients, end the fit with ``failed=True`` and
        the reason (naming the layer and the epoch for gradients).
    """
    device = train.x.device
    torch.manual_seed(seed)  # dropout draws from the global generator
    shuffle = torch.Generator(device=device).manual_seed(seed)
    optimizer = make_optimizer(model, params)
    criterion = loss_function(config, device, params)
    l1 = params.l1 or 0.0
    stopper = EarlyStopping(
        config.monitor, patience=config.patience, min_delta=config.min_delta, mode=config.monitor_mode
    )
    result = FitResult()
    n = train.x.shape[0]
    batch = params.batch_size
    # BatchNorm cannot normalise a batch of one row: drop such a final remainder.
    drop_last_single = params.batch_norm and n % batch == 1
    monitor = (
        HealthMonitor(model, every=config.health_every, thresholds=config.health_thresholds) if config.health else None
    )
    max_grad_norm = params.max_grad_norm
    model.train()
    for epoch in range(config.max_epochs):
        order = torch.randperm(n, generator=shuffle, device=device)
        loss_sum = torch.zeros((), device=device)
        for step, start in enumerate(range(0, n - 1 if drop_last_single else n, batch)):
            idx = order[start : start + batch]
            # The monitor on sampled steps only; other steps do no health work at all.
            watch = monitor if monitor is not None and monitor.sampled(step) else None
            if watch is not None:
                watch.watch_forward()
            logits = model(train.x[idx])
            if watch is not None:
                watch.unwatch_forward()
            loss = criterion(logits, train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            # The L1 penalty trains the weights but is not part of the reported loss, which stays comparable
            # with val_loss.
            (loss + l1 * l1_norm(model) if l1 > 0 else loss).backward()
            if max_grad_norm is not None:
                # Returns the total norm as a tensor, which is not read: clipping costs no host sync.
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if watch is not None:
                watch.before_step()
            optimizer.step()
            if watch is not None:
                watch.after_step()
            # Summed on the device: one host sync per epoch instead of one per step.
            loss_sum += loss.detach() * idx.shape[0]
        train_loss = float(loss_sum) / n
        health = monitor.end_epoch(epoch) if monitor is not None else None
        val_logits = predict_logits(model, validation.x, config.eval_batch_size)
        val_loss = float(criterion(val_logits, validation.y))
        metrics = {"train_loss": train_loss, "val_loss": val_loss, **(health.metrics if health else {})}
        problem = health.problem if health else None
        if problem is not None or not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            result.history.append(metrics)
            result.failed = True
            result.stop_reason, result.health = _failure(problem, metrics, epoch)
            break
        if score_validation is not None:
            metrics.update(score_validation(probabilities(val_logits, config.task).cpu().numpy()))
        result.history.append(metrics)
        if stopper.update(epoch, metrics.get(config.monitor, float("nan"))):
            result.best_epoch = epoch
            result.best_metrics = dict(metrics)
            result.state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for callback in callbacks:
            callback.on_epoch_end(epoch, metrics)
        if stopper.should_stop:
            result.stop_reason = stopper.reason
            break
    else:
        result.stop_reason = f"max_epochs reached ({config.max_epochs})"
    if result.state_dict:
        model.load_state_dict(result.state_dict)
    elif not result.failed:
        result.failed = True
        result.stop_reason = f"{config.monitor} was never finite; no epoch to keep"
    if monitor is not None and result.health is None:
        result.health = judge(result.history, config.health_thresholds)
    return result


def _failure(problem: Problem | None, metrics: dict[str, float], epoch: int) -> tuple[str, Verdict]:
    """The stop reason and verdict of an epoch that ends the fit: a gradient problem, a non-finite loss, or both.

    A gradient problem is seen on a sampled step, before the loss it causes turns non-finite, so it is named
    first: the loss is its consequence.
    """
    loss_reason = ""
    for which in ("train_loss", "val_loss"):
        if not math.isfinite(metrics[which]):
            loss_reason = f"non-finite {which} ({metrics[which]}) at epoch {epoch}"
            break
    if problem is None:
        return loss_reason, Verdict("non-finite", loss_reason)
    reason = problem.message if not loss_reason else f"{problem.message}; then {loss_reason}"
    return reason, Verdict(problem.verdict, problem.message)
