"""Encoding: the chat template and pad token, then each normalised row -> (input_ids, loss mask).

This module is the one owner of masking. Training (the `input_ids` and mask columns handed to TRL),
`fastsft data preview` and `fastsft eval` all take their tokens and masks from `Encoder.encode`, and
their labels from `labels`.

A mask marks the tokens that carry loss: with assistant-only loss every assistant answer and the
end-of-turn token after it (from the template's `{% generation %}` markers, or found by rendering the
conversation turn by turn when it has none); with completion-only loss the completion (where the
tokenized prompt and prompt + completion diverge, as TRL finds it); otherwise every token. Rows are
tokenized exactly as TRL 1.15/1.16's SFTTrainer would tokenize them, so that handing TRL our ids
changes no token.
"""

from __future__ import annotations

from typing import Any

from ..chat.templates import load_template
from ..errors import DataError
from .formats import MAX_SKIP_REASONS, Example, check_skips, skip_hint, tool_names
from .read import RowProblem, short

EOT_CHECK_EXAMPLES = 8  # examples whose every answer must end with a trained end-of-turn token
IGNORE_INDEX = -100  # the label of a token without loss (PyTorch's cross_entropy ignore_index)


def setup_template(spec, tokenizer) -> str | None:
    """Apply the DataSpec's `data.chat_template`; return a description of the template in use (None if none)."""
    name = spec.data.chat_template
    if name:
        tokenizer.chat_template = load_template(name, spec.base_dir)
        return name
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else None


_PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<pad>",
    "[PAD]",
    "<|pad|>",
    "<unk>",
)


def setup_pad_token(tokenizer, eot: str | None, log) -> str | None:
    """Give the tokenizer a pad token that is not the end-of-turn token. Returns the token it added
    (which needs the model's embeddings resized), or None."""
    if tokenizer.pad_token is not None:
        return None
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.unk_token, *_PAD_CANDIDATES, tokenizer.eos_token]
    for tok in candidates:
        if tok and tok != eot and tok in vocab:
            tokenizer.pad_token = tok
            log(f"data: the tokenizer has no pad token; using {tok!r} (not the end-of-turn token {eot!r})")
            return None
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    log(
        "warning: the tokenizer has no pad token and no spare special token; added '<|pad|>' "
        f"(id {tokenizer.pad_token_id}): the model's embeddings must be resized to {len(tokenizer)} "
        "(model.resize_token_embeddings(len(tokenizer)))"
    )
    return "<|pad|>"


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _as_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


