"""What every `fastsft` command shares: printing fastsft errors once (no traceback, exit 2) and the
options that say what loading a model may do. A leaf of the CLI: main.py and use.py import it,
never each other's internals.
"""

from __future__ import annotations

import functools
import sys

import click

from fastsft.backends.common import LoadPolicy
from fastsft.errors import FastSFTError


def _fail(message: str, code: int = 2, *, label: str = "error: ", style: str = "bold red"):
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text(label, style=style) + Text(message), highlight=False, soft_wrap=True)
    sys.exit(code)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FastSFTError as e:
            if e.is_error:
                _fail(str(e), e.exit_code)
            _fail(str(e), e.exit_code, label="stopped: ", style="bold yellow")  # a stop the user asked for
        except KeyboardInterrupt:
            _fail("interrupted", 130, label="stopped: ", style="bold yellow")

    return wrapper


def policy_options(fn):
    """--trust-remote-code and --allow-pickle: what loading a model may do (backends.LoadPolicy), the same
    for every command that loads one. A recipe or a received folder never grants them."""
    fn = click.option(
        "--allow-pickle",
        is_flag=True,
        help="Read pickle (.bin) weights, which can run code when loaded (default: safetensors only).",
    )(fn)
    fn = click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Let the model's repository run its own Python code (needed when the recipe sets "
        "[model] trust_remote_code = true). Only for code you trust.",
    )(fn)
    return fn


def make_policy(trust_remote_code: bool, allow_pickle: bool):
    return LoadPolicy(trust_remote_code=bool(trust_remote_code), allow_pickle=bool(allow_pickle))


tools_option = click.option(
    "--tools",
    "tools_file",
    type=click.Path(dir_okay=False),
    help='A JSON file of function definitions ([{"type": "function", "function": {...}}]) to offer the model.',
)


__all__ = ["handle_errors", "make_policy", "policy_options", "tools_option"]
