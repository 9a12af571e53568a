"""Generation that ends with the assistant's turn: the one generator behind `fastsft generate`, `chat`,
`eval`, `serve`, the report's before / after answers and the merged export's smoke test.

- `generate_ids(model, tokenizer, prompt, ...)`: (new token ids, stopped on an end-of-turn token), greedy
  unless a temperature is given; the ids stop before the end-of-turn token.
- `answer(model, tokenizer, prompt, ...)`: the greedy answer decoded, with its template compliance
  (it ended its turn within the budget and wrote no role markers).
- `answer_batch(model, tokenizer, prompts, ...)`: the same for many prompts, greedy, in left-padded
  batches (tested equal to `answer` one at a time).

The end-of-turn ids come from `fastsft.chat.templates.end_of_turn_ids`, the detector training uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastsft import threads
from fastsft.chat.templates import chat_ids, end_of_turn_ids, role_markers


@dataclass
class Answer:
    ids: list[int]  # the new tokens, the end-of-turn token left out
    stopped: bool  # ended with an end-of-turn token within the budget
    text: str  # decoded without special tokens, stripped
    raw: str  # decoded with special tokens
    role_markers: list[str]  # role markers written in the answer (invented turns)

    @property
    def complies(self) -> bool:
        """The answer follows the chat template: it ended its turn and invented no other."""
        return self.stopped and not self.role_markers


def generate_ids(
    model,
    tokenizer,
    prompt,
    *,
    eot: list[int] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    tools=None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    streamer=None,
    stopping_criteria=None,
) -> tuple[list[int], bool]:
    """(new token ids, stopped on an end-of-turn token) for the answer to `prompt`: chat messages, or
    the prompt's token ids (generation prompt included), with `tools` (function definitions).

    `eot` (default `end_of_turn_ids(tokenizer)`) are the ids that end the turn. Sampling (temperature > 0)
    keeps the `top_p` nucleus and starts from `seed` when given; `stop` strings end the generation too
    (the text still holds them: the caller cuts it); `streamer` (a transformers streamer) receives the
    tokens as they come; `stopping_criteria` (a list of transformers StoppingCriteria) can end it
    early, e.g. when a client goes away. A model in training mode is put back in it afterwards."""
    import torch

    eot = end_of_turn_ids(tokenizer) if eot is None else eot
    if prompt and isinstance(prompt[0], int):
        ids = torch.tensor([list(prompt)])
    else:
        ids = chat_ids(tokenizer, list(prompt), add_generation_prompt=True, tools=tools)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eot[-1] if eot else None)
    kwargs = dict(
        input_ids=ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=eot or None,
        pad_token_id=pad,
    )
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(int(seed))
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if streamer is not None:
        kwargs["streamer"] = streamer
    criteria = [*(stopping_criteria or []), *_follow_free_cores(model)]
    if criteria:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    was_training, threads_at_start = model.training, torch.get_num_threads()
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**kwargs)
    finally:
        torch.set_num_threads(threads_at_start)
        if was_training:
            model.train()
    new = out[0, ids.shape[1] :].tolist()
    for i, t in enumerate(new):
        if t in eot:
            return new[:i], True
    return new, False


def answer(
    model, tokenizer, prompt, *, eot: list[int] | None = None, max_new_tokens: int = 64, tools=None
) -> Answer:
    """The greedy answer to `prompt` (chat messages or prompt token ids), decoded, with its compliance."""
    new, stopped = generate_ids(model, tokenizer, prompt, eot=eot, max_new_tokens=max_new_tokens, tools=tools)
    return _decoded(tokenizer, new, stopped)


def _decoded(tokenizer, new: list[int], stopped: bool) -> Answer:
    raw = tokenizer.decode(new, skip_special_tokens=False)
    return Answer(
        ids=new,
        stopped=stopped,
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        raw=raw,
        role_markers=role_markers(raw),
    )


def answer_batch(
    model,
    tokenizer,
    prompts: list,
    *,
    eot: list[int] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    on_batch=None,
) -> list[Answer]:
    """Greedy answers to `prompts` (each chat messages or prompt token ids), in the prompts' order.

    Prompts run `batch_size` at a time, longest first (so a batch pads little), left-padded: every row's
    last prompt token sits at the right edge and the new tokens follow it, with the attention mask
    hiding the padding (transformers' generate derives the positions from the mask, so a padded row
    is answered as it would be alone). A row that has ended its turn keeps producing padding until the
    batch ends; its ids are cut at its end-of-turn token. `on_batch(n)` is called after each batch
    with its size (a progress bar)."""
    import torch

    eot = end_of_turn_ids(tokenizer) if eot is None else eot
    ids = [
        list(p)
        if p and isinstance(p[0], int)
        else chat_ids(tokenizer, list(p), add_generation_prompt=True)[0].tolist()
        for p in prompts
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eot[-1] if eot else 0)
    device = next(model.parameters()).device
    from transformers import StoppingCriteriaList

    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[Answer | None] = [None] * len(ids)
    was_training, threads_at_start = model.training, torch.get_num_threads()
    model.eval()
    try:
        for start in range(0, len(order), max(1, batch_size)):
            rows = order[start : start + max(1, batch_size)]
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding: the prompt ends at the right edge
                x[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            follow = _follow_free_cores(model)
            with torch.no_grad():
                gen = model.generate(
                    **({"stopping_criteria": StoppingCriteriaList(follow)} if follow else {}),
                    input_ids=x.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eot or None,
                    pad_token_id=pad,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            for r, i in enumerate(rows):
                new = gen[r, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in eot), None)
                out[i] = _decoded(tokenizer, new if cut is None else new[:cut], cut is not None)
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        torch.set_num_threads(threads_at_start)
        if was_training:
            model.train()
    return out  # type: ignore[return-value]


def _follow_free_cores(model) -> list:
    """[a StoppingCriteria that, before each new token, sets the intra-op threads to the cores other work
    leaves free (fastsft.threads.Follower); it never stops anything], or [] on a GPU or where
    fastsft's thread policy is not in force."""
    import torch

    if not threads.following() or next(model.parameters()).device.type != "cpu":
        return []
    from transformers import StoppingCriteria

    follow = threads.Follower(torch.get_num_threads())

    class FollowFreeCores(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            follow()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return [FollowFreeCores()]


__all__ = ["Answer", "answer", "answer_batch", "generate_ids"]
