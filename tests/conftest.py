"""Shared test settings."""

from __future__ import annotations

import torch

# One intra-op thread, as the CLI uses: the suite runs beside worker processes and servers on few cores.
torch.set_num_threads(1)
