"""Plain-PyTorch reference of the SwiGLU gate: ``silu(gate) * up``, computed in fp32, returned in the input dtype."""

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
