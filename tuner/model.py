"""The network: a multilayer perceptron built from :class:`~tuner.space.TrialParams`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tuner.space import TrialParams

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU}
# Gain names torch.nn.init knows; ELU is closest to ReLU for He initialisation.
_Gain = Literal["relu", "tanh", "sigmoid"]
_GAIN_NAME: dict[str, _Gain] = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "elu": "relu"}


def build_mlp(n_in: int, params: TrialParams, n_out: int, *, generator: torch.Generator | None = None) -> nn.Sequential:
    """Build the MLP: ``[Linear -> (BatchNorm) -> activation -> (Dropout)] * n_layers -> Linear``.

    Args:
        n_in: Number of input features.
        params: Depth, per-layer width, activation, initialisation, batch norm and dropout.
        n_out: 1 for a binary task (one logit), the number of classes otherwise.
        generator: Seeds the initial weights, so a trial can be replayed alone.

    Returns:
        The network, on the CPU; move it with ``.to(device)``.
    """
    layers: list[nn.Module] = []
    width_in = n_in
    for width in params.widths:
        layers.append(nn.Linear(width_in, width))
        if params.batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(_ACTIVATIONS[params.activation]())
        if params.dropout > 0:
            layers.append(nn.Dropout(params.dropout))
        width_in = width
    layers.append(nn.Linear(width_in, n_out))
    net = nn.Sequential(*layers)
    gain_name = _GAIN_NAME[params.activation]
    for module in net:
        if isinstance(module, nn.Linear):
            if params.init == "xavier":
                nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain(gain_name), generator=generator)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity=gain_name, generator=generator)
            nn.init.zeros_(module.bias)
    return net


def params_from_record(record: dict[str, Any]) -> TrialParams:
    """A trial's stored parameters (``model.json``'s ``params``, widths as a list) as the TrialParams they were."""
    return TrialParams(**{**record, "widths": tuple(record["widths"])})


def mlp_from_record(record: dict[str, Any], n_in: int, n_out: int) -> nn.Sequential:
    """Rebuild a trial's network from its stored parameters (``model.json``'s ``params``, widths as a list)."""
    return build_mlp(n_in, params_from_record(record), n_out)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read stored weights, refusing anything but a plain state dict of tensors.

    Raises:
        ValueError: The file is unreadable, or holds something other than tensors.
    """
    try:
        # weights_only: a state dict is tensors in plain containers; refuse anything that would run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or non-tensor file; all mean "unusable"
        raise ValueError(f"cannot load {path} as a plain state dict: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state
