"""A model's loss on held-out data, on the tokens training trains: the one scorer of `fastsft eval` and of
the retain set before and after training.

- `held_out_loss(model, items, ...)`: the token-weighted mean loss of encoded examples, batched
  (`data.encode.collate`).
- `stock_batch_loss(model, batch)`: a collated batch's mean loss from the model's logits, transformers'
  own causal-LM loss; the default of `held_out_loss` (a run scores its retain set through its loss route).

Its answers on the same data (the task metric) are `fastsft.chat.scoring`.
"""

from __future__ import annotations

from fastsft.data.encode import IGNORE_INDEX, collate


def stock_batch_loss(model, batch: dict):
    """The mean cross-entropy of a collated batch over its scored tokens (labels shifted by one), from the
    model's logits in float32: what transformers' own causal-LM loss computes."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def held_out_loss(
    model,
    items: list[dict],
    *,
    max_length: int,
    batch_size: int = 1,
    pad_id: int = 0,
    loss=None,
    advance=None,
) -> dict:
    """{"loss", "tokens", "examples"}: the token-weighted mean loss of encoded examples [{"input_ids",
    "mask"}] over the tokens training trains (labels shifted by one), in eval mode, without gradients;
    "loss" is None when no token is scored. `loss(model, batch)`: a collated batch's mean loss over its
    scored tokens (the run's loss route for the retain set: the training loss; `stock_batch_loss` by
    default). `advance(n)`: progress, called with each batch's size."""
    import torch

    loss = loss or stock_batch_loss
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                if advance is not None:
                    advance(len(chunk))
                batch = collate(chunk, max_length=max_length, pad_id=pad_id)
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if n == 0:
                    continue
                value = loss(model, {k: v.to(device) for k, v in batch.items()})
                nll += float(value.detach().float()) * n
                tokens += n
    finally:
        if was_training:
            model.train()
    return {"loss": nll / tokens if tokens else None, "tokens": tokens, "examples": len(items)}


__all__ = ["held_out_loss", "stock_batch_loss"]
