"""Benchmark (not a timed test): tuner's training loop against a bare PyTorch loop and a hand-wired Optuna loop.

Targets (the speed issue's P1 and P2). Every ratio is taken within one repetition and shown as min / median /
max over ``--repeats`` repetitions; PASS when the median meets the target (the worst repetition is named when
it does not):

- P1a  tuner fit / floor           <= 1.10  tuner's epoch against the eager floor, same model and batches;
- P1b  baseline / tuner (study)    >= 1.5   the hand-wired loop against tuner on equal work, per baseline
  thread count;
- P2   tuner tracking on / off     <= 1.05  the same tuner study with ``tracking.enabled`` true and false.

Run from the repository root. With the defaults a repetition takes about 20 s (sdss) and 3 minutes (simulated)
on 2 lightly loaded cores; when other jobs load the cores the 2-thread baseline slows down 10-20x (measured: a
simulated repetition up to 11 minutes, the whole run 34 minutes at load average 2-6); ``--baseline-threads 1``
skips it:

    .venv/bin/python bench/bench_loop.py [--datasets sdss simulated] [--epochs 5] [--repeats 3]
        [--batch-sizes 32 64 256 512] [--draw-seed 0] [--tuner-threads 1] [--baseline-threads 1 0]
        [--storage sqlite|memory] [--no-plots] [--n-star 100000] [--n-quasar 1000] [--sdss PATH]
        [--tracking-uri http://127.0.0.1:5000] [--tracking-writes auto|process|background|inline]

Data: ``sdss`` is studies/sdss_qso.yaml's data section (../shared/data/sdss_dr14_10k.csv.gz, QSO against the
rest on u-g, g-r, r-i, i-z); ``simulated`` is studies/quickstart.yaml's (100,000 stars, 1,000 quasars). Both use
studies/sdss_qso.yaml's search space (batch sizes 32-512). Trials: one per ``--batch-sizes`` entry, every other
parameter drawn by Optuna's RandomSampler(``--draw-seed``) from that space; all sides get the same trials
(enqueued in tuner and baseline, trial ``i`` seeded ``i``) and the same data: the train and validation tensors
tuner builds (split, scaling) on the CPU, built once before any timing.

Equal work: every trial trains exactly ``--epochs`` epochs on every side (pruner ``none`` / NopPruner,
``train.patience = max_epochs``, no early stopping; a run with another epoch count is an error). Each side
starts after a full garbage collection, so the garbage one side leaves does not trigger a collection (0.2-0.5 s
here) in the next.

- floor: a bare PyTorch loop over tuner's model (``build_mlp``) and optimizer (``make_optimizer``): per epoch
  ``torch.randperm`` + slicing, forward, BCE, ``zero_grad``, ``backward``, ``step``, the train loss summed on the
  device; then the per-epoch numbers any tuning loop needs to judge an epoch: one validation forward pass, the
  validation loss and the validation objective (completeness at 10% contamination by
  :func:`tuner.metrics.choose_operating_point`, as tuner computes it). Nothing else: no Optuna, no pruning or
  report calls, no tracking, no early-stopping bookkeeping or best-weight copy, no gradient health, no holdout
  evaluation. It seeds init, dropout and shuffling as tuner's eager engine (``study.engine: eager``) does, so
  with that engine its per-epoch train loss, validation loss and objective equal tuner's bit for bit; tuner's
  default packed engine starts from the same weights and takes the same batches, but draws its own dropout masks
  and updates with its own fused code, so its histories differ (printed as "same model and batches").
- tuner: :func:`tuner.study.run_study` (``device=`` ``--device``, ``dataset=`` the prebuilt data, sampler random,
  pruner none, the trials passed as ``enqueue``), tracking off, then the same study with tracking on (an SQLite
  MLflow store in the scratch folder; ``tracking.plots`` true unless ``--no-plots``).
- baseline: the loop a user writes from the official examples (own code, in this file): ``optuna.create_study``
  (RandomSampler, NopPruner), optuna-integration's ``MLflowCallback`` (SQLite MLflow store) with
  ``@callback.track_in_mlflow()`` on the objective, a ``DataLoader(TensorDataset(...), shuffle=True,
  batch_size=...)``, the same network and optimizer written by hand, per epoch the train loss (``loss.item()``),
  the validation loss and objective (scikit-learn's ``precision_recall_curve``), ``mlflow.log_metric`` of both,
  ``trial.report`` and ``should_prune``.

Optuna storage (``--storage``): a SQLite file in the scratch folder for tuner and baseline alike (default, as a
user runs it), or in memory (takes the disk's commit latency out; the MLflow stores stay SQLite). The SQLite
commit latency of the scratch folder is printed before and after: on a disk shared with other jobs it varies
from under 1 ms to over 10 ms, and tuner and the baseline each commit some 55 times per 5-epoch trial.

Device (``--device``, default ``cpu``): floor and tuner train on it with the data resident there; the baseline
keeps its ``DataLoader`` over the CPU tensors and moves each batch to the device, as the official examples do.

Threads: floor and tuner run with ``torch.set_num_threads(--tuner-threads)`` (1: the CLI's default
``--threads 1``); the baseline once per ``--baseline-threads`` entry (0: torch's default, the number of cores).

Epoch time is wall time over total epochs (trials x epochs), two ways:

- *study*: the whole call: ``run_study``, ``study.optimize``, the floor's loop over its trials; Optuna
  bookkeeping, tuner's manifest and holdout evaluation, MLflow writes and plots included;
- *fit*: the training alone, model built to last epoch done: tuner's :meth:`tuner.study.Objective.train_trial`
  (timed by a wrapper; its per-epoch callbacks, i.e. Optuna's ``trial.report``, included); inside the
  baseline's objective (its ``log_metric`` calls included); the floor's whole loop.

P1a compares *fit* (tuner's epoch), P1b and P2 compare *study*. The per-trial overhead column is (study - fit)
per trial. Info rows: tuner's fit without its callbacks; and P2 by attribution, 1 + the time measured inside
the tracking-only work (MlflowTracker calls, trial plots, model files; see ``TRACKING_WORK``) over the
tracking-off study, which does not depend on how much the training time wanders between runs. Excluded on
every side alike: process start-up and imports, building the data, creating the Optuna and MLflow stores (an
untimed warm-up of each side, one trial of one epoch, creates them; each timed run is a new study and MLflow
experiment in them). tuner's MLflow writer process (``tracking.writes``: a local store's writes go there) is
started and made ready before the warm-up, as it is once per process. Sides run one after another, their order
rotated between repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import torch
import yaml
from torch import nn

from tuner import study as study_mod
from tuner import tracking as tracking_mod
from tuner.config import StudySpec, spec_from_dict
from tuner.data.dataset import Dataset, build_dataset
from tuner.metrics import choose_operating_point
from tuner.model import build_mlp
from tuner.space import OPTIONAL_PARAMS, TrialParams, suggest
from tuner.train import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
TARGET_CONTAMINATION = 0.1

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------------------------------------------
# Specs and trials


def study_section(path: Path, section: str) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text())[section])


def data_section(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The data section of studies/sdss_qso.yaml or studies/quickstart.yaml (sizes from the options)."""
    if name == "sdss":
        data = study_section(STUDIES / "sdss_qso.yaml", "data")
        data["source"] = str(Path(args.sdss).resolve())
        return data
    data = study_section(STUDIES / "quickstart.yaml", "data")
    data["simulated"] = {"n_star": args.n_star, "n_quasar": args.n_quasar, "n_galaxy": 0}
    return data


