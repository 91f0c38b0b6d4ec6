"""Feature scaling fitted on the training rows only, kept as plain numbers so it can travel with a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class Preprocessor:
    """An affine map ``(x - shift) @ matrix``: standardisation, PCA whitening or the identity.

    Storing every kind as one shift and one matrix keeps the artifact a few numbers (no pickle) and lets the
    same two tensor ops run on the device.
    """

    kind: str
    shift: np.ndarray  # (d,)
    matrix: np.ndarray  # (d, d)

    @classmethod
    def fit(cls, kind: str, train_features: np.ndarray) -> Preprocessor:
        """Fit on the training rows.

        Args:
            kind: ``standardize``, ``pca_whiten`` or ``none``.
            train_features: The training rows only, never validation or holdout.

        Returns:
            The fitted preprocessor.
        """
        x = np.asarray(train_features, dtype=np.float64)
        d = x.shape[1]
        if kind == "none":
            return cls(kind, np.zeros(d), np.eye(d))
        if kind == "standardize":
            scaler = StandardScaler().fit(x)
            return cls(kind, scaler.mean_.copy(), np.diag(1.0 / scaler.scale_))
        if kind == "pca_whiten":
            pca = PCA(whiten=True).fit(x)
            # Guard against a zero-variance direction (a constant or duplicated feature).
            variance = np.maximum(pca.explained_variance_, 1e-12)
            return cls(kind, pca.mean_.copy(), pca.components_.T / np.sqrt(variance))
        raise ValueError(f"unknown preprocessing {kind!r}")

    def transform(self, features: np.ndarray) -> np.ndarray:
        return ((np.asarray(features, dtype=np.float64) - self.shift) @ self.matrix).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": self.shift.tolist(), "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessor:
        return cls(raw["kind"], np.asarray(raw["shift"], dtype=np.float64), np.asarray(raw["matrix"], dtype=np.float64))
