"""Gradient health: verdicts on deliberately broken fits, failure naming layer and epoch, clipping, sampling cost."""

from __future__ import annotations

import math
import re
from typing import Any

import optuna
import pytest
import torch
from tiny import toy_parts, trial_params
from torch import nn

from tuner import health as health_mod
from tuner.config import spec_from_dict
from tuner.data.dataset import build_dataset
from tuner.errors import ConfigError
from tuner.health import HealthMonitor, HealthThresholds, judge
from tuner.model import build_mlp
from tuner.space import TrialParams, enqueue_params, suggest
from tuner.study import run_study
from tuner.tracking import NullTracker
from tuner.train import FitConfig, FitResult, fit

BASE = trial_params()


def params(**changes: Any) -> TrialParams:
    return trial_params(**changes)


def train(
    p: TrialParams,
    *,
    epochs: int = 4,
    weight_scale: float | None = None,
    hidden_bias: float | None = None,
    **config: Any,
) -> FitResult:
    """Fit on the toy data, after optionally spoiling the initialisation."""
    tr, val = toy_parts()
    model = build_mlp(4, p, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                if weight_scale is not None:
                    module.weight.mul_(weight_scale)
                if hidden_bias is not None and module.out_features != 1:
                    module.bias.fill_(hidden_bias)
    return fit(model, tr, val, p, FitConfig(max_epochs=epochs, patience=epochs, **config), seed=0)


EXPLODING = params(optimizer="sgd", lr=1e3, momentum=0.9)
LAYER_AT_EPOCH = re.compile(r"exploding gradients in layer (\d) \(Linear (\d+)->(\d+)\) at epoch (\d+): ")


def test_a_huge_learning_rate_explodes_and_fails_the_fit_naming_layer_and_epoch():
    result = train(EXPLODING, epochs=5)
    assert result.failed and result.epochs == 1
    assert result.health is not None and result.health.name == "exploding"
    found = LAYER_AT_EPOCH.search(result.stop_reason)
    assert found, result.stop_reason
    layer, n_in, n_out, epoch = map(int, found.groups())
    assert (n_in, n_out) == ((4, 32), (32, 16), (16, 1))[layer]
    assert epoch == 0
    # The limit crossed is named with its value.
    assert re.search(r"(grad norm|update ratio) \S+ > ", result.stop_reason)


def test_the_monitor_names_the_worst_layer_and_the_epoch_it_was_seen():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 1))
    monitor = HealthMonitor(model)
    for epoch, scale in enumerate((1.0, 1.0, 1.0, 1e6)):
        for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
            # Layer 1's gradient grows until it explodes in epoch 3; layer 2's grows less.
            layer.weight.grad = torch.full_like(layer.weight, 0.01 * scale * (10.0 if i == 1 else 1.0))
        monitor.before_step()
        monitor.after_step()
        problem = monitor.end_epoch(epoch).problem
        if epoch < 3:
            assert problem is None
    assert problem is not None and problem.verdict == "exploding"
    assert (problem.layer, problem.epoch) == (1, 3)
    assert problem.message.startswith("exploding gradients in layer 1 (Linear 8->3) at epoch 3: grad norm 4.9e+05 > 1")


def test_non_finite_gradients_are_their_own_verdict():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
    monitor = HealthMonitor(model)
    for layer in (model[0], model[2]):
        layer.weight.grad = torch.zeros_like(layer.weight)
    model[2].weight.grad[0, 0] = math.nan
    monitor.before_step()
    monitor.after_step()
    problem = monitor.end_epoch(7).problem
    assert problem is not None and problem.verdict == "non-finite"
    assert problem.message == "non-finite gradients in layer 1 (Linear 2->1) at epoch 7: grad norm nan"


def test_a_deep_sigmoid_stack_with_tiny_weights_vanishes():
    p = params(n_layers=5, widths=(32,) * 5, activation="sigmoid", init="xavier", optimizer="sgd", lr=0.01)
    result = train(p, epochs=3, weight_scale=0.01)
    assert not result.failed
    assert result.health is not None and result.health.name == "vanishing", result.health
    last = result.history[-1]
    assert last["grad_norm_l0"] < 1e-4 * last["grad_norm_l5"]
    # Sigmoid layers report saturation, not dead units.
    assert {f"saturation_l{i}" for i in range(5)} <= set(last)
    assert not any(key.startswith("dead_frac") for key in last)


def test_relu_with_a_large_negative_bias_has_dead_units():
    result = train(BASE, hidden_bias=-3.0)
    assert result.health is not None and result.health.name == "dead units", result.health
    assert max(result.history[-1]["dead_frac_l0"], result.history[-1]["dead_frac_l1"]) > 0.5


