"""Benchmark (not a timed test): study throughput with 1 and with 2 worker processes on one PostgreSQL study.

Each measurement gets a fresh scratch database on the local PostgreSQL, runs ``tuner create`` (not timed), then
starts the workers (``python -m tuner.cli worker``) together and waits for them. Every trial does the same work:
the search space is a single fixed point, training runs a fixed number of epochs (patience = max_epochs, so no
early stopping), the pruner is ``none``, nothing is enqueued and tracking is off. Reported per worker count:

- wall: from starting the workers to the last one exiting (process start-up, data set build and study
  bookkeeping included), and trials per minute over it;
- span: from the first trial's start to the last trial's end as the database records them (steady state),
  and trials per minute over it.

The ratio is 2-worker over 1-worker throughput. By default each worker gets ``cores // workers`` torch
threads (OMP_NUM_THREADS), so both measurements use the same CPU cores; ``--threads N`` fixes it instead.

Run: ``.venv/bin/python bench/bench_workers.py [--trials 20] [--epochs 5] [--repeats 3] [--workers 1 2]``
(PostgreSQL at 127.0.0.1:5432, user postgres; ``--pg`` for another server).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STUDY_NAME = "bench-workers"


def study_file(folder: Path, *, trials: int, epochs: int, n_star: int, n_quasar: int) -> Path:
    """A study whose trials all do the same work: one fixed point of the search space, fixed epochs."""
    raw: dict[str, Any] = {
        "data": {"simulated": {"n_star": n_star, "n_quasar": n_quasar}},
        "search_space": {
            "n_layers": {"value": 2},
            "width": {"value": 64},
            "lr": {"value": 0.01},
            "momentum": {"value": 0.9},
            "dropout": {"value": 0.1},
            "weight_decay": {"value": 1.0e-4},
            "batch_size": {"value": 256},
            "optimizer": {"choices": ["adam"]},
            "activation": {"choices": ["relu"]},
            "init": {"choices": ["he"]},
            "batch_norm": {"choices": [False]},
        },
        "train": {"max_epochs": epochs, "patience": epochs},
        "study": {
            "name": STUDY_NAME,
            "sampler": "random",
            "pruner": "none",
            "n_trials": trials,
            "seed": 0,
        },
        "tracking": {"enabled": False},
    }
    path = folder / "bench_workers.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@contextmanager
def scratch_database(pg: str):
    """A fresh database (dropped afterwards); yields its SQLAlchemy URL."""
    import psycopg

    name = f"bench_workers_{uuid.uuid4().hex[:10]}"
    admin = psycopg.conninfo.make_conninfo(pg, dbname="postgres", connect_timeout=5)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(pg)
    user = info.get("user", "postgres")
    host = info.get("host", "127.0.0.1")
    port = info.get("port", "5432")
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tuner(*args: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tuner.cli", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )


class Unclean(Exception):
    """A measurement whose study lost and retried trials: its time includes the retries."""


@dataclass(frozen=True)
class Measurement:
    workers: int
    threads: int
    wall_s: float
    span_s: float
    trials: int

    @property
    def wall_rate(self) -> float:
        return 60.0 * self.trials / self.wall_s

    @property
    def span_rate(self) -> float:
        return 60.0 * self.trials / self.span_s


def measure(study: Path, workers: int, threads: int, *, pg: str, trials: int, folder: Path) -> Measurement:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with scratch_database(pg) as url:
        create = tuner("create", str(study), "--storage", url, env=base_env, cwd=folder, log=folder / "create.log")
        if create.wait() != 0:
            raise SystemExit(f"tuner create failed:\n{(folder / 'create.log').read_text()}")
        started = time.perf_counter()
        procs = [
            tuner(
                "worker",
                str(study),
                "--storage",
                url,
                "--device",
                "cpu",
                "--quiet",
                env={**base_env, "TUNER_WORKER_INDEX": str(i)},
                cwd=folder,
                log=folder / f"worker-{i}.log",
            )
            for i in range(workers)
        ]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - started
        if any(codes):
            logs = "\n".join((folder / f"worker-{i}.log").read_text()[-2000:] for i in range(workers))
            raise SystemExit(f"a worker failed (exit codes {codes}):\n{logs}")
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        try:
            done = optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials(deepcopy=False)
        finally:
            storage.engine.dispose()  # before the scratch database is dropped
        complete = [t for t in done if t.state.name == "COMPLETE"]
        if len(complete) != trials or len(done) != trials:
            # Trials were lost and retried (a database restart, a killed worker): not a clean measurement.
            others = [(t.number, t.state.name, t.user_attrs.get("fail_reason", "")) for t in done if t not in complete]
            raise Unclean(f"{len(complete)} COMPLETE of {len(done)} trials; the others: {others}")
        first = min(t.datetime_start for t in complete if t.datetime_start)
        last = max(t.datetime_complete for t in complete if t.datetime_complete)
        return Measurement(workers, threads, wall, (last - first).total_seconds(), len(complete))


def _summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:8.1f}"
    return f"{min(values):8.1f} {statistics.median(values):8.1f} {max(values):8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per study (default 20)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trial, always all of them (default 5)")
    parser.add_argument("--n-star", type=int, default=20_000, help="simulated stars (default 20000)")
    parser.add_argument("--n-quasar", type=int, default=400, help="simulated quasars (default 400)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per worker count (default 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: CPU cores // workers)"
    )
    parser.add_argument(
        "--pg",
        default="host=127.0.0.1 port=5432 user=postgres",
        help="libpq connection string of a server where scratch databases may be created",
    )
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"bench_workers: {args.trials} trials x {args.epochs} epochs on {args.n_star} stars + {args.n_quasar} "
        f"quasars; {cores} CPU cores, load average {load:.2f} at start; {args.repeats} repeat(s)"
    )
    results: dict[int, list[Measurement]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        folder = Path(tmp)
        study = study_file(folder, trials=args.trials, epochs=args.epochs, n_star=args.n_star, n_quasar=args.n_quasar)
        for repeat in range(args.repeats):
            # Interleaved, so that a change in the machine's load touches every worker count alike.
            for workers in args.workers:
                threads = args.threads or max(1, cores // workers)
                for _attempt in range(3):
                    try:
                        m = measure(study, workers, threads, pg=args.pg, trials=args.trials, folder=folder)
                        break
                    except Unclean as exc:
                        print(f"  repeat {repeat + 1}, {workers} worker(s): discarded ({exc}); measuring again")
                else:
                    raise SystemExit("three unclean measurements in a row: is the database being restarted?")
                results[workers].append(m)
                print(
                    f"  repeat {repeat + 1}: {workers} worker(s) x {threads} thread(s): wall {m.wall_s:6.1f} s "
                    f"({m.wall_rate:5.1f} trials/min), span {m.span_s:6.1f} s ({m.span_rate:5.1f} trials/min)",
                    flush=True,
                )
    stat = "" if args.repeats == 1 else " (min median max)"
    print(f"\ntrials per minute{stat}; wall seconds are medians")
    print(f"{'workers':>7} {'threads':>7} {'wall s':>8}   {'wall':^26}   {'span':^26}")
    for workers, ms in results.items():
        print(
            f"{workers:7d} {ms[0].threads:7d} {statistics.median(m.wall_s for m in ms):8.1f}   "
            f"{_summary([m.wall_rate for m in ms]):^26}   {_summary([m.span_rate for m in ms]):^26}"
        )
    if len(args.workers) >= 2:
        one, many = args.workers[0], args.workers[-1]
        for label, rate in (("wall", "wall_rate"), ("span", "span_rate")):
            base = statistics.median(getattr(m, rate) for m in results[one])
            top = statistics.median(getattr(m, rate) for m in results[many])
            print(f"ratio {many}/{one} workers (median trials/min, {label}): {top / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
