"""The definition of fastsft's losses, in plain float64 PyTorch.

This is what the kernels compute, written for reading rather than speed; the tests check the kernels
against it, and it is itself checked against `torch.nn.functional.cross_entropy`.

Per token i with label y_i (rows whose label is `ignore_index` contribute nothing):

    z       = softcap * tanh(x / softcap)            (only when softcap is set, Gemma-2 style)
    lse_i   = log sum_j exp(z_ij)
    nll_i   = lse_i - z_{i,y_i}
    loss_i  = (1 - eps) * nll_i + eps * mean_j(lse_i - z_ij) + lse_square_scale * lse_i^2

and the reduction: `none` -> loss_i (0 on ignored rows), `sum` -> sum_i loss_i,
`mean` -> sum_i loss_i / (number of non-ignored rows, at least 1), and with `num_items_in_batch`
(the token count of a whole accumulated batch) -> sum_i loss_i / num_items_in_batch.
"""

from __future__ import annotations

import torch


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    x = logits.double()
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(1, safe[:, None])[:, 0]
    loss = nll
    if label_smoothing:
        loss = (1 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1))
    if lse_square_scale:
        loss = loss + lse_square_scale * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, valid, reduction, num_items_in_batch)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return cross_entropy_reference(logits, labels, **kwargs)


def _reduce(loss, valid, reduction, num_items_in_batch):
    if reduction == "none":
        return loss
    total = loss.sum()
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, dtype=total.dtype, device=total.device)
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)
