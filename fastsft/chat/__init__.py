"""Conversations as token ids, one owner for training and use.

templates   the chat templates (ChatML and the tokenizer's own), role markers, the end-of-turn token
generation  `generate_ids` / `answer_batch`: the one place that calls `model.generate`, stopping on the end
            of a turn (one prompt, or many in left-padded batches)
scoring     answers against the expected ones: exact, normalised, class accuracy and confusion
tools       tool calls in an answer read back into OpenAI's `tool_calls`
"""
