"""The study's data, built once per process: catalogue -> split -> fitted scaling -> tensors on the device.

The split and the scaling are made once per study: later processes take them from the study's record.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib.metadata import version
from typing import Any

import numpy as np
import pandas as pd
import torch

from tuner.config import StudySpec
from tuner.data.load import Catalogue, catalogue_from_frame, read_table
from tuner.data.preprocess import Preprocessor
from tuner.data.split import (
    SplitIndices,
    decode_rows,
    encode_rows,
    pack_codes,
    rows_digest,
    stratified_folds,
    stratified_split,
    unpack_codes,
)
from tuner.errors import DataError
from tuner.metrics import roc_auc
from tuner.tasks import n_outputs

log = logging.getLogger(__name__)

#: A feature that alone ranks the positive class this well (ROC AUC on the training rows, either way round) is
#: more likely made from what defines the class than measured beside it: over the whole SDSS file the
#: spectroscopic redshift reaches 0.993 for QSO and the best colour (u-g) 0.968; u-g of the simulated catalogue
#: 0.954.
LABEL_LIKE_AUC = 0.99

#: The study's user attribute holding the split and the fitted scalings it was made with (:meth:`Dataset.layout`),
#: so that every later process (a worker, a resumed run, an export) uses the same rows and the same numbers
#: whatever its scikit-learn and numpy versions, and a worker need not import scikit-learn (0.8 s) to start.
LAYOUT_ATTR = "tuner.split"
LAYOUT_VERSION = 1
#: A record longer than this (as JSON) keeps only the split's digest, which a process that splits the rows again
#: must match. The 101,000 rows of the default simulated catalogue take about 25,000 characters, 77,000 with five
#: folds; 2,000,000 hold about eight million rows, or two million with ten folds.
MAX_LAYOUT_CHARS = 2_000_000
#: The same on MySQL, which holds a user attribute in a 64 KiB TEXT column.
MAX_LAYOUT_CHARS_MYSQL = 60_000


@dataclass(frozen=True)
class Part:
    """One part of the split, already scaled and on the device."""

    x: torch.Tensor  # (n, d) float32
    # (n,) int64 class (binary, multiclass); (n, L) float32 0/1 (multilabel); (n,) float32 standardised value
    # (regression) or value in [0, 1] (unit_regression)
    y: torch.Tensor
    y_numpy: np.ndarray  # host copy of the labels, or of the values in the target's own unit, for metrics

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Fold:
    """One fold of k-fold cross-validation: trained on the other folds, validated on this one.

    The scaling is fitted on the training folds only; the holdout is kept through the same scaling for the final
    measurement, and is never used to fit, choose or prune.
    """

    index: int
    train_rows: np.ndarray  # catalogue rows of the other folds
    validation_rows: np.ndarray  # catalogue rows of this fold
    train: Part
    validation: Part
    holdout: Part
    preprocessor: Preprocessor


@dataclass(frozen=True)
class Dataset:
    """Everything a trial needs from the data; shared read-only by every trial of the process."""

    train: Part
    validation: Part
    holdout: Part
    catalogue: Catalogue
    split: SplitIndices
    preprocessor: Preprocessor
    positive_index: int  # column of the positive class in the model's output probabilities
    device: torch.device
    # k-fold cross-validation (validation.kind kfold): the folds of the modelling set (train + validation rows).
    folds: tuple[Fold, ...] = ()
    task: str = "binary"
    # Regression: the training rows' mean and standard deviation; the network predicts (value - mean) / std.
    target_scaling: tuple[float, float] | None = None

    def fold_view(self, index: int) -> Dataset:
        """The data as fold ``index`` sees it: train on the other folds, validate on this one, with its scaling.

        Training and evaluation code written for one split runs unchanged on the view.
        """
        fold = self.folds[index]
        return replace(
            self,
            train=fold.train,
            validation=fold.validation,
            holdout=fold.holdout,
            preprocessor=fold.preprocessor,
            folds=(),
        )

    @property
    def n_features(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.catalogue.class_names)

    @property
    def n_out(self) -> int:
        """Units of the network's last layer for this task."""
        return n_outputs(self.task, self.n_classes, len(self.catalogue.target_names))

    def unscale(self, predictions: np.ndarray) -> np.ndarray:
        """Network outputs of a regression back in the target's unit (float64)."""
        values = np.asarray(predictions, dtype=np.float64)
        if self.target_scaling is None:
            return values
        mean, std = self.target_scaling
        return values * std + mean

    def layout(self, spec: StudySpec, max_chars: int = MAX_LAYOUT_CHARS) -> dict[str, Any]:
        """What :func:`build_dataset` needs to rebuild this split and these scalings without fitting anything.

        Stored with the study (:data:`LAYOUT_ATTR`); where longer than ``max_chars`` as JSON, only what
        identifies the split is kept.
        """
        parts, fold_of = encode_rows(self.split, [f.validation_rows for f in self.folds], self.catalogue.n_rows)
        record: dict[str, Any] = {
            "version": LAYOUT_VERSION,
            "spec": _layout_fingerprint(spec),
            "data_hash": self.catalogue.data_hash,
            "rows": self.catalogue.n_rows,
            "digest": rows_digest(parts, fold_of),
            "made_with": _split_versions(),
        }
        whole = {
            **record,
            "parts": pack_codes(parts, bits=2),
            **({"folds": pack_codes(fold_of)} if fold_of is not None else {}),
            "scaling": self.preprocessor.to_dict(),
            "fold_scaling": [f.preprocessor.to_dict() for f in self.folds],
        }
        return whole if len(json.dumps(whole)) <= max_chars else record

    def _target_facts(self) -> dict[str, str]:
        catalogue = self.catalogue
        targets = catalogue.targets
        if targets is None:
            counts = np.bincount(catalogue.labels, minlength=self.n_classes)
            return {
                "data.class_counts": ", ".join(
                    f"{n}={int(c)}" for n, c in zip(catalogue.class_names, counts, strict=True)
                )
            }
        if targets.ndim == 2:
            return {
                "data.label_counts": ", ".join(
                    f"{n}={int(c)}" for n, c in zip(catalogue.target_names, targets.sum(axis=0), strict=True)
                )
            }
        return {
            "data.target": f"{catalogue.target_names[0]}: mean {targets.mean():.6g}, std {targets.std():.6g}, "
            f"min {targets.min():.6g}, max {targets.max():.6g}"
        }

    def facts(self) -> dict[str, str]:
        """What identifies the data, for tags and the model card."""
        sizes = self.split.sizes()
        folds = {}
        if self.folds:
            fold_sizes = ", ".join(str(len(f.validation_rows)) for f in self.folds)
            folds["data.folds"] = f"{len(self.folds)} stratified folds of train + validation, sizes {fold_sizes}"
        return {
            "data.source": self.catalogue.source,
            "data.hash": self.catalogue.data_hash,
            "data.rows": str(self.catalogue.n_rows),
            **self._target_facts(),
            "data.split_sizes": ", ".join(f"{k}={v}" for k, v in sizes.items()),
            "data.features": ", ".join(self.catalogue.feature_names),
            **folds,
        }


