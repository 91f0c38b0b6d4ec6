"""Benchmark (not a timed test): a pack's gradients computed by hand against autograd's, per training step.

Equal work on both sides: the same pack (members, padded widths, dropout masks), the same batch, the same
losses. ``by hand`` is :meth:`tuner.packed._Pack.gradients` (the operators autograd would record, called
directly); ``autograd`` is the pack's :meth:`forward` in training, its losses, and ``backward()``. The figure is
microseconds per step (forward, loss and gradients; no optimizer update) and the ratio autograd / by hand
within one repetition; min / median / max over ``--repeats``. One torch thread, on the CPU by default.

Run:

    .venv/bin/python bench/bench_gradients.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import tuner.packed as packed
from tuner.space import TrialParams
from tuner.train import FitConfig

# Packs of the shapes bench_pack.py's SDSS trials split into (widths per member), batch 64, 5 inputs.
PACKS: dict[str, list[tuple[int, ...]]] = {
    "5 members, widths 38-167": [(104, 33), (54, 167), (119, 63), (88, 52), (38, 101)],
    "1 member, 240-58": [(240, 58)],
    "8 members, widths 16-60": [(24, 17), (38, 50), (30, 20), (16, 40), (20, 20), (40, 30), (33, 33), (18, 60)],
    "1 member, 3 layers 64-32-16": [(64, 32, 16)],
}


def reference_trial(widths: tuple[int, ...], batch_size: int = 64, batch_norm: bool = False) -> TrialParams:
    """A trial of these widths with fixed hyperparameters (Adam, ReLU, dropout 0.1), for timing steps."""
    return TrialParams(
        n_layers=len(widths),
        widths=widths,
        lr=0.01,
        momentum=0.9,
        dropout=0.1,
        weight_decay=1e-4,
        batch_size=batch_size,
        optimizer="adam",
        activation="relu",
        init="he",
        batch_norm=batch_norm,
    )


def make_pack(widths: Sequence[tuple[int, ...]], batch_norm: bool, device: torch.device) -> packed._Pack:
    members = [packed.PackMember(reference_trial(w, batch_norm=batch_norm), seed) for seed, w in enumerate(widths)]
    return packed._Pack(members, 5, 1, device)


def per_step(step: Callable[[], object], steps: int, device: torch.device) -> float:
    step()  # first-call allocations
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()  # a GPU's queued kernels are part of the time
    return (time.perf_counter() - started) / steps * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300, help="training steps timed per side and repetition")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    config = FitConfig()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, device {device}; microseconds per step, min / median / max")
    for batch_norm in (False, True):
        for name, widths in PACKS.items():
            pack = make_pack(widths, batch_norm, device)
            x = torch.randn(len(widths), 64, 5, generator=generator).to(device)
            y = (torch.rand(len(widths), 64, generator=generator) < 0.2).float().to(device)
            tensors = pack.parameters()

            def by_hand(pack: packed._Pack = pack, x: torch.Tensor = x, y: torch.Tensor = y) -> object:
                pack.next_dropout()
                return pack.gradients(x, y, config, None)

            def with_autograd(
                pack: packed._Pack = pack, x: torch.Tensor = x, y: torch.Tensor = y, tensors: list = tensors
            ) -> object:
                pack.next_dropout()
                for t in tensors:
                    t.grad = None
                losses = packed._losses(pack.forward(x, training=True), y, config, None, pack)
                losses.sum().backward()
                return losses

            hand, auto = [], []
            for _ in range(args.repeats):
                hand.append(per_step(by_hand, args.steps, device))
                # autograd's side: the parameters as leaves that require gradients, as a torch.nn model's are
                for t in tensors:
                    t.requires_grad_()
                auto.append(per_step(with_autograd, args.steps, device))
                for t in tensors:
                    t.requires_grad_(False)
                    t.grad = None
            ratios = [a / h for a, h in zip(auto, hand, strict=True)]

            def stats(values: list[float], fmt: str) -> str:
                return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))

            label = f"{name}{', batch norm' if batch_norm else ''}"
            print(
                f"{label:45s} by hand {stats(hand, '.0f')}   autograd {stats(auto, '.0f')}   "
                f"autograd / by hand {stats(ratios, '.2f')}"
            )


if __name__ == "__main__":
    main()