def make_spec(data: dict[str, Any], args: argparse.Namespace, *, name: str, folder: Path, tracking: bool) -> StudySpec:
    """A study whose trials do fixed work: pruner none, patience = max_epochs, only enqueued trials."""
    raw = {
        "data": data,
        "task": "binary",
        # studies/sdss_qso.yaml's space (batch sizes 32-512) for both data sets.
        "search_space": study_section(STUDIES / "sdss_qso.yaml", "search_space"),
        "train": {"max_epochs": args.epochs, "patience": args.epochs},
        "objective": {"metric": "completeness_at_contamination", "target_contamination": TARGET_CONTAMINATION},
        "study": {
            "name": name,
            "storage": f"sqlite:///{folder}/tuner-optuna.db",
            "sampler": "random",
            "pruner": "none",
            "n_trials": len(args.batch_sizes),
            "seed": 0,
            # P1 is one trial at a time: on a GPU the default (auto) would pack them.
            "pack": 1,
        },
        "tracking": {
            "enabled": tracking,
            "uri": args.tracking_uri or f"sqlite:///{folder}/tuner-mlflow.db",
            "artifact_location": str(folder / "tuner-artifacts"),
            "plots": args.plots,
            "writes": args.tracking_writes,
        },
    }
    return spec_from_dict(raw)