def raw_frame(spec: StudySpec) -> tuple[pd.DataFrame, str]:
    """The catalogue's raw rows (read, or simulated) and a description of where they came from.

    Raises:
        DataError: The file is missing or unreadable.
    """
    path = spec.data_path()
    if path is None:
        from tuner.data.catalogue import simulate_catalogue

        sim = spec.data.simulated
        frame = simulate_catalogue(n_star=sim.n_star, n_quasar=sim.n_quasar, n_galaxy=sim.n_galaxy, seed=spec.data.seed)
        source = (
            f"simulated(n_star={sim.n_star}, n_quasar={sim.n_quasar}, n_galaxy={sim.n_galaxy}, seed={spec.data.seed})"
        )
        return frame, source
    return read_table(path), str(path)


def load_catalogue(spec: StudySpec) -> Catalogue:
    """Read (or simulate) and validate the study's catalogue.

    Raises:
        DataError: The catalogue cannot be used.
    """
    frame, source = raw_frame(spec)
    return catalogue_from_frame(frame, spec.data, task=spec.task, source=source)


def _layout_fingerprint(spec: StudySpec) -> str:
    return spec.fingerprint("data", "task", "validation")


def _split_versions() -> str:
    return f"scikit-learn {version('scikit-learn')}, numpy {np.__version__}"


