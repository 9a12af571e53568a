"""The command line: `fastsft <command>`, one function per command, errors printed once.

main      the click group: run, validate, schema, doctor, data preview; `entry` (the console script)
          and `handle_errors` (a fastsft error -> its paragraph and exit 2, no traceback)
use       the commands that use a trained model: export, generate, chat, eval, serve
common    the options and helpers both share (loading policy, model references)
doctor    `fastsft doctor`: what this machine can run
"""

from .main import entry

__all__ = ["entry"]
