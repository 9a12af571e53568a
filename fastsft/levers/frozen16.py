"""Frozen embeddings and lm_head stored in the compute dtype, not float32.

PEFT's `prepare_model_for_kbit_training` casts every 16-bit weight of a quantised model to float32,
the frozen token embeddings and lm_head included (2 x 1 GB more for a 128k-vocabulary 8B model). Their
values were 16-bit and stay exactly so in float32, and under 16-bit autocast the lm_head's matmul (and
fastsft's linear loss) takes a 16-bit copy of it anyway. Stored back in the compute dtype, with the
embedding's output cast to float32 as the float32 lookup returns it, every value the model computes is
unchanged: exact under the Trainer's mixed precision (the only place this is installed). Outside it
(the answers after training, a merge, an export) a 16-bit lm_head meets float32 hidden states, so the
levers' callback puts both back in float32 when training ends (`restore`: the same values, exactly).
"""

from __future__ import annotations

import torch


def _to_float32(module, args, output):
    return output.float()


def install(model, dtype: torch.dtype) -> list:
    """Store the frozen float32 input embeddings and lm_head of `model` in `dtype`; returns what `restore`
    needs to undo it (one entry per module changed)."""
    changed = []
    emb = model.get_input_embeddings()
    if emb is not None and emb.weight.dtype == torch.float32 and not emb.weight.requires_grad:
        emb.weight.data = emb.weight.data.to(dtype)
        changed.append((emb, emb.register_forward_hook(_to_float32)))
    head = model.get_output_embeddings()
    if head is not None and head.weight.dtype == torch.float32 and not head.weight.requires_grad:
        head.weight.data = head.weight.data.to(dtype)
        changed.append((head, None))
    return changed


def restore(changed: list) -> None:
    """Undo `install`: the weights back in float32 (their 16-bit values, exactly), the embedding's hook off."""
    for module, hook in changed:
        module.weight.data = module.weight.data.float()
        if hook is not None:
            hook.remove()