def draw_trials(spec: StudySpec, batch_sizes: Sequence[int], seed: int) -> list[TrialParams]:
    """One trial per batch size; the other parameters drawn at random from the search space, reproducibly."""
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for batch in batch_sizes:
        params = suggest(sampler_study.ask(), spec.search_space)
        drawn.append(TrialParams(**{**params.__dict__, "batch_size": batch}))
    return drawn


def enqueue_entry(params: TrialParams) -> dict[str, Any]:
    """A warm-start entry in the names users write (study.enqueue / run_study(enqueue=...))."""
    entry = {**params.__dict__, "widths": list(params.widths)}
    return {k: v for k, v in entry.items() if not (k in OPTIONAL_PARAMS and v is None)}


def describe(params: TrialParams) -> str:
    return (
        f"{params.n_layers}x{'-'.join(map(str, params.widths))} {params.activation} {params.optimizer} "
        f"lr={params.lr:.2g} dropout={params.dropout:.2f} bn={params.batch_norm} init={params.init} "
        f"batch={params.batch_size}"
    )


# --------------------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Timing:
    """One side's run: wall time of the whole call, of the training alone, epochs trained, per-epoch histories."""

    study_s: float
    fit_s: float
    epochs: int
    histories: list[list[dict[str, float]]] = field(default_factory=list)
    # tuner only: time spent in the per-epoch callbacks (Optuna's trial.report, the tracking buffer)
    callbacks_s: float = 0.0
    # tuner only: time spent in the work done only with tracking on (MLflow writes, trial plots, model files)
    tracking_s: float = 0.0

    @property
    def study_per_epoch(self) -> float:
        return self.study_s / self.epochs

    @property
    def fit_per_epoch(self) -> float:
        return self.fit_s / self.epochs


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- floor ---------------------------------------------------------------------------------------------------


def show_full_collections() -> None:
    """Print the duration of every full garbage collection from now on (``--show-gc``)."""
    began: list[float] = []

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            began[:] = [time.perf_counter()]
        elif began:
            print(f"   (full garbage collection: {1000 * (time.perf_counter() - began[0]):.0f} ms)", flush=True)

    gc.callbacks.append(on_collection)


def started_clean() -> float:
    """``time.perf_counter()`` after a full garbage collection: the garbage one side leaves would otherwise
    trigger a collection in the next (0.2-0.5 s with the 300,000-700,000 objects of these processes), charged
    to whichever side it fell in."""
    gc.collect()
    return time.perf_counter()


def floor_trial(dataset: Dataset, params: TrialParams, seed: int, epochs: int) -> list[dict[str, float]]:
    """The bare loop: tuner's model, optimizer and seeding; batches by randperm + slicing; nothing else."""
    x, y = dataset.train.x, dataset.train.y
    xv, yv = dataset.validation.x, dataset.validation.y
    yv_pos = dataset.validation.y_numpy == dataset.positive_index
    device = x.device
    model = build_mlp(x.shape[1], params, 1, generator=torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed)
    shuffle = torch.Generator(device=device).manual_seed(seed)
    optimizer = make_optimizer(model, params)
    bce = nn.BCEWithLogitsLoss()
    n, batch = x.shape[0], params.batch_size
    end = n - 1 if params.batch_norm and n % batch == 1 else n
    history = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=shuffle, device=device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, end, batch):
            idx = order[start : start + batch]
            logits = model(x[idx])
            loss = bce(logits[:, 0], y[idx].to(logits.dtype))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * idx.shape[0]
        model.eval()
        with torch.no_grad():
            val_logits = model(xv)
        val_loss = float(bce(val_logits[:, 0], yv.to(val_logits.dtype)))
        scores = torch.sigmoid(val_logits[:, 0]).cpu().numpy()
        objective = choose_operating_point(yv_pos, scores, TARGET_CONTAMINATION).completeness
        history.append({"train_loss": float(loss_sum) / n, "val_loss": val_loss, "val_objective": objective})
    return history


def run_floor(dataset: Dataset, trials: Sequence[TrialParams], epochs: int) -> Timing:
    histories = []
    started = started_clean()
    for seed, params in enumerate(trials):
        histories.append(floor_trial(dataset, params, seed, epochs))
    wall = time.perf_counter() - started
    return Timing(wall, wall, sum(len(h) for h in histories), histories)


# --- tuner ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


