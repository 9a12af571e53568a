"""`fastsft serve`: an OpenAI-compatible HTTP server (chat completions, completions, models) and a
chat page, on a model loaded once.

app     the protocol (request parsing, stops, tool calls), the engine (one generation at a time,
        streaming) and the Starlette app
static/ the chat page
"""

from .app import (
    ServeSettings,
    create_app,
    cut_at_stop,
    parse_tool_calls,
    serve,
)

__all__ = [
    "ServeSettings",
    "create_app",
    "cut_at_stop",
    "parse_tool_calls",
    "serve",
]
