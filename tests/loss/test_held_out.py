"""The held-out loss (fastsft.loss.held_out): batched, on the trained tokens, against a float64 sum."""

import pytest

from fastsft.loss.held_out import held_out_loss


def test_held_out_loss_batched_equals_one_example_at_a_time_and_the_float64_sum(tiny_model_dir):
    """The one held-out scorer (fastsft eval, the retain set): right-padded batches of uneven examples
    give the token-weighted mean loss over the trained tokens, the same as one example at a time and as a
    float64 sum written out here; padding and untrained tokens carry no loss, and max_length cuts both."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    items = []
    for n in (5, 17, 9, 30, 2):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        items.append({"input_ids": ids, "mask": mask})
    want_nll, want_n = 0.0, 0
    with torch.no_grad():
        for it in items:
            ids, mask = it["input_ids"][:24], it["mask"][:24]
            logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            for t in range(1, len(ids)):
                if mask[t]:
                    want_nll -= float(logp[t - 1, ids[t]])
                    want_n += 1
    batched = held_out_loss(model, items, max_length=24, batch_size=3, pad_id=0)
    single = held_out_loss(model, items, max_length=24, batch_size=1)
    assert batched["tokens"] == single["tokens"] == want_n
    assert batched["loss"] == pytest.approx(want_nll / want_n, rel=1e-5)
    assert single["loss"] == pytest.approx(want_nll / want_n, rel=1e-5)
    assert held_out_loss(model, [{"input_ids": [5, 6], "mask": [1, 0]}], max_length=8)["loss"] is None
