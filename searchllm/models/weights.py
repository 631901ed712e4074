"""Weights as read-only numpy arrays, so Ray's object store can share them zero-copy between actors.

bf16 has no numpy dtype: it travels as uint16 bits and is viewed back, still without a copy.
Shared arrays are read-only for everyone; code that changes weights (reformation) works on copies.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch

SharedState = dict[str, np.ndarray]
_BF16_TAG = "::bf16"


def share(state: Mapping[str, torch.Tensor], names: list[str] | None = None) -> SharedState:
    out: SharedState = {}
    for name in names if names is not None else list(state):
        t = state[name].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            out[name + _BF16_TAG] = t.view(torch.uint16).numpy()
        else:
            out[name] = t.numpy()
    return out


def unshare(shared: SharedState) -> dict[str, torch.Tensor]:
    out = {}
    with warnings.catch_warnings():
        # Object-store arrays are not writable; nothing here writes to them.
        warnings.simplefilter("ignore", UserWarning)
        for name, arr in shared.items():
            if name.endswith(_BF16_TAG):
                out[name[: -len(_BF16_TAG)]] = torch.from_numpy(arr).view(torch.bfloat16)
            else:
                out[name] = torch.from_numpy(arr)
    return out
