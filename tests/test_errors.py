"""fastsft.errors: the errors a user can cause, their exit codes, and a recipe's problems all in one
message."""

import signal

import pytest

from fastsft import errors as E


def test_every_user_error_exits_2_and_is_an_error():
    for cls in (E.RecipeError, E.DataError, E.BackendError, E.RunDirError, E.ExportError, E.TrainingStopped):
        err = cls("x")
        assert isinstance(err, E.FastSFTError) and err.exit_code == 2 and err.is_error
    assert E.OutOfMemory("x").exit_code == 3 and isinstance(E.OutOfMemory("x"), E.TrainingStopped)


def test_one_recipe_problem_or_several():
    one = E.RecipeError("[train] seed = -1: must be >= 0", path="r.toml")
    assert str(one) == "r.toml: [train] seed = -1: must be >= 0" and one.problems == [
        "[train] seed = -1: must be >= 0"
    ]
    two = E.RecipeError(["first", "second"], path="r.toml")
    assert str(two) == "r.toml: 2 problems in the recipe:\n  - first\n  - second"
    assert str(E.RecipeError(["only"])) == "only"  # no path: no prefix


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_exits_as_the_shell_reports_its_signal(name, code):
    err = E.Interrupted("stopped; resume with ...", signal_name=name)
    assert err.exit_code == code == 128 + int(getattr(signal, name))
    assert not err.is_error and isinstance(err, E.TrainingStopped)
