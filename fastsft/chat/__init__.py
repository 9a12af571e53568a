"""Conversations as token ids, one owner for training and use.

templates   the chat templates (ChatML and the tokenizer's own), role markers, the end-of-turn token
generation  `generate_ids`: the one place that calls `model.generate`, stopping on the end of a turn
tools       tool calls in an answer read back into OpenAI's `tool_calls`
"""