def test_a_small_healthy_net_is_healthy_and_logs_every_layer():
    result = train(BASE)
    assert not result.failed
    assert result.health is not None and result.health.name == "healthy", result.health
    keys = {f"{k}_l{i}" for k in ("grad_norm", "update_ratio") for i in range(3)}
    keys |= {f"dead_frac_l{i}" for i in range(2)}
    for epoch in result.history:
        assert keys <= set(epoch)
        assert all(math.isfinite(epoch[k]) for k in keys)
    assert 0 < result.history[0]["update_ratio_l0"] < 1


def test_clipping_keeps_a_huge_learning_rate_finite():
    clipped = params(**{**EXPLODING.__dict__, "max_grad_norm": 1e-3})
    result = train(clipped)
    assert not result.failed, result.stop_reason
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result.history)
    assert result.health is not None and result.health.name not in ("exploding", "non-finite")
    # The norms are those of the clipped gradients: each layer's is within the total's limit.
    for epoch in result.history:
        assert all(epoch[f"grad_norm_l{i}"] <= 1e-3 * (1 + 1e-4) for i in range(3))


def test_health_is_measured_by_hooks_on_the_sampled_batches_only(monkeypatch):
    calls: list[str] = []
    real = HealthMonitor._activation_stat

    def counting(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
        calls.append(type(module).__name__)
        return real(module, output)

    monkeypatch.setattr(HealthMonitor, "_activation_stat", staticmethod(counting))
    tr, val = toy_parts()
    steps_per_epoch = math.ceil(len(tr.y) / BASE.batch_size)  # 13
    for every, sampled_per_epoch in ((0, 1), (5, 3)):
        calls.clear()
        model = build_mlp(4, BASE, 1, generator=torch.Generator().manual_seed(1))
        config = FitConfig(max_epochs=3, patience=3, health_every=every)
        result = fit(model, tr, val, BASE, config, seed=0)
        # Two ReLU layers, hooked on the sampled steps only: not on the other steps, not on validation.
        assert len(calls) == 3 * sampled_per_epoch * 2 < 3 * steps_per_epoch * 2
        assert set(calls) == {"ReLU"}
        assert all(not m._forward_hooks for m in model.modules())
        assert "grad_norm_l0" in result.history[-1]


def test_health_adds_no_host_read_per_step(monkeypatch):
    reads = {"n": 0}
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            reads["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def host_reads(batch_size: int, every: int) -> int:
        reads["n"] = 0
        p = params(optimizer="sgd", batch_size=batch_size, max_grad_norm=1.0)
        tr, val = toy_parts()
        model = build_mlp(4, p, 1, generator=torch.Generator().manual_seed(1))
        fit(model, tr, val, p, FitConfig(max_epochs=2, patience=2, health_every=every), seed=0)
        return reads["n"]

    # 13 and 25 steps per epoch, clipping on, sampling once or on every step: the same reads per epoch.
    few, many = host_reads(32, 0), host_reads(16, 0)
    assert few == many > 0
    assert host_reads(16, 1) == few


@pytest.mark.parametrize(
    ("history", "verdict"),
    [
        ([], "not measured"),
        ([{"grad_norm_l0": 0.1, "grad_norm_l1": 0.2, "update_ratio_l0": 0.01, "update_ratio_l1": 0.01}] * 3, "healthy"),
        (
            [{"grad_norm_l0": math.inf, "grad_norm_l1": 0.2, "update_ratio_l0": 0.0, "update_ratio_l1": 0.0}],
            "non-finite",
        ),
        ([{"grad_norm_l0": 0.1, "grad_norm_l1": 2e4, "update_ratio_l0": 0.0, "update_ratio_l1": 0.0}], "exploding"),
        ([{"grad_norm_l0": 0.1, "grad_norm_l1": 0.2, "update_ratio_l0": 11.0, "update_ratio_l1": 0.0}], "exploding"),
        # Vanishing: the first layer against the last, or below the absolute floor, in at least half the epochs.
        ([{"grad_norm_l0": 1e-6, "grad_norm_l1": 0.1, "update_ratio_l0": 0, "update_ratio_l1": 0}] * 2, "vanishing"),
        ([{"grad_norm_l0": 1e-8, "grad_norm_l1": 1e-5, "update_ratio_l0": 0, "update_ratio_l1": 0}] * 2, "vanishing"),
        (
            [{"grad_norm_l0": 1e-6, "grad_norm_l1": 0.1, "update_ratio_l0": 0, "update_ratio_l1": 0}]
            + [{"grad_norm_l0": 0.05, "grad_norm_l1": 0.1, "update_ratio_l0": 0, "update_ratio_l1": 0}] * 3,
            "healthy",
        ),
        # Dead units outrank vanishing: units that never fire pass no gradient back.
        (
            [
                {
                    "grad_norm_l0": 0.0,
                    "grad_norm_l1": 0.1,
                    "update_ratio_l0": 0,
                    "update_ratio_l1": 0,
                    "dead_frac_l0": 0.9,
                }
            ]
            * 2,
            "dead units",
        ),
        (
            [
                {
                    "grad_norm_l0": 0.1,
                    "grad_norm_l1": 0.1,
                    "update_ratio_l0": 0,
                    "update_ratio_l1": 0,
                    "dead_frac_l0": 0.5,
                }
            ]
            * 2,
            "healthy",
        ),
    ],
)
def test_verdict_rules_on_scripted_histories(history, verdict):
    assert judge(history).name == verdict


def test_thresholds_are_the_documented_ones():
    t = HealthThresholds()
    assert (t.exploding_grad_norm, t.exploding_update_ratio) == (1e4, 10.0)
    assert (t.dead_fraction, t.vanishing_grad_norm, t.vanishing_ratio, t.persistent_share) == (0.5, 1e-7, 1e-4, 0.5)
    doc = " ".join((health_mod.__doc__ or "").split())
    for text in ("exceeds 1e4", "exceeds 10", "more than 50%", "below 1e-7", "1e-4 times", "at least half"):
        assert text in doc, text


TINY = {
    "data": {"simulated": {"n_star": 1500, "n_quasar": 150}, "seed": 3},
    "search_space": {
        "n_layers": 2,
        "width": 16,
        "lr": {"low": 1e-3, "high": 1e3, "log": True},
        "momentum": 0.9,
        "batch_size": 128,
        "optimizer": "sgd",
        "activation": "relu",
        "init": "he",
        "batch_norm": False,
        "dropout": 0.0,
    },
    "train": {"max_epochs": 3, "patience": 2},
    "study": {"name": "health", "n_trials": 2, "seed": 1, "pruner": "none", "enqueue": [{"lr": 1e3}, {"lr": 0.01}]},
}


def test_an_exploding_trial_is_failed_in_the_study_with_its_verdict_kept():
    spec = spec_from_dict(TINY)
    result = run_study(
        spec, dataset=build_dataset(spec), tracker=NullTracker(), storage=optuna.storages.InMemoryStorage()
    )
    broken, sound = result.study.trials
    assert broken.state.name == "FAIL"
    assert broken.user_attrs["gradient_health"] == "exploding"
    assert LAYER_AT_EPOCH.search(broken.user_attrs["fail_reason"])
    assert sound.state.name == "COMPLETE"
    assert sound.user_attrs["gradient_health"] in ("healthy", "dead units", "vanishing")
    assert sound.user_attrs["gradient_health_detail"]
    for trial in (broken, sound):
        manifest = trial.user_attrs["manifest"]
        assert manifest["seed"] == 1 + trial.number and manifest["params"]["lr"] == trial.params["lr"]


DRAWN = {
    "n_layers": 1,
    "n_units_l0": 16,
    "lr": 0.01,
    "momentum": 0.5,
    "dropout": 0.0,
    "weight_decay": 1e-5,
    "log2_batch_size": 5,
    "optimizer": "adam",
    "activation": "relu",
    "init": "he",
    "batch_norm": False,
}


def test_max_grad_norm_is_off_unless_the_search_space_sets_it():
    off = spec_from_dict({})
    assert off.search_space.max_grad_norm.off
    assert "max_grad_norm" not in off.model_dump()["search_space"]  # the fingerprint of older studies holds
    unclipped = suggest(optuna.trial.FixedTrial(DRAWN), off.search_space)
    assert unclipped.max_grad_norm is None and "max_grad_norm" not in unclipped.as_record(5)
    fixed = spec_from_dict({"search_space": {"max_grad_norm": 1.0}}).search_space
    assert suggest(optuna.trial.FixedTrial(DRAWN), fixed).max_grad_norm == 1.0
    ranged = spec_from_dict({"search_space": {"max_grad_norm": {"low": 0.1, "high": 10, "log": True}}}).search_space
    drawn = suggest(optuna.trial.FixedTrial({**DRAWN, "max_grad_norm": 2.5}), ranged)
    assert drawn.max_grad_norm == 2.5 and drawn.as_record(5)["max_grad_norm"] == 2.5
    with pytest.raises(ConfigError, match=r"search_space\.max_grad_norm: max_grad_norm must be > 0 .*got low=0"):
        spec_from_dict({"search_space": {"max_grad_norm": {"low": 0, "high": 1}}})
    _, problems = enqueue_params(off.search_space, {"max_grad_norm": 1.0}, "study.enqueue[0]")
    assert problems == ["study.enqueue[0].max_grad_norm: search_space.max_grad_norm is off (null), got 1.0"]
