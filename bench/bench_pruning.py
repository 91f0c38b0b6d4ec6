"""Benchmark (not a timed test): how much training the default pruner saves before a study finds a good model.

For each sampler seed the same study runs twice, in in-memory storage with tracking off, on one data set built
once: with the study file's pruner (``median``: Optuna's MedianPruner with tuner's ``n_warmup_steps=3``) and
with pruner ``none``. Everything else is equal: the study seed (``study.seed``, which seeds the sampler and each
trial's weights as ``seed + trial number``), the warm-start queue, the trials' budget.

Compute is the number of epochs trained, summed over trials in the order they ran (each trial's user attribute
``epochs``; a pruned trial counts the epochs it trained before it was cut). The target is the unpruned run's
final best validation objective ``B`` after ``--n-trials`` trials; a run reaches it at the first trial whose
running best (COMPLETE trials only) is within 0.5% of ``B``, relative: ``best >= B - 0.005 * |B|`` when
maximising (``<= B + 0.005 * |B|`` when minimising). Epochs-to-target is the epochs summed up to and including
that trial; the unpruned run always reaches its own target.

Compute, not trials, is what is equal: pruned trials are cheap, so the pruned run may go on past ``--n-trials``
(up to ``--pruned-trials`` trials, by default four times as many) while its epochs stay within the unpruned
run's total. The bench runs them all and reads them in order: stopping at the cap would give the same trials,
since trials run one after another and each one's parameters depend only on the trials before it. The saving is
(epochs-to-target without pruning) / (with pruning); a pruned run that does not reach the target within the
unpruned run's total epochs saves nothing (ratio 0). The median ratio over the seeds is compared with the target
of 3x. The column "at n" gives the same ratio with the pruned run held to ``--n-trials`` trials; the last column
the pruned run's best value within the unpruned run's total epochs.

Two more readings follow the table. The epochs-to-target ratio waits for the first trial at the target level,
which may be one trial in a hundred, so it spreads over seeds like a first success. **Target-level trials per
1,000 epochs** count them all, pooled over the seeds, each run judged against the other seeds' targets (its own
target is its own best trial, a hit by definition): the pruner's saving per target-level trial, with far less
noise. **Cutting rules replayed** asks how much any simple rule reading the reported values could do: on the
unpruned runs' own trials, in order, each rule "cut at epoch index e (once, or at each epoch from e on) a trial
whose best so far is not within the top q of the kept COMPLETE trials' best by then", for every e and q listed,
and the rate of trials within 0.5%, 1% and 2% of the best per epoch spent, against no pruning. The trials stay
those the unpruned sampler drew (a pruned study's sampler would draw others), so this reads how much the early
epochs tell about the final value, not a run.

Run (about 5-10 minutes on 2 cores with the defaults, which these spell out):

    .venv/bin/python bench/bench_pruning.py --study studies/quickstart.yaml --n-trials 20 --max-epochs 25 \\
        --n-star 50000 --n-quasar 500 --seeds 0 1 2

``--n-star`` / ``--n-quasar`` apply to a simulated catalogue only; ``--study studies/sdss_qso.yaml`` runs on the
SDSS file (use a smaller ``--max-epochs``: its default is 60). ``--pruner``, ``--pruner-option n_warmup_steps=2``
and ``--objective average_precision`` try other pruners, settings and objectives against the same unpruned runs;
``--pruner incumbent`` (with ``--pruner-option margin=0.02``) an experimental rule of this benchmark's own
(:class:`IncumbentPruner`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import optuna
import torch
import yaml

from tuner.config import StudySpec, load_spec
from tuner.data.dataset import Dataset, build_dataset
from tuner.study import make_pruner, run_study

TOLERANCE = 0.005
TARGET_RATIO = 3.0


@dataclass(frozen=True)
class Run:
    """One study run: per trial (in the order run) its epochs, state and value."""

    pruner: str
    epochs: list[int]
    states: list[str]
    values: list[float | None]
    seconds: float
    curves: list[list[float | None]]  # per trial, the value it reported at each epoch index

    @property
    def total_epochs(self) -> int:
        return sum(self.epochs)

    def best(self, maximize: bool, cap: int | None = None) -> float:
        """The best value of the trials run within ``cap`` epochs (all of them without a cap)."""
        done, spent = [], 0
        for epochs, value in zip(self.epochs, self.values, strict=True):
            spent += epochs
            if cap is not None and spent > cap:
                break
            if value is not None:
                done.append(value)
        return max(done) if maximize else min(done)

    def ideal_pruned(self, at: int, n_startup: int, n_warmup: int) -> int:
        """Epochs to reach trial ``at`` if the same trials ran and every one the pruner may cut were cut as early
        as it allows (at epoch index ``n_warmup``, after ``n_startup`` COMPLETE trials), the target trial kept.
        """
        spent, complete = 0, 0
        for number in range(at + 1):
            full = self.epochs[number]
            cut = number != at and complete >= n_startup
            spent += min(full, n_warmup + 1) if cut else full
            complete += self.states[number] == "COMPLETE"
        return spent

    def hits(self, target: float, maximize: bool, cap: int | None = None) -> tuple[int, int]:
        """(COMPLETE trials whose value reaches ``target``, epochs spent) over the trials run within ``cap`` epochs."""
        count, spent = 0, 0
        for epochs, value in zip(self.epochs, self.values, strict=True):
            if cap is not None and spent + epochs > cap:
                break
            spent += epochs
            count += value is not None and (value >= target if maximize else value <= target)
        return count, spent

    def epochs_to(
        self, target: float, maximize: bool, *, cap: int | None = None, n_trials: int | None = None
    ) -> tuple[int | None, int | None]:
        """(epochs summed up to the first trial whose running best reaches ``target``, that trial's number), or
        (None, None) if no trial does within ``cap`` epochs and the first ``n_trials`` trials."""
        spent = 0
        for number, (epochs, value) in enumerate(zip(self.epochs, self.values, strict=True)):
            spent += epochs
            if (cap is not None and spent > cap) or (n_trials is not None and number >= n_trials):
                break
            if value is not None and (value >= target if maximize else value <= target):
                return spent, number
        return None, None


class IncumbentPruner(optuna.pruners.BasePruner):
    """An experiment of this benchmark, not one of tuner's pruners: cut a trial once its best value so far trails
    the best that any COMPLETE trial had reached by the same epoch by more than ``margin`` (in the objective's
    units), from epoch index ``n_warmup_steps`` on and after ``n_startup_trials`` COMPLETE trials. A median rule
    keeps every trial better than half the others; this one keeps only those within reach of the leader."""

    def __init__(self, margin: float = 0.02, n_startup_trials: int = 5, n_warmup_steps: int = 1) -> None:
        self._margin = margin
        self._n_startup_trials = n_startup_trials
        self._n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return False
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < self._n_startup_trials:
            return False
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0

        def best_by(t: optuna.trial.FrozenTrial) -> float:
            return max((sign * v for s, v in t.intermediate_values.items() if s <= step), default=-math.inf)

        leader = max(best_by(t) for t in complete)
        return best_by(trial) < leader - self._margin


def run_once(
    spec: StudySpec, dataset: Dataset, pruner_name: str, n_trials: int, options: dict[str, Any] | None = None
) -> Run:
    if pruner_name == "incumbent":
        pruner: optuna.pruners.BasePruner = IncumbentPruner(**(options or {}))
    else:
        pruner = make_pruner(pruner_name, spec.study.pruner_options if pruner_name == spec.study.pruner else None)
    started = time.perf_counter()
    result = run_study(
        spec,
        storage=optuna.storages.InMemoryStorage(),
        pruner=pruner,
        device="cpu",
        n_trials=n_trials,
        dataset=dataset,
    )
    seconds = time.perf_counter() - started
    trials = sorted(result.study.get_trials(deepcopy=False), key=lambda t: t.number)
    return Run(
        pruner=pruner_name,
        epochs=[int(t.user_attrs.get("epochs", 0)) for t in trials],
        states=[t.state.name for t in trials],
        values=[t.value if t.state.name == "COMPLETE" else None for t in trials],
        seconds=seconds,
        curves=[
            [t.intermediate_values.get(e) for e in range(max(t.intermediate_values, default=-1) + 1)] for t in trials
        ],
    )


def hit_rates(runs: list[tuple[float, Run, Run]], maximize: bool, pruned_name: str) -> str:
    """Trials at the target level per 1,000 epochs, pooled over the seeds, each run judged against the targets of
    the other seeds' unpruned runs (a run's own target is its best trial, so it would always count one hit).

    The epochs-to-target ratio waits for one such trial, which may be one in a hundred; its spread over seeds is
    that of a first success. This rate counts them all, so it reads the pruner's saving per target-level trial
    with far less noise. Each pruned run is read within its own seed's unpruned total, as above."""
    found = {"none": [0, 0], pruned_name: [0, 0]}
    for i, (target, _, _) in enumerate(runs):
        for j, (_, unpruned, pruned) in enumerate(runs):
            for name, run, cap in (("none", unpruned, None), (pruned_name, pruned, unpruned.total_epochs)):
                if name == "none" and i == j:
                    continue
                count, spent = run.hits(target, maximize, cap)
                found[name][0] += count
                found[name][1] += spent
    rate = {name: 1000 * count / spent if spent else 0.0 for name, (count, spent) in found.items()}
    ratio = f"{rate[pruned_name] / rate['none']:.2f}" if rate["none"] else "n/a (no unpruned hits)"
    return (
        "target-level trials per 1,000 epochs, each run against the other seeds' targets: "
        + ", ".join(f"{name} {rate[name]:.2f} ({count} in {spent} epochs)" for name, (count, spent) in found.items())
        + f"; {pruned_name} / none: {ratio}"
    )


