"""Exponential moving average of the trainable weights, kept sharded exactly like the parameters
(each rank holds the EMA of its own shards) and saved in checkpoints through DCP."""
from __future__ import annotations

import torch
from torch import nn

from scaleforge.platform.fp8_all_gather import plain_tensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return plain_tensor(t.to_local()) if hasattr(t, "to_local") else t


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.shadow = [p.detach().clone().float() if not hasattr(p, "to_local") else p.detach().clone()
                       for p in self.params]

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor | None = None) -> None:
        """shadow <- lerp(shadow, weights, 1 - decay); with ``found_inf`` (a 0-d device tensor, nonzero when the
        optimizer skipped the step) the weight is 0 there, decided on the device."""
        shadow, params = [_local(s) for s in self.shadow], [_local(p.detach()) for p in self.params]
        if found_inf is None:
            torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
            return
        weight = (1.0 - found_inf.float()) * (1.0 - self.decay)
        torch._foreach_lerp_(shadow, params, [weight] * len(shadow))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, s in zip(self.names, self.shadow):
            _local(s).copy_(_local(state[name]))
