"""Benchmark (not a timed test): study throughput with 1 and with 2 worker processes on one PostgreSQL study.

Each measurement gets a fresh scratch database on the local PostgreSQL, runs ``tuner create`` (not timed), then
starts the workers (``python -m tuner.cli worker``) together and waits for them. Every trial does the same work:
the search space is a single fixed point, training runs a fixed number of epochs (patience = max_epochs, so no
early stopping), the pruner is ``none``, nothing is enqueued and tracking is off. Reported per worker count:

- done: from starting the workers to the last trial's end (process start-up, data set build and study
  bookkeeping included), and trials per minute over it: how soon the study is complete;
- exit: from starting the workers to the last one exiting. A worker that finds no free slot while another
  worker still runs a trial waits ``min(heartbeat_interval, 5)`` seconds before it looks again (the other may
  die and its retry need a taker), so with several workers "exit" can trail "done" by up to 5 s;
- span: from the first trial's start to the last trial's end as the database records them (steady state,
  start-up excluded), and trials per minute over it;
- CPU: the workers' CPU seconds (user + system) per trial, the cores they used on average over "exit", and the
  cores every other process on the machine used meanwhile (PostgreSQL included; from /proc/stat). When other
  processes hold cores, two workers cannot get two: compare CPU seconds per trial to tell a machine that is
  busy from workers that slow each other down.

The ratio is 2-worker over 1-worker throughput, taken per repeat (the worker counts run interleaved, so each
pair saw about the same machine load) and summarised as min / median / max.

Threads: each worker gets ``--threads`` torch intra-op threads (default 1, the CLI's default), passed to the
CLI as ``--threads`` (it calls ``torch.set_num_threads``, which overrides OMP_NUM_THREADS) and as
OMP_NUM_THREADS / MKL_NUM_THREADS. ``--threads rule`` gives each worker ``max(1, cores // workers)``: never
more threads in total than cores, but on a machine where other processes hold cores that still
oversubscribes what is free, and intra-op threads spin while they wait (measured here: 1 worker x 2 threads on
2 cores while another process used about one core took 17-23 CPU s per trial instead of 3-4, 8-13x slower).

Run (about 5 minutes on 2 cores):

    .venv/bin/python bench/bench_workers.py --n-star 100000 --n-quasar 1000 --epochs 5 --trials 16 --repeats 3

(PostgreSQL at 127.0.0.1:5432, user postgres; ``--pg`` for another server).
"""

from __future__ import annotations

import argparse
import os
import resource
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


def tuner(
    *args: str, env: dict[str, str], cwd: Path, log: Path, profile: Path | None = None
) -> subprocess.Popen[bytes]:
    """``tuner ARGS`` in a new process, its output in ``log``; under cProfile, saved to ``profile``, if given."""
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *profiler, "-m", "tuner.cli", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


class Unclean(Exception):
    """A measurement whose study lost and retried trials: its time includes the retries."""


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has spent (all cores), from /proc/stat; None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is counted in user already.
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Measurement:
    workers: int
    threads: int
    done_s: float
    exit_s: float
    span_s: float
    trials: int
    cpu_s: float
    others_cores: float

    @property
    def done_rate(self) -> float:
        return 60.0 * self.trials / self.done_s

    @property
    def exit_rate(self) -> float:
        return 60.0 * self.trials / self.exit_s

    @property
    def span_rate(self) -> float:
        return 60.0 * self.trials / self.span_s

    @property
    def cores_used(self) -> float:
        return self.cpu_s / self.exit_s

    @property
    def cpu_per_trial(self) -> float:
        return self.cpu_s / self.trials