RULE_EPOCHS = (0, 1, 2, 3, 5)
RULE_KEEP = (0.1, 0.2, 0.3, 0.5)
CEILING_TOLERANCES = (TOLERANCE, 0.01, 0.02)


def _best_so_far(curve: list[float | None], epoch: int, sign: float) -> float:
    return max((sign * v for v in curve[: epoch + 1] if v is not None), default=-math.inf)


def replay_rule(run: Run, sign: float, epoch: int, keep: float, every: bool, n_startup: int = 5) -> list[int]:
    """The epochs each of ``run``'s trials would have spent under a cutting rule: positive for a trial it keeps,
    negative for one it cuts.

    The rule: after ``n_startup`` kept COMPLETE trials, a trial is cut at epoch index ``epoch`` (and, if
    ``every``, at each later one) when its best value so far is below the ``keep`` fraction best of the kept
    COMPLETE trials' best values by that epoch. ``keep`` 0.5 from epoch 3 on is about the median pruner's rule
    (which reads the others' values at that epoch rather than their best by then)."""
    kept: list[int] = []
    spent: list[int] = []
    for number, curve in enumerate(run.curves):
        trained = run.epochs[number]
        # A check at the trial's last epoch would save nothing.
        checks = range(epoch, trained - 1) if every else [e for e in (epoch,) if e < trained - 1]
        cost, cut = trained, False
        if len(kept) >= n_startup:
            for at in checks:
                others = sorted(_best_so_far(run.curves[k], at, sign) for k in kept)
                if _best_so_far(curve, at, sign) < others[-max(1, round(keep * len(others)))]:
                    cost, cut = at + 1, True
                    break
        spent.append(-cost if cut else cost)
        if not cut and run.values[number] is not None:
            kept.append(number)
    return spent


