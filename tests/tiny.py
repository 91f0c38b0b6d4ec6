"""The tiny study many tests run: a small simulated catalogue, a narrow search space, few epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
