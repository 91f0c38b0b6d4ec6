"""Benchmark (not a timed test): the cost model that splits packs on the CPU, against measured training steps.

:func:`tuner.packed.split_by_cost` decides which trials of one shape share a pack from a model of a training
step's cost in microseconds: a fixed cost per step of a pack, and per member a cost per multiply-add of each row,
per weight's update, per unit of each row (activation, dropout, their derivatives) and per row (loss, indexing),
higher by a factor for a padded member of a pack of several. This script times :func:`tuner.packed.fit_pack`
for single trials and packs of reference shapes at two or more batch sizes, prints each step's measured cost
beside the model's, and fits the model's constants to the measurements (least squares: the singles give the
fixed and per-member costs, the packs the factor), in the names they have in tuner/packed.py. Only the ratios
between the constants decide a split.

Each shape trains ``--epochs`` epochs of ``--rows`` random rows (4 features, 10% positives, 2,000 validation
rows with the per-epoch validation pass) as ``bench_gradients.reference_trial`` (Adam, dropout 0.1, ReLU), one
torch thread, on the CPU; the figure is the median over ``--repeats`` of the fit's seconds per training step.

Run:

    .venv/bin/python bench/bench_split.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from bench_gradients import reference_trial

import tuner.packed as packed
from tuner.train import FitConfig

N_IN = 4
SINGLES = [(8, 8), (32, 32), (64, 64), (128, 128), (256, 256), (240, 68), (24, 177)]
PACKS = [(8, (8, 8)), (8, (32, 32)), (8, (64, 64)), (8, (128, 128)), (2, (128, 128)), (4, (256, 256)), (5, (240, 68))]


@dataclass(frozen=True)
class Part:
    x: torch.Tensor
    y: torch.Tensor


def rows(n: int, generator: torch.Generator) -> Part:
    return Part(torch.randn(n, N_IN, generator=generator), (torch.rand(n, generator=generator) < 0.1).long())


def step_us(
    n: int, widths: tuple[int, ...], batch: int, train: Part, validation: Part, args: argparse.Namespace
) -> float:
    """Median microseconds per training step of a pack of ``n`` trials of ``widths`` (distinct seeds)."""
    config = FitConfig(max_epochs=args.epochs, patience=args.epochs)
    members = [packed.PackMember(reference_trial(widths, batch), seed) for seed in range(n)]
    steps = args.epochs * -(-len(train.x) // batch)
    packed.fit_pack(members, train, validation, config, n_out=1)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        packed.fit_pack(members, train, validation, config, n_out=1)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) / steps * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args(argv)
    if len(set(args.batch_sizes)) < 2:
        parser.error("--batch-sizes: give two or more, or a row's cost cannot be told from the fixed cost")
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    train, validation = rows(args.rows, generator), rows(2000, generator)
    print(
        f"torch {torch.__version__}, 1 thread, CPU; {args.rows} rows x {args.epochs} epochs; microseconds per "
        f"training step, median of {args.repeats}"
    )
    cases = [(1, w, b) for b in args.batch_sizes for w in SINGLES] + [
        (n, w, b) for b in args.batch_sizes for n, w in PACKS
    ]
    measured = [step_us(n, w, b, train, validation, args) for n, w, b in cases]
    constants = fit(cases, measured)
    print(f"{'pack':>16s} {'batch':>5s} {'measured':>9s} {'model now':>9s} {'fitted':>9s}")
    fitted = []
    for (n, w, b), got in zip(cases, measured, strict=True):
        now = packed._pack_cost(n, w, N_IN, 1, b)
        with constants_set(constants):
            fitted.append(packed._pack_cost(n, w, N_IN, 1, b))
        print(f"{n:2d} x {'-'.join(map(str, w)):>11s} {b:5d} {got:9.0f} {now:9.0f} {fitted[-1]:9.0f}")
    error = max(abs(f - g) / g for f, g in zip(fitted, measured, strict=True))
    print(f"\nfitted constants (largest error {100 * error:.0f}%), as named in tuner/packed.py:")
    for name, value in constants.items():
        print(f"  {name} = {value:.3g}   (now {getattr(packed, name):.3g})")


def fit(cases: Sequence[tuple[int, tuple[int, ...], int]], measured: Sequence[float]) -> dict[str, float]:
    """Least squares: singles give the fixed cost and the costs of a multiply-add, a weight's update, a unit's
    activation and a row; packs, with those, the factor on a padded member's cost."""
    singles = [(packed._sizes(w, N_IN, 1), b, c) for (n, w, b), c in zip(cases, measured, strict=True) if n == 1]
    design = np.array([[1.0, b * weights, weights, b * units, b] for (weights, units), b, _ in singles])
    (fixed, mac, param, unit, row), *_ = np.linalg.lstsq(design, np.array([c for *_, c in singles]), rcond=None)
    constants = {"_STEP_OVERHEAD_US": fixed, "_MAC_US": mac, "_PARAM_US": param, "_UNIT_US": unit, "_ROW_US": row}
    with constants_set(constants):
        packs = [
            (n * packed._step_cost(w, N_IN, 1, b), c - fixed)
            for (n, w, b), c in zip(cases, measured, strict=True)
            if n > 1
        ]
    factor = sum(x * y for x, y in packs) / sum(x * x for x, _ in packs)
    return {name: float(value) for name, value in {**constants, "_PACKED_FACTOR": factor}.items()}


@contextlib.contextmanager
def constants_set(constants: dict[str, float]) -> Iterator[None]:
    before = {name: getattr(packed, name) for name in constants}
    for name, value in constants.items():
        setattr(packed, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(packed, name, value)


if __name__ == "__main__":
    main()