#: Work tuner does only with tracking on: the MLflow writes, the trial plots and the model files to upload.
TRACKING_WORK = (
    ("tuner.tracking", "MlflowTracker", "__init__"),
    ("tuner.tracking", "MlflowTracker", "start_study"),
    ("tuner.tracking", "MlflowTracker", "start_trial"),
    ("tuner.tracking", "MlflowTracker", "run_id"),
    ("tuner.tracking", "MlflowTracker", "log_epoch"),
    ("tuner.tracking", "MlflowTracker", "end_trial"),
    ("tuner.tracking", "MlflowTracker", "end_study"),
    ("tuner.tracking", "MlflowTracker", "drain"),
    ("tuner.study", "Objective", "_plots"),
    ("tuner.study", None, "trial_model_files"),
)


def run_tuner(spec: StudySpec, dataset: Dataset, trials: Sequence[TrialParams], storage: str = "sqlite") -> Timing:
    """run_study, timed whole; inside it, timed by wrappers: Objective.train_trial (model build + fit), the
    per-epoch callbacks, and the tracking work (:data:`TRACKING_WORK`). On the device of ``dataset``'s tensors."""
    import importlib

    fits: list[tuple[float, list[dict[str, float]]]] = []
    spent = {"callbacks": 0.0, "tracking": 0.0}

    def time_fit(original: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            model, result = original(self, *args, **kwargs)
            fits.append((time.perf_counter() - started, result.history))
            return model, result

        return wrapper

    def time_into(key: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spent[key] += time.perf_counter() - started

            return wrapper

        return make

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(study_mod.Objective, "train_trial", time_fit))
        stack.enter_context(patched(study_mod.PruningCallback, "on_epoch_end", time_into("callbacks")))
        stack.enter_context(patched(study_mod.TrackingCallback, "on_epoch_end", time_into("callbacks")))
        for module, cls, name in TRACKING_WORK:
            owner = importlib.import_module(module)
            owner = getattr(owner, cls) if cls else owner
            if hasattr(owner, name):  # skipped if the code moved: the attribution is then incomplete
                stack.enter_context(patched(owner, name, time_into("tracking")))
        started = started_clean()
        result = study_mod.run_study(
            spec,
            storage=optuna.storages.InMemoryStorage() if storage == "memory" else None,
            n_trials=len(trials),
            device=dataset.train.x.device,
            enqueue=[enqueue_entry(p) for p in trials],
            dataset=dataset,
        )
        wall = time.perf_counter() - started
    states = [t.state.name for t in result.study.trials]
    if states != ["COMPLETE"] * len(trials):
        raise SystemExit(f"tuner study {spec.study.name}: trial states {states}, expected all COMPLETE")
    if result.tracking_warnings:
        raise SystemExit(f"tuner study {spec.study.name}: {result.tracking_warnings} MLflow writes failed")
    histories = [h for _, h in fits]
    epochs = sum(len(h) for h in histories)
    return Timing(
        wall, sum(s for s, _ in fits), epochs, histories, callbacks_s=spent["callbacks"], tracking_s=spent["tracking"]
    )


# --- baseline: the hand-wired loop ---------------------------------------------------------------------------


def baseline_net(n_in: int, params: dict[str, Any]) -> nn.Sequential:
    """The MLP as a user writes it: Linear, (BatchNorm), activation, (Dropout) per layer, then one logit."""
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU}[params["activation"]]
    gains: dict[str, Literal["relu", "tanh", "sigmoid"]] = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
    gain = gains.get(params["activation"], "relu")  # ELU has no gain of its own: ReLU's
    layers: list[nn.Module] = []
    width_in = n_in
    for i in range(params["n_layers"]):
        width = params[f"n_units_l{i}"]
        layers.append(nn.Linear(width_in, width))
        if params["batch_norm"]:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        if params["dropout"] > 0:
            layers.append(nn.Dropout(params["dropout"]))
        width_in = width
    layers.append(nn.Linear(width_in, 1))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            if params["init"] == "xavier":
                nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain(gain))
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity=gain)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def baseline_optimizer(net: nn.Module, params: dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, momentum, wd = params["optimizer"], params["lr"], params["momentum"], params["weight_decay"]
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, nesterov=name == "nesterov", weight_decay=wd)
    opt = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return opt(net.parameters(), lr=lr, betas=(momentum, 0.999), weight_decay=wd)


def completeness_at_contamination(y: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Highest recall (completeness) whose precision is at least 1 - target (contamination <= target)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, scores)
    ok = precision >= 1.0 - target
    return float(recall[ok].max()) if ok.any() else 0.0


