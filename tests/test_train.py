"""Training: early stopping on scripted sequences, best-weight restore, the non-finite guard, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import Part, toy_parts, trial_params

from tuner.model import build_mlp
from tuner.space import TrialParams
from tuner.train import EarlyStopping, FitConfig, fit, predict_logits


def run(stopper: EarlyStopping, values: list[float]) -> int:
    """Feed values until the stopper says stop; return the last epoch seen."""
    for epoch, value in enumerate(values):
        stopper.update(epoch, value)
        if stopper.should_stop:
            return epoch
    return len(values) - 1


def test_early_stopping_min_mode_stops_after_patience_epochs_without_improvement():
    stopper = EarlyStopping("val_loss", patience=2, mode="min")
    last = run(stopper, [1.0, 0.9, 0.95, 0.96, 0.5, 0.4])
    assert last == 3
    assert stopper.best == 0.9 and stopper.best_epoch == 1
    assert "val_loss did not improve" in stopper.reason and "epoch 1" in stopper.reason


def test_early_stopping_improvement_resets_the_count():
    stopper = EarlyStopping("val_loss", patience=2, mode="min")
    last = run(stopper, [1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.86, 0.1])
    assert last == 6
    assert stopper.best_epoch == 4


def test_early_stopping_max_mode_and_min_delta():
    stopper = EarlyStopping("val_auc", patience=1, min_delta=0.01, mode="max")
    # 0.805 is not better than 0.80 by more than 0.01: no improvement, patience 1 -> stop at epoch 1.
    last = run(stopper, [0.80, 0.805, 0.9])
    assert last == 1
    assert stopper.best == 0.80


def test_early_stopping_patience_zero_and_nan_never_improves():
    stopper = EarlyStopping("val_loss", patience=0, mode="min")
    assert stopper.update(0, 1.0) is True
    assert stopper.update(1, float("nan")) is False
    assert stopper.should_stop
    first_nan = EarlyStopping("val_loss", patience=3, mode="min")
    assert first_nan.update(0, float("nan")) is False
    assert first_nan.best is None


def test_early_stopping_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping("val_loss", patience=1, mode="up")


PARAMS = trial_params(lr=0.05, dropout=0.1)


def test_fit_restores_the_best_epoch_weights_not_the_last():
    train, val = toy_parts()
    model = build_mlp(4, PARAMS, 1, generator=torch.Generator().manual_seed(1))
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot:
        def on_epoch_end(self, epoch, metrics):
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    # A high learning rate overfits fast, so the last epoch is worse than the best.
    config = FitConfig(max_epochs=30, patience=30, monitor="val_loss", monitor_mode="min")
    result = fit(model, train, val, PARAMS, config, seed=0, callbacks=[Snapshot()])
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == losses.index(min(losses))
    assert result.best_epoch != len(losses) - 1, "the test needs a run whose last epoch is not the best"
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[result.best_epoch][key])
    restored = torch.nn.functional.binary_cross_entropy_with_logits(predict_logits(model, val.x)[:, 0], val.y.float())
    assert float(restored) == pytest.approx(min(losses), rel=1e-5)


def test_fit_stops_early_with_a_reason():
    train, val = toy_parts()
    model = build_mlp(4, PARAMS, 1, generator=torch.Generator().manual_seed(1))
    result = fit(model, train, val, PARAMS, FitConfig(max_epochs=200, patience=3), seed=0)
    assert result.epochs < 200
    assert result.stop_reason.startswith("early stopping: val_loss did not improve")
    assert result.epochs == result.best_epoch + 1 + 3


def test_fit_reports_max_epochs_when_it_never_stops():
    train, val = toy_parts()
    model = build_mlp(4, PARAMS, 1, generator=torch.Generator().manual_seed(1))
    result = fit(model, train, val, PARAMS, FitConfig(max_epochs=2, patience=10), seed=0)
    assert result.epochs == 2 and result.stop_reason == "max_epochs reached (2)"


def test_non_finite_loss_fails_the_fit_with_the_reason():
    train, val = toy_parts()
    wild = TrialParams(**{**PARAMS.__dict__, "lr": 1e30, "optimizer": "sgd", "dropout": 0.0})
    model = build_mlp(4, wild, 1, generator=torch.Generator().manual_seed(1))
    result = fit(model, train, val, wild, FitConfig(max_epochs=5), seed=0)
    assert result.failed
    assert "non-finite" in result.stop_reason and "epoch 0" in result.stop_reason
    assert result.epochs == 1


def test_same_seed_same_history_different_seed_different():
    train, val = toy_parts()

    def history(seed: int) -> list[dict[str, float]]:
        model = build_mlp(4, PARAMS, 1, generator=torch.Generator().manual_seed(seed))
        return fit(model, train, val, PARAMS, FitConfig(max_epochs=3, patience=5), seed=seed).history

    assert history(7) == history(7)
    assert history(7) != history(8)


def test_multiclass_fit_uses_cross_entropy_and_trains():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 3, generator=g)
    y = torch.argmax(x, dim=1)
    train, val = Part(x[:600], y[:600]), Part(x[600:], y[600:])
    model = build_mlp(3, PARAMS, 3, generator=torch.Generator().manual_seed(0))
    result = fit(model, train, val, PARAMS, FitConfig(task="multiclass", max_epochs=8, patience=8), seed=0)
    assert not result.failed
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] < math.log(3) + 0.5
    accuracy = (predict_logits(model, val.x).argmax(1) == val.y).float().mean()
    assert accuracy > 0.8


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "elu"])
def test_every_optimizer_and_activation_trains(optimizer, activation, batch_norm):
    train, val = toy_parts()
    params = TrialParams(
        **{
            **PARAMS.__dict__,
            "optimizer": optimizer,
            "activation": activation,
            "batch_norm": batch_norm,
            "init": "xavier" if activation in ("tanh", "sigmoid") else "he",
            "lr": 0.01,
            "batch_size": 33,
        }
    )  # 400 % 33 == 4; BatchNorm sees no 1-row batch
    model = build_mlp(4, params, 1, generator=torch.Generator().manual_seed(0))
    result = fit(model, train, val, params, FitConfig(max_epochs=3, patience=3), seed=0)
    assert not result.failed and result.best_epoch is not None


def test_nesterov_with_momentum_zero_trains_as_plain_sgd():
    # The space allows momentum 0; torch.optim.SGD refuses Nesterov without momentum, the packed engine does not.
    train, val = toy_parts()

    def history(optimizer: str) -> list[dict[str, float]]:
        params = TrialParams(**{**PARAMS.__dict__, "optimizer": optimizer, "momentum": 0.0})
        model = build_mlp(4, params, 1, generator=torch.Generator().manual_seed(0))
        return fit(model, train, val, params, FitConfig(max_epochs=2, patience=2), seed=0).history

    assert history("nesterov") == history("sgd")


def test_batch_norm_survives_a_final_batch_of_one_row():
    train, val = toy_parts()
    params = TrialParams(**{**PARAMS.__dict__, "batch_norm": True, "batch_size": 57})  # 400 % 57 == 1
    model = build_mlp(4, params, 1, generator=torch.Generator().manual_seed(0))
    result = fit(model, train, val, params, FitConfig(max_epochs=2, patience=5), seed=0)
    assert not result.failed
