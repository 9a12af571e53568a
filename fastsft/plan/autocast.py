"""CUDA autocast's casts, for tensors on `meta` (which no autocast dispatch key covers).

The Trainer's bf16 / fp16 mixed precision runs the forward under `torch.autocast("cuda")`: matmuls take
16-bit copies of float32 operands (QLoRA's float32 embeddings, lm_head, norms and LoRA weights, after
PEFT's `prepare_model_for_kbit_training`), and a few ops run in float32. The casts change which tensors
exist and their sizes, so the simulation makes them too: a `TorchFunctionMode` (above autograd, so the
casts are recorded as autocast's are) applying the two lists of torch's autocast documentation
("CUDA Ops that can autocast to float16" / "... to float32") for the ops a causal LM uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

LOWER = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.addbmm,
    F.scaled_dot_product_attention,
}
HIGHER = {
    torch.softmax,
    torch.Tensor.softmax,
    F.softmax,
    torch.log_softmax,
    torch.Tensor.log_softmax,
    F.log_softmax,
    F.cross_entropy,
    F.nll_loss,
    torch.exp,
    torch.pow,
    torch.Tensor.pow,
    torch.rsqrt,
    F.layer_norm,
}


def backward(loss: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    """`loss.backward(grad)` with the active modes kept: `Tensor.backward` is itself a torch function, so
    a mode is off while it runs, and checkpointing recomputes the forward (which needs the casts) inside."""
    from torch.autograd import Variable

    tensors = loss if isinstance(loss, (tuple, list)) else (loss,)
    grads = (
        grad if isinstance(grad, (tuple, list)) else (grad if grad is not None else torch.ones_like(loss),)
    )
    Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grads), False, False, (), allow_unreachable=True, accumulate_grad=True
    )


class MetaAutocast(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.autocast_dtype = dtype  # what fastsft.kernels' loss reads as the autocast dtype
        self._saved = []  # a stack: the mode is entered again while active (a tiled MLP's backward)

    def __enter__(self):
        # code that asks whether autocast is on (PEFT's LoRA layers skip their float32 input cast then)
        # must hear yes, as under the Trainer's CUDA autocast: the flag alone, no CUDA tensor exists
        self._saved.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        enabled, dtype = self._saved.pop()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.autograd.backward:  # (a lever's backward inside backward: keep the casts)
            with self:
                return backward(args[0], args[1] if len(args) > 1 else kwargs.get("grad_tensors"))
        if func in LOWER:

            def cast(t):
                return t.to(self.dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t  # noqa: E731

            args, kwargs = tree_map(cast, (args, kwargs))
        elif func in HIGHER:

            def cast(t):
                return (
                    t.float()
                    if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
                    else t
                )  # noqa: E731

            args, kwargs = tree_map(cast, (args, kwargs))
        return func(*args, **kwargs)
