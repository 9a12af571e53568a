"""fastsft/cli/common.py: what every command shares: a fastsft error printed once as one paragraph with its
exit code (no traceback), a stop the user asked for said as a stop, a bug of ours keeping its traceback;
and the loading options, which only the command line grants."""

import click
import pytest
from click.testing import CliRunner

from fastsft.cli.common import handle_errors, make_policy, policy_options
from fastsft.errors import DataError, Interrupted, OutOfMemory


def run(exc):
    @click.command()
    @handle_errors
    def cmd():
        raise exc

    return CliRunner().invoke(cmd, [])


@pytest.mark.parametrize(
    "exc, code, said",
    [
        (DataError("train.jsonl line 3: not valid JSON"), 2, "error: train.jsonl line 3: not valid JSON"),
        (OutOfMemory("out of memory during training"), 3, "error: out of memory during training"),
        (
            Interrupted("a checkpoint was written", signal_name="SIGTERM"),
            143,
            "stopped: a checkpoint was written",
        ),
        (KeyboardInterrupt(), 130, "stopped: interrupted"),
    ],
)
def test_a_users_error_or_stop_is_one_paragraph_and_its_exit_code(exc, code, said):
    result = run(exc)
    assert result.exit_code == code
    assert result.stderr.strip() == said and "Traceback" not in result.output


def test_a_bug_of_ours_keeps_its_traceback():
    result = run(ZeroDivisionError("ours"))
    assert isinstance(result.exception, ZeroDivisionError) and result.exit_code == 1


def test_only_the_command_line_grants_remote_code_or_pickle():
    @click.command()
    @policy_options
    def cmd(trust_remote_code, allow_pickle):
        p = make_policy(trust_remote_code, allow_pickle)
        click.echo(f"{p.trust_remote_code} {p.allow_pickle}")

    assert CliRunner().invoke(cmd, []).output == "False False\n"
    assert CliRunner().invoke(cmd, ["--trust-remote-code", "--allow-pickle"]).output == "True True\n"
    assert CliRunner().invoke(cmd, ["--allow-pickle"]).output == "False True\n"
