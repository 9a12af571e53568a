"""One loading policy for every command: remote code and pickle weights only when the command line
grants them (--trust-remote-code, --allow-pickle), never because a recipe or a received folder says so."""

import json

import pytest
from click.testing import CliRunner

from fastsft.cli.main import main

from _tiny import TINY_RECIPE

pytestmark = pytest.mark.filterwarnings("ignore")


def _refused(args, expect):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert result.exc_info[0] is SystemExit and "Traceback" not in result.output
    assert expect in result.output, result.output
    return result


def test_a_received_run_cannot_turn_on_remote_code(tmp_path, tiny_model_dir):
    """A run directory whose recipe.toml asks for remote code is refused by every command that loads
    it, before anything is loaded."""
    run = tmp_path / "received"
    (run / "adapter").mkdir(parents=True)
    recipe = TINY_RECIPE.replace('name = "builtin:tiny-mistral"', f'name = "{tiny_model_dir}"')
    recipe = recipe.replace("load_in_4bit = false", "load_in_4bit = false\ntrust_remote_code = true")
    (run / "recipe.toml").write_text(recipe)
    (run / "run.json").write_text(json.dumps({"status": "finished", "model_path": str(tiny_model_dir)}))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    for args in (
        ["generate", str(run), "--prompt", "hi"],
        ["chat", str(run)],
        ["serve", str(run), "--port", "0"],
        ["eval", str(run)],
        ["export", str(run), "--format", "adapter", "--to", str(tmp_path / "x")],
        ["run", str(run / "recipe.toml"), "-o", str(tmp_path / "new")],
        ["data", "preview", str(run / "recipe.toml")],
    ):
        _refused(args, "--trust-remote-code")
    assert not (tmp_path / "x").exists() and not (tmp_path / "new").exists()


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # as older checkpoints come
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    _refused(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"], "--allow-pickle")
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.replace('name = "builtin:tiny-mistral"', f'name = "{folder}"'))
    _refused(["run", str(recipe), "-o", str(tmp_path / "run")], "--allow-pickle")
    assert not (tmp_path / "run").exists()
    # a recipe's allow_pickle = true grants nothing by itself
    recipe.write_text(
        recipe.read_text().replace("load_in_4bit = false", "load_in_4bit = false\nallow_pickle = true")
    )
    _refused(["run", str(recipe), "-o", str(tmp_path / "run")], "--allow-pickle")

    allowed = CliRunner().invoke(
        main, ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2", "--allow-pickle"]
    )
    assert allowed.exit_code == 0, allowed.output


class _Runs:
    """An object whose unpickling would call a function: torch's safe loader refuses it."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_allow_pickle_on_a_pickle_the_safe_loader_refuses_is_a_clear_error(tmp_path, tiny_model_dir):
    """--allow-pickle reads pickles through torch.load(weights_only=True); one holding a callable was a
    traceback (UnpicklingError, #28)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path / "blocked"
    AutoConfig.from_pretrained(tiny_model_dir).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    torch.save({"x": _Runs()}, folder / "pytorch_model.bin")
    result = _refused(
        ["generate", str(folder), "--prompt", "hi", "--allow-pickle"], "torch's safe loader refused"
    )
    assert str(folder) in result.output and "safetensors" in result.output and "GLOBAL" in result.output
