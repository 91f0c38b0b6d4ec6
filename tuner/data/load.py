"""User catalogues (CSV, Parquet) and the simulated default: columns selected, colours derived, rows validated."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tuner.config import DataSpec
from tuner.errors import DataError

#: Fewest rows of a class that a stratified train / validation / holdout split can place in every part.
MIN_PER_CLASS = 3


@dataclass(frozen=True)
class Catalogue:
    """Validated rows: a float32 feature matrix, integer labels and the names that explain them."""

    features: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64: index into class_names
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]  # binary: ("rest", positive)
    ids: pd.DataFrame  # id columns, same row order
    source: str
    data_hash: str

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (optionally compressed) or Parquet catalogue.

    Raises:
        DataError: The file is missing, of an unknown type, or unreadable.
    """
    if not path.is_file():
        raise DataError(f"data.source: catalogue file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if ".parquet" in suffixes or ".pq" in suffixes:
            return pd.read_parquet(path)
        if ".csv" in suffixes or ".tsv" in suffixes:
            return pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",")
    except (OSError, ValueError) as exc:
        raise DataError(f"data.source: cannot read {path}: {exc}") from None
    raise DataError(
        f"data.source: unknown file type {''.join(path.suffixes)!r} for {path}; use .csv, .csv.gz, .tsv or .parquet"
    )


def _column(frame: pd.DataFrame, name: str, key: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    hint = difflib.get_close_matches(name, [str(c) for c in frame.columns], n=1, cutoff=0.6)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise DataError(
        f"{key}: column {name!r} not in the catalogue{suggestion}; columns: {', '.join(map(str, frame.columns))}"
    )


def derive_feature(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column as it is, or a colour ``a-b`` derived as the difference of two magnitude columns.

    Raises:
        DataError: Neither the column nor both magnitudes exist.
    """
    if name in frame.columns:
        return frame[name]
    left, sep, right = name.partition("-")
    if sep and left in frame.columns and right in frame.columns:
        return _numeric(frame[left], left) - _numeric(frame[right], right)
    if sep and (left in frame.columns) != (right in frame.columns):
        # A colour with one magnitude misspelt ('u-gg'): suggest the colour built from the closest column.
        missing = right if left in frame.columns else left
        hint = _close_columns(frame, missing)
        if hint:
            guess = f"{left}-{hint[0]}" if missing == right else f"{hint[0]}-{right}"
            raise DataError(
                f"data.features: column {name!r} not in the catalogue, nor magnitude {missing!r} to derive "
                f"it (did you mean {guess!r}?); columns: {', '.join(map(str, frame.columns))}"
            )
    return _column(frame, name, "data.features")


def _close_columns(frame: pd.DataFrame, name: str) -> list[str]:
    return difflib.get_close_matches(name, [str(c) for c in frame.columns], n=1, cutoff=0.6)


def _numeric(series: pd.Series, name: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        bad = series[pd.to_numeric(series, errors="coerce").isna() & series.notna()]
        example = repr(bad.iloc[0]) if len(bad) else repr(series.iloc[0]) if len(series) else "none"
        raise DataError(
            f"data.features: column {name!r} must be numeric, got dtype {series.dtype} (e.g. {example} in row "
            f"{bad.index[0] if len(bad) else 0})"
        )
    return series.astype("float64")


def catalogue_from_frame(frame: pd.DataFrame, spec: DataSpec, *, task: str, source: str) -> Catalogue:
    """Select and check the study's columns.

    Args:
        frame: The raw catalogue.
        spec: The data section of the study.
        task: ``binary`` (positive class vs the rest) or ``multiclass`` (every class).
        source: Where the rows came from, for messages and tags.

    Returns:
        The validated catalogue.

    Raises:
        DataError: A missing or non-numeric column, non-finite values, one class only, too few of a class.
    """
    target = _column(frame, spec.target, "data.target")
    for col in spec.id_columns:
        _column(frame, col, "data.id_columns")
    columns = {}
    for name in spec.features:
        columns[name] = _numeric(derive_feature(frame, name), name)
    features = pd.DataFrame(columns)
    for name in spec.features:
        bad = ~np.isfinite(features[name].to_numpy())
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise DataError(
                f"data.features: column {name!r} has {int(bad.sum())} non-finite value(s) (NaN or inf), "
                f"first at rows {rows}; clean or drop them before tuning"
            )
    if target.isna().any():
        rows = np.flatnonzero(target.isna().to_numpy())[:5].tolist()
        raise DataError(
            f"data.target: column {spec.target!r} has {int(target.isna().sum())} missing labels, first at rows {rows}"
        )
    target_str = target.astype(str)
    present = sorted(target_str.unique())
    if task == "binary":
        assert spec.positive is not None
        if spec.positive not in present:
            hint = difflib.get_close_matches(spec.positive, present, n=1, cutoff=0.5)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise DataError(
                f"data.positive: class {spec.positive!r} not found in column {spec.target!r}{suggestion}; "
                f"classes: {', '.join(present[:20])}"
            )
        class_names: tuple[str, ...] = ("rest", spec.positive)
        labels = (target_str == spec.positive).to_numpy().astype(np.int64)
    else:
        class_names = tuple(present)
        lookup = {name: i for i, name in enumerate(class_names)}
        labels = target_str.map(lookup).to_numpy().astype(np.int64)
        if spec.positive is not None and spec.positive not in lookup:
            raise DataError(
                f"data.positive: class {spec.positive!r} not found in column {spec.target!r}; "
                f"classes: {', '.join(present)}"
            )
    counts = np.bincount(labels, minlength=len(class_names))
    if (counts > 0).sum() < 2:
        raise DataError(
            f"data.target: column {spec.target!r} holds a single class ({present[0] if present else 'none'}); "
            "a classifier needs at least two"
        )
    for name, count in zip(class_names, counts, strict=True):
        if count < MIN_PER_CLASS:
            raise DataError(
                f"data.target: class {name!r} has {int(count)} row(s); a stratified train/validation/holdout "
                f"split needs at least {MIN_PER_CLASS}"
            )
    matrix = features.to_numpy(dtype=np.float32)
    digest = hashlib.sha256()
    digest.update(matrix.tobytes())
    digest.update(labels.tobytes())
    digest.update("|".join(spec.features).encode())
    return Catalogue(
        features=matrix,
        labels=labels,
        feature_names=tuple(spec.features),
        class_names=class_names,
        ids=frame[list(spec.id_columns)].reset_index(drop=True),
        source=source,
        data_hash=digest.hexdigest()[:16],
    )