def rule_ceiling(unpruned_runs: list[Run], maximize: bool) -> str:
    """How far cutting rules that read the reported values could raise the rate of target-level trials per
    epoch, replayed on the unpruned runs' own trials (pooled over the seeds; the trials stay those the unpruned
    sampler drew, where a pruned study's sampler would draw others)."""
    sign = 1.0 if maximize else -1.0
    lines = []
    for tolerance in CEILING_TOLERANCES:
        targets = []
        for run in unpruned_runs:
            best = run.best(maximize)
            targets.append(best - tolerance * abs(best) if maximize else best + tolerance * abs(best))

        def hit(run: Run, number: int, target: float) -> bool:
            value = run.values[number]
            return value is not None and sign * value >= sign * target

        hits = sum(hit(r, n, t) for r, t in zip(unpruned_runs, targets, strict=True) for n in range(len(r.epochs)))
        epochs = sum(r.total_epochs for r in unpruned_runs)
        rows = []
        for epoch, keep, every in ((e, k, v) for e in RULE_EPOCHS for k in RULE_KEEP for v in (False, True)):
            kept_hits, spent = 0, 0
            for run, target in zip(unpruned_runs, targets, strict=True):
                replayed = replay_rule(run, sign, epoch, keep, every)
                spent += sum(abs(c) for c in replayed)
                kept_hits += sum(c > 0 and hit(run, n, target) for n, c in enumerate(replayed))
            rows.append(((kept_hits / spent) / (hits / epochs), epoch, keep, every, kept_hits, spent))
        best_row = max(rows)
        median_row = next(r for r in rows if r[1:4] == (3, 0.5, True))
        lines.append(
            f"  within {tolerance:.1%}: none {hits} in {epochs} epochs; best rule (cut at epoch {best_row[1]}"
            f"{' on' if best_row[3] else ''} unless in the top {best_row[2]:.0%}) {best_row[0]:.2f}x ({best_row[4]} in "
            f"{best_row[5]}); the median rule {median_row[0]:.2f}x ({median_row[4]} in {median_row[5]})"
        )
    return (
        f"target-level trials per epoch under cutting rules replayed on the unpruned runs' trials ({len(rows)} rules: "
        f"cut at epoch {list(RULE_EPOCHS)}, once or from then on, unless in the top {list(RULE_KEEP)}), "
        f"against none:\n" + "\n".join(lines)
    )


