"""Gradient health: per-layer gradient norms, update ratios, dead and saturated units, and a verdict per trial.

Measured cheaply. Only sampled steps are looked at (the first batch of every epoch, or every ``every``-th step
within an epoch); on those steps the statistics are computed on the device and kept there, and they are read
back once per epoch, together with the epoch's loss. Activations are caught by forward hooks that exist only
for the sampled batch's forward pass.

Per layer ``i`` (the ``i``-th ``nn.Linear``, the output layer last), per epoch (the mean over sampled steps):

- ``grad_norm_l{i}``: L2 norm of the weight gradient the optimizer applies (after clipping, when it is on);
- ``update_ratio_l{i}``: ``|Δw| / |w|``, how far one optimizer step moves the weights relative to their size;
- ``dead_frac_l{i}`` (ReLU networks): fraction of the layer's units whose activation is 0 for every row of
  the sampled batch;
- ``saturation_l{i}`` (tanh and sigmoid networks): fraction of activations in the flat tails,
  ``|a| > 0.99`` for tanh, ``a < 0.01`` or ``a > 0.99`` for sigmoid.

The verdict (:data:`VERDICTS`), first match wins, with the thresholds of :class:`HealthThresholds`:

1. ``non-finite``: a sampled gradient is NaN or infinite, or the loss became non-finite with no gradient
   problem seen before it;
2. ``exploding``: on a sampled step some layer's gradient norm exceeds 1e4, or its update ratio exceeds 10 (one
   step moved the weights by ten times their own size);
3. ``dead units``: in at least half of the epochs more than 50% of some ReLU layer's units are dead;
4. ``vanishing``: in at least half of the epochs the first layer's gradient norm is below 1e-7, or below 1e-4
   times the last layer's;
5. ``healthy``: none of these.

``non-finite`` and ``exploding`` are found as they happen and end the fit as failed, naming the layer and the
epoch; the other verdicts describe a finished (or pruned) fit. This module imports neither optuna nor mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: The verdicts, from the most to the least severe; ``not measured`` when a fit recorded no statistics.
VERDICTS = ("non-finite", "exploding", "dead units", "vanishing", "healthy")
NOT_MEASURED = "not measured"

#: Activation modules whose outputs are watched, and what is measured on them.
_DEAD = (nn.ReLU,)
_SATURATING = (nn.Tanh, nn.Sigmoid)


@dataclass(frozen=True)
class HealthThresholds:
    """Where a statistic turns a trial's verdict; the defaults are documented in the module docstring.

    The exploding limits end a trial, so they sit far beyond what a fit that recovers shows. With standardised
    inputs and a mean loss over the batch, healthy gradient norms are of order 1e-3 to 10, and a wild fit that
    still recovers (Adam, lr 0.1, three layers of 1024) peaks near 2e2. Adam's first step moves every weight by
    about lr, an update ratio of lr / rms(w): up to about 3 in the default search space (lr 0.1, 1024 units), so
    the ratio's limit is 10. SGD at lr 1e3 shows ratios of 1e2 to 1e3 on its first step.
    """

    exploding_grad_norm: float = 1e4
    exploding_update_ratio: float = 10.0
    dead_fraction: float = 0.5
    vanishing_grad_norm: float = 1e-7
    vanishing_ratio: float = 1e-4
    # A slow symptom (dead or vanishing) must show in at least this share of the measured epochs.
    persistent_share: float = 0.5


@dataclass(frozen=True)
class Verdict:
    """A fit's gradient health: one of :data:`VERDICTS`, and why."""

    name: str
    detail: str


@dataclass(frozen=True)
class Problem:
    """A gradient problem that ends the fit: ``non-finite`` or ``exploding``, with the layer and epoch named."""

    verdict: str
    layer: int
    epoch: int
    message: str


@dataclass(frozen=True)
class EpochHealth:
    """One epoch's per-layer statistics (means over the sampled steps) and the first problem seen, if any."""

    metrics: dict[str, float]
    problem: Problem | None
    sampled_steps: int


def describe(layer: nn.Linear) -> str:
    """``Linear 64->32``: how a layer is named in messages."""
    return f"Linear {layer.in_features}->{layer.out_features}"


