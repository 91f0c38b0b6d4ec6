"""Benchmark (not a timed test): how long the study report's figures take for a 1,000-trial study.

The study is synthetic: trials are made with ``optuna.trial.create_trial`` and ``Study.add_trial`` with the
parameters, per-epoch intermediate values and user attributes a real study records, and no training. About a
third are pruned (cut short), a few failed, the rest complete. Only the study-level figures are timed; the
best-trial comparison needs trained models and is skipped (``compare=False``).

Run: ``.venv/bin/python bench/bench_report.py [--trials 1000] [--repeat 3] [--out bench-report.html]``
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tuner.config import StudySpec, spec_from_dict
from tuner.report import build_report, study_sections

SPEC = {
    "search_space": {
        "n_layers": {"low": 1, "high": 3},
        "width": {"low": 16, "high": 128, "log": True},
        "batch_size": {"low": 256, "high": 1024, "log": True, "powers_of_two": True},
        "optimizer": {"choices": ["adam", "adamw", "nesterov"]},
        "activation": {"choices": ["relu", "elu", "tanh"]},
        "init": {"choices": ["he", "xavier"]},
        "batch_norm": {"choices": [False, True]},
    },
    "train": {"max_epochs": 60, "patience": 8},
    "study": {"name": "bench-report", "sampler": "tpe", "pruner": "median"},
}


def _distributions(n_layers: int) -> dict[str, BaseDistribution]:
    dists: dict[str, BaseDistribution] = {"n_layers": IntDistribution(1, 3)}
    for layer in range(n_layers):
        dists[f"n_units_l{layer}"] = IntDistribution(16, 128, log=True)
    dists.update(
        {
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
            "momentum": FloatDistribution(0.1, 0.99),
            "dropout": FloatDistribution(0.0, 0.5),
            "weight_decay": FloatDistribution(1e-6, 1e-1, log=True),
            "log2_batch_size": IntDistribution(8, 10),
            "optimizer": CategoricalDistribution(["adam", "adamw", "nesterov"]),
            "activation": CategoricalDistribution(["relu", "elu", "tanh"]),
            "init": CategoricalDistribution(["he", "xavier"]),
            "batch_norm": CategoricalDistribution([False, True]),
        }
    )
    return dists


def _sample(dists: dict[str, BaseDistribution], rng: np.random.Generator) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, dist in dists.items():
        if isinstance(dist, CategoricalDistribution):
            params[name] = dist.choices[int(rng.integers(len(dist.choices)))]
        elif isinstance(dist, IntDistribution):
            params[name] = int(rng.integers(dist.low, dist.high + 1))
        elif isinstance(dist, FloatDistribution):
            if dist.log:
                params[name] = float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
            else:
                params[name] = float(rng.uniform(dist.low, dist.high))
    return params


def synthetic_study(n_trials: int = 1000, seed: int = 0, storage: Any = None) -> tuple[optuna.Study, StudySpec]:
    """A finished-looking study of ``n_trials`` trials with the attributes tuner records, and its spec.

    Args:
        n_trials: Number of trials to add.
        seed: Seeds the synthetic parameters and curves.
        storage: Optuna storage; in memory when None.

    Returns:
        The study and the spec it claims to have been run with.
    """
    spec = spec_from_dict(SPEC)
    rng = np.random.default_rng(seed)
    study = optuna.create_study(study_name=spec.study.name, storage=storage, direction="maximize")
    study.set_user_attr("tuner.spec", spec.model_dump(mode="json"))
    study.set_user_attr(
        "tuner.data",
        {
            "data.source": "simulated(n_star=100000, n_quasar=1000, n_galaxy=0, seed=0)",
            "data.hash": "0123456789abcdef",
            "data.rows": "101000",
            "data.class_counts": "rest=100000, QSO=1000",
            "data.split_sizes": "train=60600, validation=20200, holdout=20200",
            "data.features": "u-g, g-r, r-i, i-z",
        },
    )
    max_epochs = spec.train.max_epochs
    trials = []
    start = time.time() - n_trials * 20.0
    for number in range(n_trials):
        dists = _distributions(int(rng.integers(1, 4)))
        params = _sample(dists, rng)
        params["n_layers"] = sum(1 for k in dists if k.startswith("n_units_l"))
        # A learning curve that rises towards a ceiling set by lr, with noise.
        ceiling = 0.95 - 0.1 * abs(math.log10(params["lr"]) + 2.5) / 1.5 + rng.normal(0, 0.02)
        rate = rng.uniform(0.1, 0.5)
        roll = rng.uniform()
        state = TrialState.PRUNED if roll < 0.35 else TrialState.FAIL if roll < 0.38 else TrialState.COMPLETE
        epochs = int(rng.integers(2, 10)) if state == TrialState.PRUNED else int(rng.integers(10, max_epochs + 1))
        curve = [
            float(np.clip(ceiling * (1 - math.exp(-rate * (e + 1))) + rng.normal(0, 0.01), 0, 1)) for e in range(epochs)
        ]
        best_epoch = int(np.argmax(curve))
        attrs: dict[str, Any] = {
            "mlflow_run_id": f"{number:032x}",
            "seed": number,
            "epochs": epochs,
        }
        value = None
        if state == TrialState.PRUNED:
            attrs["stop_reason"] = f"pruned at epoch {epochs - 1} (val_objective={curve[-1]:.6g})"
        elif state == TrialState.FAIL:
            attrs["stop_reason"] = attrs["fail_reason"] = f"non-finite train_loss (nan) at epoch {epochs - 1}"
        else:
            value = curve[best_epoch]
            comp = float(np.clip(value + rng.normal(0, 0.02), 0, 1))
            cont = float(np.clip(0.1 + rng.normal(0, 0.02), 0, 1))
            attrs.update(
                {
                    "best_epoch": best_epoch,
                    "stop_reason": "early stopping: val_loss did not improve by more than 0 for 8 epochs",
                    "val_objective": value,
                    "threshold": float(rng.uniform(0.1, 0.9)),
                    "val_completeness": value,
                    "val_contamination": float(rng.uniform(0.05, 0.1)),
                    "val_auc": float(rng.uniform(0.97, 0.995)),
                    "val_ap": float(rng.uniform(0.85, 0.95)),
                    "holdout_completeness": comp,
                    "holdout_completeness_low": max(comp - 0.04, 0.0),
                    "holdout_completeness_high": min(comp + 0.03, 1.0),
                    "holdout_contamination": cont,
                    "holdout_contamination_low": max(cont - 0.03, 0.0),
                    "holdout_contamination_high": min(cont + 0.04, 1.0),
                    "holdout_auc": float(rng.uniform(0.97, 0.995)),
                }
            )
        trial = create_trial(
            state=state,
            value=value,
            params=params,
            distributions=dists,
            user_attrs=attrs,
            intermediate_values=dict(enumerate(curve)),
        )
        # create_trial stamps "now"; spread the trials over time so the wall time means something.
        trial.datetime_start = datetime.fromtimestamp(start + number * 20.0)
        trial.datetime_complete = datetime.fromtimestamp(start + number * 20.0 + epochs * 0.5)
        trials.append(trial)
    study.add_trials(trials)
    return study, spec


def main() -> None:
    """Build the synthetic study and print how long the report's figures take, in seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the whole report here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    t0 = time.perf_counter()
    study, spec = synthetic_study(args.trials)
    print(f"synthetic study: {args.trials} trials in {time.perf_counter() - t0:.2f} s")
    timings: list[float] = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        sections = study_sections(study, spec)
        html = "".join(s.html() for s in sections)
        timings.append(time.perf_counter() - t0)
    print(f"figures + HTML of the study sections: {len(sections)} sections, {len(html) / 1e6:.1f} MB without plotly.js")
    print(f"figure rendering (seconds): best {min(timings):.2f}, median {float(np.median(timings)):.2f}")
    if args.out:
        t0 = time.perf_counter()
        args.out.write_text(build_report(study, spec, compare=False).html)
        print(f"whole report written to {args.out} in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