def baseline_params(trial: optuna.Trial, space: Any) -> dict[str, Any]:
    """The search space suggested by hand, in the names of the enqueued trials."""

    def num(name: str, kind: str) -> Any:
        p = getattr(space, name)
        if p.value is not None:  # fixed in the study file: a constant, as a user's script would have it
            return int(p.value) if kind == "int" else float(p.value)
        suggest_fn = trial.suggest_int if kind == "int" else trial.suggest_float
        return suggest_fn(name, p.low, p.high, log=p.log)

    params: dict[str, Any] = {"n_layers": num("n_layers", "int")}
    for i in range(params["n_layers"]):
        w = space.width
        params[f"n_units_l{i}"] = trial.suggest_int(f"n_units_l{i}", w.low, w.high, log=w.log)
    for name in ("lr", "momentum", "dropout", "weight_decay"):
        params[name] = num(name, "float")
    b = space.batch_size
    params["batch_size"] = (
        int(b.value)
        if b.value is not None
        else trial.suggest_categorical(
            "batch_size", [2**k for k in range(int(math.log2(b.low)), int(math.log2(b.high)) + 1)]
        )
    )
    for name in ("optimizer", "activation", "init", "batch_norm"):
        params[name] = trial.suggest_categorical(name, list(getattr(space, name).options))
    return params


def baseline_entry(params: TrialParams) -> dict[str, Any]:
    entry: dict[str, Any] = {k: v for k, v in params.__dict__.items() if k not in ("widths", "max_grad_norm")}
    entry.update({f"n_units_l{i}": w for i, w in enumerate(params.widths)})
    return entry


def run_baseline(
    spec: StudySpec,
    dataset: Dataset,
    trials: Sequence[TrialParams],
    *,
    name: str,
    folder: Path,
    storage: str,
    tracking_uri: str | None = None,
    device: str = "cpu",
) -> Timing:
    """The hand-wired study: Optuna + MLflowCallback(track_in_mlflow) + DataLoader + mlflow.log_metric; MLflow in
    ``tracking_uri`` (default: a SQLite file in ``folder``). The data stay on the CPU (``dataset`` is the CPU
    copy); on another ``device`` the network lives there and each batch is moved to it, as the examples do."""
    import mlflow
    from optuna_integration.mlflow import MLflowCallback
    from torch.utils.data import DataLoader, TensorDataset

    x, y = dataset.train.x, dataset.train.y.float()
    xv, yv = dataset.validation.x.to(device), dataset.validation.y.float().to(device)
    yv_np = dataset.validation.y_numpy == dataset.positive_index
    epochs = spec.train.max_epochs
    fits: list[tuple[float, list[dict[str, float]]]] = []
    with warnings.catch_warnings():
        # MLflowCallback is deprecated (4.9, removed in 6.0) and track_in_mlflow experimental: still the
        # documented way in Optuna 5, so the warnings say nothing new here.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = MLflowCallback(
            tracking_uri=tracking_uri or f"sqlite:///{folder}/baseline-mlflow.db", metric_name="val_objective"
        )

        @callback.track_in_mlflow()
        def objective(trial: optuna.Trial) -> float:
            started = time.perf_counter()
            params = baseline_params(trial, spec.search_space)
            torch.manual_seed(trial.number)
            net = baseline_net(x.shape[1], params).to(device)
            optimizer = baseline_optimizer(net, params)
            loss_fn = nn.BCEWithLogitsLoss()
            batch = params["batch_size"]
            loader = DataLoader(
                TensorDataset(x, y),
                batch_size=batch,
                shuffle=True,
                drop_last=params["batch_norm"] and len(x) % batch == 1,
            )
            history = []
            value = 0.0
            for epoch in range(epochs):
                net.train()
                total = 0.0
                for xb, yb in loader:
                    xb, yb = xb.to(device), yb.to(device)
                    optimizer.zero_grad()
                    loss = loss_fn(net(xb).squeeze(1), yb)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(xb)
                net.eval()
                with torch.no_grad():
                    logits = net(xv).squeeze(1)
                    val_loss = loss_fn(logits, yv).item()
                    scores = torch.sigmoid(logits).cpu().numpy()
                    value = completeness_at_contamination(yv_np, scores, TARGET_CONTAMINATION)
                mlflow.log_metric("val_loss", val_loss, step=epoch)
                mlflow.log_metric("val_objective", value, step=epoch)
                history.append({"train_loss": total / len(x), "val_loss": val_loss, "val_objective": value})
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            fits.append((time.perf_counter() - started, history))
            return value

        started = started_clean()
        study = optuna.create_study(
            study_name=name,
            storage=None if storage == "memory" else f"sqlite:///{folder}/baseline-optuna.db",
            direction="maximize",
            sampler=optuna.samplers.RandomSampler(seed=0),
            pruner=optuna.pruners.NopPruner(),
        )
        for params in trials:
            study.enqueue_trial(baseline_entry(params))
        study.optimize(objective, n_trials=len(trials), callbacks=[callback])
        wall = time.perf_counter() - started
    states = [t.state.name for t in study.trials]
    if states != ["COMPLETE"] * len(trials):
        raise SystemExit(f"baseline study {name}: trial states {states}, expected all COMPLETE")
    histories = [h for _, h in fits]
    return Timing(wall, sum(s for s, _ in fits), sum(len(h) for h in histories), histories)