def _recorded_layout(
    recorded: Mapping[str, Any] | None, spec: StudySpec, catalogue: Catalogue
) -> tuple[dict[str, Any] | None, SplitIndices | None, tuple[np.ndarray, ...]]:
    """The study's record if it describes these rows under this study file, and its split and folds when stored."""
    if (
        not isinstance(recorded, Mapping)
        or recorded.get("version") != LAYOUT_VERSION
        or recorded.get("spec") != _layout_fingerprint(spec)
        or recorded.get("data_hash") != catalogue.data_hash
        or recorded.get("rows") != catalogue.n_rows
    ):
        # Not this study's rows (a changed catalogue or study file, which the study's own checks then report).
        return None, None, ()
    record = dict(recorded)
    if not isinstance(record.get("digest"), str):
        raise DataError(f"data.split: the split study {spec.study.name!r} recorded cannot be read: it has no digest")
    if "parts" not in record:
        return record, None, ()
    try:
        parts = unpack_codes(record["parts"], catalogue.n_rows, bits=2)
        fold_of = unpack_codes(record["folds"], catalogue.n_rows) if "folds" in record else None
    except ValueError as exc:
        raise DataError(f"data.split: the split study {spec.study.name!r} recorded cannot be read: {exc}") from None
    if rows_digest(parts, fold_of) != record["digest"]:
        raise DataError(f"data.split: the split study {spec.study.name!r} recorded does not match its digest")
    k = spec.validation.k if spec.validation.kind == "kfold" else 0
    split, folds = decode_rows(parts, fold_of, k)
    return record, split, folds


