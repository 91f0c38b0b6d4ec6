"""tuner: hyperparameter tuning and experiment tracking for neural-network classifiers on tabular catalogues."""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

from tuner.config import StudySpec, load_spec, spec_from_dict
from tuner.errors import ConfigError, DataError, StorageError, TrackingError, TunerError

__all__ = [
    "ConfigError",
    "DataError",
    "StorageError",
    "StudySpec",
    "TrackingError",
    "TunerError",
    "__version__",
    "load_spec",
    "run_study",
    "spec_from_dict",
]


def run_study(*args: Any, **kwargs: Any) -> Any:
    """Run or continue a study; see :func:`tuner.study.run_study` (imported lazily: torch and optuna are slow)."""
    from tuner.study import run_study as _run_study

    return _run_study(*args, **kwargs)
