"""What offload and tiled_mlp share: run a function without keeping its graph, and rerun it in backward
with the autocast and random state it first ran with (as torch.utils.checkpoint does)."""

from __future__ import annotations

import contextlib

import torch


class RunState:
    """Autocast and RNG state of a forward, to replay in backward."""

    def __init__(self, device: torch.device):
        self.device = device
        kind = device.type
        self.autocast = None
        if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
            self.autocast = (kind, torch.get_autocast_dtype(kind))
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if kind == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            ctx = (
                torch.autocast(self.autocast[0], dtype=self.autocast[1])
                if self.autocast
                else contextlib.nullcontext()
            )
            with ctx, torch.enable_grad():
                yield
