"""Packed training: several trials as one vectorised model, each trial's numbers its own."""

from __future__ import annotations

import math
import os
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from tiny import TINY_DATA, TINY_SPACE, Part, stored_in, toy_parts

from tuner.config import spec_from_dict
from tuner.packed import PackMember, fit_pack, pack_key
from tuner.space import TrialParams
from tuner.study import pack_size, replay_trial, run_study
from tuner.train import FitConfig, predict_logits

# The pack engine's tests run on the CPU; TUNER_TEST_DEVICE=cuda runs them on a GPU (bench/gpu_check.sh does).
DEVICE = torch.device(os.environ.get("TUNER_TEST_DEVICE", "cpu"))

# Packed and solo runs differ only in the matmul kernels' blocking for padded shapes: rounding-level.
TOLERANCE = 1e-5


def params(**changes) -> TrialParams:
    base = {
        "n_layers": 2,
        "widths": (16, 8),
        "lr": 0.01,
        "momentum": 0.9,
        "dropout": 0.1,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "optimizer": "adam",
        "activation": "relu",
        "init": "he",
        "batch_norm": False,
    }
    return TrialParams(**{**base, **changes})


def varied(**shared) -> list[TrialParams]:
    """Three trials of one shape with different widths, learning rates, momenta, decays and dropout rates."""
    return [
        params(**shared),
        params(widths=(32, 4), lr=0.003, momentum=0.8, dropout=0.0, **shared),
        params(widths=(8, 24), lr=0.05, momentum=0.5, weight_decay=1e-2, dropout=0.3, **shared),
    ]


def histories_close(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    assert len(a) == len(b)
    assert [sorted(e) for e in a] == [sorted(e) for e in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)


CONFIG = FitConfig(max_epochs=6, patience=3)


@pytest.mark.parametrize(
    "shared",
    [
        {},
        {"optimizer": "adamw"},
        {"optimizer": "nesterov"},
        {"optimizer": "sgd", "batch_norm": True},
        {"activation": "tanh", "batch_norm": True},
        {"activation": "sigmoid"},
        {"max_grad_norm": 0.5},
    ],
    ids=lambda shared: "-".join(f"{k}={v}" for k, v in shared.items()) or "adam-relu",
)
def test_a_packed_trial_has_the_history_and_weights_it_has_alone(shared):
    train, validation = toy_parts(device=DEVICE)
    trials = varied(**shared)
    if shared.get("optimizer") == "adamw":
        trials[1] = params(**{**shared, "optimizer": "adam", "widths": (32, 4), "lr": 0.003})
    packed = fit_pack([PackMember(p, 10 + i) for i, p in enumerate(trials)], train, validation, CONFIG, n_out=1)
    for i, p in enumerate(trials):
        (alone,) = fit_pack([PackMember(p, 10 + i)], train, validation, CONFIG, n_out=1)
        got, want = packed[i].result, alone.result
        assert histories_close(got.history, want.history) <= TOLERANCE
        assert (got.best_epoch, got.stop_reason, got.failed) == (want.best_epoch, want.stop_reason, want.failed)
        assert got.health is not None and want.health is not None and got.health.name == want.health.name
        assert got.state_dict.keys() == want.state_dict.keys()
        for key, value in want.state_dict.items():
            assert torch.allclose(got.state_dict[key].float(), value.float(), atol=TOLERANCE), key
    # The trials differ from one another: the pack does not make them one.
    assert len({round(o.result.history[-1]["val_loss"], 6) for o in packed}) == 3


def test_the_returned_network_holds_the_best_epoch_and_is_an_ordinary_mlp():
    train, validation = toy_parts(device=DEVICE)
    config = FitConfig(max_epochs=12, patience=12)
    outcomes = fit_pack([PackMember(p, 3 + i) for i, p in enumerate(varied())], train, validation, config, n_out=1)
    for outcome in outcomes:
        result = outcome.result
        assert result.best_epoch is not None
        logits = predict_logits(outcome.model, validation.x)[:, 0]
        val_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, validation.y.float()).item()
        assert val_loss == pytest.approx(result.history[result.best_epoch]["val_loss"], abs=1e-5)
        assert isinstance(outcome.model, torch.nn.Sequential)


