"""`python -m fastsft.cli ...`: the same as the `fastsft` command."""

from .main import entry

entry()
