"""`fastsft serve`: an OpenAI-compatible HTTP server (chat completions, completions, models) and a
chat page, on a model loaded once.

protocol  settings, OpenAI-shaped errors, request bodies read into checked parameters, stop strings
engine    one worker thread answering requests, in turn between clients, streamed or whole
wire      the answers' wire format: OpenAI-shaped error responses, usage, server-sent event chunks
transport what HTTP may do before the app: header deadline, the connection budget, loopback Host names
app       the Starlette app (routes, streaming, the API key, the page) and `serve`
static/   the chat page
"""

from .app import create_app, serve
from .protocol import ServeSettings, cut_at_stop

__all__ = ["ServeSettings", "create_app", "cut_at_stop", "serve"]