def test_a_pack_with_one_non_finite_trial_fails_only_that_trial():
    train, validation = toy_parts(device=DEVICE)
    trials = varied()
    trials[1] = params(widths=(32, 4), lr=1e6)  # blows up on the first step
    packed = fit_pack([PackMember(p, 20 + i) for i, p in enumerate(trials)], train, validation, CONFIG, n_out=1)
    broken = packed[1].result
    assert broken.failed
    assert broken.health is not None and broken.health.name in ("exploding", "non-finite")
    assert "at epoch 0" in broken.stop_reason and "layer" in broken.stop_reason
    assert broken.epochs == 1
    # The message names the failed trial's own layers, as its run alone does, not a pack mate's.
    (broken_alone,) = fit_pack([PackMember(trials[1], 21)], train, validation, CONFIG, n_out=1)
    assert broken.stop_reason == broken_alone.result.stop_reason
    assert "32->4" in broken.stop_reason or "4->1" in broken.stop_reason
    for i in (0, 2):
        (alone,) = fit_pack([PackMember(trials[i], 20 + i)], train, validation, CONFIG, n_out=1)
        assert not packed[i].result.failed
        assert histories_close(packed[i].result.history, alone.result.history) <= TOLERANCE
        for value in packed[i].result.state_dict.values():
            assert torch.isfinite(value.float()).all()


def test_a_trial_without_clipping_keeps_gradients_too_large_to_measure_when_a_pack_mate_clips():
    # Inputs so large that a gradient's squared norm overflows float32: the clipping trial's norm is inf, and
    # the trial that does not clip must train as it does alone, not get inf / inf = NaN from its pack mate's clip.
    train, validation = toy_parts(device=DEVICE)
    train = Part(train.x * 1e19, train.y)
    validation = Part(validation.x * 1e19, validation.y)
    config = FitConfig(max_epochs=3, patience=3, health=False)
    unclipped = params(dropout=0.0)
    clipping = params(dropout=0.0, widths=(8, 8), max_grad_norm=1.0)
    packed = fit_pack([PackMember(unclipped, 1), PackMember(clipping, 2)], train, validation, config, n_out=1)
    (alone,) = fit_pack([PackMember(unclipped, 1)], train, validation, config, n_out=1)
    got, want = packed[0].result, alone.result
    assert not want.failed and not got.failed, got.stop_reason
    assert [h["val_loss"] for h in got.history] == pytest.approx([h["val_loss"] for h in want.history], rel=1e-5)


def test_an_exported_batch_norm_layer_counts_the_steps_up_to_the_best_epoch():
    train, validation = toy_parts(device=DEVICE)  # 400 rows at batch 64: 7 steps an epoch
    config = FitConfig(max_epochs=10, patience=3)
    trial = params(batch_norm=True, dropout=0.0, lr=0.05)
    (outcome,) = fit_pack([PackMember(trial, 3)], train, validation, config, n_out=1)
    result = outcome.result
    assert result.best_epoch is not None and result.epochs > result.best_epoch + 1  # it trained past its best
    counters = [v for k, v in result.state_dict.items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 7 * (result.best_epoch + 1) for c in counters)