def _option_value(text: str) -> Any:
    """A pruner option from the command line: 2 an int, 0.1 or 1e-3 a float, else as YAML reads it (true)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="studies/quickstart.yaml", help="study file (default: quickstart)")
    parser.add_argument("--n-trials", type=int, default=20, help="trials of the unpruned run (default 20)")
    parser.add_argument(
        "--pruned-trials",
        type=int,
        default=None,
        help="most trials of the pruned run, read while its epochs stay within the unpruned run's (default 4 x n)",
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="train.max_epochs (default: the file's)")
    parser.add_argument("--patience", type=int, default=None, help="train.patience (default: the file's)")
    parser.add_argument("--n-star", type=int, default=50_000, help="simulated stars (default 50000)")
    parser.add_argument("--n-quasar", type=int, default=500, help="simulated quasars (default 500)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="study seeds (default 0 1 2)")
    parser.add_argument(
        "--pruner-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a study.pruner_options entry, a number (repeatable; default: the file's)",
    )
    parser.add_argument("--objective", default=None, help="objective.metric (default: the file's)")
    parser.add_argument("--pruner", default=None, help="the pruner to compare with none (default: the file's)")
    parser.add_argument(
        "--no-enqueue", action="store_true", help="drop the study file's warm-start trials (default: keep them)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--verbose", action="store_true", help="print each run's trials (state, epochs, value)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    base = load_spec(args.study)
    overrides: dict[str, Any] = {
        "study.n_trials": args.n_trials,
        "study.name": "bench-pruning",
        "tracking.enabled": False,
    }
    if args.max_epochs is not None:
        overrides["train.max_epochs"] = args.max_epochs
    if args.patience is not None:
        overrides["train.patience"] = args.patience
    options = {k: _option_value(v) for k, v in (option.split("=", 1) for option in args.pruner_option)}
    incumbent = args.pruner == "incumbent"  # this benchmark's own, which a study file cannot name
    if args.pruner is not None and not incumbent:
        overrides["study.pruner"] = args.pruner
    if options and not incumbent:
        overrides["study.pruner_options"] = options
    if args.objective is not None:
        overrides["objective.metric"] = args.objective
    if args.no_enqueue:
        overrides["study.enqueue"] = []
    if base.data.source == "simulated":
        overrides["data.simulated.n_star"] = args.n_star
        overrides["data.simulated.n_quasar"] = args.n_quasar
    base = base.with_overrides(overrides)
    maximize = base.objective.direction == "maximize"
    pruned_name = "incumbent" if incumbent else base.study.pruner
    dataset = build_dataset(base, "cpu")
    facts = dataset.facts()
    shown_options = options if incumbent else dict(base.study.pruner_options)
    print(
        f"bench_pruning: {args.study}, {args.n_trials} trials per run, max_epochs {base.train.max_epochs}, "
        f"patience {base.train.patience}, sampler {base.study.sampler}, pruner {pruned_name} "
        f"{shown_options or '(tuner defaults)'} vs none, {len(base.study.enqueue)} warm-start "
        f"trial(s); data {facts['data.class_counts']} ({facts['data.split_sizes']}); seeds {args.seeds}\n"
        f"target: within {TOLERANCE:.1%} (relative) of the unpruned run's final best {base.objective.metric} "
        f"({base.objective.direction})"
    )
    probe = IncumbentPruner(**options) if incumbent else make_pruner(pruned_name, base.study.pruner_options)
    # The earliest a median / percentile pruner may cut: after n_startup_trials COMPLETE trials, at epoch index
    # n_warmup_steps. Other pruners: no bound is computed.
    n_startup = getattr(probe, "_n_startup_trials", None)
    n_warmup = getattr(probe, "_n_warmup_steps", None)
    if n_startup is not None and n_warmup is not None:
        print(
            f"pruner {pruned_name}: n_startup_trials={n_startup}, n_warmup_steps={n_warmup} (earliest cut after "
            f"{n_warmup + 1} epochs); 'bound' is the ratio if every trial it may cut were cut that early"
        )
    ratios: list[float] = []
    runs: list[tuple[float, Run, Run]] = []  # per seed: (target, unpruned, pruned)
    pruned_trials = args.pruned_trials if args.pruned_trials is not None else 4 * args.n_trials
    print(
        f"the pruned run: up to {pruned_trials} trials, read while its epochs stay within the unpruned run's total\n"
        f"\n{'seed':>4} {'B (none)':>9} {'target':>8} {'epochs none':>11} {'epochs ' + pruned_name:>13} "
        f"{'ratio':>6} {'at n':>6} {'bound':>6} {'total none':>10} {'total ' + pruned_name:>12} {'pruned':>6} "
        f"{'best ' + pruned_name:>11}"
    )
    for seed in args.seeds:
        spec = base.with_overrides({"study.seed": seed})
        unpruned = run_once(spec, dataset, "none", args.n_trials)
        pruned = run_once(spec, dataset, pruned_name, pruned_trials, options)
        best = unpruned.best(maximize)
        target = best - TOLERANCE * abs(best) if maximize else best + TOLERANCE * abs(best)
        need_none, at_none = unpruned.epochs_to(target, maximize)
        need_pruned, at_pruned = pruned.epochs_to(target, maximize, cap=unpruned.total_epochs)
        need_at_n, _ = pruned.epochs_to(target, maximize, n_trials=args.n_trials)
        assert need_none is not None  # its own best reaches its own target
        ratio = need_none / need_pruned if need_pruned else 0.0
        ratios.append(ratio)
        runs.append((target, unpruned, pruned))
        bound = (
            f"{need_none / unpruned.ideal_pruned(at_none, n_startup, n_warmup):6.2f}"
            if n_startup is not None and n_warmup is not None and at_none is not None
            else f"{'n/a':>6}"
        )
        # What the pruned run spent in all: up to the trial that reached the target, or to the cap.
        spent = need_pruned if need_pruned is not None else min(unpruned.total_epochs, pruned.total_epochs)
        n_read = (at_pruned + 1) if at_pruned is not None else len(pruned.epochs)
        n_pruned = pruned.states[:n_read].count("PRUNED")
        best_pruned = pruned.best(maximize, cap=unpruned.total_epochs)
        shown = f"{need_pruned:13d}" if need_pruned is not None else f"{'not reached':>13}"
        print(
            f"{seed:4d} {best:9.4f} {target:8.4f} {need_none:11d} {shown} {ratio:6.2f} "
            f"{need_none / need_at_n if need_at_n else 0.0:6.2f} {bound} "
            f"{unpruned.total_epochs:10d} {spent:12d} {n_pruned:6d} {best_pruned:11.4f}"
            f"   (reached at trial {at_none} / {at_pruned}; {unpruned.seconds:.0f} s / {pruned.seconds:.0f} s)",
            flush=True,
        )
        if args.verbose:
            for run in (unpruned, pruned):
                trials = ", ".join(
                    f"{n}:{s[0]}{e}" + (f"={v:.3f}" if v is not None else "")
                    for n, (s, e, v) in enumerate(zip(run.states, run.epochs, run.values, strict=True))
                )
                print(f"     {run.pruner:>6}: {trials}")
    median = statistics.median(ratios)
    verdict = "PASS" if median >= TARGET_RATIO else "FAIL"
    print(
        f"\nepochs-to-target ratio (none / {pruned_name}): min {min(ratios):.2f}, median {median:.2f}, "
        f"max {max(ratios):.2f} over {len(ratios)} seed(s); target >= {TARGET_RATIO:.0f}x: {verdict}"
    )
    if len(runs) > 1:
        print(hit_rates(runs, maximize, pruned_name))
    print(rule_ceiling([unpruned for _, unpruned, _ in runs], maximize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
