"""User catalogues (CSV, Parquet) and the simulated default: columns selected, colours derived, rows validated."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from tuner.config import CONDITION, REGRESSION_TASKS, DataSpec
from tuner.errors import DataError

T = TypeVar("T")

#: Fewest rows of a class that a stratified train / validation / holdout split can place in every part.
MIN_PER_CLASS = 3
#: A regression's rows are stratified by target quantile: at most this many bins, of at least MIN_PER_BIN rows.
MAX_BINS = 10
MIN_PER_BIN = 50
#: A multilabel combination of labels rarer than this is stratified together with the other rare ones.
MIN_PER_COMBINATION = 10
#: The largest magnitude float32 holds. The network computes in float32 and the feature matrix is float32, so a
#: larger value, finite as read (float64), would turn into inf there and every loss or score it touches into NaN.
#: Values up to it are safe where tuner works in float64 (the scaling's mean and variance, a regression target's
#: standardisation, the metrics): their squares (at most 1.2e77) summed over even 1e200 rows stay finite.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Catalogue:
    """Validated rows: a float32 feature matrix, integer labels and the names that explain them."""

    features: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64: index into class_names; the strata of the split for the other tasks
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]  # binary: ("rest", positive); regression, multilabel: names of the strata
    ids: pd.DataFrame  # id columns, same row order
    source: str
    data_hash: str
    # Regression: (n,) float64 values; multilabel: (n, L) 0/1 float64; None for the single-label tasks.
    targets: np.ndarray | None = None
    target_names: tuple[str, ...] = ()  # the target column, or the multilabel labels

    @property
    def n_rows(self) -> int:
        return int(self.labels.shape[0])


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (optionally compressed) or Parquet catalogue.

    Raises:
        DataError: The file is missing, of an unknown type, or unreadable.
    """
    if path.is_dir():
        raise DataError(f"data.source: {path} is a directory; name a catalogue file in it")
    if not path.is_file():
        raise DataError(f"data.source: catalogue file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    frame = None
    try:
        if ".parquet" in suffixes or ".pq" in suffixes:
            frame = pd.read_parquet(path)
        elif ".csv" in suffixes or ".tsv" in suffixes:
            frame = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",")
    except (OSError, ValueError) as exc:
        raise DataError(f"data.source: cannot read {path}: {exc}") from None
    if frame is not None:
        if frame.empty:
            raise DataError(f"data.source: {path} holds no rows (columns: {', '.join(map(str, frame.columns))})")
        return frame
    raise DataError(
        f"data.source: unknown file type {''.join(path.suffixes)!r} for {path}; use .csv, .csv.gz, .tsv or .parquet"
    )


def _column(frame: pd.DataFrame, name: str, key: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    hint = _close_columns(frame, name)
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
        guess = f"{left}-{hint[0]}" if hint and missing == right else f"{hint[0]}-{right}" if hint else None
        raise DataError(
            f"data.features: column {name!r} not in the catalogue, nor magnitude {missing!r} to derive it"
            + (f" (did you mean {guess!r}?)" if guess else "")
            + f"; columns: {', '.join(map(str, frame.columns))}"
        )
    return _column(frame, name, "data.features")


def _feature_column(frame: pd.DataFrame, name: str) -> pd.Series:
    return _numeric(derive_feature(frame, name), name)


def float32_problem(
    values: np.ndarray, name: str, *, operands: tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]] | None = None
) -> str | None:
    """What is wrong with a column whose finite values lie beyond what float32 holds, or None when none does.

    Args:
        values: The column as fed to the network (a derived colour already derived), float64, finite.
        name: The column, for the message.
        operands: For a derived colour ``a-b``: the two magnitude columns, shown beside the value.

    Returns:
        "column 'u-g' row 5 holds 1e+39 (u - g = 1e+39 - 18.5), beyond what float32 holds (±3.4e+38) ...",
        rows numbered from 0 like every other message about rows; None when every value fits.
    """
    with np.errstate(invalid="ignore"):
        bad = np.abs(np.asarray(values, dtype=np.float64)) > FLOAT32_MAX
    if not bad.any():
        return None
    rows = np.flatnonzero(bad)
    first = int(rows[0])
    shown = f"{float(values[first]):.6g}"
    if operands is not None:
        (left, a), (right, b) = operands
        shown += f" ({left} - {right} = {float(a[first]):.6g} - {float(b[first]):.6g})"
    more = f"; {rows.size} rows do, first at rows {rows[:5].tolist()}" if rows.size > 1 else ""
    return (
        f"column {name!r} row {first} holds {shown}, beyond what float32 holds (±{FLOAT32_MAX:.2g}; the network "
        f"computes in float32){more}"
    )