class StopAt:
    """A callback that ends its trial after a given epoch, as pruning does."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seen: list[int] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.seen.append(epoch)
        if epoch == self.epoch:
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def test_a_callback_that_ends_one_trial_leaves_the_others_training():
    train, validation = toy_parts(device=DEVICE)
    config = FitConfig(max_epochs=5, patience=5)
    callbacks = [StopAt(99), StopAt(1), StopAt(99)]
    members = [PackMember(p, 30 + i, [callbacks[i]]) for i, p in enumerate(varied())]
    packed = fit_pack(members, train, validation, config, n_out=1)
    assert isinstance(packed[1].error, optuna.TrialPruned)
    assert callbacks[1].seen == [0, 1] and packed[1].result.epochs == 2
    for i in (0, 2):
        assert packed[i].error is None and callbacks[i].seen == [0, 1, 2, 3, 4]
        (alone,) = fit_pack([PackMember(varied()[i], 30 + i)], train, validation, config, n_out=1)
        assert histories_close(packed[i].result.history, alone.result.history) <= TOLERANCE


def test_members_that_leave_at_one_epoch_are_handed_off_together_after_every_callback_of_it():
    train, validation = toy_parts(device=DEVICE)
    config = FitConfig(max_epochs=5, patience=5)
    callbacks = [StopAt(99), StopAt(1), StopAt(1), StopAt(99)]
    trials = [*varied(), params(widths=(8, 8), lr=0.02)]
    batches: list[list[int]] = []
    seen_at_hand_off: list[list[list[int]]] = []

    def hand_off(calls):
        seen_at_hand_off.append([list(c.seen) for c in callbacks])
        for call in calls:
            call()
        batches.append(finished[len(finished) - len(calls) :])

    finished: list[int] = []
    members = [
        PackMember(p, 40 + i, [callbacks[i]], on_finish=lambda out, i=i: finished.append(i))
        for i, p in enumerate(trials)
    ]
    fit_pack(members, train, validation, config, n_out=1, hand_off=hand_off)
    # Two left at epoch 1 (pruned), two at the last epoch: two hand-offs, each after the epoch's every callback.
    assert [sorted(b) for b in batches] == [[1, 2], [0, 3]]
    assert seen_at_hand_off[0] == [[0, 1], [0, 1], [0, 1], [0, 1]]


def test_settling_together_runs_the_calls_at_once_and_raises_the_first_error_after_all():
    import threading

    from tuner.study import SettleTogether

    settle = SettleTogether(2)
    both_running = threading.Barrier(2, timeout=10)  # broken (an error) if the calls ran one after another
    done: list[str] = []

    def call(name: str, fail: bool = False) -> None:
        both_running.wait()
        done.append(name)
        if fail:
            raise ValueError(name)

    settle([lambda: call("a"), lambda: call("b")])
    assert sorted(done) == ["a", "b"]
    both_running.reset()
    with pytest.raises(ValueError, match="c"):
        settle([lambda: call("c", fail=True), lambda: call("d")])
    assert sorted(done) == ["a", "b", "c", "d"]  # d ran to its end before the error was raised
    settle.close()


def test_padded_units_stay_zero_and_differently_shaped_trials_are_refused():
    train, validation = toy_parts(device=DEVICE)
    trials = [params(widths=(4, 4), dropout=0.0), params(widths=(16, 12), dropout=0.0)]
    packed = fit_pack([PackMember(p, i) for i, p in enumerate(trials)], train, validation, CONFIG, n_out=1)
    small = packed[0].result.state_dict
    assert small["0.weight"].shape == (4, 4) and small["2.weight"].shape == (4, 4) and small["4.weight"].shape == (1, 4)
    with pytest.raises(ValueError, match="different shapes"):
        fit_pack([PackMember(params(), 0), PackMember(params(batch_size=128), 1)], train, validation, CONFIG, n_out=1)
    assert pack_key(params(optimizer="adam")) == pack_key(params(optimizer="adamw"))
    assert pack_key(params(optimizer="sgd")) != pack_key(params(optimizer="adam"))


def test_pack_size_auto_packs_on_a_gpu_only():
    assert pack_size("auto", torch.device("cpu")) == 1
    assert pack_size("auto", torch.device("cuda")) > 1
    assert pack_size(4, torch.device("cpu")) == 4


PACKED_STUDY = {
    "data": TINY_DATA,
    "search_space": {
        **TINY_SPACE,
        "n_layers": {"value": 2},
        "batch_size": {"value": 128},
        "optimizer": {"choices": ["adam", "adamw"]},
    },
    "train": {"max_epochs": 6, "patience": 3},
    "study": {
        "name": "tiny-packed",
        "n_trials": 7,
        "seed": 5,
        "pack": 4,
        "pruner": "median",
        "pruner_options": {"n_warmup_steps": 1},
    },
}


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes one trial once it has reported three epochs: which trial is pruned is known in advance."""

    def __init__(self, number: int) -> None:
        self.number = number

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == self.number and len(trial.intermediate_values) >= 3


@pytest.fixture(scope="module")
def packed_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    spec = spec_from_dict(stored_in(PACKED_STUDY, root, plots=False))
    result = run_study(spec, device="cpu", pruner=PruneTrial(5))
    return {"root": root, "spec": spec, "study": result.study, "dataset": result.dataset}


