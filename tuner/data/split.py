"""One stratified train / validation / holdout split, fixed by the data seed, and k folds of train + validation."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tuner.config import SplitSpec
from tuner.errors import DataError


@dataclass(frozen=True)
class SplitIndices:
    """Row indices of each part; disjoint, together every row once."""

    train: np.ndarray
    validation: np.ndarray
    holdout: np.ndarray

    def modelling(self) -> np.ndarray:
        """The train and validation rows, sorted: what k-fold cross-validation cuts into folds."""
        return np.sort(np.concatenate([self.train, self.validation]))

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
    # Imported here (about 1 s): a process that reads the split its study recorded never needs scikit-learn.
    from sklearn.model_selection import train_test_split

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
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return tuple(np.sort(rows[held]) for _, held in splitter.split(rows, labels[rows]))


#: Row codes of :func:`encode_rows`: the part of each row, and the fold of each modelling row (holdout rows none).
TRAIN, VALIDATION, HOLDOUT = 0, 1, 2
NO_FOLD = 255


def encode_rows(split: SplitIndices, folds: Sequence[np.ndarray], n_rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Each row's part (uint8, :data:`TRAIN` / :data:`VALIDATION` / :data:`HOLDOUT`), and each row's fold
    (uint8, :data:`NO_FOLD` for holdout rows), or None without folds."""
    parts = np.full(n_rows, TRAIN, dtype=np.uint8)
    parts[split.validation] = VALIDATION
    parts[split.holdout] = HOLDOUT
    if not folds:
        return parts, None
    fold_of = np.full(n_rows, NO_FOLD, dtype=np.uint8)
    for index, rows in enumerate(folds):
        fold_of[rows] = index
    return parts, fold_of


def decode_rows(parts: np.ndarray, fold_of: np.ndarray | None, k: int) -> tuple[SplitIndices, tuple[np.ndarray, ...]]:
    """The split and folds :func:`encode_rows` was given: the same sorted int64 row indices."""
    split = SplitIndices(*(np.flatnonzero(parts == code) for code in (TRAIN, VALIDATION, HOLDOUT)))
    folds = () if fold_of is None else tuple(np.flatnonzero(fold_of == index) for index in range(k))
    return split, folds


def rows_digest(parts: np.ndarray, fold_of: np.ndarray | None) -> str:
    """A hash of which row went where."""
    digest = hashlib.sha256(parts.tobytes())
    if fold_of is not None:
        digest.update(fold_of.tobytes())
    return digest.hexdigest()[:16]


def pack_codes(codes: np.ndarray, bits: int = 8) -> str:
    """Codes below ``2**bits`` as compact text for a JSON attribute; ``bits`` 2 (four rows a byte) or 8."""
    if bits == 2:
        padded = np.zeros(-(-len(codes) // 4) * 4, dtype=np.uint8)
        padded[: len(codes)] = codes
        quads = padded.reshape(-1, 4)
        codes = quads[:, 0] | quads[:, 1] << 2 | quads[:, 2] << 4 | quads[:, 3] << 6
    return base64.b64encode(zlib.compress(codes.tobytes(), 9)).decode("ascii")


def unpack_codes(text: str, n_rows: int, bits: int = 8) -> np.ndarray:
    """The codes :func:`pack_codes` was given.

    Raises:
        ValueError: The text is not such codes for ``n_rows`` rows.
    """
    if not isinstance(text, str):
        raise ValueError(f"packed row codes are text, got {type(text).__name__}")
    try:
        raw = np.frombuffer(zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True)), dtype=np.uint8)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"not packed row codes: {exc}") from None
    if bits == 2:
        raw = np.stack([(raw >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1).ravel()
        if len(raw) - n_rows not in range(4):
            raise ValueError(f"packed codes for about {len(raw)} rows, expected {n_rows}")
        raw = raw[:n_rows]
    if len(raw) != n_rows:
        raise ValueError(f"packed codes for {len(raw)} rows, expected {n_rows}")
    return raw.copy()