def _close_columns(frame: pd.DataFrame, name: str) -> list[str]:
    columns = [str(c) for c in frame.columns]
    # A column that differs in case only ('R' for 'r') is the likeliest meant; difflib sees no likeness there.
    same_but_case = [c for c in columns if c.lower() == name.lower()]
    return same_but_case[:1] or difflib.get_close_matches(name, columns, n=1, cutoff=0.6)


def _numeric(series: pd.Series, name: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        bad = series[pd.to_numeric(series, errors="coerce").isna() & series.notna()]
        example = repr(bad.iloc[0]) if len(bad) else repr(series.iloc[0]) if len(series) else "none"
        raise DataError(
            f"data.features: column {name!r} must be numeric, got dtype {series.dtype} (e.g. {example} in row "
            f"{bad.index[0] if len(bad) else 0})"
        )
    return series.astype("float64")


def keep_rows(frame: pd.DataFrame, where: dict[str, Any]) -> pd.DataFrame:
    """The rows whose columns hold the allowed values (``data.where``), renumbered from 0.

    Raises:
        DataError: A column is missing, or no row is left.
    """
    if not where:
        return frame
    mask = np.ones(len(frame), dtype=bool)
    for column, allowed in where.items():
        series = _column(frame, column, f"data.where.{column}")
        if isinstance(allowed, dict):
            if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
                raise DataError(f"data.where.{column}: a range needs a numeric column, got dtype {series.dtype}")
            x = series.to_numpy(dtype=np.float64)
            # NaN fails both comparisons: a row without a value is not in any range.
            mask &= (x >= allowed.get("min", -np.inf)) & (x <= allowed.get("max", np.inf))
            continue
        values = list(allowed) if isinstance(allowed, list | tuple) else [allowed]
        if pd.api.types.is_numeric_dtype(series) and all(isinstance(v, int | float) for v in values):
            mask &= series.isin(values).to_numpy()
        else:
            mask &= series.astype(str).isin([str(v) for v in values]).to_numpy()
    if not mask.any():
        shown = ", ".join(f"{c}={v!r}" for c, v in where.items())
        raise DataError(f"data.where: no row has {shown}; the catalogue has {len(frame)} rows")
    return frame[mask].reset_index(drop=True)


def label_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """One multilabel label as 0/1: a 0/1 or true/false column, or a condition such as ``class==QSO``.

    Raises:
        DataError: The column is missing, or does not hold 0/1 values, or the condition cannot be read.
    """
    if name in frame.columns:
        series = frame[name]
        if series.isna().any():
            rows = np.flatnonzero(series.isna().to_numpy())[:5].tolist()
            raise DataError(f"data.target: label column {name!r} has missing values, first at rows {rows}")
        values = set(pd.unique(series).tolist())
        if not values <= {0, 1}:
            shown = sorted(map(str, values))[:5]
            raise DataError(
                f"data.target: label column {name!r} must hold 0/1 or true/false, got values {shown}; "
                "a condition such as 'class==QSO' or 'redshift>1' derives a label"
            )
        return series.astype(bool).to_numpy().astype(np.float64)
    match = CONDITION.match(name)
    if match is None:
        return _column(frame, name, "data.target").to_numpy()  # raises: not a column, not a condition
    column, op, raw = match.groups()
    series = _column(frame, column.strip(), "data.target")
    value: Any = raw.strip().strip("'\"")
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if op in ("==", "!="):
        if numeric:
            try:
                value = float(value)
            except ValueError:
                raise DataError(
                    f"data.target: label {name!r} compares numeric column {column!r} with {value!r}, not a number"
                ) from None
            equal = series.to_numpy(dtype=np.float64) == value
        else:
            equal = (series.astype(str) == value).to_numpy()
        return (equal if op == "==" else ~equal).astype(np.float64)
    if not numeric:
        raise DataError(
            f"data.target: label {name!r} needs a numeric column for {op}, got {column!r} of {series.dtype}"
        )
    try:
        bound = float(value)
    except ValueError:
        raise DataError(f"data.target: label {name!r} compares with {value!r}, not a number") from None
    x = series.to_numpy(dtype=np.float64)
    result = {">": x > bound, ">=": x >= bound, "<": x < bound, "<=": x <= bound}[op]
    return result.astype(np.float64)


def _operands(frame: pd.DataFrame, name: str) -> tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]] | None:
    """The two magnitudes of a colour derived by :func:`derive_feature`; None for a column taken as it is."""
    left, sep, right = name.partition("-")
    if name in frame.columns or not sep:
        return None
    return (left, frame[left].to_numpy(dtype=np.float64)), (right, frame[right].to_numpy(dtype=np.float64))


