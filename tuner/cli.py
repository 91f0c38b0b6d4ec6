"""The ``tuner`` command: parse, build the spec, call the API, print, return an exit code.

Exit codes: 0 success, 2 a mistake the user can fix (bad study file, bad data, unreachable storage), 130 on
Ctrl-C. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tuner.config import StudySpec, load_spec
from tuner.errors import ConfigError, TunerError
from tuner.tracking import mask_password
from tuner.worker import Terminated, interrupted_summary

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _spec_for(args: argparse.Namespace) -> StudySpec:
    spec = load_spec(args.study)
    overrides: dict[str, Any] = {}
    for flag, key in (("storage", "study.storage"), ("study_name", "study.name"), ("tracking_uri", "tracking.uri")):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not value.strip():
            raise ConfigError(
                f"--{flag.replace('_', '-')}: must not be empty (it sets {key}); leave the flag out instead"
            )
        overrides[key] = value
    if getattr(args, "n_trials", None) is not None:
        overrides["study.n_trials"] = args.n_trials
    if getattr(args, "no_tracking", False):
        if getattr(args, "tracking_uri", None) is not None:
            raise ConfigError("--no-tracking and --tracking-uri contradict each other: give one of them")
        overrides["tracking.enabled"] = False
    return spec.with_overrides(overrides) if overrides else spec


def _read_enqueue(path: str | None) -> list[dict[str, Any]]:
    if not path:
        return []
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--enqueue: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--enqueue: {path} is not valid JSON: {exc}") from None
    return raw if isinstance(raw, list) else [raw]


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def trial_params(trial: Any, spec: StudySpec) -> dict[str, Any]:
    """A stored trial's hyperparameters as the model used them (fixed ones included, batch size not as log2)."""
    from dataclasses import asdict

    from tuner.space import OPTIONAL_PARAMS, suggest

    try:
        record = asdict(suggest(trial, spec.search_space))
    except ValueError:  # a study not made by tuner (or by another space): show Optuna's parameters as they are
        return dict(trial.params)
    record["widths"] = list(record["widths"])
    # Parameters the study's space leaves out (clipping, a regression's loss, L1) are not shown as None.
    return {k: v for k, v in record.items() if not (k in OPTIONAL_PARAMS and v is None)}


