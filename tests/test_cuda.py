"""On a CUDA device: no host synchronisation per optimizer step, in the eager and in the packed engine.

Skipped without a GPU; bench/gpu_check.sh runs them on one. torch's sync debug mode warns at every call that
waits for the device (``.item()``, ``.tolist()``, a copy to the host, a data-dependent shape). An epoch may wait
a few times (its train and validation loss, the early-stopping decision); a step must not: so an epoch of many
steps waits exactly as often as an epoch of one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from tiny import toy_parts, trial_params

from tuner.model import build_mlp
from tuner.packed import PackMember, fit_pack
from tuner.train import FitConfig, fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (bench/gpu_check.sh runs these)"),
]

EPOCHS = 3
# Every epoch runs (no early stop), so both runs end after the same number of epochs.
CONFIG = FitConfig(max_epochs=EPOCHS, patience=EPOCHS)


def synchronisations(run: Callable[[], object]) -> int:
    """How many times ``run`` made the host wait for the device."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def eager(batch_size: int) -> Callable[[], object]:
    train, validation = toy_parts(device="cuda")
    params = trial_params(batch_size=batch_size, dropout=0.1)
    model = build_mlp(4, params, 1, generator=torch.Generator().manual_seed(0)).to("cuda")
    return lambda: fit(model, train, validation, params, CONFIG, seed=0)


def packed(batch_size: int) -> Callable[[], object]:
    train, validation = toy_parts(device="cuda")
    members = [
        PackMember(trial_params(batch_size=batch_size, dropout=0.1, lr=lr, widths=(16, 8)), seed)
        for seed, lr in enumerate((0.01, 0.003, 0.03))
    ]
    return lambda: fit_pack(members, train, validation, CONFIG, n_out=1)


@pytest.mark.parametrize("engine", [eager, packed], ids=["eager", "packed"])
def test_an_epoch_of_many_steps_waits_for_the_device_as_often_as_an_epoch_of_one(engine):
    engine(400)()  # warm-up: first-call allocations and library loading are not the loop's
    one_step = synchronisations(engine(400))  # 400 training rows: one step per epoch
    many_steps = synchronisations(engine(25))  # sixteen steps per epoch
    assert one_step > 0, "the sync debug mode saw nothing: the check would pass vacuously"
    assert many_steps == one_step, f"{many_steps} waits with 16 steps per epoch against {one_step} with 1"
