"""Exponential moving average of trained parameters, swapped in for evaluation."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import Tensor, nn


class EMA:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta after each update (Polyak averaging).

    ``swapped()`` puts the averaged weights into the parameters for the duration of a ``with`` block
    (evaluation, export) and restores the trained ones afterwards.
    """

    def __init__(self, params: Iterable[nn.Parameter], decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One averaging step of every shadow towards its parameter (shard by shard under FSDP2)."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def swapped(self):
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadows whole (under FSDP2 each is gathered from its shards: a collective, call it on every rank)."""
        from flowrl.train.checkpoint import full_tensor

        return {f"shadow.{i}": full_tensor(s) for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Whole shadows (as :meth:`state_dict` wrote them) into this EMA, re-sharded like its parameters."""
        from flowrl.train.checkpoint import shard_like

        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors; the model has {len(self.shadow)} trained parameters")
        for i, s in enumerate(self.shadow):
            s.copy_(shard_like(state[f"shadow.{i}"], s))
