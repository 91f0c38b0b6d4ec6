"""Benchmark (not a timed test), the speed issue's P4: packed trials against the hand-wired Optuna + MLflow loop.

Equal work on both sides: the same ``--trials`` trials (drawn once by Optuna's RandomSampler from the space
below, then enqueued on both sides), the same data tensors, ``--epochs`` epochs each (no early stopping, no
pruning), validation loss and objective every epoch, MLflow tracking on. Sides:

- baseline: the hand-wired loop of bench/bench_loop.py (Optuna + optuna-integration's ``MLflowCallback`` with
  ``track_in_mlflow``, ``DataLoader(TensorDataset, shuffle=True)``, ``mlflow.log_metric`` per epoch), in one
  process with torch's default threads (all cores) — what a user's script does on this machine
  (``--baseline-threads 1`` gives it one thread: on a busy machine the fairer comparison); its network on
  ``--baseline-device`` (default the CPU; on a GPU each batch is moved there, as the examples do);
- packed, 1 process: :func:`tuner.study.run_study` with ``study.pack = --pack`` and ``--tuner-threads`` torch
  threads (default 1), on ``--device`` (data resident there);
- packed, 2 workers: ``tuner create`` then two ``tuner worker`` processes (1 torch thread each) on one study
  in a scratch PostgreSQL database, MLflow in another (the many-workers topology), ``study.pack = --pack``.

Throughput is trials per minute: for the in-process sides over the whole call (``study.optimize`` /
``run_study``), for the workers over the span from the first trial's start to the last trial's end as the
database records them (process start-up and data loading excluded; ``wall`` with them is printed too). The
ratio of each tuner side to the baseline is taken within one repetition; min / median / max over
``--repeats``. Each in-process side starts after a full garbage collection, so the garbage one side leaves
does not trigger a collection (0.2-0.5 s here) in the next (``--show-gc`` prints each one). tuner's trials
also save their best weights, their model description and manifest and measure the holdout, which the
baseline does not: tuner does more work per trial, not less. Plots are off on the tuner side
(``tracking.plots: false``): the baseline draws none.

The search space (``--space``):

- ``packable`` (default): studies/sdss_qso.yaml's space with the shape fixed — 2 layers, batch size
  ``--batch-size``, ReLU, no batch norm, Adam or AdamW — and widths, learning rate, momentum, weight decay,
  dropout, initialisation drawn per trial: every trial can share a pack;
- ``full``: studies/sdss_qso.yaml's space as it is: trials differ in depth, batch size, activation and
  optimizer, so packs are mostly of one trial (what packing gives a study that does not fix its shape).

Run (PostgreSQL at 127.0.0.1:5432 for the worker side; ``--no-workers`` without it):

    .venv/bin/python bench/bench_pack.py --dataset sdss --trials 16 --epochs 5 --pack 8 --repeats 3
    .venv/bin/python bench/bench_pack.py --dataset simulated --trials 16 --epochs 3 --pack 8 --repeats 3
    .venv/bin/python bench/bench_pack.py --dataset sdss --trials 16 --epochs 5 --pack 8 --profile 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import (
    add_tracking_writes,
    data_section,
    draw_trials,
    enqueue_entry,
    ready_writer_process,
    run_baseline,
    show_full_collections,
    started_clean,
    study_section,
    threads,
)
from bench_workers import scratch_database, tuner

from tuner.config import StudySpec, spec_from_dict
from tuner.data.dataset import Dataset, build_dataset
from tuner.space import TrialParams
from tuner.study import run_study

ROOT = Path(__file__).resolve().parent.parent
STUDY_NAME = "bench-pack"


def space(kind: str, batch_size: int) -> dict[str, Any]:
    raw = study_section(ROOT / "studies" / "sdss_qso.yaml", "search_space")
    if kind == "packable":
        raw.update(
            {
                "n_layers": {"value": 2},
                "batch_size": {"value": batch_size},
                "activation": {"choices": ["relu"]},
                "batch_norm": {"choices": [False]},
                "optimizer": {"choices": ["adam", "adamw"]},
            }
        )
    return raw


def raw_study(args: argparse.Namespace, folder: Path, *, name: str, pack: int, trials: list[TrialParams]) -> dict:
    return {
        "data": data_section(args.dataset, args),
        "task": "binary",
        "search_space": space(args.space, args.batch_size),
        "train": {"max_epochs": args.epochs, "patience": args.epochs},
        "objective": {"metric": "completeness_at_contamination", "target_contamination": 0.1},
        "study": {
            "name": name,
            "storage": f"sqlite:///{folder}/tuner-optuna.db",
            "sampler": "random",
            "pruner": "none",
            "n_trials": max(1, len(trials)),
            "seed": 0,
            "pack": pack,
            "enqueue": [enqueue_entry(p) for p in trials],
        },
        "tracking": {
            "enabled": True,
            "uri": f"sqlite:///{folder}/tuner-mlflow.db",
            "artifact_location": str(folder / "tuner-artifacts"),
            "plots": False,
            "writes": args.tracking_writes,
        },
    }


def run_packed(spec: StudySpec, dataset: Dataset, n: int) -> float:
    """Seconds for the whole in-process study."""
    started = started_clean()
    result = run_study(spec, n_trials=n, device=dataset.device, dataset=dataset)
    wall = time.perf_counter() - started
    states = [t.state.name for t in result.study.trials]
    if states != ["COMPLETE"] * n:
        raise SystemExit(f"packed study {spec.study.name}: trial states {states}")
    return wall


def run_workers(
    raw: dict, folder: Path, n: int, pg: str, timeline: bool = False, profiles: Path | None = None
) -> tuple[float, float]:
    """(span, wall) seconds of two 1-thread worker processes on one PostgreSQL study; each under cProfile, its
    profile saved in ``profiles``, if given."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with scratch_database(pg) as storage, scratch_database(pg) as tracking:
        study_raw = {**raw, "tracking": {**raw["tracking"], "uri": tracking}}
        study_raw["study"] = {**raw["study"], "storage": storage, "name": STUDY_NAME}
        path = folder / "bench_pack_workers.yaml"
        path.write_text(yaml.safe_dump(study_raw, sort_keys=False))
        create = tuner("create", str(path), env=env, cwd=folder, log=folder / "create.log")
        if create.wait() != 0:
            raise SystemExit(f"tuner create failed:\n{(folder / 'create.log').read_text()}")
        started = time.perf_counter()
        procs = [
            tuner(
                "worker",
                str(path),
                "--device",
                "cpu",
                "--threads",
                "1",
                "--quiet",
                env={**env, "TUNER_WORKER_INDEX": str(i)},
                cwd=folder,
                log=folder / f"worker-{i}.log",
                profile=profiles / f"worker-{i}.prof" if profiles else None,
            )
            for i in range(2)
        ]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - started
        if any(codes):
            logs = "\n".join((folder / f"worker-{i}.log").read_text()[-2000:] for i in range(2))
            raise SystemExit(f"a worker failed (exit codes {codes}):\n{logs}")
        rdb = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        try:
            done = optuna.load_study(study_name=STUDY_NAME, storage=rdb).get_trials(deepcopy=False)
        finally:
            rdb.engine.dispose()
    if [t.state.name for t in done] != ["COMPLETE"] * n:
        raise SystemExit(f"worker study: trial states {[t.state.name for t in done]}")
    first = min(t.datetime_start for t in done if t.datetime_start)
    last = max(t.datetime_complete for t in done if t.datetime_complete)
    if timeline:
        for t in done:
            assert t.datetime_start and t.datetime_complete
            start, end = (t.datetime_start - first).total_seconds(), (t.datetime_complete - first).total_seconds()
            print(f"  trial {t.number:2d}: {start:6.2f} -> {end:6.2f} s")
    return (last - first).total_seconds(), wall


