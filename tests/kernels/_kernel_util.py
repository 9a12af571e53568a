"""Fresh random inputs per run (the seed is printed on failure) and the error measure."""

import random

import pytest
import torch

from fastsft.kernels import triton_available

DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # the dtypes every kernel takes
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# gradient tolerance (relative error of the norm) per dtype; losses are float32 in every case
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
LOSS_TOL = 1e-4


def backends_for(device):
    out = [pytest.param("torch", id="torch")]
    out.append(
        pytest.param(
            "triton",
            id="triton",
            marks=pytest.mark.skipif(
                not triton_available(device), reason=f"Triton cannot run on {device} here"
            ),
        )
    )
    return out


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm()
    if denom == 0:
        return float((a - b).norm())
    return float((a - b).norm() / denom)


def params(devices=DEVICES):
    """(device, backend) pairs."""
    out = []
    for d in devices:
        for be in backends_for(d):
            out.append(pytest.param(d, be.values[0], id=f"{d}-{be.id}", marks=be.marks))
    return out