def measure(study: Path, workers: int, threads: int, *, pg: str, trials: int, folder: Path) -> Measurement:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    with scratch_database(pg) as url:
        create = tuner("create", str(study), "--storage", url, env=base_env, cwd=folder, log=folder / "create.log")
        if create.wait() != 0:
            raise SystemExit(f"tuner create failed:\n{(folder / 'create.log').read_text()}")
        cpu_before, busy_before = children_cpu_seconds(), busy_cpu_seconds()
        started_epoch = time.time()  # trials' datetimes are wall-clock times
        started = time.perf_counter()
        procs = [
            tuner(
                "worker",
                str(study),
                "--storage",
                url,
                "--device",
                "cpu",
                "--threads",
                str(threads),
                "--quiet",
                env={**base_env, "TUNER_WORKER_INDEX": str(i)},
                cwd=folder,
                log=folder / f"worker-{i}.log",
            )
            for i in range(workers)
        ]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - started
        cpu = children_cpu_seconds() - cpu_before
        busy_after = busy_cpu_seconds()
        others_cores = (
            max(0.0, (busy_after - busy_before - cpu) / wall)
            if busy_after is not None and busy_before is not None
            else float("nan")
        )
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
        done_s = last.timestamp() - started_epoch
        span_s = (last - first).total_seconds()
        return Measurement(workers, threads, done_s, wall, span_s, len(complete), cpu, others_cores)


def _summary(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:8.{digits}f}"
    return f"{min(values):8.{digits}f} {statistics.median(values):8.{digits}f} {max(values):8.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="trials per study (default 16)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per trial, always all of them (default 5)")
    parser.add_argument("--n-star", type=int, default=100_000, help="simulated stars (default 100000)")
    parser.add_argument("--n-quasar", type=int, default=1_000, help="simulated quasars (default 1000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per worker count (default 3)")
    parser.add_argument(
        "--threads",
        default="1",
        help="torch threads per worker: a number, or 'rule' for max(1, CPU cores // workers) (default 1)",
    )
    parser.add_argument(
        "--pg",
        default="host=127.0.0.1 port=5432 user=postgres",
        help="libpq connection string of a server where scratch databases may be created",
    )
    args = parser.parse_args(argv)
    if args.threads != "rule" and not (args.threads.isdigit() and int(args.threads) >= 1):
        parser.error(f"--threads: a number >= 1 or 'rule', got {args.threads!r}")
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
                threads = max(1, cores // workers) if args.threads == "rule" else int(args.threads)
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
                    f"  repeat {repeat + 1}: {workers} worker(s) x {threads} thread(s): done {m.done_s:5.1f} s "
                    f"({m.done_rate:5.1f} trials/min), exit {m.exit_s:5.1f} s, span {m.span_s:5.1f} s "
                    f"({m.span_rate:5.1f} trials/min); CPU {m.cpu_per_trial:4.2f} s/trial, workers used "
                    f"{m.cores_used:4.2f} cores, other processes {m.others_cores:4.2f}",
                    flush=True,
                )
    stat = "" if args.repeats == 1 else " (min median max)"
    print(f"\ntrials per minute{stat}; seconds, CPU and cores are medians")
    print(
        f"{'workers':>7} {'threads':>7} {'done s':>7} {'exit s':>7} {'CPU s/trial':>11} {'cores':>5} {'others':>6}"
        f"   {'done':^26}   {'exit':^26}   {'span':^26}"
    )
    for workers, ms in results.items():
        print(
            f"{workers:7d} {ms[0].threads:7d} {statistics.median(m.done_s for m in ms):7.1f} "
            f"{statistics.median(m.exit_s for m in ms):7.1f} {statistics.median(m.cpu_per_trial for m in ms):11.2f} "
            f"{statistics.median(m.cores_used for m in ms):5.2f} {statistics.median(m.others_cores for m in ms):6.2f}"
            f"   {_summary([m.done_rate for m in ms]):^26}   {_summary([m.exit_rate for m in ms]):^26}"
            f"   {_summary([m.span_rate for m in ms]):^26}"
        )
    if len(args.workers) >= 2:
        one, many = args.workers[0], args.workers[-1]
        print(f"\nratio {many}/{one} workers, trials per minute, per repeat{stat}:")
        for label in ("done", "exit", "span"):
            ratios = [
                getattr(b, f"{label}_rate") / getattr(a, f"{label}_rate")
                for a, b in zip(results[one], results[many], strict=True)
            ]
            print(f"  {label:4s} {_summary(ratios, 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