def print_trial(trial: Any, spec: StudySpec, title: str = "Best trial") -> None:
    """The best trial's parameters, validation objective and honest holdout figures."""
    attrs = trial.user_attrs
    table = Table(title=f"{title}: #{trial.number}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in trial_params(trial, spec).items():
        table.add_row(key, _fmt(value))
    direction = spec.objective.direction
    console.print(table)
    console.print(f"validation objective ({direction}): [bold]{_fmt(trial.value, 5)}[/bold]")
    if "holdout_rmse" in attrs:
        console.print(f"validation MAE {attrs['val_mae']:.4g}, RMSE {attrs['val_rmse']:.4g}, R² {attrs['val_r2']:.4f}")
        for name, label in (("mae", "MAE "), ("rmse", "RMSE"), ("r2", "R²  ")):
            key = f"holdout_{name}"
            console.print(
                f"holdout {label}  {attrs[key]:.4g}  95% CI [{attrs[key + '_low']:.4g}, {attrs[key + '_high']:.4g}]"
                " (bootstrap)"
            )
    elif "holdout_completeness" in attrs and "threshold" not in attrs:
        # Multilabel: one threshold per label, chosen on validation; the headline figures are macro averages.
        console.print(
            f"holdout, macro over labels: completeness {attrs['holdout_completeness']:.4f}, contamination "
            f"{attrs['holdout_contamination']:.4f} (each label's threshold chosen on validation)"
        )
        for key in sorted(k for k in attrs if k.startswith("threshold_")):
            name = key[len("threshold_") :]
            console.print(
                f"  {name}: threshold {attrs[key]:.4g}; holdout completeness "
                f"{_interval(attrs, f'holdout_completeness_{name}')}, contamination "
                f"{_interval(attrs, f'holdout_contamination_{name}')}"
            )
    elif "holdout_completeness" in attrs:
        console.print(
            f"threshold {attrs['threshold']:.4g} (chosen on validation: completeness {attrs['val_completeness']:.4f}, "
            f"contamination {attrs['val_contamination']:.4f})"
        )
        console.print(
            f"holdout completeness   {attrs['holdout_completeness']:.4f}  "
            f"95% CI [{attrs['holdout_completeness_low']:.4f}, {attrs['holdout_completeness_high']:.4f}]"
        )
        console.print(
            f"holdout contamination  {attrs['holdout_contamination']:.4f}  "
            f"95% CI [{attrs['holdout_contamination_low']:.4f}, {attrs['holdout_contamination_high']:.4f}]"
        )
    if "holdout_macro_completeness" in attrs:
        # Multiclass: every class at its most probable class (no threshold), then the macro figures.
        classes = sorted(k[len("holdout_contamination_") : -len("_low")] for k in attrs if _is_class_interval(k))
        for name in classes:
            console.print(
                f"  {name}: holdout completeness {_interval(attrs, f'holdout_completeness_{name}')}, "
                f"contamination {_interval(attrs, f'holdout_contamination_{name}')}"
            )
        console.print(
            f"holdout macro completeness {attrs['holdout_macro_completeness']:.4f}, macro contamination "
            f"{attrs['holdout_macro_contamination']:.4f}, accuracy {attrs['holdout_accuracy']:.4f} "
            "(each row to its most probable class)"
        )
    if "fold_best_epochs" in attrs:
        # k-fold: the epochs of every fold together, each fold with its own best epoch.
        best = f"{len(attrs['fold_best_epochs'])} folds, best epochs {', '.join(map(str, attrs['fold_best_epochs']))}"
    else:
        best = f"best {attrs.get('best_epoch', '?')}"
    console.print(f"epochs {attrs.get('epochs', '?')} ({best}); {attrs.get('stop_reason', '')}")
    if "mlflow_run_id" in attrs:
        console.print(f"MLflow run {attrs['mlflow_run_id']}")


def _is_class_interval(key: str) -> bool:
    return (
        key.startswith("holdout_contamination_")
        and key.endswith("_low")
        and not key.startswith("holdout_contamination_at_threshold")
    )


def _values(trial: Any) -> str:
    """A trial's objective value, or its values joined by ``/`` in a multi-objective study; ``-`` without."""
    return "/".join(_fmt(v, 5) for v in trial.values) if trial.values else "-"


def _interval(attrs: dict[str, Any], key: str) -> str:
    if key not in attrs:
        return "-"
    return f"{attrs[key]:.3f} [{attrs[key + '_low']:.3f}, {attrs[key + '_high']:.3f}]"


def shown_attrs(trial: Any) -> dict[str, Any]:
    """A trial's user attributes for ``--json``, without the record a tracking outage left for its run (curves of
    up to 32 KB, perhaps with NaN, which strict JSON readers refuse)."""
    from tuner.worker import RUN_LEFT_OUT

    return {key: value for key, value in trial.user_attrs.items() if key != RUN_LEFT_OUT}


def front_records(study: Any, spec: StudySpec) -> list[dict[str, Any]]:
    """The Pareto front of a multi-objective study, one record per trial in trial order."""
    from tuner.pareto import front, objective_names

    names = objective_names(study)
    return [
        {
            "number": t.number,
            "values": dict(zip(names, t.values, strict=True)),
            "params": trial_params(t, spec),
            **shown_attrs(t),
        }
        for t in front(study)
    ]


def print_front(study: Any, spec: StudySpec) -> None:
    """The Pareto front as a table: each objective, then the holdout figures with their 95% intervals.

    Classifiers: holdout completeness and contamination (Wilson intervals) at the fixed threshold
    (``objective.threshold``, where the completeness and contamination objectives are measured on validation), and
    at the threshold chosen on validation for ``objective.target_contamination`` (macro over labels for a
    multilabel task). Regressions: holdout MAE, RMSE and R² (bootstrap intervals).
    """
    from tuner.config import REGRESSION_TASKS
    from tuner.pareto import objective_names

    names = objective_names(study)
    regression = spec.task in REGRESSION_TASKS
    fixed = spec.objective.uses_threshold
    table = Table(title=f"Pareto front of study {spec.study.name}", title_justify="left")
    table.add_column("trial", justify="right")
    for name, direction in zip(names, study.directions, strict=True):
        table.add_column(f"{name} ({direction.name.lower()[:3]})", justify="right")
    # Short headers keep the table readable in 80 columns; the legend below spells them out.
    if regression:
        columns = [("H MAE", "holdout_mae"), ("H RMSE", "holdout_rmse"), ("H R²", "holdout_r2")]
    else:
        columns = [("H compl. @target", "holdout_completeness"), ("H contam. @target", "holdout_contamination")]
        if fixed:
            columns = [
                ("H compl. @fixed", "holdout_completeness_at_threshold"),
                ("H contam. @fixed", "holdout_contamination_at_threshold"),
                *columns,
            ]
    for header, _ in columns:
        table.add_column(header)
    records = front_records(study, spec)
    for record in records:
        row = [str(record["number"]), *(_fmt(v, 4) for v in record["values"].values())]
        row += [_interval(record, key) if f"{key}_low" in record else _fmt(record.get(key, "-")) for _, key in columns]
        table.add_row(*row)
    console.print(table)
    if regression:
        legend = "objectives measured on validation; H: holdout, with 95% bootstrap intervals"
    else:
        legend = "objectives measured on validation; H: holdout, with 95% Wilson intervals"
        if spec.task == "multilabel":
            legend = "objectives measured on validation; H: holdout, macro averages over the labels"
        if fixed:
            legend += f"; @fixed: at the score threshold {spec.objective.threshold:g}"
        legend += (
            f"; @target: at the threshold chosen on validation for contamination "
            f"{spec.objective.target_contamination:g}"
        )
    console.print(legend)
    console.print(
        f"{len(records)} trial(s) on the front; export one with `tuner export STUDY --trial N` or "
        f"`--rule '{names[-1]}<=C'`"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from tuner.study import run_study

    if args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    import torch

    # Threads spin while they wait: with more threads than free cores an epoch ran 10x slower on 2 busy cores.
    torch.set_num_threads(args.threads)
    spec = _spec_for(args)
    enqueue = _read_enqueue(args.enqueue)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=args.quiet or args.mode == "create",
    )
    task_id = progress.add_task(spec.study.name, total=None, best="-")
    last = [time.monotonic()]
    started: list[bool] = []  # stopping a progress display never started prints an empty line

    def on_start(study: Any, remaining: int) -> None:
        from tuner.worker import budget

        if args.mode == "create":
            return
        # Failed trials that were queued again do not count: their retries do.
        used = budget(study, spec.study.n_trials).used
        console.print(
            f"study [bold]{spec.study.name}[/bold]: {used} finished trial(s) count towards n_trials "
            f"{spec.study.n_trials}; running up to {remaining} more"
        )
        progress.update(task_id, total=remaining)
        progress.start()
        started.append(True)

    def on_trial(study: Any, trial: Any) -> None:
        now = time.monotonic()
        seconds, last[0] = now - last[0], now
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            # The trial's own wall time: members of a pack end together, so the gap since the last line is 0.
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        best = "-"
        if len(study.directions) > 1:
            best = f"front of {len(study.best_trials)}"
        else:
            with contextlib.suppress(ValueError):  # no completed trial yet
                best = _fmt(study.best_value, 5)
        progress.update(task_id, advance=1, best=best)
        value = _values(trial)
        reason = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("stop_reason", "")
        # One line per trial, also under --quiet: workers' logs need them.
        progress.console.print(
            f"trial {trial.number:4d} {trial.state.name:8s} value {value:>8s}  "
            f"epochs {trial.user_attrs.get('epochs', '-')}  {seconds:5.1f}s  "
            f"{reason if trial.state.name != 'COMPLETE' else ''}"
        )

    try:
        result = run_study(
            spec,
            device=args.device,
            enqueue=enqueue,
            callbacks=[on_trial],
            on_start=on_start,
            mode=getattr(args, "mode", "run"),
        )
    finally:
        if started:
            progress.stop()
    study = result.study
    from optuna.trial import TrialState

    from tuner.worker import retrying, state_counts

    # Read with retries: a database restart as the study ends must not turn its finished work into a traceback.
    counts = {k: v for k, v in retrying(lambda: state_counts(study), what="count trials").items() if v}
    if args.mode == "create":
        console.print(f"study {spec.study.name!r} is ready in {mask_password(spec.study.storage)}; start workers with:")
        console.print("  " + worker_command(args, spec.study.storage), soft_wrap=True)  # whole, to paste
        return 0
    console.print(
        f"this process ran {result.n_run} trial(s); the study holds: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    complete = retrying(lambda: study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), what="read trials")
    if complete and len(study.directions) > 1:
        print_front(study, spec)
    elif complete:
        print_trial(retrying(lambda: study.best_trial, what="read the best trial"), spec)
    else:
        err_console.print("no trial completed; see the reasons above")
    console.print(f"MLflow: {result.ui_hint}")
    if result.tracking_warnings:
        err_console.print(f"warning: {result.tracking_warnings} MLflow write(s) failed; see the log above")
    return 0 if complete else 1


def _open_study(args: argparse.Namespace) -> tuple[Any, StudySpec]:
    """The stored study named by a study file or by name, and the spec it was created with.

    Light on purpose (optuna, not torch or MLflow): ``tuner status`` and ``tuner best`` go through here.
    """
    from tuner.config import spec_from_dict
    from tuner.worker import load_existing

    target = Path(args.study)
    if target.suffix in (".yaml", ".yml") or target.is_file():
        spec = _spec_for(args)
        return load_existing(spec.study.name, spec.study.storage), spec
    storage = args.storage or StudySpec().study.storage
    study = load_existing(args.study, storage)
    stored = study.user_attrs.get("tuner.spec")
    if stored:
        # The stored spec has its passwords masked: keep the storage this command was given.
        spec = spec_from_dict(stored).with_overrides({"study.storage": storage})
    else:
        spec = StudySpec().with_overrides({"study.name": args.study, "study.storage": storage})
    return study, spec


def cmd_status(args: argparse.Namespace) -> int:
    from tuner.worker import losses, state_counts

    study, spec = _open_study(args)
    name = spec.study.name
    counts = state_counts(study)
    table = Table(title=f"study {name}", title_justify="left")
    table.add_column("state")
    table.add_column("trials", justify="right")
    for state, n in counts.items():
        table.add_row(state, str(n))
    console.print(table)
    lost = losses(study) if counts["FAIL"] else None
    if lost is not None:
        # A failed trial is either the parameters' doing or the machinery's: the second kind is run again.
        surplus = f", {lost.surplus} surplus (made beyond n_trials in a database outage; not counted)"
        machinery = (
            f"{lost.lost} lost (worker died or stopped, or the database went away), {lost.queued_again} of them "
            f"queued again{surplus if lost.surplus else ''}"
            if lost.lost
            else "none lost (worker died or stopped, or the database went away)"
        )
        console.print(f"failed: {counts['FAIL'] - lost.lost} in training; {machinery}")
    if counts["COMPLETE"] and len(study.directions) > 1:
        from tuner.pareto import front, objective_names

        numbers = [t.number for t in front(study)]
        console.print(
            f"Pareto front so far ({', '.join(objective_names(study))}): {len(numbers)} trial(s), "
            f"#{', #'.join(map(str, numbers))}"
        )
    elif counts["COMPLETE"]:
        best = study.best_trial
        console.print(
            f"best so far: trial #{best.number}, value {_fmt(best.value, 5)} ({study.direction.name.lower()})"
        )
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from tuner.worker import state_counts

    study, spec = _open_study(args)
    # Counted in the database: loading every trial to find one COMPLETE took 4 s at 10,000 trials.
    if not state_counts(study)["COMPLETE"]:
        err_console.print(f"study {spec.study.name!r} has no completed trial yet")
        return 1
    if len(study.directions) > 1:
        if args.json:
            print(json.dumps(front_records(study, spec), indent=2))
        else:
            print_front(study, spec)
        return 0
    best = study.best_trial
    if args.json:
        record = {"number": best.number, "value": best.value, "params": trial_params(best, spec), **shown_attrs(best)}
        print(json.dumps(record, indent=2))
    else:
        print_trial(best, spec)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tuner.data.dataset import build_dataset
    from tuner.study import check_spec

    spec = _spec_for(args)
    check_spec(spec)
    dataset = build_dataset(spec, "cpu")
    console.print(f"{args.study}: valid")
    for key, value in dataset.facts().items():
        console.print(f"  {key}: {value}")
    return 0


def _quiet_mlflow_downloads() -> None:
    import os

    # MLflow's per-file download progress bars would bury the summary; the user's own setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _say(text: str) -> None:
    # Paths and URIs are printed whole (no wrapping, no markup), so they can be copied.
    console.print(text, markup=False, soft_wrap=True)


def cmd_export(args: argparse.Namespace) -> int:
    from tuner.export import ALIAS, export_trial, figures_summary

    _quiet_mlflow_downloads()
    study, spec = _open_study(args)
    result = export_trial(
        study,
        spec,
        trial_number=args.trial,
        rule=args.rule,
        out=args.out,
        force=args.force,
        register=args.register,
        tracking_uri=args.tracking_uri,
    )
    for note in result.notes:
        err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    card = result.card

    def figures(entry: dict[str, Any]) -> str:
        return figures_summary(entry["figures"], card["task"])

    _say(f"exported trial {result.trial_number} of study {result.study_name!r} to {result.path}")
    _say(f"  trial {result.trial_number}: {figures(card['trial'])}")
    if card["runner_up"]:
        _say(f"  runner-up trial {card['runner_up']['number']}: {figures(card['runner_up'])}")
        _say(f"  {card['comparison']['reading']}")
    _say(f"  model card: {result.path / 'model_card.md'}")
    if result.logged_uri:
        _say(f"  logged to MLflow: {result.logged_uri}")
    if result.version:
        _say(
            f"  registered {result.registered_name!r} version {result.version}; alias {ALIAS!r} -> "
            f"{result.champion_uri}",
        )
        uri = result.champion_uri
    else:
        _say(f"  (with --register it would load as {result.champion_uri})")
        uri = str(result.path)
    _say(f"  use: tuner predict {uri} --data CATALOGUE --out SCORES.csv")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tuner.export import predict_file

    _quiet_mlflow_downloads()
    _refuse_overwriting(Path(args.out), "--out", args, None)
    result = predict_file(args.model, args.data, args.out, id_columns=args.id_columns, tracking_uri=args.tracking_uri)
    selected = ""
    if result.selected is not None:
        selected = f"; {result.selected} selected as {result.positive_class} at threshold {result.threshold:.6g}"
    _say(f"scored {result.rows} rows of {args.data} into {result.out}{selected}")
    if result.selected_per_label and result.thresholds:
        for label, count in result.selected_per_label.items():
            _say(f"  {label}: {count} selected at threshold {result.thresholds[label]:.6g}")
    _say(f"columns: {', '.join(result.columns)}")
    return 0


def _refuse_overwriting(
    out: Path, option: str, args: argparse.Namespace, spec: StudySpec | None, study: Any = None
) -> None:
    """Raise ConfigError when ``out`` is a file the command reads, or any SQLite database."""
    from tuner.paths import overwrite_problem

    inputs: dict[str, Path | None] = {}
    named = getattr(args, "study", None)
    if named and _is_study_file(named):
        inputs["the study file"] = Path(named)
    if spec is not None:
        inputs["the study's catalogue (data.source)"] = spec.data_path()
    if study is not None:
        # A study opened by name has its spec from storage, whose relative data.source means nothing here; the
        # study keeps the path it read, resolved.
        read = (study.user_attrs.get("tuner.data") or {}).get("data.source")
        if isinstance(read, str) and read != "simulated":
            inputs["the catalogue the study was run on (data.source)"] = Path(read)
    if getattr(args, "data", None):
        inputs["the --data file"] = Path(args.data)
    problem = overwrite_problem(out, inputs)
    if problem:
        raise ConfigError(f"{option}: {problem}")


def _is_study_file(study: str) -> bool:
    return Path(study).suffix in (".yaml", ".yml") or Path(study).is_file()


def cmd_report(args: argparse.Namespace) -> int:
    from tuner.report import build_report, log_report, write_report

    study, spec = _open_study(args)
    out = Path(args.out or Path("reports") / f"{spec.study.name}.html")
    _refuse_overwriting(out, "--out", args, spec, study)  # before the replays, which can take minutes
    report = build_report(study, spec, tracking_uri=args.tracking_uri, replay=not args.no_replay, say=_say)
    path = write_report(report, out)
    size = path.stat().st_size / 1e6
    _say(f"report of study {spec.study.name!r} written to {path} ({size:.1f} MB)")
    for text in report.warnings:
        err_console.print(f"warning: {text}", markup=False)
    if not args.no_mlflow:
        try:
            _say(f"logged to {log_report(study, spec, report, args.tracking_uri)}")
        except TunerError as exc:
            # The report is written; a copy MLflow refused is worth a warning, not a failed command.
            err_console.print(f"warning: report not logged to MLflow: {exc}", markup=False)
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    from tuner.report import trials_frame, trials_table, write_trials

    study, spec = _open_study(args)
    if args.csv or args.parquet:
        _refuse_overwriting(Path(args.csv or args.parquet), "--csv" if args.csv else "--parquet", args, spec, study)
    frame = trials_frame(study, spec)
    if args.csv or args.parquet:
        path = write_trials(frame, args.csv or args.parquet, "csv" if args.csv else "parquet")
        _say(f"{len(frame)} trial(s) of study {spec.study.name!r} written to {path}")
    else:
        console.print(trials_table(frame, f"study {spec.study.name}: {len(frame)} trial(s)"))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from tuner.report import serve_mlflow_ui

    tracking_uri, experiment, minimize = args.tracking_uri, None, False
    if args.study:
        _, spec = _open_study(args)
        tracking_uri = tracking_uri or spec.tracking.uri
        experiment = spec.tracking.experiment or spec.study.name
        minimize = spec.objective.direction == "minimize"
    return serve_mlflow_ui(
        tracking_uri or StudySpec().tracking.uri,
        host=args.host,
        port=args.port,
        experiment=experiment,
        minimize=minimize,
        say=_say,
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from tuner.report import serve_dashboard

    _, spec = _open_study(args)
    # Where _open_study found the study: the file's storage, or --storage / the default for a bare name.
    storage = spec.study.storage if _is_study_file(args.study) else args.storage or StudySpec().study.storage
    return serve_dashboard(
        storage,
        study_name=spec.study.name,
        host=args.host,
        port=args.port,
        say=_say,
    )


def cmd_replay(args: argparse.Namespace) -> int:
    from tuner.study import replay_trial

    study, spec = _open_study(args)
    announce = (
        f"replaying trial {args.trial} of study {spec.study.name!r} alone on the CPU, from its parameters and seed"
    )
    replay = replay_trial(study, spec, args.trial, on_start=lambda: _say(announce))
    for note in replay.notes:
        err_console.print(f"note: {note}", markup=False, soft_wrap=True)
    for line in replay.summary():
        _say(line)
    # 1, not 2: nothing to fix in the command; the trial did not reproduce.
    return 0 if replay.matches else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuner", description="Tune and track neural-network classifiers.")
    from tuner import __version__

    parser.add_argument("--version", action="version", version=f"tuner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for mode, text in (
        ("run", "run or continue a study from a study file (creating it when missing)"),
        ("create", "create the study (tables, warm-start queue, MLflow parent run) before starting workers"),
        ("worker", "join an existing study and take trials until it holds n_trials in total"),
    ):
        run = sub.add_parser(mode, help=text)
        run.add_argument("study", help="study file (YAML)")
        run.add_argument("--storage", help="Optuna storage URL (overrides study.storage)")
        run.add_argument("--tracking-uri", help="MLflow tracking URI (overrides tracking.uri)")
        run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        run.add_argument("--n-trials", type=int, help="total trials the study should hold (overrides study.n_trials)")
        run.add_argument("--study-name", help="run under this study name (e.g. to start a new study after a change)")
        if mode != "worker":
            run.add_argument(
                "--enqueue", metavar="PARAMS_JSON", help="JSON object or list of parameter sets to try first"
            )
        if mode != "create":
            run.add_argument(
                "--device",
                default="auto",
                help="auto (CUDA when present; with several GPUs each worker takes its own), cpu, cuda, cuda:N",
            )
        run.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch intra-op threads for this process (default 1). Rule: at most max(1, free cores // workers "
            "on this machine), never more threads in all than free cores: idle threads spin, and oversubscribed "
            "cores made trials 8-13x slower; small MLPs gain little from a second thread",
        )
        run.add_argument("--quiet", action="store_true", help="no progress display")
        run.set_defaults(func=cmd_run, mode=mode, enqueue=None, device="cpu" if mode == "create" else "auto")

    for name, func, text in (
        ("status", cmd_status, "trial counts by state (failed ones: in training or lost) and the best so far"),
        ("best", cmd_best, "the best trial: parameters, objective, holdout figures"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("study", help="study file (YAML) or study name")
        p.add_argument("--storage", help="Optuna storage URL (default: the study file's, else sqlite:///optuna.db)")
        if name == "best":
            p.add_argument("--json", action="store_true", help="print as JSON")
        p.set_defaults(func=func)

    # Further subcommands register here, each calling into its own module.
    rpl = sub.add_parser(
        "replay", help="retrain one trial alone from its parameters and seed; compare with its recorded result"
    )
    rpl.add_argument("study", help="study file (YAML) or study name")
    rpl.add_argument("trial", type=int, help="trial number")
    rpl.add_argument("--storage", help="Optuna storage URL (default: the study file's, else sqlite:///optuna.db)")
    rpl.set_defaults(func=cmd_replay)
    storage_help = "Optuna storage URL (default: the study file's, else sqlite:///optuna.db)"
    rpt = sub.add_parser("report", help="write the study report: one self-contained HTML page, also logged to MLflow")
    rpt.add_argument("study", help="study file (YAML) or study name")
    rpt.add_argument("--out", help="HTML file to write (default: reports/<study>.html)")
    rpt.add_argument("--storage", help=storage_help)
    rpt.add_argument("--tracking-uri", help="MLflow tracking URI (default: the study's tracking.uri)")
    rpt.add_argument("--no-mlflow", action="store_true", help="do not attach the report to the study's MLflow run")
    rpt.add_argument("--no-replay", action="store_true", help="never retrain a trial whose model MLflow does not hold")
    rpt.set_defaults(func=cmd_report)

    trl = sub.add_parser("trials", help="every trial as one row: a table, or written with --csv / --parquet")
    trl.add_argument("study", help="study file (YAML) or study name")
    trl.add_argument("--storage", help=storage_help)
    out = trl.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="PATH", help="write the trials as CSV instead of printing them")
    out.add_argument("--parquet", metavar="PATH", help="write the trials as Parquet instead of printing them")
    trl.set_defaults(func=cmd_trials)

    ui = sub.add_parser("ui", help="serve the MLflow UI on the study's tracking store until Ctrl-C")
    ui.add_argument("study", nargs="?", help="study file (YAML) or study name; opens its experiment")
    ui.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ui.add_argument("--storage", help=storage_help)
    ui.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the study's tracking.uri, else sqlite:///mlruns/mlflow.db)",
    )
    ui.set_defaults(func=cmd_ui)

    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on the study's storage until Ctrl-C")
    dash.add_argument("study", help="study file (YAML) or study name")
    dash.add_argument("--port", type=int, default=8080, help="port to serve on (default: 8080)")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dash.add_argument("--storage", help=storage_help)
    dash.set_defaults(func=cmd_dashboard)

    exp = sub.add_parser("export", help="export a trial (the best by default) as an MLflow pyfunc model + model card")
    exp.add_argument("study", help="study file (YAML) or study name")
    exp.add_argument("--trial", type=int, help="trial number to export (default: the best COMPLETE trial)")
    exp.add_argument(
        "--rule",
        help="multi-objective study: choose from the Pareto front, e.g. 'contamination<=0.1' exports the front trial "
        "with the best other objective among those meeting it",
    )
    exp.add_argument("--out", help="model directory to write (default: exports/<study>-trial-<N>)")
    exp.add_argument("--force", action="store_true", help="replace --out when it holds a previous export")
    exp.add_argument(
        "--register", action="store_true", help="register under the study's name and move alias 'champion' to it"
    )
    exp.add_argument("--storage", help="Optuna storage URL (default: the study file's, else sqlite:///optuna.db)")
    exp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the study's tracking.uri)")
    exp.set_defaults(func=cmd_export)

    pred = sub.add_parser("predict", help="score a catalogue with an exported model")
    pred.add_argument("model", help="model directory, runs:/RUN_ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION")
    pred.add_argument("--data", required=True, help="catalogue with the raw columns (CSV, CSV.gz, TSV, Parquet)")
    pred.add_argument("--out", required=True, help="scores to write (.csv, .csv.gz, .tsv, .parquet)")
    pred.add_argument(
        "--id-columns", nargs="+", default=[], metavar="COLUMN", help="columns to copy through, besides data.id_columns"
    )
    pred.add_argument(
        "--tracking-uri", help="MLflow tracking URI for runs:/ and models:/ URIs (default: $MLFLOW_TRACKING_URI)"
    )
    pred.set_defaults(func=cmd_predict)

    val = sub.add_parser("validate", help="check a study file and its data without running anything")
    val.add_argument("study", help="study file (YAML)")
    val.set_defaults(func=cmd_validate)
    return parser


def worker_command(args: argparse.Namespace, storage: str) -> str:
    """The ``tuner worker`` command that joins the study ``tuner create`` just made: the same study and stores
    (passwords masked, for the user to fill in)."""
    import shlex

    words = ["tuner", "worker", args.study, "--storage", mask_password(storage)]
    if args.study_name:
        words += ["--study-name", args.study_name]
    if args.n_trials:
        words += ["--n-trials", str(args.n_trials)]
    if args.no_tracking:
        words.append("--no-tracking")
    elif args.tracking_uri:
        words += ["--tracking-uri", mask_password(args.tracking_uri)]
    return " ".join(shlex.quote(word) for word in words)


#: Options that name a file or folder to read or write.
PATH_FLAGS = ("out", "csv", "parquet", "data", "enqueue")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tuner`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "n_trials", None) is not None and args.n_trials < 1:
        err_console.print(f"error: --n-trials must be >= 1, got {args.n_trials}")
        return 2
    for flag in PATH_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str) and not value.strip():
            # An empty path would fall back to the default, or to printing, without a word.
            err_console.print(f"error: --{flag}: must not be empty, got {value!r}; give a path or leave the flag out")
            return 2
    try:
        return int(args.func(args))
    except TunerError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print(f"interrupted: {interrupted_summary()}")
        return 130
    except Terminated:
        err_console.print(f"terminated: {interrupted_summary()}")
        return 143


if __name__ == "__main__":
    sys.exit(main())