def test_a_packed_study_runs_its_exact_budget_and_each_trial_is_its_own_run(packed_study):
    study, spec = packed_study["study"], packed_study["spec"]
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 7 and all(t.state.is_finished() for t in trials)
    assert {t.user_attrs["engine"] for t in trials} == {"packed"}
    # One process ran them four at a time: trials 0-3 all started before any of them finished, then 4-6.
    first_done = min(t.datetime_complete for t in trials[:4])
    assert all(t.datetime_start < first_done for t in trials[:4])
    assert all(t.datetime_start >= max(u.datetime_complete for u in trials[:4]) for t in trials[4:])
    client = MlflowClient(spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.study.name)
    runs = client.search_runs([experiment.experiment_id], "tags.`optuna.trial_number` != ''")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == list(range(7))
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert len(history) == trial.user_attrs["epochs"]
        assert run.data.tags["engine"] == "packed"
        if trial.state.name == "COMPLETE":
            assert math.isfinite(trial.value)
            assert run.info.status == "FINISHED"
            assert "holdout_completeness" in run.data.metrics
    # Pruning ends one trial of a pack; its pack mates train on.
    pruned = trials[5]
    assert pruned.state.name == "PRUNED" and pruned.user_attrs["epochs"] == 3
    assert client.get_run(pruned.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert [t.state.name for t in trials if t.number != 5] == ["COMPLETE"] * 6
    assert max(t.user_attrs["epochs"] for t in trials[4:]) > 3


def test_a_packed_trial_replays_alone_to_its_recorded_value(packed_study):
    study = packed_study["study"]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    # A trial that trained beside others records how; this study's packs hold some.
    packed = [t for t in complete if "packed_with" in t.user_attrs]
    assert packed and all(t.user_attrs["packed_with"]["layout"][0][1] > 1 for t in packed), [
        t.user_attrs.get("packed_with") for t in complete
    ]
    for trial in complete:
        replay = replay_trial(study, packed_study["spec"], trial.number, dataset=packed_study["dataset"])
        assert replay.matches, replay.summary()
        if DEVICE.type == "cpu":
            assert replay.replayed == replay.recorded, replay.summary()
        # A packed trial is replayed as it trained (fit_as_packed, whose exactness the next test checks).
        assert any("trained in a pack" in note for note in replay.notes) == (trial in packed)


class EndAt:
    """Ends its member at the end of the given epoch, as pruning would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.epoch:
            raise optuna.TrialPruned(f"ended at epoch {epoch}")


@pytest.mark.parametrize(
    "shared",
    [{}, {"activation": "tanh", "batch_norm": True}, {"activation": "elu", "batch_size": 48, "optimizer": "adamw"}],
    ids=["relu-adam", "tanh-batch_norm", "elu-48-adamw"],
)
def test_a_member_trained_as_packed_has_the_numbers_it_had_in_its_pack(shared):
    from tuner.packed import PackedWith, fit_as_packed

    train, validation = toy_parts(device=DEVICE)
    trials = [*varied(**shared), *varied(**shared)[:2]]
    ends = [[EndAt(1)], [EndAt(4)], [], [EndAt(4)], []]
    config = FitConfig(max_epochs=8, patience=20)
    packed = fit_pack(
        [PackMember(p, 10 + i, ends[i]) for i, p in enumerate(trials)], train, validation, config, n_out=1
    )
    # The pack as each member saw it: five, four from epoch 2, two (members 2 and 4) from epoch 5, and its row.
    assert packed[0].packed_with == PackedWith((32, 24), ((0, 5, 0),))
    assert packed[4].packed_with == PackedWith((32, 24), ((0, 5, 4), (2, 4, 3), (5, 2, 1)))
    assert packed[4].packed_with.departures() == ([2, 5, 5, None], [])
    assert packed[2].packed_with.departures() == ([2, 5], [5, None])
    assert PackedWith.from_record(packed[4].packed_with.as_record()) == packed[4].packed_with
    for i, p in enumerate(trials):
        replayed = fit_as_packed(
            PackMember(p, 10 + i, ends[i]), packed[i].packed_with, train, validation, config, n_out=1
        )
        got, want = replayed.result, packed[i].result
        assert len(got.history) == len(want.history) == {0: 2, 1: 5, 3: 5}.get(i, 8)
        # Losses and weights to the last bit on the CPU; the health statistics, reductions over the whole pack, to
        # rounding (their pack mates' numbers differ from the twins').
        exact = 0.0 if DEVICE.type == "cpu" else TOLERANCE
        for g, w in zip(got.history, want.history, strict=True):
            assert abs(g["train_loss"] - w["train_loss"]) <= exact and abs(g["val_loss"] - w["val_loss"]) <= exact
        assert histories_close(got.history, want.history) <= TOLERANCE
        for key, value in want.state_dict.items():
            torch.testing.assert_close(got.state_dict[key], value, rtol=0.0, atol=exact)
    # A pack of one records nothing: alone is how it trained.
    (alone,) = fit_pack([PackMember(trials[0], 10)], train, validation, config, n_out=1)
    assert alone.packed_with is None


def test_the_eager_engine_remains_selectable_and_replays_its_own_trials(tmp_path):
    raw = {**PACKED_STUDY, "study": {**PACKED_STUDY["study"], "name": "tiny-eager", "n_trials": 2, "pack": 1}}
    raw["study"]["engine"] = "eager"
    spec = spec_from_dict(stored_in(raw, tmp_path, enabled=False))
    result = run_study(spec, device="cpu")
    trials = result.study.get_trials(deepcopy=False)
    assert [t.user_attrs["engine"] for t in trials] == ["eager", "eager"]
    assert trials[0].user_attrs["manifest"]["engine"] == "eager"
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    replay = replay_trial(result.study, spec, complete[0].number, dataset=result.dataset)
    assert replay.matches, replay.summary()


def test_the_eager_engine_cannot_pack():
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"study\.engine: the eager engine trains one trial at a time, got pack=4"):
        spec_from_dict({"study": {"engine": "eager", "pack": 4}})
    assert spec_from_dict({"study": {}}).study.engine == "packed"


def test_packs_are_split_so_that_narrow_trials_are_not_padded_to_a_wide_ones_size():
    from tuner.packed import split_by_cost

    wide, narrow = params(widths=(256, 256)), params(widths=(16, 12))
    trials = [narrow, wide, *[params(widths=(8 + i, 16)) for i in range(6)]]
    packs = split_by_cost(trials, 4, 1)
    assert sorted(i for pack in packs for i in pack) == list(range(8))  # every trial once
    assert [1] in packs  # the wide trial alone
    assert len(packs) == 2
    # Trials of one size are never split.
    assert split_by_cost([params(widths=(64, 64))] * 8, 4, 1) == [list(range(8))]


def test_a_narrow_trial_is_not_padded_to_ten_times_its_width_to_save_a_steps_fixed_cost():
    from tuner.packed import split_by_cost

    # At batch 64 a 24-21 trial computed at 240-68 in a pack costs about 190 us a step; alone, 90 us with the
    # fixed cost of a step (the cost model of bench/bench_split.py).
    trials = [params(widths=(240, 58)), params(widths=(143, 68)), params(widths=(24, 21))]
    packs = split_by_cost(trials, 4, 1)
    assert sorted(i for pack in packs for i in pack) == [0, 1, 2]
    assert not any({0, 2} <= set(pack) for pack in packs)


class _PruneTrialZero(optuna.pruners.BasePruner):
    """Prunes trial 0 at its second epoch; records what trial 1 sees of trial 0 at each of its epochs."""

    def __init__(self) -> None:
        self.seen: dict[int, optuna.trial.TrialState] = {}

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step or 0
        if trial.number == 1:
            self.seen[step] = study.get_trials(deepcopy=False)[0].state
        return trial.number == 0 and step >= 1


def test_a_member_that_leaves_its_pack_is_told_to_optuna_while_the_pack_trains_on(tmp_path):
    space = {
        **TINY_SPACE,
        "n_layers": 1,
        "width": 16,
        "batch_size": 128,
        "optimizer": "adam",
        "activation": "relu",
        "batch_norm": False,
    }
    raw = {
        "data": TINY_DATA,
        "search_space": space,
        "train": {"max_epochs": 6, "patience": 6},
        "study": {"name": "early-tell", "n_trials": 2, "seed": 0, "pack": 2},
    }
    spec = spec_from_dict(stored_in(raw, tmp_path, plots=False))
    pruner = _PruneTrialZero()
    study = run_study(spec, pruner=pruner, device="cpu").study
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    # Trained together: trial 0 was still running at trial 1's first epoch ...
    assert pruner.seen[0] == optuna.trial.TrialState.RUNNING
    # ... and was recorded PRUNED while trial 1 still trained, not when the pack ended.
    assert pruner.seen[5] == optuna.trial.TrialState.PRUNED
    assert study.trials[0].datetime_complete < study.trials[1].datetime_complete


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "nesterov"])
def test_the_fused_update_agrees_with_the_foreach_update(optimizer, monkeypatch):
    # torch's fused kernels (one call per member) against the _foreach ops over the whole pack: rounding apart,
    # the same update; a momentum of 0 (no momentum buffer) included. The gradients are given, not computed from
    # the weights: over whole epochs Adam scales rounding noise in near-zero gradients up to lr-sized steps, and
    # a GPU's fused kernel (double-precision arithmetic inside) rounds differently from the _foreach ops.
    import tuner.packed as packed_mod

    trials = [*varied(optimizer=optimizer), params(optimizer=optimizer, momentum=0.0)]
    members = [PackMember(p, 5 + i) for i, p in enumerate(trials)]
    packs = {}
    for fused in (True, False):
        monkeypatch.setattr(packed_mod, "_FUSED_DEVICES", (DEVICE.type,) if fused else ())
        packs[fused] = packed_mod._Pack(members, 4, 1, DEVICE)
        assert packs[fused].fused is fused
    start = packs[True].parameters()[0].detach().clone()
    gradients = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gradients).to(DEVICE) for p in packs[True].parameters()]
        for pack in packs.values():
            for buffer, g in zip(pack.grads, grads, strict=True):
                buffer.copy_(g)
            pack.step()
    # SGD without momentum keeps no buffer in the fused kernel (torch.optim.SGD's way): its row is not compared.
    rows = [i for i, p in enumerate(trials) if p.momentum > 0 or optimizer.startswith("adam")]
    for name, fused_tensors in [("parameters", packs[True].parameters()), *packs[True].state.items()]:
        plain_tensors = packs[False].parameters() if name == "parameters" else packs[False].state[name]
        for got, want in zip(fused_tensors, plain_tensors, strict=True):
            if name != "parameters":
                got, want = got[rows], want[rows]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # Not vacuous: the five steps moved the weights.
    assert not torch.allclose(packs[True].parameters()[0], start, atol=1e-3)


def test_a_restart_while_one_member_is_judged_loses_that_member_alone(tmp_path, monkeypatch):
    # Its pack mates are still training: failing them too for one lost connection would repeat their work.
    from sqlalchemy.exc import OperationalError

    from tuner import study as study_module
    from tuner.worker import RETRY_OF

    raw = {**PACKED_STUDY, "study": {**PACKED_STUDY["study"], "name": "lost-member", "n_trials": 3, "pack": 3}}
    spec = spec_from_dict(stored_in(raw, tmp_path, plots=False))
    real_record_trial = study_module.record_trial
    lost: list[int] = []

    def record_trial_losing_the_first_judged(trial, attrs, intermediate_values=None):
        if "best_epoch" in attrs and not lost:
            lost.append(trial.number)
            raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
        return real_record_trial(trial, attrs, intermediate_values)

    monkeypatch.setattr(study_module, "record_trial", record_trial_losing_the_first_judged)
    study = run_study(spec, device="cpu").study
    [number] = lost
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL" if t.number == number else "COMPLETE" for t in study.trials[:3]] + ["COMPLETE"]
    retry = study.trials[3]
    assert retry.user_attrs[RETRY_OF] == number and retry.params == study.trials[number].params
    # The lost trial's MLflow run is closed as failed, the others' as finished. The lost trial's end, which
    # records its run's id, was not stored: its run is found by its tags.
    client = MlflowClient(spec.tracking.uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {
        int(r.data.tags["optuna.trial_number"]): r
        for r in client.search_runs(experiments, "tags.`optuna.study_name` = 'lost-member'")
        if r.data.tags.get("tuner.kind") == "trial"
    }
    assert "mlflow_run_id" not in study.trials[number].user_attrs
    assert all(runs[t.number].info.run_id == t.user_attrs["mlflow_run_id"] for t in study.trials if t.number != number)
    statuses = [runs[t.number].info.status for t in study.trials]
    assert statuses == ["FAILED" if t.number == number else "FINISHED" for t in study.trials]


def test_each_trials_line_gives_its_own_wall_time_also_when_a_pack_ends_together(tmp_path, capsys):
    # Trials leaving a pack at one epoch are printed one right after the other: the time since the previous
    # line would show 0.0 s for all but the first.
    import re

    import yaml

    from tuner.cli import main

    raw = stored_in(
        {
            **PACKED_STUDY,
            # One shape: the four trials train as one pack and leave it together.
            "search_space": {
                **PACKED_STUDY["search_space"],
                "width": {"value": 16},
                "activation": {"value": "relu"},
                "batch_norm": {"value": False},
            },
            "train": {"max_epochs": 80, "patience": 80},
            "study": {
                **{k: v for k, v in PACKED_STUDY["study"].items() if k != "pruner_options"},
                "name": "timed",
                "n_trials": 4,
                "pruner": "none",
            },
        },
        tmp_path,
        enabled=False,
    )
    path = tmp_path / "timed.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet", "--device", "cpu"]) == 0
    printed = {
        int(number): float(seconds)
        for number, seconds in re.findall(r"trial\s+(\d+) COMPLETE .*?epochs 80\s+([\d.]+)s", capsys.readouterr().out)
    }
    study = optuna.load_study(study_name="timed", storage=raw["study"]["storage"])
    own = {t.number: t.duration.total_seconds() for t in study.trials if t.duration is not None}
    assert sorted(printed) == sorted(own) == [0, 1, 2, 3]
    # Printed to 0.1 s; the storage's end differs from the callback's by the tell's few milliseconds.
    assert min(own.values()) > 0.15, "the trials ran too fast for their times to tell the two readings apart"
    for number, seconds in printed.items():
        assert seconds == pytest.approx(own[number], abs=0.08)


def test_each_members_dropout_masks_drop_its_own_rate_of_its_own_units():
    import tuner.packed as packed_mod

    rates = [0.0, 0.1, 0.3, 0.5]
    members = [PackMember(params(widths=(16 + 8 * i, 8), dropout=p), i) for i, p in enumerate(rates)]
    pack = packed_mod._Pack(members, 4, 1, DEVICE)
    steps = 3 * pack.dropout_chunk  # three refills of every member's masks
    seen: list[list[torch.Tensor]] = [[] for _ in range(pack.depth)]
    for _ in range(steps):
        pack.next_dropout()
        for layer in range(pack.depth):
            seen[layer].append(pack._dropout_masks[layer][pack._dropout_step].clone())
    for layer in range(pack.depth):
        masks = torch.stack(seen[layer]).cpu()  # (steps, K, rows, widest)
        for row, p in enumerate(rates):
            width = members[row].params.widths[layer]
            own, padded = masks[:, row, :, :width], masks[:, row, :, width:]
            assert torch.all(padded == 1.0), "padded units are never dropped nor scaled"
            dropped = float((own == 0).float().mean())
            n = own.numel()
            assert abs(dropped - p) <= 4 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9, (layer, p, dropped, n)
            kept = own[own != 0]
            assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4), (layer, p)
    # The refills draw anew: a member's masks of one step and of a later chunk differ.
    assert not torch.equal(seen[0][0][3], seen[0][pack.dropout_chunk][3])


@pytest.mark.parametrize("batch_norm", [False, True], ids=["", "batch_norm"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "elu"])
@pytest.mark.parametrize(
    "task, n_out, loss, pos_weight",
    [
        ("binary", 1, None, None),
        ("binary", 1, None, 3.0),
        ("multiclass", 3, None, None),
        ("multilabel", 2, None, (2.0, 0.5)),
        ("regression", 1, "huber", None),
        ("unit_regression", 1, "bce", None),
    ],
    ids=["binary", "binary-pos_weight", "multiclass", "multilabel", "regression-huber", "unit_regression-bce"],
)
def test_the_gradients_computed_by_hand_are_autograds(activation, batch_norm, task, n_out, loss, pos_weight):
    import tuner.packed as packed_mod

    shared = {
        "activation": activation,
        "batch_norm": batch_norm,
        "loss": loss,
        "huber_delta": 0.5 if loss == "huber" else None,
    }
    members = [
        PackMember(params(widths=(16, 8), dropout=0.3, l1=1e-3, **shared), 3),
        PackMember(params(widths=(8, 12), dropout=0.0, lr=0.1, **shared), 4),
    ]
    pack = packed_mod._Pack(members, 4, n_out, DEVICE)
    pack.next_dropout()
    g = torch.Generator().manual_seed(1)
    rows = 24  # fewer than the batch size, as a last batch is: the dropout masks are cut to it
    x = torch.randn(2, rows, 4, generator=g).to(DEVICE)
    if task == "multiclass":
        y = torch.randint(0, n_out, (2, rows), generator=g)
    elif task == "multilabel":
        y = (torch.rand(2, rows, n_out, generator=g) < 0.4).float()
    elif task == "binary":
        y = (torch.rand(2, rows, generator=g) < 0.4).float()
    else:
        y = torch.rand(2, rows, generator=g)
    y = y.to(DEVICE)
    config = FitConfig(task=task, pos_weight=pos_weight)
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=DEVICE)
    tensors = pack.parameters()
    running = [t.clone() for t in (*pack.running_means, *pack.running_vars)]

    watched_by_hand: list[torch.Tensor] = []
    losses_by_hand = pack.gradients(x, y, config, weight, watch=watched_by_hand)
    by_hand = [g.clone() for g in pack.grads]
    running_by_hand = [t.clone() for t in (*pack.running_means, *pack.running_vars)]
    for t in tensors:
        t.requires_grad_()
    for t, before in zip((*pack.running_means, *pack.running_vars), running, strict=True):
        t.copy_(before)
    watched: list[torch.Tensor] = []
    logits = pack.forward(x, training=True, watch=watched)
    losses = packed_mod._losses(logits, y, config, weight, pack)
    l1_norms = torch.stack([w.abs().sum(dim=(1, 2)) for w in pack.weights]).sum(dim=0)
    (losses.sum() + (pack.l1 * l1_norms).sum()).backward()

    # On the CPU to the last bit, so that trials recorded with autograd's gradients replay exactly; elsewhere
    # (a GPU) to rounding, the kernels there being free to differ.
    exact = {"rtol": 0.0, "atol": 0.0} if DEVICE.type == "cpu" else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(losses_by_hand, losses.detach(), **exact)
    for i, (got, want) in enumerate(zip(by_hand, [t.grad for t in tensors], strict=True)):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, **exact, msg=lambda m, i=i: f"tensor {i}: {m}")
    # Batch norm's running statistics are updated once, as autograd's forward updates them.
    for got, want in zip(running_by_hand, (*pack.running_means, *pack.running_vars), strict=True):
        torch.testing.assert_close(got, want)
    assert len(running_by_hand) == (4 if batch_norm else 0)
    assert len(watched_by_hand) == len(watched) == pack.depth
    for got, want in zip(watched_by_hand, watched, strict=True):
        torch.testing.assert_close(got, want)
    # Not vacuous: the first member drops units in this step, and the gradients are not all zero.
    assert bool((pack.step_masks[0][0, :rows, :16] == 0).any())
    assert float(by_hand[0][1].abs().sum()) > 0


@pytest.mark.parametrize(
    "shared",
    [{}, {"activation": "tanh", "batch_norm": True, "optimizer": "nesterov"}, {"activation": "sigmoid", "l1": 1e-3}],
    ids=["relu-adam", "tanh-batch_norm-nesterov", "sigmoid-l1"],
)
def test_a_fit_with_gradients_by_hand_is_the_fit_with_autograds(shared, monkeypatch):
    # Trials recorded when a pack's gradients came from autograd replay to the same numbers.
    import tuner.packed as packed_mod

    def with_autograd(pack, x, y, config, pos_weight, watch=None):
        tensors = pack.parameters()
        for t in tensors:
            t.requires_grad_()
        with torch.enable_grad():
            losses = packed_mod._losses(pack.forward(x, training=True, watch=watch), y, config, pos_weight, pack)
            penalty = sum(w.abs().sum(dim=(1, 2)) for w in pack.weights) * pack.l1
            grads = torch.autograd.grad((losses.sum() + penalty.sum()), tensors)
        for t, buffer, g in zip(tensors, pack.grads, grads, strict=True):
            t.requires_grad_(False)
            buffer.copy_(g)
        return losses.detach()

    train, validation = toy_parts(device=DEVICE)
    # A batch of 48 rows: 1 / 48 is inexact, so a mean's derivative taken another way would show.
    trials = varied(**shared, batch_size=48)
    fits = {}
    for how in ("by hand", "autograd"):
        if how == "autograd":
            monkeypatch.setattr(packed_mod._Pack, "gradients", with_autograd)
        members = [PackMember(p, 10 + i) for i, p in enumerate(trials)]
        fits[how] = fit_pack(members, train, validation, CONFIG, n_out=1)
    # To the last bit on the CPU; on a GPU to the packed engine's rounding tolerance.
    tolerance = 0.0 if DEVICE.type == "cpu" else TOLERANCE
    for got, want in zip(fits["by hand"], fits["autograd"], strict=True):
        assert histories_close(got.result.history, want.result.history) <= tolerance
        for key, value in want.result.state_dict.items():
            torch.testing.assert_close(got.result.state_dict[key], value, rtol=0.0, atol=tolerance)
    assert len(fits["by hand"][0].result.history) > 1


def test_a_packed_trial_whose_weights_are_missing_is_exported_retrained_to_the_same_weights(packed_study, tmp_path):
    import shutil
    from urllib.parse import unquote, urlparse

    from tuner.export import export_trial

    study, spec = packed_study["study"], packed_study["spec"]
    trial = next(t for t in study.trials if t.state.name == "COMPLETE" and "packed_with" in t.user_attrs)
    run = MlflowClient(spec.tracking.uri).get_run(trial.user_attrs["mlflow_run_id"])
    weights = Path(unquote(urlparse(run.info.artifact_uri).path)) / "model" / "state_dict.pt"
    original = torch.load(weights, weights_only=True)
    shutil.move(weights, tmp_path / "kept.pt")
    try:
        result = export_trial(study, spec, trial_number=trial.number, out=tmp_path / "model", log_to_mlflow=False)
    finally:
        shutil.move(tmp_path / "kept.pt", weights)
    assert result.retrained
    retrained = torch.load(result.path / "artifacts" / "state_dict.pt", weights_only=True)
    assert retrained.keys() == original.keys()
    for key, value in original.items():
        if DEVICE.type == "cpu":
            assert torch.equal(retrained[key], value), key
        else:
            torch.testing.assert_close(retrained[key], value, rtol=0.0, atol=TOLERANCE)