def stats(values: list[float]) -> str:
    return f"{min(values):7.2f} {statistics.median(values):7.2f} {max(values):7.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["sdss", "simulated"], default="sdss")
    parser.add_argument("--sdss", default=str(ROOT.parent / "shared" / "data" / "sdss_dr14_10k.csv.gz"))
    parser.add_argument("--n-star", type=int, default=100_000)
    parser.add_argument("--n-quasar", type=int, default=1_000)
    parser.add_argument("--space", choices=["packable", "full"], default="packable")
    parser.add_argument("--batch-size", type=int, default=64, help="the packable space's batch size (default 64)")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pack", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draw-seed", type=int, default=0)
    parser.add_argument("--no-workers", action="store_true", help="skip the two-worker side (no PostgreSQL)")
    parser.add_argument("--device", default="cpu", help="device of the tuner sides")
    parser.add_argument(
        "--baseline-device",
        default="cpu",
        help="device of the baseline's network (its DataLoader moves each CPU batch there), e.g. cuda",
    )
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=0,
        help="torch threads of the baseline: 0 (default) = torch's default, all cores, as a user's script runs",
    )
    parser.add_argument(
        "--tuner-threads",
        type=int,
        default=1,
        help="torch threads of the packed 1-process side (default 1, the CLI's; the workers keep 1 each)",
    )
    add_tracking_writes(parser)
    parser.add_argument("--pg", default="host=127.0.0.1 port=5432 user=postgres")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="instead of the comparison: the packed 1-process side once under cProfile, its N costliest calls",
    )
    parser.add_argument("--profile-out", help="with --profile: also save the raw profile here (for pstats)")
    parser.add_argument(
        "--profile-workers",
        metavar="DIR",
        help="run the two workers under cProfile (which slows them) and save worker-0.prof and worker-1.prof here "
        "(the last repetition's)",
    )
    parser.add_argument(
        "--timeline", action="store_true", help="print when each of the workers' trials started and ended"
    )
    parser.add_argument(
        "--show-gc", action="store_true", help="print the duration of each full garbage collection in this process"
    )
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.show_gc:
        show_full_collections()
    cores = os.cpu_count() or 1
    base_threads = args.baseline_threads or cores
    print(
        f"bench_pack: {args.dataset}, {args.space} space, {args.trials} trials x {args.epochs} epochs, pack "
        f"{args.pack}; {cores} cores, baseline {base_threads} thread(s); load average {os.getloadavg()[0]:.2f} at "
        f"start; tuner on {args.device}, baseline on {args.baseline_device}"
    )
    profiles = Path(args.profile_workers) if args.profile_workers else None
    if profiles:
        profiles.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {"baseline": [], "packed-1": [], "packed-2w": []}
    ratios: dict[str, list[float]] = {"packed-1": [], "packed-2w": []}
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        folder = Path(tmp)
        first = spec_from_dict(raw_study(args, folder, name="draw", pack=args.pack, trials=[]))
        trials = draw_trials(first, [t.batch_size for t in _draw_shapes(first, args)], args.draw_seed)
        dataset = build_dataset(first, "cpu")
        packed_data = dataset if args.device == "cpu" else build_dataset(first, args.device)
        print(f"data: {len(dataset.train)} training rows, {len(dataset.validation)} validation rows; trials:")
        for p in trials:
            print(f"  {p.n_layers}x{'-'.join(map(str, p.widths))} {p.activation} {p.optimizer} batch {p.batch_size}")
        # Untimed warm-up of each in-process side (stores created, code paths loaded).
        warm = trials[:1]
        ready_writer_process(args.tracking_writes, _spec(args, folder, "warm-p", args.pack, warm).tracking.uri)
        with threads(base_threads):
            run_baseline(
                _spec(args, folder, "warm-b", 1, warm),
                dataset,
                warm,
                name="warm-b",
                folder=folder,
                storage="sqlite",
                device=args.baseline_device,
            )
        with threads(args.tuner_threads):
            run_packed(_spec(args, folder, "warm-p", args.pack, warm), packed_data, 1)
        if args.profile:
            profiled = _spec(args, folder, "profiled", args.pack, trials)
            return _profile(profiled, packed_data, len(trials), args.profile, args.profile_out)
        for repeat in range(args.repeats):
            name = f"r{repeat}"
            with threads(base_threads):
                base = run_baseline(
                    _spec(args, folder, f"b-{name}", 1, trials),
                    dataset,
                    trials,
                    name=f"b-{name}",
                    folder=folder,
                    storage="sqlite",
                    device=args.baseline_device,
                )
            base_rate = 60 * len(trials) / base.study_s
            with threads(args.tuner_threads):
                packed_s = run_packed(_spec(args, folder, f"p-{name}", args.pack, trials), packed_data, len(trials))
            packed_rate = 60 * len(trials) / packed_s
            rates["baseline"].append(base_rate)
            rates["packed-1"].append(packed_rate)
            ratios["packed-1"].append(packed_rate / base_rate)
            line = (
                f"repeat {repeat + 1}: baseline {base.study_s:6.1f} s ({base_rate:6.1f} trials/min), "
                f"packed 1 process {packed_s:6.1f} s ({packed_rate:6.1f}/min, {packed_rate / base_rate:4.1f}x)"
            )
            if not args.no_workers:
                raw = raw_study(args, folder, name=STUDY_NAME, pack=args.pack, trials=trials)
                span, wall = run_workers(raw, folder, len(trials), args.pg, args.timeline, profiles)
                rate = 60 * len(trials) / span
                rates["packed-2w"].append(rate)
                ratios["packed-2w"].append(rate / base_rate)
                line += (
                    f", packed 2 workers span {span:6.1f} s / wall {wall:6.1f} s "
                    f"({rate:6.1f}/min, {rate / base_rate:4.1f}x)"
                )
            print(line, flush=True)
    print(f"\ntrials per minute and ratio to the baseline (min median max over {args.repeats})")
    for side, values in rates.items():
        if values:
            ratio = f"   ratio {stats(ratios[side])}" if side in ratios else ""
            print(f"  {side:10s} {stats(values)}{ratio}")
    for side in ("packed-1", "packed-2w"):
        if ratios[side]:
            median = statistics.median(ratios[side])
            print(
                f"P4 {side}: median {median:.2f}x the hand-wired loop (target >= 5x): "
                f"{'PASS' if median >= 5 else 'FAIL'}"
            )
    return 0


def _profile(spec: StudySpec, dataset: Dataset, n: int, top: int, out: str | None = None) -> int:
    """The packed in-process study under cProfile: wall time, then the ``top`` calls by cumulative and own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    with threads(1):
        profiler.enable()
        wall = run_packed(spec, dataset, n)
        profiler.disable()
    print(f"packed, 1 process, under cProfile: {wall:.2f} s for {n} trials")
    if out:
        profiler.dump_stats(out)
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return 0


def _spec(args: argparse.Namespace, folder: Path, name: str, pack: int, trials: list[TrialParams]) -> StudySpec:
    return spec_from_dict(raw_study(args, folder, name=name, pack=pack, trials=trials))


def _draw_shapes(spec: StudySpec, args: argparse.Namespace) -> list[TrialParams]:
    """Batch sizes to draw with: the packable space's fixed one, or each trial's own from the full space."""
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.draw_seed + 1))
    from tuner.space import suggest

    return [suggest(sampler_study.ask(), spec.search_space) for _ in range(args.trials)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