def _value_strata(values: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Quantile bins of a regression target, so every part of the split spans the same range of values."""
    n_bins = int(max(1, min(MAX_BINS, len(values) // MIN_PER_BIN)))
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
    strata = np.searchsorted(edges, values, side="right").astype(np.int64)
    present = np.unique(strata)
    strata = np.searchsorted(present, strata).astype(np.int64)
    names = tuple(f"quantile bin {i + 1} of {len(present)}" for i in range(len(present)))
    return strata, names


def _label_strata(labels: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """One stratum per combination of labels; rare combinations share one, so a split can stratify them."""
    codes = (labels.astype(np.int64) * (1 << np.arange(labels.shape[1]))).sum(axis=1)
    combos, counts = np.unique(codes, return_counts=True)
    common = [int(c) for c, n in zip(combos, counts, strict=True) if n >= MIN_PER_COMBINATION]
    rare = [int(c) for c, n in zip(combos, counts, strict=True) if n < MIN_PER_COMBINATION]
    if rare and int(np.isin(codes, rare).sum()) < MIN_PER_COMBINATION and common:
        # Too few even together: they join the largest combination.
        largest = int(combos[np.argmax(counts)])
        codes = np.where(np.isin(codes, rare), largest, codes)
        rare = []

    def describe(code: int) -> str:
        on = [n for i, n in enumerate(names) if code >> i & 1]
        return "+".join(on) if on else "no label"

    strata_names = [describe(c) for c in common] + (["rare combinations"] if rare else [])
    lookup = {c: i for i, c in enumerate(common)}
    strata = np.array([lookup.get(int(c), len(common)) for c in codes], dtype=np.int64)
    return strata, tuple(strata_names)


def _hash(matrix: np.ndarray, *arrays: np.ndarray, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    digest.update(matrix.tobytes())
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    digest.update("|".join(names).encode())
    return digest.hexdigest()[:16]


def catalogue_from_frame(frame: pd.DataFrame, spec: DataSpec, *, task: str, source: str) -> Catalogue:
    """Select and check the study's columns.

    Args:
        frame: The raw catalogue.
        spec: The data section of the study.
        task: ``binary`` (positive class vs the rest), ``multiclass`` (every class), ``multilabel`` (a list of
            label columns or conditions), ``regression`` or ``unit_regression`` (a numeric target column).
        source: Where the rows came from, for messages and tags.

    Returns:
        The validated catalogue.

    Raises:
        DataError: A missing or non-numeric column, non-finite values, one class only, too few of a class, a
            label without positives or negatives, a unit_regression target outside [0, 1].
    """
    frame = keep_rows(frame, spec.where)
    # Every column the study names is looked for before any is used, so that all the missing ones are named at once.
    problems: list[str] = []

    def looked_up(find: Callable[[], T]) -> T | None:
        try:
            return find()
        except DataError as exc:
            problems.append(str(exc))
            return None

    if task == "multilabel":
        for name in spec.targets:
            looked_up(partial(label_column, frame, name))
    else:
        target = looked_up(partial(_column, frame, str(spec.target), "data.target"))
    for col in spec.id_columns:
        looked_up(partial(_column, frame, col, "data.id_columns"))
    columns = {}
    for name in spec.features:
        column = looked_up(partial(_feature_column, frame, name))
        if column is not None:
            columns[name] = column
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        names = ", ".join(map(str, frame.columns))
        raise DataError(
            f"{len(problems)} problems with the catalogue's columns:\n"
            + "\n".join(f"  - {p.removesuffix(f'; columns: {names}')}" for p in problems)
            + f"\n  the catalogue's columns: {names}"
        )
    features = pd.DataFrame(columns)
    for name in spec.features:
        values = features[name].to_numpy()
        bad = ~np.isfinite(values)
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise DataError(
                f"data.features: column {name!r} has {int(bad.sum())} non-finite value(s) (NaN or inf), "
                f"first at rows {rows}; clean or drop them before tuning"
            )
        problem = float32_problem(values, name, operands=_operands(frame, name))
        if problem:
            raise DataError(f"data.features: {problem}; clean or drop those rows before tuning")
    matrix = features.to_numpy(dtype=np.float32)
    ids = frame[list(spec.id_columns)].reset_index(drop=True)
    if task == "multilabel":
        return _multilabel(frame, matrix, ids, spec, source)
    assert target is not None  # found, or the problems above were raised
    if task in REGRESSION_TASKS:
        return _regression(target, matrix, ids, spec, task, source)
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
    return Catalogue(
        features=matrix,
        labels=labels,
        feature_names=tuple(spec.features),
        class_names=class_names,
        ids=ids,
        source=source,
        data_hash=_hash(matrix, labels, names=tuple(spec.features)),
    )


def _regression(
    target: pd.Series, matrix: np.ndarray, ids: pd.DataFrame, spec: DataSpec, task: str, source: str
) -> Catalogue:
    name = str(spec.target)
    if pd.api.types.is_bool_dtype(target) or not pd.api.types.is_numeric_dtype(target):
        bad = target[pd.to_numeric(target, errors="coerce").isna()]
        example = repr(bad.iloc[0]) if len(bad) else repr(target.iloc[0]) if len(target) else "none"
        raise DataError(
            f"data.target: a {task} task needs a numeric target column, got column {name!r} of dtype "
            f"{target.dtype} (e.g. {example})"
        )
    values = target.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise DataError(
            f"data.target: column {name!r} has {int(bad.sum())} missing or non-finite value(s), first at rows {rows}"
        )
    problem = float32_problem(values, name)
    if problem:
        # The network learns and predicts the standardised value in float32; one such value also drowns the
        # standardisation (every other row lands near 0) and any error measured in the target's unit.
        raise DataError(f"data.target: {problem}; clean or drop those rows before tuning")
    if task == "unit_regression":
        outside = (values < 0) | (values > 1)
        if outside.any():
            rows = np.flatnonzero(outside)[:5].tolist()
            raise DataError(
                f"data.target: task unit_regression needs values in [0, 1], but column {name!r} has "
                f"{int(outside.sum())} outside (from {values.min():.6g} to {values.max():.6g}; first at rows "
                f"{rows}); use task regression, or select rows with data.where"
            )
    if len(values) < 3 * MIN_PER_CLASS or float(values.std()) == 0.0:
        raise DataError(
            f"data.target: column {name!r} needs varying values on at least {3 * MIN_PER_CLASS} rows to fit a "
            f"regression, got {len(values)} row(s) with standard deviation {float(values.std()):.3g}"
        )
    strata, names = _value_strata(values)
    return Catalogue(
        features=matrix,
        labels=strata,
        feature_names=tuple(spec.features),
        class_names=names,
        ids=ids,
        source=source,
        data_hash=_hash(matrix, values, names=(*spec.features, name)),
        targets=values,
        target_names=(name,),
    )


def _multilabel(frame: pd.DataFrame, matrix: np.ndarray, ids: pd.DataFrame, spec: DataSpec, source: str) -> Catalogue:
    names = spec.targets
    labels = np.stack([label_column(frame, name) for name in names], axis=1)
    n = labels.shape[0]
    for i, name in enumerate(names):
        positives = int(labels[:, i].sum())
        if min(positives, n - positives) < MIN_PER_CLASS:
            raise DataError(
                f"data.target: label {name!r} holds {positives} positive and {n - positives} negative row(s); "
                f"a stratified split needs at least {MIN_PER_CLASS} of each"
            )
    strata, strata_names = _label_strata(labels, names)
    return Catalogue(
        features=matrix,
        labels=strata,
        feature_names=tuple(spec.features),
        class_names=strata_names,
        ids=ids,
        source=source,
        data_hash=_hash(matrix, labels, names=(*spec.features, *names)),
        targets=labels,
        target_names=tuple(names),
    )
