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
def test_the_host_waits_for_the_device_per_epoch_not_per_step(engine):
    engine(400)()  # warm-up: first-call allocations and library loading are not the loop's
    one_step = synchronisations(engine(400))  # 400 training rows: one step per epoch
    many_steps = synchronisations(engine(25))  # sixteen steps per epoch
    more_steps = synchronisations(engine(10))  # forty steps per epoch
    assert one_step > 0, "the sync debug mode saw nothing: the check would pass vacuously"
    # A wait per step would add at least 15 (or 39). The epoch's own few waits need not be equal across batch
    # sizes: an H200 showed 10 with one step and 9 with sixteen.
    assert max(many_steps, more_steps) <= one_step + 2, (
        f"waits per epoch: {one_step} with 1 step, {many_steps} with 16, {more_steps} with 40"
    )
