"""The tiny study many tests run: a small simulated catalogue, a narrow search space, few epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tuner.space import TrialParams

TINY_DATA: dict[str, Any] = {"simulated": {"n_star": 1500, "n_quasar": 150}, "seed": 3}
TINY_SPACE: dict[str, Any] = {
    "n_layers": {"low": 1, "high": 2},
    "width": {"low": 8, "high": 32, "log": True},
    "lr": {"low": 1e-3, "high": 3e-2, "log": True},
    "batch_size": {"low": 128, "high": 256, "log": True, "powers_of_two": True},
    "optimizer": {"choices": ["adam", "nesterov"]},
}


def stored_in(raw: dict[str, Any], root: Path, **tracking: Any) -> dict[str, Any]:
    """The study file with its Optuna storage and MLflow store inside ``root``."""
    return {
        **raw,
        "study": {**raw["study"], "storage": f"sqlite:///{root}/optuna.db"},
        "tracking": {"uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_location": str(root / "art"), **tracking},
    }


class Part:
    """Features and labels, as training takes them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


def toy_parts(seed: int = 0, device: torch.device | str = "cpu") -> tuple[Part, Part]:
    """A noisy, learnable binary problem in four features: 400 training and 200 validation rows, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(600, 4, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.8 * torch.randn(600, generator=g)) > 1.0).long()
    x, y = x.to(device), y.to(device)
    return Part(x[:400], y[:400]), Part(x[400:], y[400:])


def trial_params(**changes: Any) -> TrialParams:
    """A small trial's parameters (two ReLU layers, Adam, no dropout or decay), with ``changes`` applied."""
    base: dict[str, Any] = {
        "n_layers": 2,
        "widths": (32, 16),
        "lr": 0.01,
        "momentum": 0.9,
        "dropout": 0.0,
        "weight_decay": 0.0,
        "batch_size": 32,
        "optimizer": "adam",
        "activation": "relu",
        "init": "he",
        "batch_norm": False,
    }
    return TrialParams(**{**base, **changes})


#: A narrow space for the task tests: one layer, Adam, a fixed batch size.
TASK_SPACE: dict[str, Any] = {
    "n_layers": {"value": 1},
    "width": {"low": 8, "high": 32, "log": True},
    "lr": {"low": 3e-3, "high": 3e-2, "log": True},
    "batch_size": {"value": 64},
    "optimizer": {"value": "adam"},
    "batch_norm": False,
}


def write_task_table(path: Path, *, n: int, seed: int) -> Path:
    """A learnable catalogue for every task: features a-d, a value far from unit scale, a value in [0, 1], a 0/1
    label and a class column with three classes."""
    rng = np.random.default_rng(seed)
    a, b, c, d = rng.normal(size=(4, n))
    value = 3.0 + 2.0 * np.sin(a) + b + 0.2 * rng.normal(size=n)
    frame = pd.DataFrame(
        {
            "a": a,
            "b": b,
            "c": c,
            "d": d,
            "value": 100.0 * value,  # far from unit scale: the network sees it standardised
            "fraction": 1.0 / (1.0 + np.exp(-(a + 0.5 * b))),
            "bright": (a + 0.3 * rng.normal(size=n) > 0.5).astype(int),
            "kind": np.where(b + c > 0.5, "X", np.where(a > 0, "Y", "Z")),
        }
    )
    frame.to_csv(path, index=False)
    return path
