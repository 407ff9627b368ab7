"""Tensor sampling operations: host data to the device, each row's most likely token, the rows'
logit biases, and the distribution a row samples from (temperature, top-k, top-p, min-p)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from infera.kernels import cpu_kernels

if TYPE_CHECKING:
    from infera.sampling_params import SamplingParams


def device_tensor(data: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data as a tensor on ``device``. On CUDA it is copied from pinned memory without
    waiting: a plain copy would first wait for every kernel already queued."""
    if device.type == "cuda":
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


def top_tokens(logits: torch.Tensor, with_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's most likely token (the first of equal maxima, as ``argmax``) and, ``with_probs``,
    its probability under the softmax.  On a CPU one native pass over the logits: torch's argmax
    and softmax take 0.4-0.8 ms for 16 rows of a 49k vocabulary, several percent of a decode step."""
    ext = cpu_kernels(logits)
    if ext is not None and logits.dtype in (torch.float32, torch.bfloat16) and logits.stride(-1) == 1:
        ids, probs = ext.top_tokens(logits, with_probs)
        return ids, probs if with_probs else None
    if with_probs:
        probs, ids = logits.float().softmax(dim=-1).max(dim=-1)
        return ids, probs
    return logits.argmax(dim=-1), None


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``logits`` [R, V] plus each row's ``logit_bias`` (a new tensor; ``logits`` itself when no row
    has one).  Host work is per bias entry, never per vocabulary entry."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    row_ids = [i for i in rows for _ in params[i].logit_bias]
    token_ids = [t for i in rows for t in params[i].logit_bias]
    values = [v for i in rows for v in params[i].logit_bias.values()]
    index = (device_tensor(row_ids, logits.device), device_tensor(token_ids, logits.device))
    return logits.index_put(index, device_tensor(values, logits.device, logits.dtype), accumulate=True)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution sampled from: temperature, then top-k, top-p and min-p."""
    temps = device_tensor([p.temperature for p in params], logits.device).unsqueeze(1)
    logits = logits / temps
    if any(p.top_k for p in params):
        ks = [min(p.top_k, logits.shape[1]) if p.top_k > 0 else logits.shape[1] for p in params]
        k = device_tensor(ks, logits.device)
        kth = logits.topk(max(ks), dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = device_tensor([p.top_p for p in params], logits.device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the mass before it already reaches top_p (always keep the first)
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p.unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = device_tensor([p.min_p for p in params], logits.device)
        keep = probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
