"""How fast `tuner status` and `tuner best` answer on a study with many trials (issue target: < 2 s at 10,000).

Builds a study of synthetic finished trials in a temporary SQLite file (no training; some failed, lost and
retried, which ``status`` tells apart), then times each command
as a user runs it: a fresh process, imports included. Prints seconds (min / median / max of --repeats).

    .venv/bin/python bench/bench_status.py --trials 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tuner.worker import LOST, RETRY_OF


def build(storage: str, n: int) -> None:
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize")
    distributions = {"n_layers": IntDistribution(1, 5), "lr": FloatDistribution(1e-4, 1e-1, log=True)}
    trials = []
    for i in range(n):
        state = TrialState.PRUNED if i % 3 == 0 else TrialState.COMPLETE
        attrs: dict[str, object] = {"epochs": 10, "stop_reason": "synthetic"}
        # One trial in 40 lost and queued again (the next one its retry), one in 40 failed in training.
        if i % 40 == 1:
            state, attrs[LOST] = TrialState.FAIL, "lost to a storage error"
        elif i % 40 == 2:
            attrs[RETRY_OF] = i - 1
        elif i % 40 == 3:
            state = TrialState.FAIL
        trials.append(
            create_trial(
                state=state,
                value=None if state in (TrialState.PRUNED, TrialState.FAIL) else (i % 997) / 997,
                params={"n_layers": 1 + i % 5, "lr": 10 ** (-4 + 3 * (i % 101) / 100)},
                distributions=distributions,
                user_attrs=attrs,
                intermediate_values={0: 0.1, 1: 0.2},
            )
        )
    study.add_trials(trials)


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuner.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tuner {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'bench.db'}"
        started = time.perf_counter()
        build(storage, args.trials)
        print(f"built {args.trials} trials in {time.perf_counter() - started:.1f} s")
        for command in ("status", "best"):
            times = [timed([command, "bench", "--storage", storage]) for _ in range(args.repeats)]
            print(
                f"tuner {command}: min {min(times):.2f} s, median {statistics.median(times):.2f} s, "
                f"max {max(times):.2f} s (target < 2 s)"
            )


if __name__ == "__main__":
    main()
