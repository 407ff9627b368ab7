import torch
import torch.nn.functional as F
from torch import nn

from infera.kernels import cpu_kernels


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a gate/up projection fused along the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and (ext := cpu_kernels(x)):
            return ext.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """``gelu(gate) * up`` with GELU's tanh approximation (Gemma's ``gelu_pytorch_tanh``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
