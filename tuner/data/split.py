"""One stratified train / validation / holdout split, fixed by the data seed, and k folds of train + validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from tuner.config import SplitSpec
from tuner.errors import DataError


@dataclass(frozen=True)
class SplitIndices:
    """Row indices of each part; disjoint, together every row once."""

    train: np.ndarray
    validation: np.ndarray
    holdout: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "holdout": len(self.holdout)}


def stratified_split(labels: np.ndarray, spec: SplitSpec, seed: int, class_names: tuple[str, ...]) -> SplitIndices:
    """Split rows so each part keeps the class proportions.

    Args:
        labels: Integer class of each row.
        spec: Validation and holdout fractions.
        seed: The data seed; the same seed gives the same split.
        class_names: For messages.

    Returns:
        The indices of each part.

    Raises:
        DataError: A class is too rare to appear in every part.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    smallest = min(spec.validation, spec.holdout, spec.train_fraction)
    for name, count in zip(class_names, counts, strict=True):
        if count * smallest < 1:
            raise DataError(
                f"data.split: class {name!r} has {int(count)} rows, too few to stratify a split with a "
                f"{smallest * 100:.3g}% part (needs at least {int(np.ceil(1 / smallest))})"
            )
    rows = np.arange(len(labels))
    rest, holdout = train_test_split(rows, test_size=spec.holdout, stratify=labels, random_state=seed)
    # Validation as a fraction of what is left after the holdout, so the fractions refer to the whole catalogue.
    val_share = spec.validation / (1.0 - spec.holdout)
    train, validation = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed + 1)
    split = SplitIndices(np.sort(train), np.sort(validation), np.sort(holdout))
    for part, idx in (("train", split.train), ("validation", split.validation), ("holdout", split.holdout)):
        missing = set(range(len(class_names))) - set(np.unique(labels[idx]).tolist())
        if missing:
            names = ", ".join(repr(class_names[m]) for m in sorted(missing))
            raise DataError(f"data.split: the {part} part has no rows of class {names}; the class is too rare")
    return split


def stratified_folds(
    labels: np.ndarray, rows: np.ndarray, k: int, seed: int, class_names: tuple[str, ...]
) -> tuple[np.ndarray, ...]:
    """Cut the modelling rows into k folds that each keep the class proportions.

    Args:
        labels: Integer class of every row of the catalogue.
        rows: The modelling rows (train + validation of the split); the holdout is never among them.
        k: Number of folds.
        seed: The data seed; the same seed gives the same folds.
        class_names: For messages.

    Returns:
        Each fold's row indices (sorted); disjoint, together every modelling row once.

    Raises:
        DataError: A class has fewer modelling rows than folds, so some fold would have none of it.
    """
    counts = np.bincount(labels[rows], minlength=len(class_names))
    for name, count in zip(class_names, counts, strict=True):
        if count < k:
            listing = ", ".join(f"{n}={int(c)}" for n, c in zip(class_names, counts, strict=True))
            raise DataError(
                f"validation.k: class {name!r} has {int(count)} rows in the modelling set (train + validation: "
                f"{listing}), fewer than k={k} folds, so some fold would have none of it; lower validation.k to at "
                f"most {int(counts.min())}"
            )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return tuple(np.sort(rows[held]) for _, held in splitter.split(rows, labels[rows]))
