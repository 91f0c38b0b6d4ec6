"""Feature scaling fitted on the training rows only, kept as plain numbers so it can travel with a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuner.data.load import FLOAT32_MAX
from tuner.errors import DataError


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
        # scikit-learn is imported here (about 1 s): a process that reads the scaling its study recorded never fits.
        if kind == "standardize":
            from sklearn.preprocessing import StandardScaler

            scaler = StandardScaler().fit(x)
            return cls(kind, scaler.mean_.copy(), np.diag(1.0 / scaler.scale_))
        if kind == "pca_whiten":
            from sklearn.decomposition import PCA

            pca = PCA(whiten=True).fit(x)
            # Guard against a zero-variance direction (a constant or duplicated feature).
            variance = np.maximum(pca.explained_variance_, 1e-12)
            return cls(kind, pca.mean_.copy(), pca.components_.T / np.sqrt(variance))
        raise ValueError(f"unknown preprocessing {kind!r}")

    def _scaled(self, features: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return (np.asarray(features, dtype=np.float64) - self.shift) @ self.matrix

    def transform(self, features: np.ndarray) -> np.ndarray:
        """The scaled rows as float32, what the network is fed.

        Raises:
            DataError: A scaled value lies beyond what float32 holds (see :meth:`problem` for a message that
                names the column and the row); it would turn into inf, and the network's output into NaN.
        """
        scaled = self._scaled(features)
        beyond = ~(np.abs(scaled) <= FLOAT32_MAX)
        if beyond.any():
            row, column = (int(i[0]) for i in np.nonzero(beyond))
            raise DataError(
                f"row {row}: the {self.kind} scaling takes column {column} to {scaled[row, column]:.6g}, beyond what "
                f"float32 holds (±{FLOAT32_MAX:.2g}; the network computes in float32)"
            )
        return scaled.astype(np.float32)

    def problem(self, features: np.ndarray, names: Sequence[str], rows: np.ndarray | None = None) -> str | None:
        """What is wrong with rows that this scaling takes beyond what float32 holds, or None when none is.

        A row far enough from the training rows (3e+38 where their standard deviation is 0.5, say)
        overflows float32 once scaled, though every raw value fits.

        Args:
            features: The rows, unscaled, each value within float32's range.
            names: The features, for the message.
            rows: The rows' numbers, for the message (their positions in ``features`` when None).

        Returns:
            "column 'u-g' row 812 holds 3e+38, which the scaling fitted on the training rows (standardize: mean
            0.52, standard deviation 0.31) takes to 9.7e+38, beyond what float32 holds (±3.4e+38) ..."
        """
        x = np.asarray(features, dtype=np.float64)
        scaled = self._scaled(x)
        beyond = ~(np.abs(scaled) <= FLOAT32_MAX)
        if not beyond.any():
            return None
        bad_rows = np.flatnonzero(beyond.any(axis=1))
        numbers = np.arange(len(x)) if rows is None else np.asarray(rows)
        first = int(bad_rows[0])
        column = int(np.flatnonzero(beyond[first])[0])
        limit = f"beyond what float32 holds (±{FLOAT32_MAX:.2g}; the network computes in float32)"
        if self.kind == "pca_whiten":
            shown = ", ".join(f"{n} = {v:.6g}" for n, v in zip(names, x[first], strict=True))
            message = (
                f"row {int(numbers[first])} ({shown}) is taken by the scaling fitted on the training rows "
                f"(pca_whiten) to {scaled[first, column]:.6g} in component {column + 1}, {limit}"
            )
        else:
            std = 1.0 / float(self.matrix[column, column])
            message = (
                f"column {names[column]!r} row {int(numbers[first])} holds {x[first, column]:.6g}, which the scaling "
                f"fitted on the training rows ({self.kind}: mean {float(self.shift[column]):.6g}, standard "
                f"deviation {std:.6g}) takes to {scaled[first, column]:.6g}, {limit}"
            )
        if bad_rows.size > 1:
            message += f"; {bad_rows.size} rows are, first at rows {numbers[bad_rows[:5]].tolist()}"
        return message

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": self.shift.tolist(), "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessor:
        return cls(raw["kind"], np.asarray(raw["shift"], dtype=np.float64), np.asarray(raw["matrix"], dtype=np.float64))
