"""Packed training: K trials of one shape trained as one vectorised model.

On small tabular MLPs a training step costs little arithmetic and much overhead (Python, the operator
dispatcher, kernel launches). A pack stacks the weights of K trials along a leading dimension and runs every
layer as one batched matmul (``baddbmm``), so K trials pay the overhead of one. Each trial keeps what makes it
its own: its initial weights (drawn by :func:`tuner.model.build_mlp` from its seed), its shuffling and dropout
streams, its learning rate, momentum, weight decay, dropout rate and gradient clipping, its early stopping,
its best-weight restore and its gradient-health verdict. Each trial's callbacks (reporting, pruning, tracking)
are called with its own metrics, and an exception a callback raises (pruning) ends that trial alone.

Which trials share a pack (:func:`pack_key`): the same depth, activation, batch norm on/off, batch size and
optimizer family (SGD and Nesterov; Adam and AdamW). Widths differ freely: every layer is padded to the
widest trial's width with zero weights placed after the real units. The padded units stay exactly zero
(zero weights get zero gradients, and zero stays zero under every update rule), and padding at the end of the
inner dimension leaves each real unit's sum unchanged, so a trial's numbers in a pack equal the numbers this
engine gives it alone (``fit_pack`` with one member) with the same seed; the tests check it.

A trial whose loss or gradients turn non-finite, or explode, fails alone; a trial that stops (early stopping,
pruning, failure) leaves the pack, which shrinks and goes on with the others.

The gradients are computed by hand (:meth:`_Pack.gradients`): the operators autograd would record for
:meth:`_Pack.forward`, called directly, without recording a graph; on the CPU the results are autograd's to
the last bit.

This module imports neither optuna nor mlflow.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuner.health import HealthThresholds, Problem, describe, find_problem, judge
from tuner.model import build_mlp
from tuner.space import TrialParams
from tuner.tasks import DEFAULT_HUBER_DELTA, outputs, row_losses
from tuner.train import Callback, EarlyStopping, FitConfig, FitResult, Part, _failure

#: Optimizers whose update rules share one vectorised implementation.
FAMILY = {"sgd": "sgd", "nesterov": "sgd", "adam": "adam", "adamw": "adam"}

_ACTIVATION: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
}
# Activations whose units the health monitor watches (as in tuner.health): ReLU for dead units, tanh and
# sigmoid for saturation; ELU is not watched.
_WATCHED = ("relu", "tanh", "sigmoid")

_BN_EPS = 1e-5
_BN_MOMENTUM = 0.1
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8
# Devices whose torch has fused SGD and Adam kernels; elsewhere the update is made of torch._foreach ops.
_FUSED_DEVICES = ("cpu", "cuda")
# Dropout draws are made for this many rows ahead (per trial, per layer), so a step costs no draw of its own.
_DROPOUT_ROWS_AHEAD = 1024
# Training rows gathered ahead, per member: one indexing of the data per this many rows.
_ROWS_AHEAD = 8192
# Dropout decisions compare 16 random bits (a signed int16) with the drop probability's cut.
_DROPOUT_LEVELS = 65536
# Offset between a trial's shuffling seed and its dropout seed: two independent streams per trial.
_DROPOUT_SEED_OFFSET = 1_000_003


def pack_key(params: TrialParams) -> tuple[Any, ...]:
    """Trials with equal keys can share a pack."""
    return (
        params.n_layers,
        params.activation,
        params.batch_norm,
        params.batch_size,
        FAMILY[params.optimizer],
        params.loss,
    )


# A CPU cost model for splitting packs, in microseconds per training step: a fixed cost per step of a pack
# (Python, the dispatcher, some 60 operator calls), then per member a multiply-add of the matmuls (forward and
# backward) per row, an element of the optimizer's update, a unit's activation, dropout and their derivatives per
# row, and a row's loss and indexing; a member of a pack of several costs more per padded weight than a pack of
# one (batched matmuls, a working set several times larger). Fitted by bench/bench_split.py to fit_pack's steps
# with the gradients by hand, on a 2-core AMD EPYC (one thread, batch 64 and 256, dropout 0.1): one member 80 us
# at widths 8-8 and 500 us at 256-256 (batch 64), within 30% of the measured steps. Only ratios matter.
_STEP_OVERHEAD_US = 72.0
_MAC_US = 6.2e-5
_PARAM_US = 1.0e-3
_UNIT_US = 3.0e-3
_ROW_US = 0.11
_PACKED_FACTOR = 1.25


def _sizes(widths: Sequence[int], n_in: int, n_out: int) -> tuple[int, int]:
    """A member's weights and units (hidden and output), the sizes its step's cost grows with."""
    dims = [n_in, *widths, n_out]
    return sum(a * b for a, b in itertools.pairwise(dims)), sum(widths) + n_out


def _step_cost(widths: Sequence[int], n_in: int, n_out: int, batch: int) -> float:
    weights, units = _sizes(widths, n_in, n_out)
    return batch * (weights * _MAC_US + units * _UNIT_US + _ROW_US) + weights * _PARAM_US


def _pack_cost(n_members: int, widths: Sequence[int], n_in: int, n_out: int, batch: int) -> float:
    factor = _PACKED_FACTOR if n_members > 1 else 1.0
    return _STEP_OVERHEAD_US + n_members * factor * _step_cost(widths, n_in, n_out, batch)


def split_by_cost(params: Sequence[TrialParams], n_in: int, n_out: int) -> list[list[int]]:
    """Split trials of one :func:`pack_key` into packs that are cheaper than training the trials apart.

    Every member of a pack is computed at the pack's widest widths. A member joins a pack (largest members
    first) only while the pack's step grows by less than the step of a pack of its own would cost; so narrow
    trials pack together, and a narrow trial is not padded to a wide one's size. On a GPU, where the fixed cost
    of a step dwarfs the arithmetic, callers keep one pack.

    Returns:
        Lists of indices into ``params``, largest members first within each.
    """
    order = sorted(range(len(params)), key=lambda i: -_step_cost(params[i].widths, n_in, n_out, 1))
    packs: list[list[int]] = []
    padded: list[list[int]] = []
    for i in order:
        p = params[i]
        alone = _pack_cost(1, p.widths, n_in, n_out, p.batch_size)
        for members, widths in zip(packs, padded, strict=True):
            grown = [max(a, b) for a, b in zip(widths, p.widths, strict=True)]
            extra = _pack_cost(len(members) + 1, grown, n_in, n_out, p.batch_size) - _pack_cost(
                len(members), widths, n_in, n_out, p.batch_size
            )
            if extra <= alone:
                members.append(i)
                widths[:] = grown
                break
        else:
            packs.append([i])
            padded.append(list(p.widths))
    return packs


@dataclass
class PackMember:
    """One trial in a pack: its parameters, its seed and its callbacks.

    ``on_finish`` is called with the member's outcome as soon as it leaves the pack (stopped early, pruned,
    failed or at max_epochs), while the others go on training: its trial can be closed at once.
    """

    params: TrialParams
    seed: int
    callbacks: Sequence[Callback] = ()
    on_finish: Callable[[PackOutcome], None] | None = None


@dataclass
class PackOutcome:
    """What a packed fit produced for one member.

    ``result`` is the member's :class:`FitResult` (history, best epoch, stop reason, verdict, best-epoch weights
    in :func:`tuner.model.build_mlp`'s layout); ``model`` is that network on the data's device holding the best
    weights. ``error`` is the exception a callback raised to end the member (pruning), None otherwise.
    """

    result: FitResult
    model: nn.Sequential
    error: Exception | None = None
    packed_with: PackedWith | None = None


@dataclass(frozen=True)
class PackedWith:
    """How a member trained beside others, which :func:`fit_as_packed` needs to train it alone to the same numbers.

    ``widths`` are the pack's padded hidden widths; ``layout`` the pack as the member saw it, as (first epoch,
    members, the member's row) triples: ``((0, 8, 5), (3, 5, 2))`` is eight members with this one sixth for
    epochs 0-2, then five with it third.
    """

    widths: tuple[int, ...]
    layout: tuple[tuple[int, int, int], ...]

    def as_record(self) -> dict[str, Any]:
        return {"widths": list(self.widths), "layout": [list(phase) for phase in self.layout]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PackedWith:
        return cls(
            tuple(int(w) for w in record["widths"]),
            tuple((int(epoch), int(members), int(row)) for epoch, members, row in record["layout"]),
        )

    def departures(self) -> tuple[list[int | None], list[int | None]]:
        """For each of the other members, before and after this one's row, the epoch before which it left (None:
        it stayed to the end)."""
        before: list[int | None] = []
        after: list[int | None] = []
        for (_, members, row), (epoch, now_members, now_row) in itertools.pairwise(self.layout):
            before += [epoch] * (row - now_row)
            after += [epoch] * (members - now_members - (row - now_row))
        _, members, row = self.layout[-1]
        return before + [None] * row, after + [None] * (members - row - 1)


@dataclass
class _Slot:
    """Per-member state the pack does not vectorise."""

    member: PackMember
    model: nn.Sequential
    stopper: EarlyStopping
    result: FitResult = field(default_factory=FitResult)
    best: dict[str, torch.Tensor] | None = None
    error: Exception | None = None
    layout: list[tuple[int, int, int]] = field(default_factory=list)  # see PackedWith; empty in a pack of one


class _Pack:
    """The stacked parameters, optimizer state and random streams of the members still training."""

    def __init__(
        self,
        members: Sequence[PackMember],
        n_in: int,
        n_out: int,
        device: torch.device,
        pad_to: Sequence[int] | None = None,
    ) -> None:
        first = members[0].params
        self.depth = first.n_layers
        self.activation = first.activation
        self.batch_norm = first.batch_norm
        self.batch_size = first.batch_size
        self.family = FAMILY[first.optimizer]
        self.loss = first.loss
        self.device = device
        k = len(members)
        widths = [max(m.params.widths[i] for m in members) for i in range(self.depth)]
        if pad_to is not None:
            widths = [max(w, p) for w, p in zip(widths, pad_to, strict=True)]
        self.dims = [n_in, *widths, n_out]
        self.models = [
            build_mlp(n_in, m.params, n_out, generator=torch.Generator().manual_seed(m.seed)) for m in members
        ]
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        for layer in range(self.depth + 1):
            w = torch.zeros(k, self.dims[layer], self.dims[layer + 1])
            b = torch.zeros(k, 1, self.dims[layer + 1])
            for slot, model in enumerate(self.models):
                linear = _linears(model)[layer]
                w[slot, : linear.in_features, : linear.out_features] = linear.weight.detach().T
                b[slot, 0, : linear.out_features] = linear.bias.detach()
            self.weights.append(w.to(device))
            self.biases.append(b.to(device))
        self.gammas: list[torch.Tensor] = []
        self.betas: list[torch.Tensor] = []
        self.running_means: list[torch.Tensor] = []
        self.running_vars: list[torch.Tensor] = []
        if self.batch_norm:
            for layer in range(self.depth):
                # Padded units get gamma 0, so that even coupled weight decay leaves them at exactly zero.
                gamma = torch.zeros(k, 1, widths[layer])
                for slot, m in enumerate(members):
                    gamma[slot, 0, : m.params.widths[layer]] = 1.0
                self.gammas.append(gamma.to(device))
                self.betas.append(torch.zeros(k, 1, widths[layer], device=device))
                self.running_means.append(torch.zeros(k, 1, widths[layer], device=device))
                self.running_vars.append(gamma.detach().clone().to(device))
        self.bn_steps = 0

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).view(k, 1, 1)

        p = [m.params for m in members]
        self.lr = column([x.lr for x in p])
        self.momentum = column([x.momentum for x in p])
        self.weight_decay = column([x.weight_decay for x in p])
        self.nesterov = torch.tensor([x.optimizer == "nesterov" for x in p], device=device).view(k, 1, 1)
        self.decoupled = column([1.0 if x.optimizer == "adamw" else 0.0 for x in p])
        self.coupled = 1.0 - self.decoupled
        # Each member's hyperparameters as numbers, for torch's fused optimizer kernels (one call per member):
        # (lr, momentum or beta1, weight decay, decoupled decay (AdamW) or Nesterov momentum (SGD)).
        self.settings = [
            (x.lr, x.momentum, x.weight_decay, x.optimizer == ("adamw" if self.family == "adam" else "nesterov"))
            for x in p
        ]
        self.fused = device.type in _FUSED_DEVICES
        # Per member: views of its rows of the parameters, their gradients and each optimizer state (made once per
        # pack shape).
        self._row_views: list[list[list[torch.Tensor]]] | None = None
        self._step_count = torch.zeros((), dtype=torch.float32, device=device)
        self.clip = column([x.max_grad_norm if x.max_grad_norm is not None else math.inf for x in p]).view(k)
        # Huber's delta per member, against (K, rows) residuals; the L1 coefficient per member.
        self.delta = column([x.huber_delta or DEFAULT_HUBER_DELTA for x in p]).view(k, 1)
        self.l1 = column([x.l1 or 0.0 for x in p]).view(k)
        self.any_l1 = any(x.l1 for x in p)
        self.any_clip = any(x.max_grad_norm is not None for x in p)
        self.dropout = [x.dropout for x in p]
        self.any_dropout = any(d > 0 for d in self.dropout)
        # Real units of each hidden layer: masks padded units where an activation is not zero at zero.
        self.unit_masks = [
            torch.stack([(torch.arange(widths[i]) < m.params.widths[i]).float() for m in members])
            .view(k, 1, widths[i])
            .to(device)
            for i in range(self.depth)
        ]
        self.unit_counts = [
            torch.tensor([float(m.params.widths[i]) for m in members], device=device) for i in range(self.depth)
        ]
        self.state: dict[str, list[torch.Tensor]] = {
            name: [torch.zeros_like(t) for t in self.parameters()]
            for name in (("momentum_buffer",) if self.family == "sgd" else ("exp_avg", "exp_avg_sq"))
        }
        # Each parameter's gradient, in the order of parameters(): written over by every gradients() call.
        self.grads = [torch.zeros_like(t) for t in self.parameters()]
        self.steps = 0
        self.shuffles = [torch.Generator(device=device).manual_seed(m.seed) for m in members]
        self.dropout_streams = [
            torch.Generator(device=device).manual_seed(m.seed + _DROPOUT_SEED_OFFSET) for m in members
        ]
        self.widths_of = [m.params.widths for m in members]
        self.dropout_chunk = max(1, _DROPOUT_ROWS_AHEAD // self.batch_size)
        self._dropout_masks: list[torch.Tensor] = []
        self._dropout_step = self.dropout_chunk  # refill on the first step
        # Per step of a chunk, its masks as views, made once per mask tensor: a step then indexes no tensor.
        self._masks_by_step: list[list[torch.Tensor]] = []
        self.step_masks: list[torch.Tensor] = []  # this step's (K, batch, width) mask per hidden layer
        self._weights_t: list[torch.Tensor] | None = None  # the weights transposed (views), for the backward pass

    # ----------------------------------------------------------------------------------------------------------
    # Parameters

    def parameters(self) -> list[torch.Tensor]:
        # A bias before batch norm is redundant (the batch mean is subtracted): its gradient is rounding noise,
        # which Adam would scale up into a random walk. It is held at zero.
        biases = self.biases[-1:] if self.batch_norm else self.biases
        return [*self.weights, *biases, *self.gammas, *self.betas]

    def keep(self, rows: list[int]) -> None:
        """Keep only the given members (by their current position), in that order."""
        index = torch.tensor(rows, device=self.device)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)

        self.weights = [pick(t) for t in self.weights]
        self.biases = [pick(t) for t in self.biases]
        self.gammas = [pick(t) for t in self.gammas]
        self.betas = [pick(t) for t in self.betas]
        self.grads = [pick(t) for t in self.grads]
        self.running_means = [pick(t) for t in self.running_means]
        self.running_vars = [pick(t) for t in self.running_vars]
        self.state = {name: [pick(t) for t in ts] for name, ts in self.state.items()}
        self._row_views = None
        for name in ("lr", "momentum", "weight_decay", "nesterov", "decoupled", "coupled", "clip", "delta", "l1"):
            setattr(self, name, pick(getattr(self, name)))
        self.unit_masks = [pick(t) for t in self.unit_masks]
        self.unit_counts = [pick(t) for t in self.unit_counts]
        self._weights_t = None
        self._dropout_masks = [t.index_select(1, index) for t in self._dropout_masks]
        self._masks_by_step = _views_by_step(self._dropout_masks)
        if self._masks_by_step:
            self.step_masks = self._masks_by_step[self._dropout_step]
        for name in ("models", "shuffles", "dropout_streams", "widths_of", "dropout", "settings"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in rows])
        self.any_dropout = any(d > 0 for d in self.dropout)
        self.any_clip = bool(torch.isfinite(self.clip).any())
        self.any_l1 = bool((self.l1 > 0).any())

    def snapshot(self, row: int) -> dict[str, torch.Tensor]:
        """A copy of one member's parameters and batch-norm statistics, with the batch-norm step count then."""
        out = {"bn_steps": torch.tensor(self.bn_steps)}
        for name in ("weights", "biases", "gammas", "betas", "running_means", "running_vars"):
            for i, t in enumerate(getattr(self, name)):
                out[f"{name}.{i}"] = t[row].detach().clone()
        return out

    def write_model(self, model: nn.Sequential, saved: dict[str, torch.Tensor]) -> None:
        """Load a snapshot into the member's own network (real units only, in nn.Linear's layout)."""
        with torch.no_grad():
            for i, linear in enumerate(_linears(model)):
                w = saved[f"weights.{i}"][: linear.in_features, : linear.out_features]
                linear.weight.copy_(w.T)
                linear.bias.copy_(saved[f"biases.{i}"][0, : linear.out_features])
            for i, bn in enumerate(m for m in model if isinstance(m, nn.BatchNorm1d)):
                n = bn.num_features
                bn.weight.copy_(saved[f"gammas.{i}"][0, :n])
                bn.bias.copy_(saved[f"betas.{i}"][0, :n])
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.copy_(saved[f"running_means.{i}"][0, :n])
                bn.running_var.copy_(saved[f"running_vars.{i}"][0, :n])
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.copy_(saved["bn_steps"])

    # ----------------------------------------------------------------------------------------------------------
    # Forward

    def forward(self, x: torch.Tensor, *, training: bool, watch: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (K, rows, n_out) for inputs (K, rows, n_in); ``watch`` collects activations (health)."""
        h = x
        act = _ACTIVATION[self.activation]
        for layer in range(self.depth):
            if self.batch_norm:
                z = self._batch_norm(torch.bmm(h, self.weights[layer]), layer, training)
            else:
                z = torch.baddbmm(self.biases[layer], h, self.weights[layer])
            h = act(z)
            if self.activation == "sigmoid":
                h = h * self.unit_masks[layer]
            if watch is not None:
                watch.append(h.detach())
            if training and self.any_dropout:
                h = h * self.step_masks[layer][:, : h.shape[1]]
        return torch.baddbmm(self.biases[-1], h, self.weights[-1])

    def gradients(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        config: FitConfig,
        pos_weight: torch.Tensor | None,
        watch: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One training step's (K,) mean losses for inputs (K, rows, n_in); :attr:`grads` set.

        The gradients are autograd's, computed by hand: each layer's derivative written out as the operators
        autograd would record for :meth:`forward` (``threshold_backward`` for ReLU, ``native_batch_norm_backward``
        and so on), without recording them. Recording the graph and running autograd's engine cost a sixth to two
        fifths of a small pack's forward and backward (bench/bench_gradients.py). The L1 penalty trains the weights
        but stays out of the reported loss, as in tuner.train.fit.
        """
        rows = x.shape[1]
        masks = self.step_masks if self.any_dropout else []
        if masks and rows < self.batch_size:
            masks = [m[:, :rows] for m in masks]
        inputs = [x]  # each linear layer's input, for its weight gradient
        saved: list[torch.Tensor] = []  # what each activation's derivative is computed from
        normalised: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # batch norm's input, mean, 1/std
        h = x
        for layer in range(self.depth):
            if self.batch_norm:
                z = self._batch_norm_by_hand(torch.bmm(h, self.weights[layer]), layer, normalised)
            else:
                z = torch.baddbmm(self.biases[layer], h, self.weights[layer])
            mask = masks[layer] if masks else None
            if self.activation == "relu":
                # ReLU's derivative is read from its output; after dropout that output is still positive exactly
                # where the unit was kept and active, so one tensor serves both, updated in place.
                a = z.relu_()
                if watch is not None:
                    watch.append(a.clone())
                h = a.mul_(mask) if mask is not None else a
                saved.append(h)
            else:
                if self.activation == "elu":
                    saved.append(z)
                    a = F.elu(z)
                else:
                    a = z.tanh_() if self.activation == "tanh" else z.sigmoid_()
                    saved.append(a)
                    if self.activation == "sigmoid":
                        a = a * self.unit_masks[layer]
                if watch is not None:
                    watch.append(a)
                h = a * mask if mask is not None else a
            inputs.append(h)
        logits = torch.baddbmm(self.biases[-1], h, self.weights[-1])
        losses, grad = self._loss_gradient(logits, y, config, pos_weight)
        # Written into the gradient buffers, whose rows the optimizer's kernels take as they are.
        n_weights, n_biases = len(self.weights), 1 if self.batch_norm else len(self.biases)
        weight_grads = self.grads[:n_weights]
        bias_grads = self.grads[n_weights : n_weights + n_biases]
        gamma_grads = self.grads[n_weights + n_biases : n_weights + n_biases + len(self.gammas)]
        beta_grads = self.grads[n_weights + n_biases + len(self.gammas) :]
        if self._weights_t is None:  # views: the updates are in place, so they stay current
            self._weights_t = [w.transpose(1, 2) for w in self.weights]
        weights_t = self._weights_t
        for layer in range(self.depth, -1, -1):
            torch.bmm(inputs[layer].transpose(1, 2), grad, out=weight_grads[layer])
            if not self.batch_norm or layer == self.depth:
                torch.sum(grad, dim=1, keepdim=True, out=bias_grads[layer if not self.batch_norm else 0])
            if layer == 0:
                break
            below = layer - 1
            grad = torch.bmm(grad, weights_t[layer])
            if masks:
                grad.mul_(masks[below])
            kept = saved[below]
            if self.activation == "relu":
                grad = torch.ops.aten.threshold_backward(grad, kept, 0)
            elif self.activation == "tanh":
                grad = torch.ops.aten.tanh_backward(grad, kept)
            elif self.activation == "sigmoid":
                # No unit mask here: a padded unit's gradient is already zero, its outgoing weights being zero.
                grad = torch.ops.aten.sigmoid_backward(grad, kept)
            else:
                grad = torch.ops.aten.elu_backward(grad, 1.0, 1, 1, False, kept)
            if self.batch_norm:
                grad = self._batch_norm_backward(grad, below, normalised[below], gamma_grads[below], beta_grads[below])
        if self.any_l1:
            for g, w in zip(weight_grads, self.weights, strict=True):
                g.add_(self.l1.view(-1, 1, 1) * w.sign())
        return losses

    def _batch_norm_by_hand(
        self, z: torch.Tensor, layer: int, normalised: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """:meth:`_batch_norm` in training, keeping what its derivative needs."""
        k, rows, width = z.shape
        flat = z.transpose(0, 1).reshape(rows, k * width)
        gamma, beta, running_mean, running_var = self._batch_norm_tensors(layer)
        out, mean, inverse_std = torch.ops.aten.native_batch_norm(
            flat, gamma, beta, running_mean, running_var, True, _BN_MOMENTUM, _BN_EPS
        )
        normalised.append((flat, mean, inverse_std))
        return out.view(rows, k, width).transpose(0, 1)

    def _batch_norm_backward(
        self,
        grad: torch.Tensor,
        layer: int,
        normalised: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        gamma_grad: torch.Tensor,
        beta_grad: torch.Tensor,
    ) -> torch.Tensor:
        """The gradient before a layer's batch norm, from the one after it; its gamma's and beta's written."""
        k, rows, width = grad.shape
        flat, mean, inverse_std = normalised
        gamma, _, running_mean, running_var = self._batch_norm_tensors(layer)
        grad_in, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad.transpose(0, 1).reshape(rows, k * width),
            flat,
            gamma,
            running_mean,
            running_var,
            mean,
            inverse_std,
            True,
            _BN_EPS,
            [True, True, True],
        )
        gamma_grad.copy_(grad_gamma.view(k, 1, width))
        beta_grad.copy_(grad_beta.view(k, 1, width))
        return grad_in.view(rows, k, width).transpose(0, 1)

    def _loss_gradient(
        self, logits: torch.Tensor, y: torch.Tensor, config: FitConfig, pos_weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) mean losses and the gradient of their sum with respect to the logits, to the last bit autograd's
        (so that trials recorded before the gradients were computed by hand replay exactly)."""
        per_row = 1.0 / logits.shape[1]
        task = config.task
        if task == "binary":
            losses = _losses(logits, y, config, pos_weight, self)
            # The formula of torch's kernel in its order; the mean's derivative is a product with 1 / rows.
            target = y.unsqueeze(-1)
            if pos_weight is None:
                grad = torch.sigmoid(logits).sub_(target)
            else:
                weighted = pos_weight * target
                grad = (weighted + 1).sub_(target).mul_(torch.sigmoid(logits)).sub_(weighted)
            return losses, grad.mul_(per_row)
        # Other tasks' losses (multiclass, multilabel, regression) are differentiated by autograd, on the logits
        # alone: a small graph, where the formulas written out differ from its fused kernels in the last bit.
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            losses = _losses(leaf, y, config, pos_weight, self)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grad

    def _batch_norm(self, z: torch.Tensor, layer: int, training: bool) -> torch.Tensor:
        # Every member's units side by side as the features of one (rows, K * width) batch: one fused kernel
        # normalises each unit of each member over the rows and updates the running statistics in place.
        k, rows, width = z.shape
        flat = z.transpose(0, 1).reshape(rows, k * width)
        gamma, beta, running_mean, running_var = self._batch_norm_tensors(layer)
        out = F.batch_norm(
            flat, running_mean, running_var, gamma, beta, training=training, momentum=_BN_MOMENTUM, eps=_BN_EPS
        )
        return out.view(rows, k, width).transpose(0, 1)

    def _batch_norm_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A layer's gamma, beta, running mean and running variance, every member's units in one row (views)."""
        return (
            self.gammas[layer].view(-1),
            self.betas[layer].view(-1),
            self.running_means[layer].view(-1),
            self.running_vars[layer].view(-1),
        )

    def next_dropout(self) -> None:
        """Advance to the next step's dropout masks, drawing the next chunk from each member's own stream."""
        if not self.any_dropout:
            return
        self._dropout_step += 1
        if self._dropout_step >= self.dropout_chunk:
            self._dropout_step = 0
            self._draw_dropout()
        self.step_masks = self._masks_by_step[self._dropout_step]

    def _draw_dropout(self) -> None:
        k, b, s = len(self.models), self.batch_size, self.dropout_chunk
        if not self._dropout_masks:
            # Ones where a member drops nothing and in padded units; refilled in place, a member's own units only.
            self._dropout_masks = [
                torch.ones(s, k, b, self.weights[layer].shape[2], device=self.device) for layer in range(self.depth)
            ]
            self._masks_by_step = _views_by_step(self._dropout_masks)
        for layer, mask in enumerate(self._dropout_masks):
            for row in range(k):
                p = self.dropout[row]
                if p <= 0:
                    continue
                w = self.widths_of[row][layer]
                # 16 random bits per unit, four from each 64-bit draw: a third of the time of a float per unit.
                # The drop probability is p to the nearest 1/65536; the kept units are scaled by its exact inverse.
                cut = min(round(p * _DROPOUT_LEVELS), _DROPOUT_LEVELS - 1)
                words = torch.empty(-(-s * b * w // 4), dtype=torch.int64, device=self.device)
                words.random_(-(2**63), None, generator=self.dropout_streams[row])
                draw = words.view(torch.int16)[: s * b * w].view(s, b, w)
                # Written straight into the mask: no temporary per member, a third of this call's time.
                kept = mask[:, row, :, :w]
                torch.ge(draw, cut - _DROPOUT_LEVELS // 2, out=kept)
                kept.mul_(_DROPOUT_LEVELS / (_DROPOUT_LEVELS - cut))

    # ----------------------------------------------------------------------------------------------------------
    # Optimizer

    def clip_gradients(self) -> None:
        """Scale each member's gradients so that their total norm is at most its ``max_grad_norm``."""
        if not self.any_clip:
            return
        grads = self.grads
        total = torch.sqrt(torch.stack([g.pow(2).flatten(1).sum(dim=1) for g in grads]).sum(dim=0))
        # A member without clipping keeps its gradients as they are: inf / inf (a norm that overflowed float32)
        # would make them NaN, and only because a pack mate clips.
        coef = torch.where(torch.isinf(self.clip), 1.0, (self.clip / (total + 1e-6)).clamp(max=1.0))
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))

    def step(self) -> None:
        """One update of every member, each with its own hyperparameters (torch.optim's formulas)."""
        params, grads = self.parameters(), self.grads
        self.steps += 1
        if self.batch_norm:
            self.bn_steps += 1
        lr, wd = self.lr, self.weight_decay
        n = len(params)
        # Elsewhere than in the fused kernels, torch._foreach_* ops apply one operation to every parameter tensor
        # in one call: the same arithmetic in the same order as a loop over the tensors, at a fraction of the
        # dispatch cost. The (K, 1, 1) hyperparameters broadcast per member.
        if self.fused:
            self._fused_step(params, grads)
        elif self.family == "sgd":
            d = torch._foreach_mul(params, [wd] * n)
            torch._foreach_add_(d, grads)
            buffers = self.state["momentum_buffer"]
            torch._foreach_mul_(buffers, [self.momentum] * n)
            torch._foreach_add_(buffers, d)
            for p, d_p, buf in zip(params, d, buffers, strict=True):
                update = torch.where(self.nesterov, d_p + self.momentum * buf, buf)
                p.sub_(lr * update)
        else:
            beta1 = self.momentum
            correction1 = 1 - beta1.pow(self.steps)
            correction2_sqrt = math.sqrt(1 - _ADAM_BETA2**self.steps)
            exp_avg, exp_avg_sq = self.state["exp_avg"], self.state["exp_avg_sq"]
            torch._foreach_mul_(params, [1 - lr * wd * self.decoupled] * n)
            d = torch._foreach_mul(params, [wd * self.coupled] * n)
            torch._foreach_add_(d, grads)
            torch._foreach_mul_(exp_avg, [beta1] * n)
            torch._foreach_add_(exp_avg, torch._foreach_mul(d, [1 - beta1] * n))
            torch._foreach_mul_(exp_avg_sq, _ADAM_BETA2)
            torch._foreach_addcmul_(exp_avg_sq, d, d, value=1 - _ADAM_BETA2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, correction2_sqrt)
            torch._foreach_add_(denom, _ADAM_EPS)
            change = torch._foreach_mul(exp_avg, [lr / correction1] * n)
            torch._foreach_div_(change, denom)
            torch._foreach_sub_(params, change)

    def _fused_step(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """The update with torch's fused SGD / Adam / AdamW kernels: one pass over each member's tensors, where
        the ``_foreach`` version makes a dozen over the whole pack (measured 4-9x faster per Adam update on the
        CPU). The kernels take scalar hyperparameters, hence one call per member, on views of its rows; the
        result agrees with the ``_foreach`` version to rounding (the tests compare five steps' weights and states)."""
        if self._row_views is None:
            tensors = [params, grads, *self.state.values()]
            self._row_views = [[[t[row] for t in ts] for ts in tensors] for row in range(len(self.settings))]
        if self.family == "sgd":
            for row, (lr, momentum, decay, nesterov) in enumerate(self.settings):
                member_params, member_grads, buffers = self._row_views[row]
                torch._fused_sgd_(
                    member_params,
                    member_grads,
                    # Zero buffers make the first step's momentum the gradient itself, as torch.optim.SGD's does.
                    buffers if momentum > 0 else [],
                    weight_decay=decay,
                    momentum=momentum,
                    lr=lr,
                    dampening=0.0,
                    nesterov=nesterov and momentum > 0,
                    maximize=False,
                    is_first_step=False,
                )
            return
        self._step_count.fill_(self.steps)
        steps = [self._step_count] * len(params)
        for row, (lr, beta1, decay, decoupled) in enumerate(self.settings):
            member_params, member_grads, exp_avg, exp_avg_sq = self._row_views[row]
            kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
            kernel(
                member_params,
                member_grads,
                exp_avg,
                exp_avg_sq,
                [],
                steps,
                lr=lr,
                beta1=beta1,
                beta2=_ADAM_BETA2,
                weight_decay=decay,
                eps=_ADAM_EPS,
                amsgrad=False,
                maximize=False,
            )

    # ----------------------------------------------------------------------------------------------------------
    # Gradient health, per member and layer, on the device

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor:
        """(K, layers): the norm of each layer's weight gradient as the update will apply it."""
        return torch.stack([torch.linalg.vector_norm(g, dim=(1, 2)) for g in self.grads[: len(self.weights)]], dim=1)

    @torch.no_grad()
    def activation_stats(self, watched: list[torch.Tensor]) -> torch.Tensor | None:
        """(K, hidden layers): dead-unit fraction (ReLU) or saturation (tanh, sigmoid) of the real units."""
        if self.activation not in _WATCHED:
            return None
        stats = []
        for layer, a in enumerate(watched):
            mask, count = self.unit_masks[layer], self.unit_counts[layer]
            if self.activation == "relu":
                dead = (a == 0).all(dim=1).float() * mask[:, 0, :]
                stats.append(dead.sum(dim=1) / count)
            else:
                tail = a.abs() > 0.99 if self.activation == "tanh" else (a < 0.01) | (a > 0.99)
                stats.append((tail.float() * mask).sum(dim=(1, 2)) / (count * a.shape[1]))
        return torch.stack(stats, dim=1)


def _views_by_step(masks: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per step of a chunk, each layer's (K, batch, width) mask: views of the (steps, K, batch, width) tensors."""
    return [list(step) for step in zip(*(t.unbind(0) for t in masks), strict=True)]


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _losses(
    logits: torch.Tensor, y: torch.Tensor, config: FitConfig, pos_weight: torch.Tensor | None, pack: _Pack
) -> torch.Tensor:
    """(K,) mean loss of each member, with the task's loss (tuner.tasks) and each member's Huber delta."""
    loss = pack.loss
    return row_losses(logits, y, config.task, loss=loss, delta=pack.delta, pos_weight=pos_weight).mean(dim=1)


def run_in_order(calls: Sequence[Callable[[], None]]) -> None:
    """The default hand-off of :func:`fit_pack`: each call in turn."""
    for call in calls:
        call()


def fit_pack(
    members: Sequence[PackMember],
    train: Part,
    validation: Part,
    config: FitConfig,
    *,
    n_out: int,
    score_validation: Callable[[np.ndarray], dict[str, float]] | None = None,
    hand_off: Callable[[Sequence[Callable[[], None]]], None] = run_in_order,
    pad_to: Sequence[int] | None = None,
) -> list[PackOutcome]:
    """Train several trials of one :func:`pack_key` together; each ends on its own.

    Args:
        members: The trials, all with the same :func:`pack_key`.
        train: Training rows, on the device.
        validation: Validation rows, for the loss, the monitor and ``score_validation``.
        config: Epochs, patience, monitor, task, gradient-health sampling (as for :func:`tuner.train.fit`).
        n_out: Units of the last layer (see tuner.tasks.n_outputs).
        score_validation: Extra validation metrics from one member's (n, classes) probabilities.
        hand_off: Runs the ``on_finish`` calls of the members that leave at one epoch's end, and returns when all
            have returned (default: one after another). Every member's callbacks of that epoch have run by then,
            and none of the next epoch's: so running them at once changes nothing the others see.
        pad_to: Hidden widths to pad every layer to at least (:func:`fit_as_packed` gives a pack's recorded ones).

    Returns:
        One outcome per member, in order: its history, best epoch, stop reason, verdict and best-epoch network;
        ``error`` holds the exception a member's callback raised to end it (pruning), which ends no one else;
        ``packed_with`` how it was packed, when the pack started with others.

    Raises:
        ValueError: The members cannot share a pack.
        KeyboardInterrupt: And any BaseException that is not an Exception: the whole pack stops.
    """
    if not members:
        return []
    keys = {pack_key(m.params) for m in members}
    if len(keys) > 1:
        raise ValueError(f"trials of different shapes cannot share a pack: {sorted(map(str, keys))}")
    device = train.x.device
    pack = _Pack(members, train.x.shape[1], n_out, device, pad_to)
    slots = [
        _Slot(
            member=m,
            model=pack.models[i],
            stopper=EarlyStopping(
                config.monitor, patience=config.patience, min_delta=config.min_delta, mode=config.monitor_mode
            ),
        )
        for i, m in enumerate(members)
    ]
    if len(members) > 1:
        for row, slot in enumerate(slots):
            slot.layout.append((0, len(members), row))
    active = list(slots)
    pos_weight = None if config.pos_weight is None else torch.tensor(config.pos_weight, device=device)
    # The binary and multilabel losses take float targets: converted once here, not at every step.
    float_targets = config.task in ("binary", "multilabel")
    train_y = train.y.to(pack.weights[0].dtype) if float_targets else train.y
    thresholds = config.health_thresholds
    n = train.x.shape[0]
    batch = pack.batch_size
    drop_last_single = pack.batch_norm and n % batch == 1
    starts = range(0, n - 1 if drop_last_single else n, batch)
    # Each member's rows for the next steps are gathered in one indexing per chunk of steps, not two per step.
    chunk_rows = max(batch, _ROWS_AHEAD // batch * batch)
    for epoch in range(config.max_epochs):
        orders = torch.stack([torch.randperm(n, generator=g, device=device) for g in pack.shuffles])
        loss_sum = torch.zeros(len(active), device=device)
        health_rows: list[torch.Tensor] = []
        chunk_start = -chunk_rows
        # The pack's tensors never require gradients (they are computed by hand), so nothing is recorded anyway;
        # one guard per epoch instead of one per call of the step's methods (about 2 us each).
        with torch.no_grad():
            for step, start in enumerate(starts):
                if start >= chunk_start + chunk_rows:
                    chunk_start = start
                    chunk = orders[:, start : start + chunk_rows]
                    # The chunk's batches as views, cut in one call each (chunk_rows is a multiple of batch).
                    x_batches = train.x[chunk].split(batch, dim=1)
                    y_batches = train_y[chunk].split(batch, dim=1)
                at = (start - chunk_start) // batch
                x_batch, y_batch = x_batches[at], y_batches[at]
                pack.next_dropout()
                sampled = config.health and (step == 0 if config.health_every == 0 else step % config.health_every == 0)
                watched: list[torch.Tensor] | None = [] if sampled else None
                losses = pack.gradients(x_batch, y_batch, config, pos_weight, watch=watched)
                pack.clip_gradients()
                if watched is not None:
                    norms = pack.grad_norms()
                    before = [w.detach().clone() for w in pack.weights]
                pack.step()
                if watched is not None:
                    ratios = torch.stack(
                        [
                            torch.linalg.vector_norm(w.detach() - old, dim=(1, 2))
                            / torch.linalg.vector_norm(old, dim=(1, 2)).clamp_min(1e-12)
                            for w, old in zip(pack.weights, before, strict=True)
                        ],
                        dim=1,
                    )
                    acts = pack.activation_stats(watched)
                    health_rows.append(torch.cat([norms, ratios] + ([acts] if acts is not None else []), dim=1))
                loss_sum += losses * x_batch.shape[1]
        with torch.no_grad():
            val_logits = torch.cat(
                [
                    pack.forward(
                        validation.x[i : i + config.eval_batch_size].unsqueeze(0).expand(len(active), -1, -1),
                        training=False,
                    )
                    for i in range(0, validation.x.shape[0], config.eval_batch_size)
                ],
                dim=1,
            )
            val_y = validation.y.unsqueeze(0).expand(len(active), *validation.y.shape)
            val_losses = _losses(val_logits, val_y, config, pos_weight, pack)
        # One transfer per epoch for every member's figures.
        train_losses = (loss_sum / n).tolist()
        val_loss_values = val_losses.tolist()
        samples = torch.stack(health_rows, dim=1).tolist() if health_rows else None
        probs = outputs(val_logits, config.task).cpu().numpy() if score_validation is not None else None
        leaving: list[int] = []
        for row, slot in enumerate(active):
            metrics = {"train_loss": train_losses[row], "val_loss": val_loss_values[row]}
            problem = None
            if samples is not None:
                health_metrics, problem = _epoch_health(samples[row], pack, slot.model, epoch, thresholds)
                metrics.update(health_metrics)
            member_probs = probs[row] if probs is not None else None
            leaves = _end_epoch(slot, epoch, metrics, problem, member_probs, score_validation)
            if slot.result.best_epoch == epoch:
                slot.best = pack.snapshot(row)
            if leaves:
                leaving.append(row)
        if leaving:
            _leave([active[row] for row in leaving], pack, config, hand_off)
            stay = [r for r in range(len(active)) if r not in leaving]
            active = [active[r] for r in stay]
            if not active:
                break
            for row, slot in enumerate(active):
                if slot.layout:
                    slot.layout.append((epoch + 1, len(active), row))
            pack.keep(stay)
    for slot in active:
        slot.result.stop_reason = f"max_epochs reached ({config.max_epochs})"
    _leave(active, pack, config, hand_off)
    return [_outcome(s, pack) for s in slots]


def _outcome(slot: _Slot, pack: _Pack) -> PackOutcome:
    # The pack's widths stay as they started while members leave (only rows are dropped).
    packed_with = PackedWith(tuple(pack.dims[1:-1]), tuple(slot.layout)) if slot.layout else None
    return PackOutcome(result=slot.result, model=slot.model.to(pack.device), error=slot.error, packed_with=packed_with)


class _LeaveAt:
    """A callback that ends its member at the end of the epoch before ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch + 1 >= self.epoch:
            raise RuntimeError(f"left the pack before epoch {self.epoch}")


def fit_as_packed(
    member: PackMember,
    packed_with: PackedWith,
    train: Part,
    validation: Part,
    config: FitConfig,
    *,
    n_out: int,
    score_validation: Callable[[np.ndarray], dict[str, float]] | None = None,
) -> PackOutcome:
    """Train one member alone to the numbers it had in its pack (a replay).

    A member's numbers in a pack depend on the others only through the pack's shape: its padded widths, how many
    models the batched operators compute at once (torch's CPU ``bmm`` of a batch of one takes another kernel for
    a single output column) and the member's row among them (the matmul kernels' paths follow where each model's
    rows lie in memory). So the member trains at the pack's widths, in its row, beside copies of itself (its
    parameters and seed: numbers that follow its own), as many as its pack mates were, each leaving at the
    epoch one of them left.
    """
    before, after = packed_with.departures()

    def twin(epoch: int | None) -> PackMember:
        return PackMember(member.params, member.seed, [] if epoch is None else [_LeaveAt(epoch)])

    return fit_pack(
        [*map(twin, before), member, *map(twin, after)],
        train,
        validation,
        config,
        n_out=n_out,
        score_validation=score_validation,
        pad_to=packed_with.widths,
    )[len(before)]


def _leave(
    slots: Sequence[_Slot], pack: _Pack, config: FitConfig, hand_off: Callable[[Sequence[Callable[[], None]]], None]
) -> None:
    """Members leave the pack: their best weights restored, and their outcomes handed to ``on_finish`` at once."""
    calls = []
    for slot in slots:
        _finish(slot, pack, config)
        if slot.member.on_finish is not None:
            calls.append(functools.partial(slot.member.on_finish, _outcome(slot, pack)))
    if calls:
        hand_off(calls)


def _epoch_health(
    samples: list[list[float]], pack: _Pack, model: nn.Sequential, epoch: int, thresholds: HealthThresholds
) -> tuple[dict[str, float], Problem | None]:
    """One member's epoch of sampled statistics: per-layer means and the first problem (its layers named by the
    member's own ``model``), as tuner.health does."""
    layers = pack.depth + 1
    names = [describe(linear) for linear in _linears(model)]
    problem = None
    for row in samples:
        problem = find_problem(row[:layers], row[layers : 2 * layers], epoch, names, thresholds)
        if problem is not None:
            break
    columns = list(zip(*samples, strict=True))
    metrics: dict[str, float] = {}
    for i in range(layers):
        metrics[f"grad_norm_l{i}"] = float(np.mean(columns[i]))
        metrics[f"update_ratio_l{i}"] = float(np.mean(columns[layers + i]))
    if pack.activation in _WATCHED:
        key = "dead_frac" if pack.activation == "relu" else "saturation"
        for j in range(pack.depth):
            metrics[f"{key}_l{j}"] = float(np.mean(columns[2 * layers + j]))
    return metrics, problem


def _end_epoch(
    slot: _Slot,
    epoch: int,
    metrics: dict[str, float],
    problem: Problem | None,
    probs: np.ndarray | None,
    score_validation: Callable[[np.ndarray], dict[str, float]] | None,
) -> bool:
    """Record one member's epoch like :func:`tuner.train.fit` does; True when the member leaves the pack."""
    result = slot.result
    if problem is not None or not (math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])):
        result.history.append(metrics)
        result.failed = True
        result.stop_reason, result.health = _failure(problem, metrics, epoch)
        return True
    if score_validation is not None and probs is not None:
        metrics.update(score_validation(probs))
    result.history.append(metrics)
    monitor = slot.stopper.monitor
    if slot.stopper.update(epoch, metrics.get(monitor, float("nan"))):
        result.best_epoch = epoch
        result.best_metrics = dict(metrics)
    try:
        for callback in slot.member.callbacks:
            callback.on_epoch_end(epoch, metrics)
    except Exception as exc:  # a callback ends its own trial (pruning); the pack goes on
        slot.error = exc
        return True
    if slot.stopper.should_stop:
        result.stop_reason = slot.stopper.reason
        return True
    return False


def _finish(slot: _Slot, pack: _Pack, config: FitConfig) -> None:
    """Restore the member's best weights into its own network and give its verdict."""
    result = slot.result
    if slot.best is not None and result.best_epoch is not None:
        pack.write_model(slot.model, slot.best)
        result.state_dict = {k: v.detach().clone() for k, v in slot.model.state_dict().items()}
    elif not result.failed and slot.error is None:
        result.failed = True
        result.stop_reason = f"{config.monitor} was never finite; no epoch to keep"
    if config.health and result.health is None:
        result.health = judge(result.history, config.health_thresholds)
