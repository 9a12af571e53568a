"""Every recipe under recipes/ (globbed: a new one is checked without being listed) passes
`fastsft validate`, `fastsft data preview -n 1` and `fastsft plan` as a user would run them: exit 0, or exit 2 with
fastsft's one error paragraph when the only cause is something this machine lacks (a hub model not in
the cache with the hub offline, an optional package, a model file); never a traceback. (A renamed
function once made `validate recipes/smollm2_135m_mix.toml` crash with an AttributeError; `plan` crashed on
the built-in and GGUF models, and on hub ids it did not know.)"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import RECIPES

SHIPPED = sorted(RECIPES.glob("*.toml"))
# what may stop a shipped recipe on a machine without a network, a GPU or the optional extras
MISSING = ("not in the local cache", "not installed", "pip install", "no such file", "does not exist")


def test_the_glob_finds_the_shipped_recipes():
    assert {"tiny.toml", "smollm2_135m_mix.toml"} <= {p.name for p in SHIPPED}


COMMANDS = (["validate"], ["data", "preview", "-n", "1"], ["plan", "--json"])


def _slow(recipe, command):
    """`plan` of any model but the built-in tiny one simulates its memory (10-25 s each on a 2-core CPU), and
    the first preview of a smollm2_135m recipe reads the real model's GGUF (26 s, whichever runs first): in
    the full suite, not the edit loop (tiny's plan and every `validate` stay in it)."""
    if command[0] == "plan":
        return recipe.stem != "tiny"
    return command[0] == "data" and recipe.stem.startswith("smollm2_135m")


@pytest.mark.parametrize(
    ("recipe", "command"),
    [
        pytest.param(r, c, id=f"{r.stem}-{' '.join(c)}", marks=[pytest.mark.slow] if _slow(r, c) else [])
        for r in SHIPPED
        for c in COMMANDS
    ],
)
def test_a_shipped_recipe_validates_and_previews(recipe, command, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same answer with or without a network
    result = CliRunner().invoke(main, [*command, str(recipe)])
    out = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{recipe.name}: {' '.join(command)} raised {result.exception!r}\n{out}"
    )
    assert "Traceback" not in out, out
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (result.exit_code, out)
    error = out[out.index("error:") :].lower() if "error:" in out else ""
    assert error and any(m in error for m in MISSING), f"{recipe.name}: not a missing-file error:\n{out}"