class Encoder:
    """Tokenizes a normalised row into (input_ids, mask) exactly as TRL 1.15/1.16's SFTTrainer does,
    or, for assistant-only loss with a template without generation markers, with assistant spans
    found by rendering the conversation turn by turn."""

    def __init__(
        self, tokenizer, *, assistant_only: bool, completion_only: bool, markers: bool, eot: str | None
    ):
        self.tok = tokenizer
        self.assistant_only = assistant_only
        self.completion_only = completion_only
        self.markers = markers
        self.eot = eot

    # -- conversations
    def _chat(self, messages: list[dict], tools: list[dict] | None = None, **kw) -> dict:
        if tools:
            kw["tools"] = tools
        out = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        return {k: _as_list(v) for k, v in out.items() if k in ("input_ids", "assistant_masks")}

    def _chat_with_assistant_mask(
        self, messages: list[dict], tools: list[dict] | None
    ) -> tuple[list[int], list[int]]:
        if self.markers:
            out = self._chat(messages, tools, return_assistant_tokens_mask=True)
            return out["input_ids"], out["assistant_masks"]
        return self.own_assistant_mask(messages, tools)

    def check_tools(self, row: dict, ids: list[int]) -> None:
        """A row with tool definitions or calls: every function name must show in the encoded text, or
        the template dropped them (most templates without tool support ignore `tools` silently)."""
        names = tool_names(row)
        if not names:
            return
        text = self.tok.decode(ids)
        missing = [n for n in dict.fromkeys(names) if n not in text]
        if missing:
            what = "tool definitions (`tools`)" if row.get("tools") else "tool calls"
            raise RowProblem(
                f"the chat template drops this row's {what}: {', '.join(map(repr, missing))} does not appear in "
                "the rendered text, so the model would be trained without them. Use a template that renders "
                'tools: the model\'s own, or data.chat_template = "chatml", "qwen2.5", "llama3" or "mistral"'
            )

    def own_assistant_mask(
        self, messages: list[dict], tools: list[dict] | None = None
    ) -> tuple[list[int], list[int]]:
        """Assistant answers (and the end-of-turn token after each) found by rendering turn by turn."""
        tok = self.tok
        kw = {"tools": tools} if tools else {}
        full = tok.apply_chat_template(messages, tokenize=False, **kw)
        spans = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = -1
            if i > 0:
                before = tok.apply_chat_template(
                    messages[:i], tokenize=False, add_generation_prompt=True, **kw
                )
                if full.startswith(before) and len(before) >= cursor:
                    start = len(before)
            # a tool call without text is found by its function's name
            content = m["content"].strip() or next(
                (c["function"]["name"] for c in m.get("tool_calls") or []), ""
            )
            at = full.find(content, max(start, cursor))
            if start < 0:
                start = at
            if at < 0 or start < 0:
                raise RowProblem(
                    f"cannot find assistant message {i + 1} in the rendered conversation: the chat template "
                    "changes earlier turns as later ones are added. Use a template with {% generation %} "
                    'markers (data.chat_template = "chatml", ...)'
                )
            upto = tok.apply_chat_template(messages[: i + 1], tokenize=False, **kw)
            limit = len(upto) if full.startswith(upto) and len(upto) > start else len(full)
            end = limit
            if self.eot:
                k = full.find(self.eot, at + len(content), limit)
                if k >= 0:
                    end = k + len(self.eot)
            spans.append((start, end))
            cursor = end
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = _as_list(enc["input_ids"])
        mask = [0] * len(ids)
        for j, (a, b) in enumerate(enc["offset_mapping"]):
            if any(a < e and b > s for s, e in spans):
                mask[j] = 1
        return ids, mask

    # -- any row
    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        from jinja2 import TemplateError

        try:
            ids, mask = self._encode(row)
        except TemplateError as e:
            raise RowProblem(f"the chat template fails on this row: {e}") from None
        except (OverflowError, RecursionError, MemoryError) as e:
            # jinja's sandbox refuses range(10**8) with an OverflowError; a template can recurse forever
            raise RowProblem(f"the chat template fails on this row: {type(e).__name__}: {e}") from None
        self.check_tools(row, ids)
        return ids, mask

    def _encode(self, row: dict) -> tuple[list[int], list[int]]:
        tok = self.tok
        tools = row.get("tools")
        if "messages" in row:
            if self.assistant_only:
                return self._chat_with_assistant_mask(row["messages"], tools)
            ids = self._chat(row["messages"], tools)["input_ids"]
            return ids, [1] * len(ids)
        if "prompt" in row:
            if isinstance(row["prompt"], list):
                prompt_ids = self._chat(row["prompt"], tools, add_generation_prompt=True)["input_ids"]
                both = row["prompt"] + row["completion"]
                if self.assistant_only:
                    ids, amask = self._chat_with_assistant_mask(both, tools)
                else:
                    ids = self._chat(both, tools)["input_ids"]
                    amask = None
            else:
                eos = tok.eos_token or ""
                completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
                prompt_ids = _as_list(tok(text=row["prompt"])["input_ids"])
                ids = _as_list(tok(text=row["prompt"] + completion)["input_ids"])
                amask = None
            n = _common_prefix_length(prompt_ids, ids)
            mask = [0] * n + [1] * (len(ids) - n) if self.completion_only else [1] * len(ids)
            if amask is not None:
                mask = [a & b for a, b in zip(mask, amask, strict=False)]
            return ids, mask
        eos = tok.eos_token or ""
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = _as_list(tok(text=text)["input_ids"])
        return ids, [1] * len(ids)


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of 1s."""
    out, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


def check_end_of_turn(examples: list[Example], tokenizer, required: str | None, template: str | None) -> None:
    """Every trained span (an answer) of the first examples must include the end-of-turn token."""
    if required is None:
        raise DataError(
            "the tokenizer has no eos token, so no example can teach the model to stop; use a tokenizer with one"
        )
    rid = tokenizer.convert_tokens_to_ids(required)
    for ex in examples[:EOT_CHECK_EXAMPLES]:
        for s, e in _runs(ex.mask):
            if rid not in ex.input_ids[s:e]:
                answer = tokenizer.decode(ex.input_ids[s:e])
                raise DataError(
                    f"{ex.where}: the end-of-turn token {required!r} after the answer {short(answer)!r} carries no "
                    f"loss under the chat template ({template or 'none'}), so the model would never learn to stop. "
                    "Use a template whose {% generation %} block includes the end-of-turn token "
                    '(data.chat_template = "chatml", "llama3", "mistral", "qwen2.5" or "gemma", matching the '
                    "model's tokens), or set data.assistant_only_loss = false"
                )


def labels(input_ids: list[int], mask: list[int], limit: int | None = None) -> list[int]:
    """The labels a model is trained (or scored) on: each token id where its mask is 1, IGNORE_INDEX
    where it is 0; both cut to the first `limit` tokens (TRL's `truncation_mode = "keep_start"`)."""
    ids = input_ids if limit is None else input_ids[:limit]
    return [i if m else IGNORE_INDEX for i, m in zip(ids, mask, strict=False)]


def collate(items: list[dict], *, max_length: int, pad_id: int) -> dict:
    """Encoded examples [{"input_ids", "mask"}] -> one right-padded batch of tensors: `input_ids`,
    `attention_mask` and `labels` (`labels` above; IGNORE_INDEX on padding), each cut to `max_length`.
    The batch fastsft scores held-out loss on (`fastsft.loss.held_out.held_out_loss`)."""
    import torch

    rows = [(it["input_ids"][:max_length], labels(it["input_ids"], it["mask"], max_length)) for it in items]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[r, : len(ids)] = 1
        label_ids[r, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}


def truncation_limit(spec) -> int | None:
    """The tokens of an example that training sees: data.max_length, or all of them under wrapped packing."""
    d = spec.data
    if d.packing and d.packing_strategy == "wrapped":
        return None  # wrapped packing keeps every token
    return d.max_length


def encode_all(
    examples: list[Example], encoder: Encoder, limit: int | None, on_invalid: str, info: dict, *, advance=None
) -> tuple[list[Example], dict]:
    """Tokenize every example; refuse or skip those left without a trained token. `advance(n)` (a
    progress bar) is told every 256 examples."""
    kept: list[Example] = []
    problems: list[str] = []
    truncated = lost = 0
    for i, ex in enumerate(examples):
        if advance is not None and i and i % 256 == 0:
            advance(256)
        try:
            ex.input_ids, ex.mask = encoder.encode(ex.row)
            if not any(ex.mask):
                raise RowProblem("no token carries loss: the chat template marks no assistant tokens")
            if limit is not None and len(ex.input_ids) > limit:
                kept_trained = sum(ex.mask[:limit])
                if kept_trained == 0:
                    first = ex.mask.index(1)
                    raise RowProblem(
                        f"no token carries loss after truncation to max_length = {limit}: the first answer starts "
                        f"at token {first + 1} of {len(ex.input_ids)}. Raise data.max_length or shorten the example"
                    )
                truncated += 1
                lost += sum(ex.mask[limit:])
        except RowProblem as e:
            message = f"{ex.where}: {e}"
            if on_invalid == "error":
                raise DataError(message + skip_hint()) from None
            problems.append(message)
            continue
        kept.append(ex)
    if problems:
        info["skipped"] += len(problems)
        info["skip_reasons"] = (info["skip_reasons"] + problems)[:MAX_SKIP_REASONS]
        check_skips(info["name"], info)
    return kept, {"truncated_examples": truncated, "answer_tokens_lost": lost}