class HealthMonitor:
    """Samples a model's gradient health during a fit; see the module docstring for what is measured.

    Call order on every step: :meth:`sampled` decides; on a sampled step wrap the forward pass in
    :meth:`watch_forward` / :meth:`unwatch_forward`, call :meth:`before_step` after ``backward`` (and after
    clipping) and :meth:`after_step` after ``optimizer.step()``. Call :meth:`end_epoch` once per epoch.

    Args:
        model: The network; every ``nn.Linear`` is a layer, every ReLU / tanh / sigmoid module an activation.
        every: Sample every ``every``-th step of an epoch (steps 0, every, 2*every, ...); 0 samples only the
            first step of each epoch.
        thresholds: Where the exploding check fires.
    """

    def __init__(self, model: nn.Module, *, every: int = 0, thresholds: HealthThresholds | None = None) -> None:
        if every < 0:
            raise ValueError(f"every must be >= 0, got {every}")
        self.every = every
        self.thresholds = thresholds or HealthThresholds()
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.activations = [m for m in model.modules() if isinstance(m, _DEAD + _SATURATING)]
        self.names = [describe(layer) for layer in self.layers]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._act_stats: list[torch.Tensor | None] = [None] * len(self.activations)
        self._before: list[torch.Tensor] = []
        self._grad_norms: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []

    def sampled(self, step: int) -> bool:
        """Whether step ``step`` of the epoch (counted from 0) is measured."""
        return step == 0 if self.every == 0 else step % self.every == 0

    def watch_forward(self) -> None:
        """Hook the activation modules for the next forward pass only."""
        for i, module in enumerate(self.activations):
            self._hooks.append(module.register_forward_hook(self._activation_hook(i)))

    def unwatch_forward(self) -> None:
        """Remove the hooks: unsampled steps pay nothing."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _activation_hook(self, index: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._act_stats[index] = self._activation_stat(module, output)

        return hook

    @staticmethod
    @torch.no_grad()
    def _activation_stat(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        a = output.detach()
        if isinstance(module, nn.ReLU):
            # A unit is dead on this batch when no row activates it.
            return (a == 0).all(dim=0).float().mean()
        if isinstance(module, nn.Tanh):
            return (a.abs() > 0.99).float().mean()
        return ((a < 0.01) | (a > 0.99)).float().mean()

    @torch.no_grad()
    def before_step(self) -> None:
        """Gradient norms (as the optimizer will apply them) and a copy of the weights, all on the device."""
        norms = [
            torch.linalg.vector_norm(m.weight.grad) if m.weight.grad is not None else m.weight.new_zeros(())
            for m in self.layers
        ]
        self._grad_norms = torch.stack(norms) if norms else None
        self._before = [m.weight.detach().clone() for m in self.layers]

    @torch.no_grad()
    def after_step(self) -> None:
        """Update ratios; the step's row of statistics stays on the device until :meth:`end_epoch`."""
        if self._grad_norms is None:
            return
        ratios = torch.stack(
            [
                torch.linalg.vector_norm(m.weight.detach() - old) / torch.linalg.vector_norm(old).clamp_min(1e-12)
                for m, old in zip(self.layers, self._before, strict=True)
            ]
        )
        stats = [s if s is not None else ratios.new_full((), math.nan) for s in self._act_stats]
        parts = [self._grad_norms, ratios]
        if stats:
            parts.append(torch.stack(stats).to(ratios.dtype))
        self._rows.append(torch.cat(parts))
        self._before, self._grad_norms = [], None
        self._act_stats = [None] * len(self.activations)

    def end_epoch(self, epoch: int) -> EpochHealth:
        """Read the epoch's samples back (one transfer) and look for a problem, in step order.

        Args:
            epoch: The epoch, for messages.

        Returns:
            The epoch's per-layer metrics and the first problem found, if any.
        """
        if not self._rows:
            return EpochHealth({}, None, 0)
        rows = torch.stack(self._rows).cpu().tolist()
        self._rows = []
        n = len(self.layers)
        problem = None
        for row in rows:
            problem = self._problem(row[:n], row[n : 2 * n], epoch)
            if problem is not None:
                break
        metrics: dict[str, float] = {}
        columns = list(zip(*rows, strict=True))
        for i in range(n):
            metrics[f"grad_norm_l{i}"] = _mean(columns[i])
            metrics[f"update_ratio_l{i}"] = _mean(columns[n + i])
        for j, module in enumerate(self.activations):
            key = "dead_frac" if isinstance(module, _DEAD) else "saturation"
            metrics[f"{key}_l{j}"] = _mean(columns[2 * n + j])
        return EpochHealth(metrics, problem, len(rows))

    def _problem(self, norms: Sequence[float], ratios: Sequence[float], epoch: int) -> Problem | None:
        return find_problem(norms, ratios, epoch, self.names, self.thresholds)