# --------------------------------------------------------------------------------------------------------------
# One data set


@dataclass(frozen=True)
class Side:
    key: str
    label: str
    threads: int
    run: Callable[[str], Timing]  # called with a fresh study name


def same_history(a: list[list[dict[str, float]]], b: list[list[dict[str, float]]], keys: Sequence[str]) -> str:
    """'identical' when every epoch's values are equal bit for bit, else the largest difference."""
    if [len(h) for h in a] != [len(h) for h in b]:
        return f"differs: epochs {[len(h) for h in a]} vs {[len(h) for h in b]}"
    worst = 0.0
    for ha, hb in zip(a, b, strict=True):
        for ea, eb in zip(ha, hb, strict=True):
            for k in keys:
                if ea[k] != eb[k] and not (math.isnan(ea[k]) and math.isnan(eb[k])):
                    worst = max(worst, abs(ea[k] - eb[k]))
    return "identical" if worst == 0.0 else f"differs (largest difference {worst:.3g})"


def stats(values: Sequence[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def bench_dataset(name: str, args: argparse.Namespace, folder: Path) -> list[str]:
    data = data_section(name, args)
    base = make_spec(data, args, name="draw", folder=folder, tracking=False)
    built = time.perf_counter()
    dataset = build_dataset(base, "cpu")
    # floor and tuner take their tensors on the device; the baseline moves CPU batches to it
    on_device = dataset if args.device == "cpu" else build_dataset(base, args.device)
    built = time.perf_counter() - built
    trials = draw_trials(base, args.batch_sizes, args.draw_seed)
    n_trials, epochs = len(trials), args.epochs
    default_threads = torch.get_num_threads()
    print(
        f"\n== {name}: {dataset.catalogue.source}; train {len(dataset.train)} rows, validation "
        f"{len(dataset.validation)} (built in {built:.1f} s, not timed); {n_trials} trials x {epochs} epochs",
        flush=True,
    )
    for i, p in enumerate(trials):
        print(f"   trial {i}: {describe(p)}")

    counter = iter(range(1_000_000))

    def fresh(prefix: str) -> str:
        return f"{prefix}-{name}-{next(counter)}"

    def tuner_side(tracking: bool) -> Callable[[str], Timing]:
        def run(study_name: str) -> Timing:
            spec = make_spec(data, args, name=study_name, folder=folder, tracking=tracking)
            return run_tuner(spec, on_device, trials, args.storage)

        return run

    sides = [
        Side("floor", "floor (bare loop)", args.tuner_threads, lambda _: run_floor(on_device, trials, epochs)),
        Side("off", "tuner, tracking off", args.tuner_threads, tuner_side(False)),
        Side("on", "tuner, tracking on", args.tuner_threads, tuner_side(True)),
    ]
    for t in args.baseline_threads:
        n = t or default_threads
        sides.append(
            Side(
                f"base{t}",
                f"baseline ({'torch default, ' if t == 0 else ''}{n} thread{'s' if n > 1 else ''})",
                n,
                lambda study_name: run_baseline(
                    base,
                    dataset,
                    trials,
                    name=study_name,
                    folder=folder,
                    storage=args.storage,
                    tracking_uri=args.tracking_uri,
                    device=args.device,
                ),
            )
        )

    # Warm-up, not timed: imports, the Optuna and MLflow stores' schemas, first-call allocations.
    warm_args = argparse.Namespace(**{**vars(args), "epochs": 1, "batch_sizes": [512]})
    warm_trials = trials[-1:]
    with threads(args.tuner_threads):
        floor_trial(on_device, warm_trials[0], 0, 1)
        ready_writer_process(args.tracking_writes, base.tracking.uri)
        for tracking in (False, True):
            spec = make_spec(data, warm_args, name=fresh("warm"), folder=folder, tracking=tracking)
            run_tuner(spec, on_device, warm_trials, args.storage)
        warm_spec = make_spec(data, warm_args, name="warm", folder=folder, tracking=False)
        run_baseline(
            warm_spec,
            dataset,
            warm_trials,
            name=fresh("warm"),
            folder=folder,
            storage=args.storage,
            tracking_uri=args.tracking_uri,
            device=args.device,
        )

    results: dict[str, list[Timing]] = {s.key: [] for s in sides}
    for rep in range(args.repeats):
        order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
        for side in order:
            with threads(side.threads):
                timing = side.run(fresh(side.key))
            if timing.epochs != n_trials * epochs:
                raise SystemExit(f"{side.label}: {timing.epochs} epochs trained, expected {n_trials * epochs}")
            results[side.key].append(timing)
        print(
            f"   repetition {rep + 1}/{args.repeats}: "
            + ", ".join(f"{s.key} {results[s.key][-1].study_s:.2f} s" for s in sides),
            flush=True,
        )

    lines = [
        f"\n{name}: {n_trials} trials x {epochs} epochs = {n_trials * epochs} epochs per side, batch sizes "
        f"{'/'.join(map(str, args.batch_sizes))}, train {len(dataset.train)} rows; {args.repeats} repetitions; "
        "min / median / max",
        f"{'side':<34}{'threads':>8}   {'study s/epoch':<28}{'fit s/epoch':<28}{'per-trial overhead s':<22}",
    ]
    for side in sides:
        runs = results[side.key]
        overhead = [(r.study_s - r.fit_s) / n_trials for r in runs]
        lines.append(
            f"{side.label:<34}{side.threads:>8}   {stats([r.study_per_epoch for r in runs], '.4f'):<28}"
            f"{stats([r.fit_per_epoch for r in runs], '.4f'):<28}{stats(overhead, '.3f'):<22}"
        )

    def ratio(a: str, b: str, what: str) -> list[float]:
        return [getattr(x, what) / getattr(y, what) for x, y in zip(results[a], results[b], strict=True)]

    no_callbacks = [(x.fit_s - x.callbacks_s) / y.fit_s for x, y in zip(results["off"], results["floor"], strict=True)]
    tracking_cost = [(a.study_s - b.study_s) / n_trials for a, b in zip(results["on"], results["off"], strict=True)]
    lines.append(
        "tuner, tracking off: per-epoch callbacks (Optuna trial.report / should_prune) "
        f"{stats([r.callbacks_s / r.epochs * 1e3 for r in results['off']], '.2f')} ms per epoch; "
        f"tracking on costs {stats(tracking_cost, '.3f')} s per trial (wall-time difference), "
        f"{stats([r.tracking_s / n_trials for r in results['on']], '.3f')} s per trial timed inside the tracking work"
    )
    rows: list[tuple[str, list[float], str, float | None]] = [
        ("P1a tuner fit / floor", ratio("off", "floor", "fit_s"), "<=", 1.10),
        ("    tuner fit minus callbacks / floor", no_callbacks, "<=", None),
        ("    tuner study / floor (info)", ratio("off", "floor", "study_s"), "<=", None),
    ]
    for t in args.baseline_threads:
        n = t or default_threads
        rows.append((f"P1b baseline ({n}T) / tuner, study", ratio(f"base{t}", "off", "study_s"), ">=", 1.5))
        rows.append((f"    baseline ({n}T) / tuner, fit (info)", ratio(f"base{t}", "off", "fit_s"), ">=", None))
    rows.append(("P2  tuner tracking on / off, study", ratio("on", "off", "study_s"), "<=", 1.05))
    attributed = [1 + a.tracking_s / b.study_s for a, b in zip(results["on"], results["off"], strict=True)]
    rows.append(("    1 + tracking work / off study (info)", attributed, "<=", None))
    lines.append(f"{'ratio (per repetition)':<44}{'min / median / max':<26}{'target':<10}result")
    for label, values, op, target in rows:
        if target is None:
            lines.append(f"{label:<44}{stats(values, '.3f'):<26}")
            continue
        med = statistics.median(values)
        ok = med <= target if op == "<=" else med >= target
        worst = max(values) if op == "<=" else min(values)
        all_ok = worst <= target if op == "<=" else worst >= target
        verdict = ("PASS" if ok else "FAIL") + ("" if ok == all_ok else f" (worst repetition {worst:.3f})")
        lines.append(f"{label:<44}{stats(values, '.3f'):<26}{op + ' ' + format(target, 'g'):<10}{verdict}")
    keys = ("train_loss", "val_loss", "val_objective")
    lines.append(
        "same model and batches: floor vs tuner per-epoch train/val loss and objective "
        f"{same_history(results['floor'][0].histories, results['off'][0].histories, keys)}; "
        f"tuner tracking on vs off {same_history(results['on'][0].histories, results['off'][0].histories, keys)}"
    )
    return lines


def commit_latency(folder: Path, n: int = 20) -> float:
    """Seconds per SQLite commit (one row) in the scratch folder: what each Optuna or MLflow write waits for."""
    import sqlite3

    conn = sqlite3.connect(folder / "probe.db")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
        conn.commit()
        started = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO t VALUES (?)", (i,))
            conn.commit()
        return (time.perf_counter() - started) / n
    finally:
        conn.close()


def ready_writer_process(tracking_writes: str, tracking_uri: str) -> None:
    """Start tuner's MLflow writer process, when the studies' writes go there, and wait until it takes jobs:
    its start-up (imports) is excluded as other imports are, and the warm-up study's writes then open its store."""
    writer = tracking_mod.start_writer_process(tracking_uri, tracking_writes)
    if writer is not None and not writer.wait_ready(timeout=120):
        raise SystemExit("tuner's MLflow writer process did not start")


def add_tracking_writes(parser: argparse.ArgumentParser) -> None:
    """The ``--tracking-writes`` option: tuner's ``tracking.writes`` for the benchmark's studies."""
    parser.add_argument(
        "--tracking-writes",
        choices=["auto", "process", "background", "inline"],
        default="auto",
        help="tuner's tracking.writes (default auto: on a background thread for a server or a database server, in "
        "a writer process for a local SQLite file)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=["sdss", "simulated"], default=["sdss", "simulated"])
    parser.add_argument("--sdss", default=str(ROOT.parent / "shared" / "data" / "sdss_dr14_10k.csv.gz"))
    parser.add_argument("--n-star", type=int, default=100_000, help="simulated stars (default 100000)")
    parser.add_argument("--n-quasar", type=int, default=1_000, help="simulated quasars (default 1000)")
    parser.add_argument("--epochs", type=int, default=5, help="fixed epochs per trial (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 64, 256, 512], help="one trial per batch size"
    )
    parser.add_argument("--draw-seed", type=int, default=0, help="seed of the random draw of the trials")
    parser.add_argument("--tuner-threads", type=int, default=1, help="torch threads for floor and tuner")
    parser.add_argument(
        "--baseline-threads", type=int, nargs="+", default=[1, 0], help="torch threads for the baseline; 0 = default"
    )
    parser.add_argument(
        "--storage",
        choices=["sqlite", "memory"],
        default="sqlite",
        help="Optuna storage of tuner and baseline: a SQLite file in the scratch folder (default) or in memory",
    )
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="tracking.plots false for tuner")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store of tuner and baseline, e.g. http://127.0.0.1:5000 (default: SQLite files in scratch)",
    )
    add_tracking_writes(parser)
    parser.add_argument(
        "--device", default="cpu", help="device of every side, e.g. cuda (the baseline moves CPU batches to it)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (stores) and print its path")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be >= 1")

    lines = [
        f"torch {torch.__version__}, optuna {optuna.__version__}, cores {os.cpu_count()}, "
        f"torch default threads {torch.get_num_threads()}; Optuna storage {args.storage}; device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
    ]
    folder = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    try:
        lines.append(
            f"before: load average {os.getloadavg()[0]:.2f}, SQLite commit {commit_latency(folder) * 1e3:.1f} ms "
            f"(in {folder})"
        )
        for name in args.datasets:
            lines += bench_dataset(name, args, folder)
        lines.append(
            f"\nafter: load average {os.getloadavg()[0]:.2f}, SQLite commit {commit_latency(folder) * 1e3:.1f} ms"
        )
    finally:
        if args.keep:
            print(f"scratch folder kept: {folder}")
        else:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
