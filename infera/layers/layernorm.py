import torch
from torch import nn

from infera.kernels import cpu_kernels
from infera.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as HF transformers does; optionally adds the residual first.

    With a residual the fused CPU kernel works in place: ``x`` becomes the normalized output and
    ``residual`` the sum."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        ext = cpu_kernels(x) if x.dtype == self.weight.dtype else None
        if residual is None:  # (any leading dims: Qwen3 normalizes [tokens, heads, head_dim])
            return ext.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape) if ext else self._norm(x)
        if ext and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous():
            ext.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm, ``x * (1 + w)`` in float32 then cast back, as HF transformers computes it: the
    weight holds ``1 + w`` in float32, ``w`` the checkpoint's rounded to the model's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        dtype = self.weight.dtype
        self.weight.data = self.weight.data.float()
        self.weight.weight_loader = lambda param, w: default_weight_loader(param, w.to(dtype).float() + 1)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)
