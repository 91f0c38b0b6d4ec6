"""Tests of the search space: suggestions, fixed values, records and warm-start entries (tuner.space)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial

from tuner.config import SearchSpace, spec_from_dict
from tuner.space import TrialParams, enqueue_params, max_layers, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT = SearchSpace()

FULL = {
    "n_layers": 3,
    "n_units_l0": 256,
    "n_units_l1": 64,
    "n_units_l2": 17,
    "lr": 0.003,
    "momentum": 0.8,
    "dropout": 0.25,
    "weight_decay": 1e-4,
    "log2_batch_size": 7,
    "optimizer": "adamw",
    "activation": "elu",
    "init": "he",
    "batch_norm": True,
}


def space(**entries: Any) -> SearchSpace:
    return spec_from_dict({"search_space": entries}).search_space


def fixed_trial(params: dict[str, Any]) -> FixedTrial:
    return FixedTrial(params)


def test_fixed_trial_default_space() -> None:
    trial = fixed_trial(FULL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any value outside its distribution would warn
        params = suggest(trial, DEFAULT)
    assert params == TrialParams(
        n_layers=3,
        widths=(256, 64, 17),
        lr=0.003,
        momentum=0.8,
        dropout=0.25,
        weight_decay=1e-4,
        batch_size=128,
        optimizer="adamw",
        activation="elu",
        init="he",
        batch_norm=True,
    )
    dists = trial.distributions
    assert dists["log2_batch_size"] == IntDistribution(4, 10)
    assert "batch_size" not in dists
    assert dists["n_layers"] == IntDistribution(1, 5)
    assert dists["n_units_l0"] == IntDistribution(16, 1024, log=True)
    assert dists["lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert dists["momentum"] == FloatDistribution(0.1, 0.99)
    assert dists["optimizer"] == CategoricalDistribution(["sgd", "nesterov", "adam", "adamw"])
    assert dists["batch_norm"] == CategoricalDistribution([False, True])


def test_widths_only_for_the_drawn_depth() -> None:
    params = {**FULL, "n_layers": 1}
    trial = fixed_trial(params)
    assert suggest(trial, DEFAULT).widths == (256,)
    assert "n_units_l1" not in trial.distributions


def test_missing_width_is_asked_for() -> None:
    params = {k: v for k, v in FULL.items() if k != "n_units_l2"}
    with pytest.raises(ValueError, match="n_units_l2"):
        suggest(fixed_trial(params), DEFAULT)


def test_fixed_values_are_not_suggested() -> None:
    sp = space(
        momentum=0.9,
        n_layers=2,
        width=64,
        batch_size=512,
        optimizer="sgd",
        batch_norm=False,
        dropout={"low": 0.0, "high": 0.1},
    )
    trial = fixed_trial({"lr": 0.01, "dropout": 0.05, "weight_decay": 1e-3, "activation": "tanh", "init": "xavier"})
    params = suggest(trial, sp)
    assert params.momentum == 0.9 and params.n_layers == 2 and params.widths == (64, 64)
    assert params.batch_size == 512 and params.optimizer == "sgd" and params.batch_norm is False
    assert params.dropout == 0.05
    assert set(trial.distributions) == {"lr", "dropout", "weight_decay", "activation", "init"}
    assert trial.distributions["dropout"] == FloatDistribution(0.0, 0.1)


def test_random_study_stays_in_range() -> None:
    sp = space(
        n_layers={"low": 1, "high": 4},
        width={"low": 8, "high": 300, "log": True},
        batch_size={"low": 32, "high": 2048, "log": True, "powers_of_two": True},
        lr={"low": 1e-3, "high": 3e-2, "log": True},
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: list[TrialParams] = []
    for _ in range(30):
        trial = study.ask()
        p = suggest(trial, sp)
        seen.append(p)
        study.tell(trial, 0.0)
        assert 1 <= p.n_layers <= 4 and len(p.widths) == p.n_layers
        assert all(isinstance(w, int) and 8 <= w <= 300 for w in p.widths)
        assert 32 <= p.batch_size <= 2048 and p.batch_size & (p.batch_size - 1) == 0
        assert 1e-3 <= p.lr <= 3e-2
        assert 0.1 <= p.momentum <= 0.99 and 0.0 <= p.dropout <= 0.5
        assert 1e-6 <= p.weight_decay <= 1e-1
        assert p.optimizer in ("sgd", "nesterov", "adam", "adamw")
        assert p.activation in ("relu", "tanh", "sigmoid", "elu") and p.init in ("xavier", "he")
        assert isinstance(p.batch_norm, bool)
        assert trial.params["log2_batch_size"] == int(math.log2(p.batch_size))
    # random sampling over 30 trials explores: several depths and batch sizes
    assert len({p.n_layers for p in seen}) >= 3
    assert len({p.batch_size for p in seen}) >= 3
    # a stored trial reads back the same parameters
    frozen = study.trials[5]
    assert suggest(frozen, sp) == seen[5]


def test_as_record_same_keys_for_every_depth() -> None:
    shallow = suggest(fixed_trial({**FULL, "n_layers": 1}), DEFAULT)
    deep = suggest(fixed_trial({**FULL, "n_layers": 5, "n_units_l3": 32, "n_units_l4": 16}), DEFAULT)
    depth = max_layers(DEFAULT)
    assert depth == 5
    a, b = shallow.as_record(depth), deep.as_record(depth)
    assert list(a) == list(b)
    assert a["widths"] == "256" and b["widths"] == "256-64-17-32-16"
    assert [a[f"n_units_l{i}"] for i in range(5)] == [256, 0, 0, 0, 0]
    assert [b[f"n_units_l{i}"] for i in range(5)] == [256, 64, 17, 32, 16]
    assert a["batch_size"] == 128
    assert all(isinstance(v, int | float | str | bool) for v in a.values())


def test_max_layers_fixed() -> None:
    assert max_layers(space(n_layers=3)) == 3


# --- warm-start entries -------------------------------------------------------------------------------------


def test_enqueue_converts_user_names() -> None:
    entry = {"widths": [64, 32], "lr": 0.01, "batch_size": 256, "optimizer": "adam", "batch_norm": True}
    params, problems = enqueue_params(DEFAULT, entry, "study.enqueue[0]")
    assert problems == []
    assert params == {
        "n_layers": 2,
        "n_units_l0": 64,
        "n_units_l1": 32,
        "lr": 0.01,
        "log2_batch_size": 8,
        "optimizer": "adam",
        "batch_norm": True,
    }


def test_enqueue_single_width_and_fixed_entries() -> None:
    params, problems = enqueue_params(DEFAULT, {"n_layers": 3, "width": 128}, "e")
    assert problems == []
    assert params == {"n_layers": 3, "n_units_l0": 128, "n_units_l1": 128, "n_units_l2": 128}
    # a fixed entry of the space is checked but not passed on (Optuna never suggests it)
    sp = space(momentum=0.9, batch_size=64)
    params, problems = enqueue_params(sp, {"momentum": 0.9, "batch_size": 64}, "e")
    assert (params, problems) == ({}, [])
    _, problems = enqueue_params(sp, {"momentum": 0.5}, "e")
    assert problems == ["e.momentum: search_space.momentum is fixed to 0.9, got 0.5"]


def test_enqueued_trial_reads_back_the_entry() -> None:
    entry = {"widths": [64, 32], "lr": 0.01, "batch_size": 256, "optimizer": "adam"}
    params, problems = enqueue_params(DEFAULT, entry, "e")
    assert problems == []
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.enqueue_trial(params)
    got = suggest(study.ask(), DEFAULT)
    assert (got.widths, got.lr, got.batch_size, got.optimizer) == ((64, 32), 0.01, 256, "adam")


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ({"batch_size": 2048}, ["w.batch_size:", "2048", "outside", "[16, 1024]"]),
        ({"batch_size": 100}, ["w.batch_size:", "power of two", "100"]),
        ({"lr": 0.5}, ["w.lr:", "0.5", "outside"]),
        ({"lr": "fast"}, ["w.lr:", "must be a number", "'fast'"]),
        ({"n_layers": 7}, ["w.n_layers:", "7", "outside"]),
        ({"widths": [64, 8]}, ["w.width:", "8", "outside"]),
        ({"widths": [64.5]}, ["w.width:", "integer", "64.5"]),
        ({"optimizer": "adamm"}, ["w.optimizer:", "'adamm'", "options"]),
        ({"learning_rat": 0.01}, ["w:", "unknown parameter 'learning_rat'"]),
        ({"batchsize": 64}, ["w:", "'batchsize'", "did you mean 'batch_size'"]),
        ({"widht": 64}, ["w:", "'widht'", "did you mean 'width'"]),
        ({"n_layers": 3, "widths": [64, 32]}, ["w.widths:", "2 widths", "n_layers=3"]),
        ({"widths": 64}, ["w.widths:", "must be a list", "64"]),
        ({"width": 64}, ["w.width:", "give n_layers"]),
    ],
)
def test_enqueue_problems(entry: dict[str, Any], needles: list[str]) -> None:
    _, problems = enqueue_params(DEFAULT, entry, "w")
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])


def test_enqueue_reports_every_problem() -> None:
    entry = {"batch_size": 100, "lr": 5.0, "optimzer": "adam", "n_layers": 2, "widths": [64]}
    _, problems = enqueue_params(DEFAULT, entry, "w")
    assert len(problems) == 4, problems


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        # A range refused NaN already, but as "outside [low, high]": the rule is finiteness.
        ({"lr": math.nan}, "w.lr: must be a finite number, got nan"),
        ({"momentum": math.inf}, "w.momentum: must be a finite number, got inf"),
        ({"width": math.inf, "n_layers": 1}, "w.width: must be a finite number, got inf"),
    ],
)
def test_enqueue_refuses_non_finite_numbers(entry: dict[str, Any], problem: str) -> None:
    assert enqueue_params(DEFAULT, entry, "w")[1] == [problem]


def test_enqueue_refuses_non_finite_number_for_a_fixed_entry() -> None:
    assert enqueue_params(space(lr=0.01), {"lr": math.nan}, "w")[1] == ["w.lr: must be a finite number, got nan"]
