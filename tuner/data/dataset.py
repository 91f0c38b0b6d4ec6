"""The study's data, built once per process: catalogue -> split -> fitted scaling -> tensors on the device."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from tuner.config import StudySpec
from tuner.data.load import Catalogue, catalogue_from_frame, read_table
from tuner.data.preprocess import Preprocessor
from tuner.data.split import SplitIndices, stratified_folds, stratified_split
from tuner.errors import DataError
from tuner.metrics import roc_auc
from tuner.tasks import n_outputs

log = logging.getLogger(__name__)

#: A feature that alone ranks the positive class this well (ROC AUC on the training rows, either way round) is
#: more likely made from what defines the class than measured beside it: over the whole SDSS file the
#: spectroscopic redshift reaches 0.993 for QSO and the best colour (u-g) 0.968; u-g of the simulated catalogue
#: 0.954.
LABEL_LIKE_AUC = 0.99


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


def build_dataset(spec: StudySpec, device: torch.device | str = "cpu", catalogue: Catalogue | None = None) -> Dataset:
    """Split once, fit scaling on train only, and move every part to the device.

    With ``validation.kind: kfold`` the modelling set (train + validation rows) is also cut into k stratified
    folds, each with its own scaling fitted on its training folds.

    Args:
        spec: The study.
        device: Where the tensors live for the whole study.
        catalogue: Already loaded rows; loaded from the spec when None.

    Returns:
        The dataset.

    Raises:
        DataError: A class is too rare for the split or for k folds; a row that the scaling fitted on the training
            rows takes beyond what float32 holds.
    """
    catalogue = catalogue or load_catalogue(spec)
    device = torch.device(device)
    split = stratified_split(catalogue.labels, spec.data.split, spec.data.seed, catalogue.class_names)
    preprocessor = Preprocessor.fit(spec.data.preprocess, catalogue.features[split.train])
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
    if spec.validation.kind == "kfold":
        modelling = np.sort(np.concatenate([split.train, split.validation]))
        held = stratified_folds(catalogue.labels, modelling, spec.validation.k, spec.data.seed, catalogue.class_names)
        for i, rows in enumerate(held):
            train_rows = np.setdiff1d(modelling, rows)
            scaling = Preprocessor.fit(spec.data.preprocess, catalogue.features[train_rows])
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