def _recorded_scalings(
    record: Mapping[str, Any], spec: StudySpec, catalogue: Catalogue, n_folds: int
) -> tuple[Preprocessor, list[Preprocessor]]:
    """The scalings fitted when the study was created; numbers, so every process scales the rows alike."""
    d = len(catalogue.feature_names)
    try:
        main = Preprocessor.from_dict(record["scaling"])
        per_fold = [Preprocessor.from_dict(raw) for raw in record["fold_scaling"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(
            f"data.preprocess: the scaling study {spec.study.name!r} recorded cannot be read: {exc!r}"
        ) from None
    fits = len(per_fold) == n_folds and all(
        p.kind == spec.data.preprocess
        and p.shift.shape == (d,)
        and p.matrix.shape == (d, d)
        and np.isfinite(p.shift).all()
        and np.isfinite(p.matrix).all()
        for p in (main, *per_fold)
    )
    if not fits:
        raise DataError(
            f"data.preprocess: the scaling study {spec.study.name!r} recorded is not a finite {spec.data.preprocess} "
            f"scaling of its {d} features for each of its {n_folds} folds"
        )
    return main, per_fold


def build_dataset(
    spec: StudySpec,
    device: torch.device | str = "cpu",
    catalogue: Catalogue | None = None,
    recorded: Mapping[str, Any] | None = None,
) -> Dataset:
    """Split once, fit scaling on train only, and move every part to the device.

    With ``validation.kind: kfold`` the modelling set (train + validation rows) is also cut into k stratified
    folds, each with its own scaling fitted on its training folds.

    Args:
        spec: The study.
        device: Where the tensors live for the whole study.
        catalogue: Already loaded rows; loaded from the spec when None.
        recorded: The study's :data:`LAYOUT_ATTR`: where it holds this catalogue's split, the split and the
            scalings are taken from it instead of being made again; where it holds only the split's digest, the
            split made again must match it.

    Returns:
        The dataset.

    Raises:
        DataError: A class is too rare for the split or for k folds; a row that the scaling fitted on the training
            rows takes beyond what float32 holds; this process splits the rows otherwise than the study recorded.
    """
    catalogue = catalogue or load_catalogue(spec)
    device = torch.device(device)
    record, split, held = _recorded_layout(recorded, spec, catalogue)
    if split is None:
        split = stratified_split(catalogue.labels, spec.data.split, spec.data.seed, catalogue.class_names)
        if spec.validation.kind == "kfold":
            held = stratified_folds(
                catalogue.labels, split.modelling(), spec.validation.k, spec.data.seed, catalogue.class_names
            )
        if record is not None:
            _check_digest(record, split, held, catalogue.n_rows, spec.study.name)
    if record is not None and "scaling" in record:
        preprocessor, fold_scalings = _recorded_scalings(record, spec, catalogue, len(held))
    else:
        preprocessor = Preprocessor.fit(spec.data.preprocess, catalogue.features[split.train])
        fold_scalings = []
    targets = catalogue.targets
    target_scaling = None
    if spec.task == "regression":
        assert targets is not None
        train_values = targets[split.train]
        std = float(train_values.std())
        target_scaling = (float(train_values.mean()), std if std > 0 else 1.0)
    if spec.task == "multilabel":
        _check_labels_in_parts(catalogue, split)

    def part(idx: np.ndarray, scaling: Preprocessor = preprocessor) -> Part:
        problem = scaling.problem(catalogue.features[idx], catalogue.feature_names, rows=idx)
        if problem:
            raise DataError(f"data.features: {problem}; clean or drop those rows before tuning")
        x = torch.from_numpy(scaling.transform(catalogue.features[idx])).to(device)
        if targets is None:
            y_np = catalogue.labels[idx]
            return Part(x=x, y=torch.from_numpy(y_np).to(device), y_numpy=y_np)
        values = targets[idx]
        if target_scaling is not None:
            mean, std = target_scaling
            values_for_training = (values - mean) / std
        else:
            values_for_training = values
        y = torch.from_numpy(values_for_training.astype(np.float32)).to(device)
        return Part(x=x, y=y, y_numpy=values)

    folds: list[Fold] = []
    if held:
        modelling = split.modelling()
        for i, rows in enumerate(held):
            train_rows = np.setdiff1d(modelling, rows)
            scaling = (
                fold_scalings[i]
                if fold_scalings
                else Preprocessor.fit(spec.data.preprocess, catalogue.features[train_rows])
            )
            folds.append(
                Fold(
                    index=i,
                    train_rows=train_rows,
                    validation_rows=rows,
                    train=part(train_rows, scaling),
                    validation=part(rows, scaling),
                    holdout=part(split.holdout, scaling),
                    preprocessor=scaling,
                )
            )

    if spec.task == "binary":
        positive_index = 1
    elif spec.task == "multiclass" and spec.data.positive:
        positive_index = catalogue.class_names.index(spec.data.positive)
    else:
        positive_index = 0
    if spec.task == "binary" or (spec.task == "multiclass" and spec.data.positive):
        for name, auc in label_like_features(catalogue, split.train, positive_index):
            log.warning(
                "data.features: %s alone tells %s from the rest (ROC AUC %.3f on the training rows, above %s); if "
                "it comes from what defines the class (a spectroscopic redshift, say), it leaks the label",
                name,
                catalogue.class_names[positive_index],
                auc,
                LABEL_LIKE_AUC,
            )
    return Dataset(
        train=part(split.train),
        validation=part(split.validation),
        holdout=part(split.holdout),
        catalogue=catalogue,
        split=split,
        preprocessor=preprocessor,
        positive_index=positive_index,
        device=device,
        folds=tuple(folds),
        task=spec.task,
        target_scaling=target_scaling,
    )


def _check_digest(
    record: Mapping[str, Any], split: SplitIndices, held: tuple[np.ndarray, ...], n_rows: int, study_name: str
) -> None:
    """The split just made is the one the study recorded, or its trials would be judged on other rows."""
    if rows_digest(*encode_rows(split, held, n_rows)) == record["digest"]:
        return
    made_with, here = record.get("made_with"), _split_versions()
    advice = (
        f"run it with {made_with}, as the study was made with"
        if made_with != here
        else f"the versions are the same, so the study's record ({LAYOUT_ATTR}) was changed since; start a new "
        "study with --study-name NEW_NAME"
    )
    raise DataError(
        f"data.split: this process splits the catalogue's rows otherwise than when study {study_name!r} was "
        f"created (made with {made_with}; here {here}), so its trials would be trained and measured on other "
        f"rows; {advice}"
    )


def label_like_features(catalogue: Catalogue, rows: np.ndarray, positive_index: int) -> list[tuple[str, float]]:
    """The features that alone separate the positive class from the rest on ``rows`` with a ROC AUC (either way
    round) of at least :data:`LABEL_LIKE_AUC`, with that AUC."""
    is_positive = catalogue.labels[rows] == positive_index
    found = []
    for column, name in enumerate(catalogue.feature_names):
        auc = roc_auc(is_positive, catalogue.features[rows, column])
        if not math.isnan(auc) and max(auc, 1 - auc) >= LABEL_LIKE_AUC:
            found.append((name, max(auc, 1 - auc)))
    return found


def _check_labels_in_parts(catalogue: Catalogue, split: SplitIndices) -> None:
    """Every label needs positive and negative rows in every part, or its threshold cannot be chosen or measured."""
    assert catalogue.targets is not None
    for part, idx in (("train", split.train), ("validation", split.validation), ("holdout", split.holdout)):
        positives = catalogue.targets[idx].sum(axis=0)
        for name, count in zip(catalogue.target_names, positives, strict=True):
            if count == 0 or count == len(idx):
                which = "positive" if count == 0 else "negative"
                raise DataError(
                    f"data.target: the {part} part has no {which} row of label {name!r}; the label is too rare for "
                    "the split (add rows, or enlarge data.split.validation / holdout)"
                )