def find_problem(
    norms: Sequence[float], ratios: Sequence[float], epoch: int, names: Sequence[str], thresholds: HealthThresholds
) -> Problem | None:
    """The problem one sampled step shows, if any: non-finite gradients first, else the worst exploding layer.

    Args:
        norms: Per layer, the gradient norm the optimizer applied.
        ratios: Per layer, the update ratio of the step.
        epoch: The epoch, for the message.
        names: Per layer, how it is named in messages (:func:`describe`).
        thresholds: The exploding limits.
    """
    t = thresholds

    def where(layer: int, what: str, kind: str) -> str:
        return f"{kind} in layer {layer} ({names[layer]}) at epoch {epoch}: {what}"

    for i, g in enumerate(norms):
        if not math.isfinite(g):
            return Problem("non-finite", i, epoch, where(i, f"grad norm {g}", "non-finite gradients"))
    # The worst layer is named: the one furthest beyond its limit.
    worst, excess, what = -1, 1.0, ""
    for i, (g, r) in enumerate(zip(norms, ratios, strict=True)):
        if g / t.exploding_grad_norm > excess:
            worst, excess, what = i, g / t.exploding_grad_norm, f"grad norm {g:.2g} > {t.exploding_grad_norm:g}"
        # A non-finite ratio from finite gradients: the step itself wrote non-finite weights.
        ratio_excess = r / t.exploding_update_ratio if math.isfinite(r) else math.inf
        if ratio_excess > excess:
            worst, excess, what = i, ratio_excess, f"update ratio {r:.2g} > {t.exploding_update_ratio:g}"
    if worst < 0:
        return None
    return Problem("exploding", worst, epoch, where(worst, what, "exploding gradients"))


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _layer_values(history: Sequence[Mapping[str, float]], key: str) -> list[list[float]]:
    """Per epoch, the values of ``{key}_l0``, ``{key}_l1``, ... (epochs without them are skipped)."""
    out = []
    for epoch in history:
        values = []
        i = 0
        while f"{key}_l{i}" in epoch:
            values.append(epoch[f"{key}_l{i}"])
            i += 1
        if values:
            out.append(values)
    return out


def judge(history: Sequence[Mapping[str, float]], thresholds: HealthThresholds | None = None) -> Verdict:
    """The verdict on a fit from its per-epoch metrics (``grad_norm_l0``, ...), e.g. of a finished or pruned fit.

    Args:
        history: One mapping per epoch, as :func:`tuner.train.fit` records them.
        thresholds: The limits; the documented defaults when None.

    Returns:
        The verdict and a sentence saying why; ``not measured`` when no epoch holds gradient statistics.
    """
    t = thresholds or HealthThresholds()
    norms = _layer_values(history, "grad_norm")
    if not norms:
        return Verdict(NOT_MEASURED, "no epoch recorded gradient statistics")
    ratios = _layer_values(history, "update_ratio")
    for epoch, (g, r) in enumerate(zip(norms, ratios, strict=False)):
        bad = [i for i, v in enumerate(g) if not math.isfinite(v)]
        if bad:
            return Verdict("non-finite", f"non-finite gradients in layer {bad[0]} at epoch {epoch}")
        for i, (gi, ri) in enumerate(zip(g, r, strict=False)):
            if gi > t.exploding_grad_norm or not ri <= t.exploding_update_ratio:
                return Verdict(
                    "exploding",
                    f"exploding gradients in layer {i} at epoch {epoch}: grad norm {gi:.2g}, update ratio {ri:.2g}",
                )
    measured = len(norms)
    needed = max(1, math.ceil(t.persistent_share * measured))
    dead = _layer_values(history, "dead_frac")
    dead_epochs = [max(d) for d in dead if max(d) > t.dead_fraction]
    if dead and len(dead_epochs) >= needed:
        worst = max(range(len(dead[-1])), key=lambda i: dead[-1][i])
        return Verdict(
            "dead units",
            f"more than {t.dead_fraction:.0%} of a ReLU layer's units dead in {len(dead_epochs)}/{len(dead)} epochs "
            f"(last epoch: layer {worst} {dead[-1][worst]:.0%} dead)",
        )
    vanishing = [g for g in norms if len(g) >= 2 and (g[0] < t.vanishing_grad_norm or g[0] < t.vanishing_ratio * g[-1])]
    if len(vanishing) >= needed:
        g = norms[-1]
        ratio = g[0] / g[-1] if g[-1] > 0 else math.nan
        return Verdict(
            "vanishing",
            f"first-layer gradient norm below {t.vanishing_grad_norm:g} or below {t.vanishing_ratio:g} x the last "
            f"layer's in {len(vanishing)}/{measured} epochs (last epoch: {g[0]:.2g}, ratio {ratio:.2g})",
        )
    g = norms[-1]
    return Verdict("healthy", f"last epoch: gradient norms {g[0]:.2g} (first layer) to {g[-1]:.2g} (last layer)")
